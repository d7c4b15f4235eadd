"""The plugin's trainer classes, defined here once.

nnU-Net finds them by name through the shim modules in ``nnunet_plugins/trainers`` (the folder that
``nnunet-plugins trainers --path`` prints for ``nnUNet_extTrainer``).
"""
from nnunet_plugins.training.mednext import (
    nnUNetTrainerMedNeXtB, nnUNetTrainerMedNeXtB_k5, nnUNetTrainerMedNeXtL, nnUNetTrainerMedNeXtL_k5,
    nnUNetTrainerMedNeXtM, nnUNetTrainerMedNeXtM_k5, nnUNetTrainerMedNeXtS, nnUNetTrainerMedNeXtS_k5,
    nnUNetTrainerMedNeXtB_k5_UpKern, nnUNetTrainerMedNeXtL_k5_UpKern, nnUNetTrainerMedNeXtM_k5_UpKern,
    nnUNetTrainerMedNeXtS_k5_UpKern)
from nnunet_plugins.training.finetune import (
    nnUNetTrainerMedNeXtB_Finetune, nnUNetTrainerMedNeXtL_Finetune, nnUNetTrainerMedNeXtM_Finetune,
    nnUNetTrainerMedNeXtS_Finetune, nnUNetTrainerSwinUNETR_Finetune, nnUNetTrainerUTNetV2_Finetune,
    nnUNetTrainerUXNet_Finetune)
from nnunet_plugins.training.pretrainers import (
    nnUNetTrainer_PretrainRCR, nnUNetTrainerMedNeXtB_PretrainRCR, nnUNetTrainerMedNeXtL_PretrainRCR,
    nnUNetTrainerMedNeXtM_PretrainRCR, nnUNetTrainerMedNeXtS_PretrainRCR, nnUNetTrainerSwinUNETR_PretrainRCR,
    nnUNetTrainerUTNetV2_PretrainRCR, nnUNetTrainerUXNet_PretrainRCR,
    nnUNetTrainer_PretrainTokenCL, nnUNetTrainerMedNeXtB_PretrainTokenCL, nnUNetTrainerMedNeXtL_PretrainTokenCL,
    nnUNetTrainerMedNeXtM_PretrainTokenCL, nnUNetTrainerMedNeXtS_PretrainTokenCL,
    nnUNetTrainerSwinUNETR_PretrainTokenCL, nnUNetTrainerUTNetV2_PretrainTokenCL, nnUNetTrainerUXNet_PretrainTokenCL,
    nnUNetTrainer_PretrainTokenBYOL, nnUNetTrainerMedNeXtB_PretrainTokenBYOL, nnUNetTrainerMedNeXtL_PretrainTokenBYOL,
    nnUNetTrainerMedNeXtM_PretrainTokenBYOL, nnUNetTrainerMedNeXtS_PretrainTokenBYOL,
    nnUNetTrainerSwinUNETR_PretrainTokenBYOL, nnUNetTrainerUTNetV2_PretrainTokenBYOL,
    nnUNetTrainerUXNet_PretrainTokenBYOL)
from nnunet_plugins.training.swinunetr import nnUNetTrainerSwinUNETR
from nnunet_plugins.training.uxnet import nnUNetTrainerUXNet
from nnunet_plugins.training.utnetv2 import nnUNetTrainerUTNetV2

TRAINERS = (
    nnUNetTrainerMedNeXtS, nnUNetTrainerMedNeXtB, nnUNetTrainerMedNeXtM, nnUNetTrainerMedNeXtL,
    nnUNetTrainerMedNeXtS_k5, nnUNetTrainerMedNeXtB_k5, nnUNetTrainerMedNeXtM_k5, nnUNetTrainerMedNeXtL_k5,
    nnUNetTrainerMedNeXtS_k5_UpKern, nnUNetTrainerMedNeXtB_k5_UpKern, nnUNetTrainerMedNeXtM_k5_UpKern,
    nnUNetTrainerMedNeXtL_k5_UpKern,
    nnUNetTrainerUXNet,
    nnUNetTrainerUTNetV2,
    nnUNetTrainerSwinUNETR,
    nnUNetTrainerMedNeXtS_Finetune, nnUNetTrainerMedNeXtB_Finetune, nnUNetTrainerMedNeXtM_Finetune,
    nnUNetTrainerMedNeXtL_Finetune, nnUNetTrainerUXNet_Finetune, nnUNetTrainerUTNetV2_Finetune,
    nnUNetTrainerSwinUNETR_Finetune,
)
# trainers that build the same network as another one and differ only in how they start or schedule
VARIANT_SUFFIXES = ('_UpKern', '_Finetune')
# self-supervised pre-training of the networks' encoders (the supervised trainers above fine-tune from them)
PRETRAINERS = (
    nnUNetTrainerMedNeXtS_PretrainRCR, nnUNetTrainerMedNeXtB_PretrainRCR, nnUNetTrainerMedNeXtM_PretrainRCR,
    nnUNetTrainerMedNeXtL_PretrainRCR, nnUNetTrainerUXNet_PretrainRCR, nnUNetTrainerUTNetV2_PretrainRCR,
    nnUNetTrainerSwinUNETR_PretrainRCR, nnUNetTrainer_PretrainRCR,
    nnUNetTrainerMedNeXtS_PretrainTokenCL, nnUNetTrainerMedNeXtB_PretrainTokenCL, nnUNetTrainerMedNeXtM_PretrainTokenCL,
    nnUNetTrainerMedNeXtL_PretrainTokenCL, nnUNetTrainerUXNet_PretrainTokenCL, nnUNetTrainerUTNetV2_PretrainTokenCL,
    nnUNetTrainerSwinUNETR_PretrainTokenCL, nnUNetTrainer_PretrainTokenCL,
    nnUNetTrainerMedNeXtS_PretrainTokenBYOL, nnUNetTrainerMedNeXtB_PretrainTokenBYOL,
    nnUNetTrainerMedNeXtM_PretrainTokenBYOL, nnUNetTrainerMedNeXtL_PretrainTokenBYOL,
    nnUNetTrainerUXNet_PretrainTokenBYOL, nnUNetTrainerUTNetV2_PretrainTokenBYOL,
    nnUNetTrainerSwinUNETR_PretrainTokenBYOL, nnUNetTrainer_PretrainTokenBYOL,
)
__all__ = [trainer.__name__ for trainer in TRAINERS + PRETRAINERS]
