"""UTNetV2 trainer: ``nnUNetTrainerUTNetV2``, the paper's BCV setting on the plans' topology.

Optimiser as the authors' recipe, on nnU-Net's schedule: AdamW with learning rate 6e-4, weight decay 0.05
and eps 1e-5 (the authors' value, chosen there for fp16 stability), poly decay per epoch (the authors warm
up for 5 of 150 epochs first; nnU-Net's schedule has no warm-up), gradient-norm clipping at 12 (nnU-Net's;
the authors clip nothing). Loss: nnU-Net's Dice + cross-entropy on the main output and on the auxiliary
output, weighted 1:1 as in the authors' configuration.
"""
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_plugins.networks.utnetv2 import AUX_LEVEL, MAX_LEVELS, MIN_LEVELS, utnetv2_from_plan
from nnunet_plugins.training.base import nnUNetTrainerPlugin

AUX_LOSS_WEIGHTS = (0.5, 0.5)  # main and auxiliary output, the authors' aux_weight


class nnUNetTrainerUTNetV2(nnUNetTrainerPlugin):
    """UTNetV2 (37.4M parameters on the paper's five-level BCV plan), with its auxiliary loss."""

    initial_lr = 6e-4
    weight_decay = 0.05
    adam_eps = 1e-5
    max_levels = MAX_LEVELS
    undefined_on_one_voxel = 'instance norm and attention are undefined'

    @classmethod
    def check_patch_size(cls, configuration_manager: ConfigurationManager) -> None:
        """Also refuse plans with fewer than four levels."""
        strides = cls.network_strides(configuration_manager)
        patch_size = list(configuration_manager.patch_size)
        if len(strides) < MIN_LEVELS:
            raise ValueError(
                f'{cls.__name__} needs at least {MIN_LEVELS} resolution levels (full resolution, the stem\'s second '
                f'level, a B-MHA level and the bottleneck), but the plans configuration has {len(strides)} '
                f'(strides {strides}) for patch size {patch_size}; nnU-Net plans more levels for a larger patch. '
                + cls.patch_advice([2 * p for p in patch_size]))
        super().check_patch_size(configuration_manager)

    @classmethod
    def deep_supervision_scales(cls, configuration_manager: ConfigurationManager) -> list[list[float]]:
        """The main output at full resolution, the auxiliary one at level :data:`AUX_LEVEL`."""
        per_level = super().deep_supervision_scales(configuration_manager)
        return [per_level[0], per_level[AUX_LEVEL]]

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        cls.check_patch_size(configuration_manager)
        strides, kernel_sizes = cls.plan_topology(configuration_manager)
        return utnetv2_from_plan(num_input_channels, num_output_channels, strides, kernel_sizes,
                                 deep_supervision=enable_deep_supervision)

    def deep_supervision_weights(self) -> list[float]:
        return list(AUX_LOSS_WEIGHTS)

    def initialize(self):
        super().initialize()
        network = self.plain_network()
        self.print_to_log_file(
            f'UTNetV2: {len(network.strides)} levels, strides {network.strides}, kernels {network.kernel_sizes}, '
            f'B-MHA blocks {network.transformer_blocks} from level 2, semantic map {network.map_size}, '
            f'{sum(p.numel() for p in network.parameters()):,} parameters')
