"""MedNeXt trainers: ``nnUNetTrainerMedNeXt{S,B,M,L}`` (kernel 3) and ``..._k5`` (kernel 5, from scratch).

Optimiser as in the reference's nnU-Net trainer: AdamW, learning rate 1e-3, weight decay 3e-5 and
eps 1e-4 (eps 1e-8 gave NaN losses under fp16), poly decay, gradient-norm clipping at 12 (nnU-Net's).
"""
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_plugins import settings
from nnunet_plugins.networks.mednext import MAX_LEVELS, mednext_from_plan
from nnunet_plugins.training.base import nnUNetTrainerPlugin


class MedNeXtTrainer(nnUNetTrainerPlugin):
    """Shared by the MedNeXt trainers, which set ``variant`` and ``kernel_size``."""

    variant: str
    kernel_size: int
    initial_lr = 1e-3
    weight_decay = 3e-5
    adam_eps = 1e-4

    @classmethod
    def network_strides(cls, configuration_manager: ConfigurationManager) -> list[list[int]]:
        strides, _ = cls.plan_topology(configuration_manager)
        return strides[:MAX_LEVELS]

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        cls.check_patch_size(configuration_manager)
        strides, kernel_sizes = cls.plan_topology(configuration_manager)
        return mednext_from_plan(cls.variant, cls.kernel_size, num_input_channels, num_output_channels,
                                 strides, kernel_sizes, deep_supervision=enable_deep_supervision,
                                 gradient_checkpointing=settings.flag(settings.CHECKPOINTING))


    def initialize(self):
        super().initialize()
        network = self.plain_network()
        self.print_to_log_file(
            f'MedNeXt-{self.variant} k{self.kernel_size}: {len(network.strides)} levels, strides {network.strides}, '
            f'kernels {network.kernel_sizes}, {sum(p.numel() for p in network.parameters()):,} parameters, '
            f'gradient checkpointing {"on" if network.gradient_checkpointing else "off"}')


class nnUNetTrainerMedNeXtS(MedNeXtTrainer):
    """MedNeXt-S, kernel 3 (5.6M parameters)."""
    variant, kernel_size = 'S', 3


class nnUNetTrainerMedNeXtB(MedNeXtTrainer):
    """MedNeXt-B, kernel 3 (10.5M parameters)."""
    variant, kernel_size = 'B', 3


class nnUNetTrainerMedNeXtM(MedNeXtTrainer):
    """MedNeXt-M, kernel 3 (17.6M parameters, gradient checkpointing)."""
    variant, kernel_size = 'M', 3


class nnUNetTrainerMedNeXtL(MedNeXtTrainer):
    """MedNeXt-L, kernel 3 (61.8M parameters, gradient checkpointing)."""
    variant, kernel_size = 'L', 3


class nnUNetTrainerMedNeXtS_k5(MedNeXtTrainer):
    """MedNeXt-S, kernel 5, from scratch (5.9M parameters)."""
    variant, kernel_size = 'S', 5


class nnUNetTrainerMedNeXtB_k5(MedNeXtTrainer):
    """MedNeXt-B, kernel 5, from scratch (11.0M parameters)."""
    variant, kernel_size = 'B', 5


class nnUNetTrainerMedNeXtM_k5(MedNeXtTrainer):
    """MedNeXt-M, kernel 5, from scratch (18.3M parameters, gradient checkpointing)."""
    variant, kernel_size = 'M', 5


class nnUNetTrainerMedNeXtL_k5(MedNeXtTrainer):
    """MedNeXt-L, kernel 5, from scratch (63.0M parameters, gradient checkpointing)."""
    variant, kernel_size = 'L', 5
