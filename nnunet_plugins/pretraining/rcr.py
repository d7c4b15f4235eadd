"""RCR, the self-supervised pre-training of paper 003 (rotation, contrastive, reconstruction), as a method object.

Per iteration (:mod:`~nnunet_plugins.pretraining.rcr_views`): two rotated, cut-out views of every patch, the
encoder's bottleneck, three heads (:mod:`~nnunet_plugins.pretraining.rcr_heads`), three losses summed.

nnU-Net's own augmentation is kept, except what would make the rotation task ambiguous: mirroring in the y-x
plane (mirroring y and x is a half turn) and in-plane rotations beyond 30 degrees (nnU-Net rotates 2d and
anisotropic patches by up to 180).

Optimiser as in the paper (:class:`~nnunet_plugins.pretraining.method.OptimiserSettings`' defaults): AdamW, learning
rate 4e-4, weight decay 1e-5, linear warm-up (2 epochs: the paper's 500 iterations at nnU-Net's 250 per epoch) then
cosine decay; nnU-Net's gradient-norm clipping at 12.
"""
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_plugins.pretraining.method import PretrainingMethod
from nnunet_plugins.pretraining.rcr_heads import RCRModel
from nnunet_plugins.pretraining.rcr_views import CUTOUTS, LOSS_TERMS, allowed_rotations, make_views, proxy_losses

MAX_INPLANE_ROTATION = 30. / 360 * 2 * np.pi


@dataclass
class RCR(PretrainingMethod):
    """Paper 003's three proxy tasks on the encoder's bottleneck, weighted 1/1/1.

    ``cutout`` (see :mod:`~nnunet_plugins.pretraining.rcr_views`): ``'text'`` (default), the paper's text, boxes set
    to 0 until nearly 30% of the voxels; ``'authors'``, the authors' code, a rate from U(0, 0.3), boxes filled with
    noise in [0, 1], then boxes pasted from another patch of the batch. The default is the text's because the text is
    what a user citing the paper reads, and the code's noise range belongs to its [0, 1] intensity window, not to
    nnU-Net's z-scored intensities (where [0, 1] is a grey band from the foreground mean to one standard deviation
    above).
    """
    name = 'RCR'
    loss_terms = LOSS_TERMS
    cutout: str = 'text'
    rotations: tuple[int, ...] = field(default=(), init=False)  # quarter turns drawn; from the patch (prepare)

    def check(self) -> None:
        if self.cutout not in CUTOUTS:
            raise ValueError(f"RCR's cutout {self.cutout!r} is not one of {CUTOUTS}: 'text' (the paper's text, 30% set "
                             f"to 0) or 'authors' (the authors' code, U(0, 0.3), noise and pasted boxes)")

    def describe(self) -> str:
        cutout = ('the paper\'s text: boxes set to 0, <= 30% of voxels' if self.cutout == 'text' else
                  'the authors\' code: a rate from U(0, 0.3), noise boxes in [0, 1], then boxes from another patch')
        return ('RCR of paper 003 (Swin UNETR pre-training): two views per patch, each rotated by a quarter turn in '
                f'the y-x plane and cut out ({cutout}); L1 reconstruction of the rotated uncut view + 4-way '
                'rotation cross-entropy + NT-Xent (cosine, temperature 0.5, 512-d), weights 1/1/1; rotation and '
                'contrastive heads on the spatially averaged bottleneck')

    def build_model(self, network: nn.Module, input_channels: int, patch_size: Sequence[int]) -> RCRModel:
        return RCRModel(network, input_channels, patch_size)

    def prepare(self, model: RCRModel, patch_size: Sequence[int]) -> None:
        self.rotations = allowed_rotations(patch_size)

    def augmentation(self, rotation: tuple[float, float], mirror_axes: tuple[int, ...],
                     dims: int) -> tuple[tuple[float, float], tuple[int, ...]]:
        """In-plane rotations within 30 degrees, no mirroring of y or x (the last two of ``dims`` axes)."""
        rotation = (max(rotation[0], -MAX_INPLANE_ROTATION), min(rotation[1], MAX_INPLANE_ROTATION))
        return rotation, tuple(axis for axis in mirror_axes if axis < dims - 2)

    def losses(self, model: nn.Module, data: torch.Tensor, rng: np.random.Generator,
               autocast: Callable[[], ContextManager]) -> dict[str, torch.Tensor]:
        views = make_views(data, self.rotations, rng, self.cutout)
        with autocast():
            return proxy_losses(model(views.inputs), views)

    def log_lines(self, patch_size: Sequence[int]) -> list[str]:
        if len(self.rotations) == 4:
            return []
        patch = list(patch_size)
        return [f'The patch {patch} is not square in y-x ({patch[-2]} x {patch[-1]}): a 90 or 270 degree turn would '
                f'change its shape, so the rotation task draws 0 and 180 degrees only.']

    def report(self) -> dict:
        return {'rotations_degrees': [90 * k for k in self.rotations], 'cutout': self.cutout}
