"""nnU-Net's own network of the plans (PlainConvUNet, or ResidualEncoderUNet on ResEnc plans), the network nnU-Net's
``nnUNetTrainer`` trains and fine-tunes with ``-pretrained_weights``: its pre-training trainers, and its fine-tuning
trainer with the warm-up."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_plugins.pretraining import MAE, RCR, PretrainingTrainer, TokenBYOL, TokenCL
from nnunet_plugins.training.base import Role
from nnunet_plugins.training.schedule import FINETUNE_WARMUP_EPOCHS, WarmupPolyLRScheduler


class nnUNetTrainer_Finetune(nnUNetTrainer):
    """nnU-Net's network of the plans, fine-tuning: nnU-Net's SGD, 50-epoch linear warm-up, then poly decay.

    Everything else is ``nnUNetTrainer``'s (its initial learning rate 0.01 included; declare ``initial_lr`` on a
    subclass for the nnU-Net team's 1e-3 of nnssl fine-tuning); ``warmup_epochs`` is a class setting, as on the
    plugin trainers. It is not a plugin trainer: the plugin's environment variables and fold check do not apply.
    """
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS

    def configure_optimizers(self):
        """``nnUNetTrainer``'s SGD (Nesterov, momentum 0.99) with the warm-up before nnU-Net's poly decay."""
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        warmup = min(type(self).warmup_epochs, self.num_epochs - 1)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup)


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
