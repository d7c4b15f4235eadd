"""What both token-level methods of paper 004 (Sec. 3.2-3.3) share: the views, the token grid, rotate-and-restore
and the collapse monitor; the losses are :mod:`~nnunet_plugins.pretraining.token_cl`'s and
:mod:`~nnunet_plugins.pretraining.token_byol`'s.

Per iteration:

- two views of every patch (:mod:`~nnunet_plugins.pretraining.token_views`): texture transforms on both, masking on
  one (75% of the blocks of ``patch // 16`` voxels per axis, the authors' 4 x 8 x 8 on 64 x 128 x 128, filled with
  their N(0, 0.1^2) noise), a random symmetry of the token grid (quarter turns in y-x, flips) on the other;
- the tokens are the encoder's feature map at :attr:`TokenMethod.token_stage` (the bottleneck), projected per
  token (:mod:`~nnunet_plugins.pretraining.token_heads`); the transformed view's map is restored with the exact
  inverse of its transform, so token ``m`` of both views covers the same block of the patch ("rotate-and-restore");
- the collapse monitor on the encoder's tokens, logged per epoch and drawn in ``progress.png``: mean cosine
  similarity of same-position tokens across volumes (the paper's collapse is this going to 1), of the two views'
  matching tokens, and of different positions within a volume.

Optimiser: RCR's by default (:class:`~nnunet_plugins.pretraining.method.OptimiserSettings`' defaults: AdamW 4e-4,
weight decay 1e-5, 2 warm-up epochs then cosine); the paper's is a setting, ``TokenCL(optimiser=PAPER_004_SGD)``
(:data:`~nnunet_plugins.pretraining.method.PAPER_004_SGD`: SGD 1e-4, Nesterov momentum 0.99, and from the authors'
script weight decay 1e-5, 50 warm-up epochs from 0, cosine). AdamW stays the default after the
fair re-run (README, "Measured on the synthetic data": both on this schedule of the authors', 1000 iterations, two
seeds, fine-tuned): the same held-out Dice, and AdamW learns the pretext task that SGD at 1e-4 barely starts.
"""
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_plugins.pretraining.method import PretrainingMethod
from nnunet_plugins.pretraining.token_heads import HIDDEN_SIZE, PROJECTION_SIZE, TokenPretrainingModel
from nnunet_plugins.pretraining.token_losses import CollapseReading, collapse_monitor
from nnunet_plugins.pretraining.token_views import (
    MASK_BLOCKS_PER_AXIS, MASK_NOISE_STD, MASK_RATIO, GridTransform, TextureSettings, allowed_transforms, block_size,
    check_mask_ratio, input_mask_block, make_views, mask_grid, restore_each)

IDENTITY = GridTransform(0, ())
MASK_GRANULARITIES = ('input', 'token')


@dataclass
class TokenMethod(PretrainingMethod):
    """Paper 004's views and tokens; a form (CL or BYOL) adds its heads and loss.

    Settings: ``mask_ratio`` (share of the blocks masked in one view, below 85%), ``mask_granularity`` ('input':
    blocks of ``patch // 16`` voxels per axis, the paper's; 'token': the regions the tokens cover, an ablation and
    this project's masking before issue 25), ``mask_noise_std`` (masked blocks filled with Gaussian noise of this
    standard deviation, the authors' 0.1; 0 sets them to 0), ``rotate_and_restore`` (False: no spatial transform,
    the paper's Table 4 without Gamma_s), ``token_stage`` (which encoder output, -1 the deepest),
    ``texture_settings``, ``projection_size`` and ``hidden_size`` (the per-token heads' output and hidden widths).
    """
    readings = CollapseReading._fields
    readings_label = 'collapse monitor (mean cosine)'
    mask_ratio: float = MASK_RATIO
    mask_granularity: str = 'input'
    mask_noise_std: float = MASK_NOISE_STD
    rotate_and_restore: bool = True
    token_stage: int = -1
    texture_settings: TextureSettings = TextureSettings()
    projection_size: int = PROJECTION_SIZE
    hidden_size: int = HIDDEN_SIZE
    token_grid: list[int] = field(default_factory=list, init=False)  # from the built model (prepare)
    transforms: tuple[GridTransform, ...] = field(default=(), init=False)  # drawn for the second view (prepare)
    mask_block: tuple[int, ...] = field(default=(), init=False)  # voxels per masked block (prepare)
    model_class = TokenPretrainingModel

    def check(self) -> None:
        check_mask_ratio(self.mask_ratio)
        if self.mask_granularity not in MASK_GRANULARITIES:
            raise ValueError(f'mask_granularity {self.mask_granularity!r}: one of {MASK_GRANULARITIES} expected (input '
                             f'blocks of patch // {MASK_BLOCKS_PER_AXIS} voxels per axis, the paper\'s, or the '
                             f'regions of the tokens)')
        if self.mask_noise_std < 0:
            raise ValueError(f'mask_noise_std {self.mask_noise_std} < 0: a standard deviation; 0 fills masked '
                             f'blocks with 0, the authors\' code uses {MASK_NOISE_STD}')

    def build_model(self, network: nn.Module, input_channels: int, patch_size: Sequence[int]) -> TokenPretrainingModel:
        return self.model_class(network, input_channels, patch_size, self.token_stage, self.projection_size,
                                self.hidden_size)

    def prepare(self, model: TokenPretrainingModel, patch_size: Sequence[int]) -> None:
        self.token_grid = list(model.grid)
        allowed = allowed_transforms(patch_size, self.token_grid)  # checks the grid too
        self.transforms = allowed if self.rotate_and_restore else (IDENTITY,)
        self.mask_block = (input_mask_block(patch_size) if self.mask_granularity == 'input'
                           else block_size(patch_size, self.token_grid))

    def views_description(self) -> str:
        """The two views, as :meth:`describe` of each form begins."""
        blocks = (f'input blocks (patch // {MASK_BLOCKS_PER_AXIS} voxels per axis)' if self.mask_granularity == 'input'
                  else 'token regions')
        fill = f'Gaussian noise of std {self.mask_noise_std}' if self.mask_noise_std else '0'
        return (f'texture transforms on both views, {self.mask_ratio:.0%} of the {blocks} masked on one (filled with '
                f'{fill}), a symmetry of the token grid on the other '
                f'{"restored on its feature map" if self.rotate_and_restore else "(off)"}')

    def outputs_on_views(self, model: nn.Module, data: torch.Tensor, rng: np.random.Generator,
                         autocast: Callable[[], ContextManager]) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The model's outputs on the two views of ``data``'s ``B`` patches, float32, each as a pair (masked view's,
        transformed view's restored) of ``(B, C, *grid)`` maps."""
        views = make_views(data, self.mask_block, self.transforms, rng, self.mask_ratio, self.texture_settings,
                           self.mask_noise_std)
        with autocast():
            outputs = model(torch.cat([views.masked, views.transformed]))
        pairs = []
        for output in outputs:
            masked, transformed = output.float().split(len(data))
            pairs.append((masked, restore_each(transformed, views.transforms)))
        return tuple(pairs)

    @staticmethod
    def monitor(tokens: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The collapse monitor's readings on the two views' encoder tokens, as scalars."""
        reading = collapse_monitor(tokens[1], tokens[0])
        return {name: torch.tensor(value) for name, value in reading._asdict().items()}

    def log_lines(self, patch_size: Sequence[int]) -> list[str]:
        patch, grid = list(patch_size), self.token_grid
        blocks = mask_grid(patch, self.mask_block)
        per_token = np.prod([size / (tokens * block) for size, tokens, block in zip(patch, grid, self.mask_block)])
        lines = [f'masking, per patch {patch}: {round(self.mask_ratio * int(np.prod(blocks)))} of its {list(blocks)} '
                 f'blocks of {list(self.mask_block)} voxels ({self.mask_granularity} granularity; token grid {grid}, '
                 f'{per_token:.3g} blocks per token region).']
        if not self.rotate_and_restore:
            return [*lines, f'rotate-and-restore is off: the second view keeps its orientation (tokens {grid}).']
        drawn = ', '.join(map(str, self.transforms))
        lines.append(f'rotate-and-restore draws from {len(self.transforms)} transforms of the {grid} token grid: '
                     f'{drawn}.')
        if not any(t.quarter_turns % 2 for t in self.transforms):
            lines.append(f'The patch {patch} or its token grid {grid} is not square in y-x: a 90 or 270 degree turn '
                         f'would change its shape, so only half turns and flips are drawn.')
        return lines

    def report(self) -> dict:
        return {'token_stage': self.token_stage, 'token_grid': self.token_grid, 'mask_ratio': self.mask_ratio,
                'mask_granularity': self.mask_granularity, 'mask_block': list(self.mask_block),
                'mask_noise_std': self.mask_noise_std, 'rotate_and_restore': self.rotate_and_restore,
                'transforms': [str(t) for t in self.transforms],
                'texture': asdict(self.texture_settings), 'projection_size': self.projection_size,
                'hidden_size': self.hidden_size}
