"""Swin UNETR trainer: ``nnUNetTrainerSwinUNETR``.

The patch embedding follows the plans (see :mod:`nnunet_plugins.networks.swinunetr`); the ``2d`` configuration
trains the 2d version of the same network.

No deep supervision, as in the reference: the network has one output, so the parameter count stays the
reference's and checkpoints load strictly.

Optimiser: AdamW with poly decay per epoch and nnU-Net's gradient-norm clipping at 12, as the MedNeXt authors
trained their Swin UNETR baseline inside nnU-Net (MedNeXt paper, Sec. 3.1): learning rate 2.5e-3, nnU-Net's
weight decay 3e-5, eps 1e-4 (1e-8 may give NaN losses under fp16 autocast). On synthetic data this learned
clearly faster than nnU-Net 2.8's transformer recipe (3e-4 with warm-up), the 8e-4 of other nnU-Net forks and
the authors' MONAI fine-tuning setting (1e-4), with the same iterations (README, "Training settings";
``scripts/swinunetr_learning_rates.py``).
"""
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_plugins.networks.swinunetr import swinunetr_from_plan, swinunetr_levels
from nnunet_plugins.networks.topology import Levels
from nnunet_plugins.pretraining import MAE, RCR, PretrainingTrainer, TokenBYOL, TokenCL
from nnunet_plugins.training.base import Role, nnUNetTrainerPlugin
from nnunet_plugins.training.schedule import FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerSwinUNETR(nnUNetTrainerPlugin):
    """Swin UNETR (62.2M parameters), no deep supervision."""

    initial_lr = 2.5e-3
    weight_decay = 3e-5
    adam_eps = 1e-4
    enable_deep_supervision = False
    undefined_on_one_voxel = 'instance norm is undefined'

    def initialize(self):
        super().initialize()
        patch_size = list(self.configuration_manager.patch_size)
        windows = self.plain_network().windows(patch_size)
        self.print_to_log_file(f'{self.network_name()} windows (shifts) per stage on patch {patch_size}: '
                               + ', '.join(f'{list(window)} ({list(shift)})' for window, shift in windows))

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, deep_supervision: bool) -> nn.Module:
        return swinunetr_from_plan(num_input_channels, num_output_channels, *cls.plan_topology(configuration_manager))

    @classmethod
    def network_levels(cls, configuration_manager: ConfigurationManager) -> Levels:
        return swinunetr_levels(*cls.plan_topology(configuration_manager))

    @classmethod
    def network_name(cls) -> str:
        return 'Swin UNETR'


# ---- fine-tuning and pre-training (declared here, with the network they train; `nnunet-plugins trainers` lists them)


class nnUNetTrainerSwinUNETR_Finetune(nnUNetTrainerSwinUNETR):
    """Swin UNETR, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerSwinUNETR_PretrainRCR(PretrainingTrainer):
    """RCR pre-training of Swin UNETR (paper 003's recipe), for nnUNetTrainerSwinUNETR."""
    network_trainer, method = nnUNetTrainerSwinUNETR, RCR()


class nnUNetTrainerSwinUNETR_PretrainTokenCL(PretrainingTrainer):
    """Token-level contrastive pre-training of Swin UNETR (paper 004's recipe), for nnUNetTrainerSwinUNETR."""
    network_trainer, method = nnUNetTrainerSwinUNETR, TokenCL()


class nnUNetTrainerSwinUNETR_PretrainTokenBYOL(PretrainingTrainer):
    """Token-level BYOL pre-training of Swin UNETR, for nnUNetTrainerSwinUNETR."""
    network_trainer, method = nnUNetTrainerSwinUNETR, TokenBYOL()


class nnUNetTrainerSwinUNETR_PretrainMAE(PretrainingTrainer):
    """nnssl's masked-image modelling of the whole Swin UNETR (encoder and decoder), for nnUNetTrainerSwinUNETR."""
    network_trainer, method = nnUNetTrainerSwinUNETR, MAE()
