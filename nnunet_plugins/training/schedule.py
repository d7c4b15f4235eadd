"""The plugin trainers' learning-rate schedule: an optional linear warm-up, then nnU-Net's poly decay.

The learning rate is a function of the epoch alone (nnU-Net calls ``step(current_epoch)`` at the start of
every epoch and does not save the scheduler), so ``nnUNetv2_train --c`` resumes it exactly.
"""
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

POLY_EXPONENT = 0.9  # nnU-Net's poly decay, (1 - progress) ** 0.9; nnssl's MAE schedule uses it too
FINETUNE_WARMUP_EPOCHS = 50  # the _Finetune trainers' warm-up: the nnU-Net team's default for 1000-epoch fine-tuning


def warmup_poly_lr(epoch: int, initial_lr: float, num_epochs: int, warmup_epochs: int = 0) -> float:
    """The learning rate of ``epoch`` (0-based).

    During the first ``warmup_epochs`` epochs it rises linearly, ``initial_lr * (epoch + 1) / warmup_epochs``
    (as nnU-Net's ``Lin_incr_LRScheduler``), reaching ``initial_lr`` in the last warm-up epoch; then it decays
    as nnU-Net's poly schedule over the epochs left, ``initial_lr * (1 - (epoch - warmup_epochs) /
    (num_epochs - warmup_epochs)) ** 0.9``. With ``warmup_epochs=0`` this is nnU-Net's ``PolyLRScheduler``.
    """
    if epoch < warmup_epochs:
        return initial_lr * (epoch + 1) / warmup_epochs
    return initial_lr * (1 - (epoch - warmup_epochs) / (num_epochs - warmup_epochs)) ** POLY_EXPONENT


class WarmupPolyLRScheduler(LRScheduler):
    """Sets every parameter group's learning rate to :func:`warmup_poly_lr` of the epoch given to ``step``."""

    def __init__(self, optimizer: Optimizer, initial_lr: float, num_epochs: int, warmup_epochs: int = 0):
        if not 0 <= warmup_epochs < num_epochs:
            raise ValueError(f'warmup_epochs={warmup_epochs} must be at least 0 and less than num_epochs={num_epochs} '
                             f'(the poly decay needs an epoch after the warm-up)')
        self.initial_lr, self.num_epochs, self.warmup_epochs = initial_lr, num_epochs, warmup_epochs
        super().__init__(optimizer)

    def describe(self) -> str:
        warmup = f'linear warm-up to {self.initial_lr} over the first {self.warmup_epochs} epochs, then ' \
            if self.warmup_epochs else f'{self.initial_lr}, '
        return f'{warmup}poly decay over {self.num_epochs - self.warmup_epochs} epochs'

    def get_lr(self) -> list[float]:
        return [warmup_poly_lr(max(self.last_epoch, 0), self.initial_lr, self.num_epochs, self.warmup_epochs)
                for _ in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:
        """Move to ``epoch`` (nnU-Net passes ``current_epoch``), or to the next epoch when it is None."""
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group['lr'] = lr
