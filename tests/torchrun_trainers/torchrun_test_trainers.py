"""Plugin trainers as the torchrun tests run them (this folder goes on ``nnUNet_extTrainer`` in tests/test_torchrun.py):
a checkpoint every epoch (so that a killed worker has a ``checkpoint_latest.pth`` to resume from), no closing
validation (nnU-Net's, not the plugin's; it would take most of the test's time), and, at the end of training, a file
per rank with the SHA-256 of the weights that rank holds (only rank 0 writes a checkpoint, so that the other ranks'
weights can be compared with it).
"""
import hashlib
import os

import torch.distributed as dist

from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS, nnUNetTrainerMedNeXtS_PretrainTokenCL


def weights_file(rank: int) -> str:
    """Name of the file in the fold folder with rank ``rank``'s hash."""
    return f'weights_rank{rank}.sha256'


class RankWeights:
    """Mixin: after training, every rank writes the hash of its model's state dict (without the DDP wrapper)."""

    save_every = 1

    def on_train_end(self):
        super().on_train_end()
        model = self.network.module if self.is_ddp else self.network
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        with open(os.path.join(self.output_folder, weights_file(dist.get_rank() if self.is_ddp else 0)), 'w') as f:
            f.write(digest.hexdigest())

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file('no closing validation in this test trainer')


class nnUNetTrainerMedNeXtS_torchrun(RankWeights, nnUNetTrainerMedNeXtS):
    """MedNeXt-S, supervised."""


class nnUNetTrainerMedNeXtS_PretrainTokenCL_torchrun(RankWeights, nnUNetTrainerMedNeXtS_PretrainTokenCL):
    """MedNeXt-S, token-level contrastive pre-training."""
