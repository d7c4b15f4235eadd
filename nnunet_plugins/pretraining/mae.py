"""Masked-image modelling (MAE) of the whole network, encoder and decoder, as a method object: nnssl's recipe
(MIC-DKFZ/nnssl at commit 7044864404315536e92e670ef2f0ca24f11e6175, ``BaseMAETrainer`` in
``src/nnssl/training/nnsslTrainer/masked_image_modeling/BaseMAETrainer.py``, the trainer of "Revisiting MAE
pre-training for 3D medical image segmentation", CVPR 2025, and of OpenMind's MAE), on any network of the plans.

nnssl's recipe, each number from that commit:

- the mask: per patch, a grid of blocks of 16 voxels per axis (``mask_creation``'s ``block_size=16``), of which
  ``int(0.75 x blocks)`` drawn at random (``mask_percentage = 0.75``; ``create_blocky_mask``) are set to 0 in every
  channel (``masked_data = data * mask``);
- the network: the whole segmentation network (nnssl's ResEnc-L, encoder and decoder, deep supervision off) with
  one output per reconstructed channel in place of the segmentation classes: here a 1x1 conv on the input of the
  network's final segmentation head (:mod:`~nnunet_plugins.pretraining.mae_model`);
- the loss: the mean squared error on the masked voxels only (``MAEMSELoss`` in ``training/loss/mse_loss.py``:
  ``sum((output - target)^2 * (1 - mask)) / sum(1 - mask)``), the target the unmasked patch;
- the optimiser (``AbstractTrainer``, kept by ``BaseMAETrainer``): SGD, learning rate 1e-2, Nesterov momentum 0.99,
  weight decay 3e-5, no warm-up, poly decay (exponent 0.9) over 1000 epochs of 250 iterations, gradient-norm
  clipping at 12 (:data:`~nnunet_plugins.pretraining.method.NNSSL_SGD`).

Adapted where a plan needs it:

- blocks that divide the plans' patch: per axis, the divisor of the patch's edge nearest to 16 voxels (the smaller
  on a tie) that leaves at least 2 blocks on the axis (nnssl's fixed 160^3 patch has 10 per axis): 16 on edges of
  32 or more that 16 divides, e.g. 20 x 16 x 16 on an anisotropic 40 x 160 x 128 patch, 8 on an edge of 16; 2d
  configurations get 2d blocks of the same rule;
- the patch, batch size and augmentation are the plans' and nnU-Net's (nnssl: 160^3, batch 2, spatial and mirror
  transforms only), so the network is the one the supervised trainer builds and fine-tunes;
- several input channels: the loss is the mean over the masked voxels and the channels (nnssl's single-channel MRI
  has one; its formula sums over channels).
"""
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_plugins.pretraining.mae_model import MAEModel
from nnunet_plugins.pretraining.method import NNSSL_SGD, OptimiserSettings, PretrainingMethod

MASK_RATIO = 0.75  # nnssl's BaseMAETrainer.mask_percentage
BLOCK_EDGE = 16  # nnssl's mask_creation(block_size=16), voxels per axis


def mask_block(patch_size: Sequence[int], edge: int = BLOCK_EDGE) -> tuple[int, ...]:
    """Voxels per masked block along each axis of ``patch_size``: the divisor of the axis nearest to ``edge`` (the
    smaller on a tie) of those that leave at least 2 blocks (1 on an axis of 1 voxel)."""
    def along(size: int) -> int:
        divisors = [d for d in range(1, size // 2 + 1) if size % d == 0] or [size]
        return min(divisors, key=lambda d: (abs(d - edge), d))
    return tuple(along(size) for size in patch_size)


def masked_count(blocks: int, mask_ratio: float) -> int:
    """How many of a patch's ``blocks`` are masked: ``int(mask_ratio * blocks)``, nnssl's."""
    return int(mask_ratio * blocks)


def block_mask(batch_size: int, patch_size: Sequence[int], block: Sequence[int], mask_ratio: float,
               rng: np.random.Generator, device: torch.device | str = 'cpu') -> torch.Tensor:
    """``(B, 1, *S)`` float mask, 1 where a voxel is kept and 0 where it is masked: per patch,
    :func:`masked_count` of the grid of ``block``-sized blocks drawn anew without replacement."""
    grid = [size // edge for size, edge in zip(patch_size, block)]
    blocks = int(np.prod(grid))
    kept = np.ones((batch_size, blocks), dtype=np.float32)
    for row in kept:
        row[rng.permutation(blocks)[:masked_count(blocks, mask_ratio)]] = 0
    mask = torch.from_numpy(kept).to(device).view(batch_size, 1, *grid)
    for axis, edge in enumerate(block):
        mask = mask.repeat_interleave(edge, dim=2 + axis)
    return mask


def masked_mse(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``output`` against ``target`` (both ``(B, C, *S)``) over the voxels where ``mask``
    (``(B, 1, *S)``, 0 = masked) is 0, and over the channels; unmasked voxels do not count."""
    masked = 1 - mask
    return ((output - target) ** 2 * masked).sum() / (masked.sum() * output.shape[1])


@dataclass
class MAE(PretrainingMethod):
    """nnssl's MAE on the whole network (see the module). Settings: ``mask_ratio`` (share of the blocks masked,
    0.75), ``block_edge`` (voxels per block and axis before the patch is fitted, 16) and ``optimiser`` (nnssl's
    SGD and poly decay, :data:`~nnunet_plugins.pretraining.method.NNSSL_SGD`)."""
    name = 'MAE'
    loss_terms = ('masked_mse',)
    mask_ratio: float = MASK_RATIO
    block_edge: int = BLOCK_EDGE
    optimiser: OptimiserSettings = field(default_factory=lambda: NNSSL_SGD)
    mask_block: tuple[int, ...] = field(default=(), init=False)  # voxels per block and axis (prepare)

    def check(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f'MAE\'s mask_ratio {self.mask_ratio} must lie between 0 and 1 (nnssl: {MASK_RATIO}): '
                             f'the share of the blocks set to 0')
        if self.block_edge < 1:
            raise ValueError(f'MAE\'s block_edge {self.block_edge} must be at least 1 voxel (nnssl: {BLOCK_EDGE})')

    def describe(self) -> str:
        return (f'masked-image modelling of nnssl (BaseMAETrainer): {self.mask_ratio:.0%} of the blocks of each patch '
                f'set to 0, the whole network (encoder and decoder) reconstructing the input channels through a 1x1 '
                f'conv in place of its segmentation head, mean squared error on the masked voxels only')

    def build_model(self, network: nn.Module, input_channels: int, patch_size: Sequence[int]) -> MAEModel:
        return MAEModel(network, input_channels, patch_size)

    def prepare(self, model: MAEModel, patch_size: Sequence[int]) -> None:
        self.mask_block = mask_block(patch_size, self.block_edge)
        blocks = int(np.prod([size // edge for size, edge in zip(patch_size, self.mask_block)]))
        if masked_count(blocks, self.mask_ratio) == 0:
            raise ValueError(f'MAE masks int({self.mask_ratio} x {blocks}) = 0 of the {blocks} blocks of the patch '
                             f'{list(patch_size)}: raise mask_ratio or use a larger patch')

    def losses(self, model: nn.Module, data: torch.Tensor, rng: np.random.Generator,
               autocast: Callable[[], ContextManager]) -> dict[str, torch.Tensor]:
        mask = block_mask(len(data), data.shape[2:], self.mask_block, self.mask_ratio, rng, data.device)
        with autocast():
            reconstruction = model(data * mask)
        loss = masked_mse(reconstruction.float(), data, mask)
        return {'masked_mse': loss, 'total': loss}

    def log_lines(self, patch_size: Sequence[int]) -> list[str]:
        grid = [size // edge for size, edge in zip(patch_size, self.mask_block)]
        blocks = int(np.prod(grid))
        line = (f'masking, per patch {list(patch_size)}: {masked_count(blocks, self.mask_ratio)} of its {grid} blocks '
                f'of {list(self.mask_block)} voxels set to 0')
        if any(edge != self.block_edge for edge in self.mask_block):
            line += f' (blocks of {self.block_edge} voxels per axis fitted to the patch: at least 2 per axis)'
        return [line + '.']

    def report(self) -> dict:
        return {'mask_ratio': self.mask_ratio, 'block_edge': self.block_edge, 'mask_block': list(self.mask_block)}
