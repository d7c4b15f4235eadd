"""Ablations of token-level pre-training (paper 004, Table 4 in small) for scripts/pretraining_label_efficiency.py
--trainer-folder: eq. 3's weight w (1: the paper's "without weight"; 0: no same-position terms at all) and
rotate-and-restore, each changed alone; and the two arms of the fair optimiser re-run (AdamW and paper 004's SGD on
one schedule)."""
import dataclasses

from nnunet_plugins.pretraining import PAPER_004_SGD, TokenCL
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


# The fair optimiser re-run (issue 25): both optimisers with the same schedule (paper 004's authors': linear warm-up
# from 0 over 5% of the epochs, then cosine to 0) and the authors' weight decay 1e-5; only the algorithm and its
# learning rate differ.
class nnUNetTrainerMedNeXtS_PretrainTokenCLsgd(nnUNetTrainerMedNeXtS_PretrainTokenCL):
    """Paper 004's optimiser and its authors' schedule: SGD 1e-4, Nesterov momentum 0.99, weight decay 1e-5."""
    method = TokenCL(optimiser=PAPER_004_SGD)


class nnUNetTrainerMedNeXtS_PretrainTokenCLadamw(nnUNetTrainerMedNeXtS_PretrainTokenCL):
    """This project's AdamW (4e-4, eps 1e-4, weight decay 1e-5) on the SGD arm's schedule instead of its own."""
    method = TokenCL(optimiser=dataclasses.replace(PAPER_004_SGD, algorithm='AdamW', initial_lr=4e-4))
