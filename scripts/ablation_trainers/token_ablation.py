"""Ablations of token-level pre-training (paper 004, Table 4 in small) for scripts/pretraining_label_efficiency.py
--trainer-folder: eq. 3's weight w and rotate-and-restore, each switched off alone."""
from nnunet_plugins.pretraining import TokenCL
from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS_PretrainTokenCL


class nnUNetTrainerMedNeXtS_PretrainTokenCLw0(nnUNetTrainerMedNeXtS_PretrainTokenCL):
    """w = 0: eq. 1, plain token NT-Xent."""
    method = TokenCL(same_position_weight=0.0)


class nnUNetTrainerMedNeXtS_PretrainTokenCLnorestore(nnUNetTrainerMedNeXtS_PretrainTokenCL):
    """No spatial transform, so nothing to restore (Table 4 without Gamma_s)."""
    method = TokenCL(rotate_and_restore=False)
