"""What a pre-training method is: the object a :class:`~nnunet_plugins.pretraining.trainer.PretrainingTrainer` is
composed with, beside the network trainer whose network it pre-trains.

A method (one module each: :mod:`~nnunet_plugins.pretraining.rcr`, :mod:`~nnunet_plugins.pretraining.token_cl`,
:mod:`~nnunet_plugins.pretraining.token_byol`, :mod:`~nnunet_plugins.pretraining.mae`) is a dataclass of its settings
that supplies the heads on the network (:meth:`PretrainingMethod.build_model`), the views and losses of a batch
(:meth:`PretrainingMethod.losses`), the names of its loss terms and readings, what the log and the report say of
it, and every optimiser setting of the run (:attr:`PretrainingMethod.optimiser`). The trainer supplies everything
else, once for every method.
"""
import math
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, ContextManager, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from nnunet_plugins.training.schedule import POLY_EXPONENT

OPTIMISERS = ('AdamW', 'SGD')
DECAYS = ('cosine', 'poly')


@dataclass(frozen=True)
class OptimiserSettings:
    """Every optimiser setting of a pre-training run: AdamW (or SGD with Nesterov momentum), a linear warm-up, then
    cosine (or poly) decay to 0 at the last epoch, a function of the epoch (so ``--c`` resumes it exactly); nnU-Net's
    gradient-norm clipping at 12.

    Defaults are paper 003's (AdamW, learning rate 4e-4, weight decay 1e-5, 500 warm-up iterations: 2 epochs at
    nnU-Net's 250), shared by every method here. ``adam_eps`` is 1e-4 for every network, the value the MedNeXt
    authors chose because 1e-8 gave NaN losses under fp16 autocast (and the value MedNeXt's, 3D UX-Net's and Swin
    UNETR's pre-training used before these settings were the method's; nnU-Net's own network's used 1e-8).
    ``algorithm`` is ``'AdamW'`` or ``'SGD'`` (Nesterov, ``sgd_momentum``; ``adam_eps`` then unused).
    ``warmup_from_zero``: the warm-up starts at 0 and reaches ``initial_lr`` in its last epoch (the authors'
    schedule of paper 004, see :data:`PAPER_004_SGD`) instead of starting at ``initial_lr / (warmup_epochs + 1)``.
    ``decay`` is ``'cosine'`` or ``'poly'`` (nnU-Net's ``(1 - progress) ** 0.9``, MAE's, see :data:`NNSSL_SGD`).
    """
    initial_lr: float = 4e-4
    weight_decay: float = 1e-5
    adam_eps: float = 1e-4
    warmup_epochs: int = 2
    algorithm: str = 'AdamW'
    sgd_momentum: float = 0.99
    warmup_from_zero: bool = False
    decay: str = 'cosine'

    def __post_init__(self):
        if self.algorithm not in OPTIMISERS:
            raise ValueError(f'optimiser algorithm {self.algorithm!r} is not one of {OPTIMISERS}')
        if self.decay not in DECAYS:
            raise ValueError(f'learning-rate decay {self.decay!r} is not one of {DECAYS}')

    def build(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimiser of ``parameters`` these settings describe."""
        if self.algorithm == 'SGD':
            return torch.optim.SGD(parameters, lr=self.initial_lr, momentum=self.sgd_momentum, nesterov=True,
                                   weight_decay=self.weight_decay)
        return torch.optim.AdamW(parameters, lr=self.initial_lr, weight_decay=self.weight_decay, eps=self.adam_eps)

    def describe(self, num_epochs: int) -> str:
        """The settings as the training log states them, for a run of ``num_epochs``."""
        algorithm = f'SGD, Nesterov momentum {self.sgd_momentum}' if self.algorithm == 'SGD' else 'AdamW'
        eps = '' if self.algorithm == 'SGD' else f', eps {self.adam_eps}'
        schedule = WarmupDecayLRScheduler.text(self.initial_lr, self.warmup_epochs, num_epochs, self.warmup_from_zero,
                                               self.decay)
        return (f'{algorithm}, learning rate {self.initial_lr}{eps}, weight decay {self.weight_decay}; {schedule}; '
                f'gradient-norm clipping at 12')


OPTIMISER_SETTINGS = tuple(f.name for f in fields(OptimiserSettings))

# Paper 004's optimiser (Sec. 4.1: "SGD with learning rate being 0.0001 ... Nesterov momentum ... 0.99") with what
# its text leaves out taken from the authors' pre-training script (xhu248/SimTROT, Pretrain/main_pretraining.py):
# weight decay 1e-5 (its ``reg_weight``), a linear warm-up from 0 over 50 of its 1000 epochs, then cosine decay to 0
# (MONAI's ``LinearWarmupCosineAnnealingLR``, stepped once per epoch). 50 epochs of nnU-Net's 1000 keep that share;
# ``nnUNet_plugins_epochs`` shortens the warm-up in proportion, as every warm-up.
PAPER_004_SGD = OptimiserSettings(initial_lr=1e-4, weight_decay=1e-5, warmup_epochs=50, algorithm='SGD',
                                  sgd_momentum=0.99, warmup_from_zero=True)
# nnssl's MAE optimiser (MIC-DKFZ/nnssl at 7044864, src/nnssl/training/nnsslTrainer/AbstractTrainer.py, which
# BaseMAETrainer keeps): SGD, learning rate 1e-2, Nesterov momentum 0.99, weight decay 3e-5, no warm-up, poly decay
# (exponent 0.9, training/lr_scheduler/polylr.py) over its 1000 epochs of 250 iterations, stepped per epoch.
NNSSL_SGD = OptimiserSettings(initial_lr=1e-2, weight_decay=3e-5, warmup_epochs=0, algorithm='SGD',
                              sgd_momentum=0.99, decay='poly')


class WarmupDecayLRScheduler(LRScheduler):
    """Linear warm-up over ``warmup_epochs`` (from ``initial_lr / (warmup_epochs + 1)``, or with ``from_zero`` from
    0, reaching ``initial_lr`` in the last warm-up epoch), then ``decay`` towards 0 at ``max_epochs``: ``'cosine'``,
    or ``'poly'``, ``initial_lr * (1 - progress) ** 0.9``; ``step(epoch)`` sets the learning rate of that epoch
    (nnU-Net steps once per epoch)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, warmup_epochs: int, max_epochs: int,
                 from_zero: bool = False, decay: str = 'cosine'):
        self.initial_lr, self.warmup_epochs, self.max_epochs = initial_lr, warmup_epochs, max_epochs
        self.from_zero, self.decay = from_zero, decay
        super().__init__(optimizer)

    @staticmethod
    def text(initial_lr: float, warmup_epochs: int, max_epochs: int, from_zero: bool = False,
             decay: str = 'cosine') -> str:
        start = 'from 0 ' if from_zero else ''
        decay_text = f'poly decay (exponent {POLY_EXPONENT})' if decay == 'poly' else 'cosine decay'
        if not warmup_epochs:
            return f'no warm-up, {decay_text} from {initial_lr} over {max_epochs} epochs'
        return (f'linear warm-up {start}to {initial_lr} over the first {warmup_epochs} epochs, then {decay_text} over '
                f'{max_epochs - warmup_epochs} epochs')

    def describe(self) -> str:
        return self.text(self.initial_lr, self.warmup_epochs, self.max_epochs, self.from_zero, self.decay)

    def learning_rate(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            if self.from_zero:  # 0 in epoch 0, initial_lr in the last warm-up epoch (0 throughout a 1-epoch warm-up)
                return self.initial_lr * epoch / max(1, self.warmup_epochs - 1)
            return self.initial_lr * (epoch + 1) / (self.warmup_epochs + 1)
        progress = min(1., (epoch - self.warmup_epochs) / max(1, self.max_epochs - self.warmup_epochs))
        if self.decay == 'poly':
            return self.initial_lr * (1 - progress) ** POLY_EXPONENT
        return self.initial_lr * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, epoch: int | None = None) -> None:
        epoch = self.last_epoch + 1 if epoch is None else epoch
        self.last_epoch = epoch
        for group in self.optimizer.param_groups:
            group['lr'] = self.learning_rate(epoch)
        self._last_lr = [group['lr'] for group in self.optimizer.param_groups]


class PretrainingModel(nn.Module):
    """What :meth:`PretrainingMethod.build_model` returns: the segmentation network as ``network`` (the keys of the
    supervised trainer's network), the method's heads as ``heads``; the encoder methods run only the encoder, MAE
    the whole network."""
    network: nn.Module
    heads: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser trains, network first, then heads (the order ``--c`` restores the
        optimiser's state by); not those that get no gradient (the decoder of an encoder method)."""
        raise NotImplementedError

    def pretrained_tensors(self) -> set[int]:
        """The ``id`` of every tensor of ``network.state_dict(keep_vars=True)`` the method trains (the report's
        ``pretrained_tensors``): the encoder's."""
        return {id(t) for t in self.network.encoder.state_dict(keep_vars=True).values()}


@dataclass
class PretrainingMethod:
    """Base of the methods; a method is a dataclass of its settings, e.g. ``TokenCL(same_position_weight=0)``.

    The trainer copies its class's method object per run (``dataclasses.replace``), then calls :meth:`prepare`
    once the model is built; what :meth:`prepare` derives (a token grid, the rotations drawn) is the copy's.
    """
    name: ClassVar[str]  # e.g. 'RCR', as the training log names the method
    loss_terms: ClassVar[tuple[str, ...]]  # the terms :meth:`losses` returns; their sum ('total') is minimised
    readings: ClassVar[tuple[str, ...]] = ()  # values :meth:`losses` also returns, logged and drawn, not minimised
    readings_label: ClassVar[str] = ''  # the y-axis label of the readings' panel of progress.png
    optimiser: OptimiserSettings = field(default_factory=OptimiserSettings)

    def describe(self) -> str:
        """What the training log and the report say the method is."""
        raise NotImplementedError

    def build_model(self, network: nn.Module, input_channels: int, patch_size: Sequence[int]) -> PretrainingModel:
        """``network`` with the method's heads on its encoder (no DDP or compile wrapper yet)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise ValueError, naming the setting and the fix, for settings the method cannot train with; the trainer
        calls it before anything is built."""

    def prepare(self, model: PretrainingModel, patch_size: Sequence[int]) -> None:
        """Derive what the views need from the built ``model`` and the plans' ``patch_size`` (raises ValueError for a
        patch the method cannot take)."""

    def augmentation(self, rotation: tuple[float, float], mirror_axes: tuple[int, ...],
                     dims: int) -> tuple[tuple[float, float], tuple[int, ...]]:
        """nnU-Net's rotation range (radians, about the axis its data augmentation rotates in-plane) and mirror axes,
        as the method restricts them; unchanged here."""
        return rotation, mirror_axes

    def losses(self, model: nn.Module, data: torch.Tensor, rng: np.random.Generator,
               autocast: Callable[[], ContextManager]) -> dict[str, torch.Tensor]:
        """The loss terms, their sum ``total`` and the :attr:`readings` (scalars) on a batch of patches.

        Args:
            model: the model :meth:`build_model` made, as the trainer runs it (perhaps in DDP or compiled).
            data: ``(B, C, *S)`` nnU-Net's augmented patches, on the training device.
            rng: the run's generator for the views (seeded from numpy's global state when the trainer is built).
            autocast: a context for the model's forward (mixed precision on CUDA, as nnU-Net's steps).
        """
        raise NotImplementedError

    def after_optimizer_step(self, model: PretrainingModel) -> None:
        """What the method does after every optimiser step (BYOL moves its target)."""

    def log_lines(self, patch_size: Sequence[int]) -> list[str]:
        """Lines the training log gets at the start, after the method's description."""
        return []

    def report(self) -> dict:
        """The method's settings for ``pretraining_report.json``."""
        return {}
