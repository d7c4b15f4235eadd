"""UTNetV2 trainer: ``nnUNetTrainerUTNetV2``, the paper's BCV setting on the plans' topology.

Optimiser as the authors' recipe, on nnU-Net's schedule: AdamW with learning rate 6e-4, weight decay 0.05
and eps 1e-5 (the authors' value, chosen there for fp16 stability), poly decay per epoch (the authors warm
up for 5 of 150 epochs first; nnU-Net's schedule has no warm-up), gradient-norm clipping at 12 (nnU-Net's;
the authors clip nothing). Loss: nnU-Net's Dice + cross-entropy on the main output and on the auxiliary
output (interpolated to full resolution by the network, as the authors'), weighted 1:1 as in the authors'
configuration; both against the full-resolution labels.
"""
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_plugins.networks.topology import Levels
from nnunet_plugins.networks.utnetv2 import utnetv2_from_plan, utnetv2_levels
from nnunet_plugins.pretraining import MAE, RCR, PretrainingTrainer, TokenBYOL, TokenCL
from nnunet_plugins.training.base import Role, nnUNetTrainerPlugin
from nnunet_plugins.training.schedule import FINETUNE_WARMUP_EPOCHS

AUX_LOSS_WEIGHTS = (0.5, 0.5)  # main and auxiliary output, the authors' aux_weight


class nnUNetTrainerUTNetV2(nnUNetTrainerPlugin):
    """UTNetV2 (36.7M parameters on the paper's five-level BCV plan), with its auxiliary loss."""

    initial_lr = 6e-4
    weight_decay = 0.05
    adam_eps = 1e-5
    undefined_on_one_voxel = 'instance norm and attention are undefined'

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, deep_supervision: bool) -> nn.Module:
        return utnetv2_from_plan(num_input_channels, num_output_channels, *cls.plan_topology(configuration_manager),
                                 deep_supervision=deep_supervision)

    @classmethod
    def network_levels(cls, configuration_manager: ConfigurationManager) -> Levels:
        return utnetv2_levels(*cls.plan_topology(configuration_manager))

    @classmethod
    def deep_supervision_scales(cls, configuration_manager: ConfigurationManager) -> list[list[float]]:
        """Both outputs at full resolution."""
        full_resolution = super().deep_supervision_scales(configuration_manager)[0]
        return [full_resolution, full_resolution]

    def deep_supervision_weights(self) -> list[float]:
        return list(AUX_LOSS_WEIGHTS)


# ---- fine-tuning and pre-training (declared here, with the network they train; `nnunet-plugins trainers` lists them)


class nnUNetTrainerUTNetV2_Finetune(nnUNetTrainerUTNetV2):
    """UTNetV2, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerUTNetV2_PretrainRCR(PretrainingTrainer):
    """RCR pre-training of UTNetV2, for nnUNetTrainerUTNetV2."""
    network_trainer, method = nnUNetTrainerUTNetV2, RCR()


class nnUNetTrainerUTNetV2_PretrainTokenCL(PretrainingTrainer):
    """Token-level contrastive pre-training of UTNetV2, for nnUNetTrainerUTNetV2."""
    network_trainer, method = nnUNetTrainerUTNetV2, TokenCL()


class nnUNetTrainerUTNetV2_PretrainTokenBYOL(PretrainingTrainer):
    """Token-level BYOL pre-training of UTNetV2, for nnUNetTrainerUTNetV2."""
    network_trainer, method = nnUNetTrainerUTNetV2, TokenBYOL()


class nnUNetTrainerUTNetV2_PretrainMAE(PretrainingTrainer):
    """nnssl's masked-image modelling of the whole UTNetV2 (encoder and decoder), for nnUNetTrainerUTNetV2."""
    network_trainer, method = nnUNetTrainerUTNetV2, MAE()
