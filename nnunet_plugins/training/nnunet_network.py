"""Pre-training of nnU-Net's own network of the plans (PlainConvUNet, or ResidualEncoderUNet on ResEnc plans), the
network nnU-Net's ``nnUNetTrainer`` trains and fine-tunes with ``-pretrained_weights``."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_plugins.pretraining import MAE, RCR, PretrainingTrainer, TokenBYOL, TokenCL


class nnUNetTrainer_PretrainRCR(PretrainingTrainer):
    """RCR pre-training of nnU-Net's network of the plans, for nnUNetTrainer.

    The network is PlainConvUNet, or ResidualEncoderUNet on ResEnc plans.
    """
    network_trainer, method = nnUNetTrainer, RCR()


class nnUNetTrainer_PretrainTokenCL(PretrainingTrainer):
    """Token-level contrastive pre-training (paper 004) of nnU-Net's network of the plans, for nnUNetTrainer."""
    network_trainer, method = nnUNetTrainer, TokenCL()


class nnUNetTrainer_PretrainTokenBYOL(PretrainingTrainer):
    """Token-level BYOL pre-training (paper 004) of nnU-Net's network of the plans, for nnUNetTrainer."""
    network_trainer, method = nnUNetTrainer, TokenBYOL()


class nnUNetTrainer_PretrainMAE(PretrainingTrainer):
    """nnssl's masked-image modelling of nnU-Net's whole network of the plans, for nnUNetTrainer.

    Encoder and decoder; the network is PlainConvUNet, or on ResEnc plans ResidualEncoderUNet, nnssl's own.
    """
    network_trainer, method = nnUNetTrainer, MAE()
