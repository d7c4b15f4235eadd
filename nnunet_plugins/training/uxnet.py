"""3D UX-Net trainer: ``nnUNetTrainerUXNet``.

The network's downsampling follows the plans (see :mod:`nnunet_plugins.networks.uxnet`); the ``2d``
configuration trains the 2d version of the same network.

No deep supervision, as in the reference and in the MedNeXt authors' nnU-Net baseline of UX-Net: the
network has one output, so the parameter count stays the reference's and checkpoints load strictly.

Optimiser: AdamW with poly decay per epoch and nnU-Net's gradient-norm clipping at 12.

- Learning rate 2.5e-3, as the MedNeXt authors trained UX-Net inside nnU-Net (the paper's 1e-4 belongs to
  40,000 iterations with a plateau schedule and learned much more slowly on nnU-Net's schedule).
- eps 1e-4, as in the MedNeXt authors' UX-Net trainer, whose comment says 1e-8 may give NaNs in fp16.
- Weight decay 1e-3: AdamW shrinks the weights by learning rate x weight decay per iteration, so the paper's
  0.08 at 25 times its learning rate would decay 25 times faster. 1e-3 gives the paper's total decay over
  nnU-Net's schedule: 2.5e-3 x 1e-3 x 250,000 iterations x 1/1.9 (mean of poly decay) = 0.33, against the
  paper's 1e-4 x 0.08 x 40,000 = 0.32.
"""
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_plugins.networks.topology import Levels
from nnunet_plugins.networks.uxnet import uxnet_from_plan, uxnet_levels
from nnunet_plugins.pretraining import MAE, RCR, PretrainingTrainer, TokenBYOL, TokenCL
from nnunet_plugins.training.base import Role, nnUNetTrainerPlugin
from nnunet_plugins.training.schedule import FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerUXNet(nnUNetTrainerPlugin):
    """3D UX-Net (53.0M parameters), no deep supervision."""

    initial_lr = 2.5e-3
    weight_decay = 1e-3
    adam_eps = 1e-4
    enable_deep_supervision = False
    undefined_on_one_voxel = 'instance norm is undefined'

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, deep_supervision: bool) -> nn.Module:
        return uxnet_from_plan(num_input_channels, num_output_channels, *cls.plan_topology(configuration_manager))

    @classmethod
    def network_levels(cls, configuration_manager: ConfigurationManager) -> Levels:
        return uxnet_levels(*cls.plan_topology(configuration_manager))

    @classmethod
    def network_name(cls) -> str:
        return '3D UX-Net'


# ---- fine-tuning and pre-training (declared here, with the network they train; `nnunet-plugins trainers` lists them)


class nnUNetTrainerUXNet_Finetune(nnUNetTrainerUXNet):
    """3D UX-Net, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerUXNet_PretrainRCR(PretrainingTrainer):
    """RCR pre-training of 3D UX-Net, for nnUNetTrainerUXNet."""
    network_trainer, method = nnUNetTrainerUXNet, RCR()


class nnUNetTrainerUXNet_PretrainTokenCL(PretrainingTrainer):
    """Token-level contrastive pre-training of 3D UX-Net, for nnUNetTrainerUXNet."""
    network_trainer, method = nnUNetTrainerUXNet, TokenCL()


class nnUNetTrainerUXNet_PretrainTokenBYOL(PretrainingTrainer):
    """Token-level BYOL pre-training of 3D UX-Net, for nnUNetTrainerUXNet."""
    network_trainer, method = nnUNetTrainerUXNet, TokenBYOL()


class nnUNetTrainerUXNet_PretrainMAE(PretrainingTrainer):
    """nnssl's masked-image modelling of the whole 3D UX-Net (encoder and decoder), for nnUNetTrainerUXNet."""
    network_trainer, method = nnUNetTrainerUXNet, MAE()
