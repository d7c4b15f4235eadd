"""Re-exports the MedNeXt trainers for nnU-Net's trainer search (see __init__.py)."""
from nnunet_plugins.training.mednext import (  # noqa: F401
    nnUNetTrainerMedNeXtB, nnUNetTrainerMedNeXtB_k5, nnUNetTrainerMedNeXtL, nnUNetTrainerMedNeXtL_k5,
    nnUNetTrainerMedNeXtM, nnUNetTrainerMedNeXtM_k5, nnUNetTrainerMedNeXtS, nnUNetTrainerMedNeXtS_k5)
