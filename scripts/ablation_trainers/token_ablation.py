"""Ablations of token-level pre-training (paper 004, Table 4 in small) for scripts/pretraining_label_efficiency.py
--trainer-folder: eq. 3's weight w (1: the paper's "without weight"; 0: no same-position terms at all) and
rotate-and-restore, each changed alone."""
from nnunet_plugins.pretraining import TokenCL
from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS_PretrainTokenCL


class nnUNetTrainerMedNeXtS_PretrainTokenCLw1(nnUNetTrainerMedNeXtS_PretrainTokenCL):
    """w = 1: eq. 1, plain token NT-Xent (Table 4 without the weight)."""
    method = TokenCL(same_position_weight=1.0)


class nnUNetTrainerMedNeXtS_PretrainTokenCLw0(nnUNetTrainerMedNeXtS_PretrainTokenCL):
    """w = 0: the same position in the other volumes of the anchor's view is no negative (what those terms do)."""
    method = TokenCL(same_position_weight=0.0)


class nnUNetTrainerMedNeXtS_PretrainTokenCLnorestore(nnUNetTrainerMedNeXtS_PretrainTokenCL):
    """No spatial transform, so nothing to restore (Table 4 without Gamma_s)."""
    method = TokenCL(rotate_and_restore=False)
