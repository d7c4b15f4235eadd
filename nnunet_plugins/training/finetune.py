"""Fine-tuning trainers: each network family's trainer with the nnU-Net team's fine-tuning schedule, a 50-epoch
linear warm-up of the learning rate, then poly decay over the other 950 epochs.

Start them from pre-trained weights with the stock flag: ``nnUNetv2_train D CONFIGURATION FOLD -tr
nnUNetTrainerSwinUNETR_Finetune -pretrained_weights FILE`` (FILE a pre-training run's ``checkpoint_final.pth``,
or what ``nnunet-plugins adapt-weights`` made of an encoder-only or foreign checkpoint). One class per family
that has a pre-training trainer; other settings (freezing the encoder, another warm-up) are two-line subclasses
(``warmup_epochs``, ``freeze_encoder_epochs``: see :class:`~nnunet_plugins.training.base.nnUNetTrainerPlugin`).
"""
from nnunet_plugins.training.base import Role
from nnunet_plugins.training.mednext import (nnUNetTrainerMedNeXtB, nnUNetTrainerMedNeXtL, nnUNetTrainerMedNeXtM,
                                             nnUNetTrainerMedNeXtS)
from nnunet_plugins.training.swinunetr import nnUNetTrainerSwinUNETR
from nnunet_plugins.training.utnetv2 import nnUNetTrainerUTNetV2
from nnunet_plugins.training.uxnet import nnUNetTrainerUXNet

FINETUNE_WARMUP_EPOCHS = 50  # the nnU-Net team's default for 1000-epoch fine-tuning


class nnUNetTrainerMedNeXtS_Finetune(nnUNetTrainerMedNeXtS):
    """MedNeXt-S k3, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerMedNeXtB_Finetune(nnUNetTrainerMedNeXtB):
    """MedNeXt-B k3, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerMedNeXtM_Finetune(nnUNetTrainerMedNeXtM):
    """MedNeXt-M k3, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerMedNeXtL_Finetune(nnUNetTrainerMedNeXtL):
    """MedNeXt-L k3, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerUXNet_Finetune(nnUNetTrainerUXNet):
    """3D UX-Net, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerUTNetV2_Finetune(nnUNetTrainerUTNetV2):
    """UTNetV2, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerSwinUNETR_Finetune(nnUNetTrainerSwinUNETR):
    """Swin UNETR, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS
