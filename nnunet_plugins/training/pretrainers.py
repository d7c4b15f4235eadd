"""Pre-training trainers, one per network and method: RCR (:mod:`nnunet_plugins.training.rcr_pretraining`) and
token-level CL and BYOL (:mod:`nnunet_plugins.training.token_pretraining`). Each pre-trains the encoder of the network
its supervised trainer (the second base) trains, and that trainer fine-tunes from its ``checkpoint_final.pth`` with
``-pretrained_weights``."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_plugins.training.base import nnUNetTrainerPlugin
from nnunet_plugins.training.mednext import (
    nnUNetTrainerMedNeXtB, nnUNetTrainerMedNeXtL, nnUNetTrainerMedNeXtM, nnUNetTrainerMedNeXtS)
from nnunet_plugins.training.rcr_pretraining import PretrainRCR
from nnunet_plugins.training.swinunetr import nnUNetTrainerSwinUNETR
from nnunet_plugins.training.utnetv2 import nnUNetTrainerUTNetV2
from nnunet_plugins.training.token_pretraining import PretrainTokenBYOL, PretrainTokenCL
from nnunet_plugins.training.uxnet import nnUNetTrainerUXNet


class _nnUNetsNetwork(nnUNetTrainerPlugin):
    """A plugin trainer of nnU-Net's network of the plans (PlainConvUNet, or ResidualEncoderUNet on ResEnc plans), the
    network nnUNetTrainer trains; the base of the pre-training trainers for it."""

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    @classmethod
    def network_name(cls) -> str:
        return "nnU-Net's network of the plans"


class nnUNetTrainer_PretrainRCR(PretrainRCR, _nnUNetsNetwork):
    """RCR pre-training of nnU-Net's network of the plans, for nnUNetTrainer.

    The network is PlainConvUNet, or ResidualEncoderUNet on ResEnc plans.
    """


class nnUNetTrainerMedNeXtS_PretrainRCR(PretrainRCR, nnUNetTrainerMedNeXtS):
    """RCR pre-training of MedNeXt-S k3, for nnUNetTrainerMedNeXtS."""


class nnUNetTrainerMedNeXtB_PretrainRCR(PretrainRCR, nnUNetTrainerMedNeXtB):
    """RCR pre-training of MedNeXt-B k3, for nnUNetTrainerMedNeXtB."""


class nnUNetTrainerMedNeXtM_PretrainRCR(PretrainRCR, nnUNetTrainerMedNeXtM):
    """RCR pre-training of MedNeXt-M k3, for nnUNetTrainerMedNeXtM."""


class nnUNetTrainerMedNeXtL_PretrainRCR(PretrainRCR, nnUNetTrainerMedNeXtL):
    """RCR pre-training of MedNeXt-L k3, for nnUNetTrainerMedNeXtL."""


class nnUNetTrainerUXNet_PretrainRCR(PretrainRCR, nnUNetTrainerUXNet):
    """RCR pre-training of 3D UX-Net, for nnUNetTrainerUXNet."""


class nnUNetTrainerUTNetV2_PretrainRCR(PretrainRCR, nnUNetTrainerUTNetV2):
    """RCR pre-training of UTNetV2, for nnUNetTrainerUTNetV2."""


class nnUNetTrainerSwinUNETR_PretrainRCR(PretrainRCR, nnUNetTrainerSwinUNETR):
    """RCR pre-training of Swin UNETR (paper 003's recipe), for nnUNetTrainerSwinUNETR."""


class nnUNetTrainer_PretrainTokenCL(PretrainTokenCL, _nnUNetsNetwork):
    """Token-level contrastive pre-training (paper 004) of nnU-Net's network of the plans, for nnUNetTrainer."""


class nnUNetTrainerMedNeXtS_PretrainTokenCL(PretrainTokenCL, nnUNetTrainerMedNeXtS):
    """Token-level contrastive pre-training of MedNeXt-S k3, for nnUNetTrainerMedNeXtS."""


class nnUNetTrainerMedNeXtB_PretrainTokenCL(PretrainTokenCL, nnUNetTrainerMedNeXtB):
    """Token-level contrastive pre-training of MedNeXt-B k3, for nnUNetTrainerMedNeXtB."""


class nnUNetTrainerMedNeXtM_PretrainTokenCL(PretrainTokenCL, nnUNetTrainerMedNeXtM):
    """Token-level contrastive pre-training of MedNeXt-M k3, for nnUNetTrainerMedNeXtM."""


class nnUNetTrainerMedNeXtL_PretrainTokenCL(PretrainTokenCL, nnUNetTrainerMedNeXtL):
    """Token-level contrastive pre-training of MedNeXt-L k3, for nnUNetTrainerMedNeXtL."""


class nnUNetTrainerUXNet_PretrainTokenCL(PretrainTokenCL, nnUNetTrainerUXNet):
    """Token-level contrastive pre-training of 3D UX-Net, for nnUNetTrainerUXNet."""


class nnUNetTrainerUTNetV2_PretrainTokenCL(PretrainTokenCL, nnUNetTrainerUTNetV2):
    """Token-level contrastive pre-training of UTNetV2, for nnUNetTrainerUTNetV2."""


class nnUNetTrainerSwinUNETR_PretrainTokenCL(PretrainTokenCL, nnUNetTrainerSwinUNETR):
    """Token-level contrastive pre-training of Swin UNETR (paper 004's recipe), for nnUNetTrainerSwinUNETR."""


class nnUNetTrainer_PretrainTokenBYOL(PretrainTokenBYOL, _nnUNetsNetwork):
    """Token-level BYOL pre-training (paper 004) of nnU-Net's network of the plans, for nnUNetTrainer."""


class nnUNetTrainerMedNeXtS_PretrainTokenBYOL(PretrainTokenBYOL, nnUNetTrainerMedNeXtS):
    """Token-level BYOL pre-training of MedNeXt-S k3, for nnUNetTrainerMedNeXtS."""


class nnUNetTrainerMedNeXtB_PretrainTokenBYOL(PretrainTokenBYOL, nnUNetTrainerMedNeXtB):
    """Token-level BYOL pre-training of MedNeXt-B k3, for nnUNetTrainerMedNeXtB."""


class nnUNetTrainerMedNeXtM_PretrainTokenBYOL(PretrainTokenBYOL, nnUNetTrainerMedNeXtM):
    """Token-level BYOL pre-training of MedNeXt-M k3, for nnUNetTrainerMedNeXtM."""


class nnUNetTrainerMedNeXtL_PretrainTokenBYOL(PretrainTokenBYOL, nnUNetTrainerMedNeXtL):
    """Token-level BYOL pre-training of MedNeXt-L k3, for nnUNetTrainerMedNeXtL."""


class nnUNetTrainerUXNet_PretrainTokenBYOL(PretrainTokenBYOL, nnUNetTrainerUXNet):
    """Token-level BYOL pre-training of 3D UX-Net, for nnUNetTrainerUXNet."""


class nnUNetTrainerUTNetV2_PretrainTokenBYOL(PretrainTokenBYOL, nnUNetTrainerUTNetV2):
    """Token-level BYOL pre-training of UTNetV2, for nnUNetTrainerUTNetV2."""


class nnUNetTrainerSwinUNETR_PretrainTokenBYOL(PretrainTokenBYOL, nnUNetTrainerSwinUNETR):
    """Token-level BYOL pre-training of Swin UNETR, for nnUNetTrainerSwinUNETR."""
