"""Paper 004's two views of a batch of nnU-Net patches (Sec. 3.2) and the restore step of rotate-and-restore.

Every patch (``(C, *S)``, ``S`` = (z, y, x) or (y, x), nnU-Net's z-scored intensities) gives two views, both
with random texture transforms (Gaussian noise, Gibbs noise, intensity scaling, intensity shift):

- the masked view: 75% (by default) of the blocks of a grid over the patch masked, after the texture transforms:
  filled with Gaussian noise (the authors' code) or set to 0 (the mean of z-scored intensities). The paper masks
  "small patches" of the input as BEiT does; its authors' code masks blocks of 4 x 8 x 8 voxels of a 64 x 128 x 128
  patch, 16 blocks per axis, so a token of the encoder's output (a region of 64 blocks for their Swin UNETR) almost
  surely keeps part of its region. Here the block is
  ``patch // 16`` voxels per axis (at least 1; :func:`input_mask_block`), the authors' block on their patch.
  For ablations the blocks can instead be the regions the encoder's tokens cover (:func:`block_size`), the
  masking of this project before issue 25, which leaves a masked token nothing of its own region;
- the transformed view: a random symmetry of the token grid (quarter turns in the y-x plane, the last two axes
  of nnU-Net's arrays, and flips). After the encoder, :meth:`GridTransform.restore` puts its tokens back, so
  token ``m`` of both views describes the same block of the patch (the paper's "rotate-and-restore").

A transform is drawn only if it maps both the patch and the token grid onto themselves (quarter turns need
equal y and x), and the token grid must divide the patch, so that the block a token covers moves with it.
The authors' restore step does not invert the drawn rotation and flip (design note ssl-and-swin.md); here the
tests check restore(apply(index grid)) is the identity for every transform that can be drawn.
"""
import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

MASK_RATIO = 0.75  # the paper's best (Sec. 4.4, Fig. 6)
MAX_MASK_RATIO = 0.85  # the paper: masking over 85% of the patches leaves no visual information to learn from
MASK_BLOCKS_PER_AXIS = 16  # the authors' code: blocks of 4 x 8 x 8 voxels on its 64 x 128 x 128 patch
MASK_NOISE_STD = 0.1  # the authors' code fills masked blocks with N(0, 0.1^2), on intensities scaled to [0, 1]


@dataclass(frozen=True)
class TextureSettings:
    """Texture transforms, each applied independently with ``probability`` to every view of every patch.

    The paper names the transforms but not their strength; these ranges are mild on z-scored intensities
    (nnU-Net's own Gaussian noise augmentation draws its variance from (0, 0.1)).

    Attributes:
        probability: chance of each transform per view and patch.
        noise_std: range of the Gaussian noise's standard deviation.
        gibbs_alpha: range of MONAI's ``GibbsNoise`` alpha (share of k-space truncated; 0 = none).
        scale: range of ``f`` in ``x * (1 + f)``.
        shift: range of ``o`` in ``x + o``.
    """
    probability: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.1)
    gibbs_alpha: tuple[float, float] = (0.0, 0.5)
    scale: tuple[float, float] = (-0.1, 0.1)
    shift: tuple[float, float] = (-0.1, 0.1)


def texture(batch: torch.Tensor, settings: TextureSettings, rng: np.random.Generator) -> torch.Tensor:
    """``batch`` ``(B, C, *S)`` with a random combination of the texture transforms per patch (a new tensor)."""
    from monai.transforms import GibbsNoise  # imported on use, as in networks/swinunetr.py
    from monai.utils import convert_to_tensor
    torch_rng = torch.Generator(batch.device).manual_seed(int(rng.integers(2 ** 62)))
    out = []
    for patch in batch:
        if rng.random() < settings.probability:
            noise = torch.randn(patch.shape, generator=torch_rng, device=patch.device, dtype=patch.dtype)
            patch = patch + float(rng.uniform(*settings.noise_std)) * noise
        if rng.random() < settings.probability:
            gibbs = GibbsNoise(float(rng.uniform(*settings.gibbs_alpha)))
            patch = convert_to_tensor(gibbs(patch), dtype=batch.dtype, track_meta=False)  # not MONAI's MetaTensor
        if rng.random() < settings.probability:
            patch = patch * (1 + float(rng.uniform(*settings.scale)))
        if rng.random() < settings.probability:
            patch = patch + float(rng.uniform(*settings.shift))
        out.append(patch)
    return torch.stack(out)


def check_mask_ratio(mask_ratio: float) -> None:
    """Raise unless ``0 <= mask_ratio < MAX_MASK_RATIO``, the share of masked blocks."""
    if not 0 <= mask_ratio < MAX_MASK_RATIO:
        raise ValueError(f'mask_ratio {mask_ratio} is outside [0, {MAX_MASK_RATIO}): paper 004 (Sec. 4.4) found that '
                         f'masking {MAX_MASK_RATIO:.0%} or more of the patches leaves no visual information to learn '
                         f'from; its best is {MASK_RATIO}')


def input_mask_block(spatial_shape: Sequence[int]) -> tuple[int, ...]:
    """Voxels per masking block along each axis of a patch of ``spatial_shape``: ``s // 16``, at least 1 (64 x 128 x
    128 -> 4 x 8 x 8, the authors' block; 8 x 16 x 16 -> 1 x 1 x 1)."""
    return tuple(max(1, size // MASK_BLOCKS_PER_AXIS) for size in spatial_shape)


def mask_grid(spatial_shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    """Blocks per axis: ``ceil(s / b)``; where ``b`` does not divide ``s``, the last block of the axis is shorter."""
    return tuple(-(-size // b) for size, b in zip(spatial_shape, block, strict=True))


def mask_patches(batch: torch.Tensor, block: Sequence[int], mask_ratio: float, rng: np.random.Generator,
                 noise_std: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``round(mask_ratio * n)`` of the ``n`` blocks of every sample of ``batch`` ``(B, C, *S)``, in every
    channel.

    The blocks, ``block`` voxels each, tile ``S`` from its first voxel (:func:`mask_grid`). A masked block is set to
    0 if ``noise_std`` is 0, else filled with Gaussian noise of mean 0 and that standard deviation. Returns the
    masked batch and the mask ``(B, *grid)``, True where masked.
    """
    check_mask_ratio(mask_ratio)
    spatial = batch.shape[2:]
    grid = mask_grid(spatial, block)
    patches = int(np.prod(grid))
    masked = round(mask_ratio * patches)
    mask = np.zeros((len(batch), patches), dtype=bool)
    for row in mask:
        row[rng.choice(patches, size=masked, replace=False)] = True
    mask = torch.as_tensor(mask, device=batch.device).reshape(len(batch), *grid)
    voxels = mask
    for axis, (size, length) in enumerate(zip(block, spatial)):
        voxels = voxels.repeat_interleave(size, dim=axis + 1).narrow(axis + 1, 0, length)
    if noise_std == 0 or not masked:
        return batch.masked_fill(voxels[:, None], 0), mask
    torch_rng = torch.Generator(batch.device).manual_seed(int(rng.integers(2 ** 62)))
    noise = noise_std * torch.randn(batch.shape, generator=torch_rng, device=batch.device, dtype=batch.dtype)
    return torch.where(voxels[:, None], noise, batch), mask


def block_size(spatial_shape: Sequence[int], grid_shape: Sequence[int]) -> tuple[int, ...]:
    """Voxels per token along each axis: ``spatial_shape / grid_shape``, which must be whole numbers."""
    if len(spatial_shape) != len(grid_shape) or any(s % g for s, g in zip(spatial_shape, grid_shape)):
        raise ValueError(f'a token grid of {list(grid_shape)} does not divide the patch {list(spatial_shape)} into '
                         f'equal blocks, so a token covers no fixed block of it; use a patch size that is a '
                         f'multiple of the encoder\'s total stride along every axis')
    return tuple(s // g for s, g in zip(spatial_shape, grid_shape))


@dataclass(frozen=True)
class GridTransform:
    """A symmetry of a token grid: ``quarter_turns`` rotations in the y-x plane (``torch.rot90`` over the last
    two axes, y towards x), then a flip of each axis in ``flip_axes`` (negative: -2 is y, -3 is z).

    Rotations with a y flip give all 8 symmetries of the y-x square (a flip of x is a half turn and a y flip),
    and a z flip doubles them in 3d.
    """
    quarter_turns: int
    flip_axes: tuple[int, ...]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., [Z,] Y, X)`` transformed."""
        x = torch.rot90(x, self.quarter_turns, dims=(-2, -1))
        return torch.flip(x, self.flip_axes) if self.flip_axes else x

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`apply`: flips are their own inverse and come first, then the opposite turns."""
        x = torch.flip(x, self.flip_axes) if self.flip_axes else x
        return torch.rot90(x, -self.quarter_turns, dims=(-2, -1))

    def __str__(self) -> str:
        axes = ' '.join({-3: 'z', -2: 'y'}[a] for a in self.flip_axes)
        return f'rot{90 * self.quarter_turns}' + (f'+flip {axes}' if axes else '')


def allowed_transforms(spatial_shape: Sequence[int], grid_shape: Sequence[int]) -> tuple[GridTransform, ...]:
    """The transforms that map both a patch of ``spatial_shape`` and its token grid of ``grid_shape`` onto
    themselves: all quarter turns where both are square in y-x, else only half turns; every flip.

    ``grid_shape`` must divide ``spatial_shape`` (:func:`block_size`). Log the result once: on a patch that is
    not square in y-x, a quarter turn of the view would change the grid's shape, so none is drawn.
    """
    block_size(spatial_shape, grid_shape)
    if len(grid_shape) not in (2, 3):
        raise ValueError(f'token grid {list(grid_shape)}: 2d (y, x) or 3d (z, y, x) expected')
    square = spatial_shape[-1] == spatial_shape[-2] and grid_shape[-1] == grid_shape[-2]
    turns = (0, 1, 2, 3) if square else (0, 2)
    flippable = (-3, -2) if len(grid_shape) == 3 else (-2,)
    flips = [axes for n in range(len(flippable) + 1) for axes in itertools.combinations(flippable, n)]
    return tuple(GridTransform(k, axes) for k in turns for axes in flips)


def apply_each(batch: torch.Tensor, transforms: Sequence[GridTransform]) -> torch.Tensor:
    """Transform sample ``i`` of ``batch`` ``(B, C, *S)`` by ``transforms[i]``."""
    return torch.stack([t.apply(sample) for sample, t in zip(batch, transforms, strict=True)])


def restore_each(features: torch.Tensor, transforms: Sequence[GridTransform]) -> torch.Tensor:
    """Undo ``transforms[i]`` on sample ``i`` of the feature maps ``(B, C, *grid)`` of a transformed view."""
    return torch.stack([t.restore(sample) for sample, t in zip(features, transforms, strict=True)])


@dataclass
class TokenViews:
    """The two views of a batch of ``B`` patches."""
    masked: torch.Tensor  # (B, C, *S): textured, patches masked
    transformed: torch.Tensor  # (B, C, *S): textured, then transforms[i] applied to patch i
    transforms: list[GridTransform]
    mask: torch.Tensor  # (B, *mask grid): True where the masked view's block is masked


def make_views(batch: torch.Tensor, mask_block: Sequence[int], allowed: Sequence[GridTransform],
               rng: np.random.Generator, mask_ratio: float = MASK_RATIO, settings: TextureSettings = TextureSettings(),
               mask_noise_std: float = MASK_NOISE_STD) -> TokenViews:
    """The two views of every patch of ``batch`` ``(B, C, *S)``.

    The masked view masks blocks of ``mask_block`` voxels (:func:`input_mask_block` of ``S``, or :func:`block_size`
    of ``S`` and the token grid), filled as :func:`mask_patches` says; ``mask_ratio`` 0 switches masking off.
    Transforms are drawn uniformly from ``allowed`` (:func:`allowed_transforms` of ``S`` and the token grid; pass
    only the identity to switch rotate-and-restore off).
    """
    check_mask_ratio(mask_ratio)
    masked, mask = mask_patches(texture(batch, settings, rng), mask_block, mask_ratio, rng, mask_noise_std)
    transforms = [allowed[i] for i in rng.integers(len(allowed), size=len(batch))]
    return TokenViews(masked, apply_each(texture(batch, settings, rng), transforms), transforms, mask)
