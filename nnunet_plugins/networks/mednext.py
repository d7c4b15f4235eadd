"""MedNeXt (Roy et al., MICCAI 2023; paper 001) with its topology taken from nnU-Net plans.

One class serves 2d and 3d and every size: the sizes S/B/M/L differ only in the per-level expansion
ratios and block counts of :data:`VARIANTS` (paper Table 1 left). On isotropic plans with at least
five stages the network is the paper's, layer for layer: stem 1x1 conv to 32 channels, widths
32-64-128-256-512, residual inverted-bottleneck blocks, residual up/down blocks, decoder skips added
(not concatenated) and one 1x1 head per level.

What differs from the reference implementation, and why:

- strides and kernel anisotropy follow the plans (an axis whose nnU-Net kernel is 1 keeps kernel 1),
  so the network trains on nnU-Net's anisotropic plans and on the ``2d`` configuration;
- the deep-supervision heads always exist (the reference builds them only with deep supervision on),
  so ``nnUNetv2_predict`` can load checkpoints strictly;
- the reference's dummy scalar parameter, a work-around for re-entrant checkpointing, is not needed
  with non-reentrant checkpointing and is left out.
"""
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op, get_matching_convtransp
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunet_plugins.networks.topology import Levels, ShallowPlanError, levels_of, same_padding

MAX_LEVELS = 5  # four downsamplings, as in the paper
STEM_FEATURES = 32  # level l has STEM_FEATURES * 2 ** l channels


@dataclass(frozen=True)
class MedNeXtVariant:
    """Expansion ratios and block counts of one MedNeXt size.

    Index ``l`` of an ``encoder_*`` tuple is resolution level ``l`` (level 4 is the bottleneck, its down
    block included); index ``l`` of a ``decoder_*`` tuple is the decoder stage that ends at level ``l``
    (its up block included). The paper's nine positions are encoder 0-4 followed by decoder 3-0.
    """

    encoder_expansion: tuple[int, ...]
    decoder_expansion: tuple[int, ...]
    encoder_blocks: tuple[int, ...]
    decoder_blocks: tuple[int, ...]
    gradient_checkpointing: bool  # the reference checkpoints M and L to fit 128^3 patches on a GPU


VARIANTS: dict[str, MedNeXtVariant] = {
    'S': MedNeXtVariant((2, 2, 2, 2, 2), (2, 2, 2, 2), (2, 2, 2, 2, 2), (2, 2, 2, 2), False),
    'B': MedNeXtVariant((2, 3, 4, 4, 4), (2, 3, 4, 4), (2, 2, 2, 2, 2), (2, 2, 2, 2), False),
    'M': MedNeXtVariant((2, 3, 4, 4, 4), (2, 3, 4, 4), (3, 4, 4, 4, 4), (3, 4, 4, 4), True),
    'L': MedNeXtVariant((3, 4, 8, 8, 8), (3, 4, 8, 8), (3, 4, 8, 8, 8), (3, 4, 8, 8), True),
}


class ChannelNorm(nn.GroupNorm):
    """GroupNorm with one group per channel (the reference's norm, same parameters), exact in every memory layout.

    PyTorch's CPU GroupNorm on a channels-last input computes the variance in one pass, which loses precision
    when a channel's mean is large against its spread (pytorch #54293: 7e-4 instead of 1e-6 on CT-like
    values); there the statistics come from ``torch.var_mean`` (Welford), as accurate as the contiguous kernel.
    ``(B, C, *S) -> (B, C, *S)``, same memory layout.
    """

    def __init__(self, channels: int):
        super().__init__(num_groups=channels, num_channels=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous() or x.device.type != 'cpu':
            return super().forward(x)
        variance, mean = torch.var_mean(x, dim=tuple(range(2, x.ndim)), keepdim=True, unbiased=False)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale = self.weight.view(shape) * torch.rsqrt(variance + self.eps)
        return (x - mean) * scale + self.bias.view(shape)


class _InvertedBottleneck(nn.Module):
    """Depthwise conv -> per-channel norm -> 1x1 expand -> GELU -> 1x1 project."""

    def __init__(self, depthwise: nn.Module, channels: int, out_channels: int, expansion: int,
                 conv_op: type[nn.Module]):
        super().__init__()
        self.depthwise = depthwise
        self.norm = ChannelNorm(channels)
        self.expand = conv_op(channels, expansion * channels, kernel_size=1)
        self.act = nn.GELU()
        self.project = conv_op(expansion * channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.act(self.expand(self.norm(self.depthwise(x)))))


class MedNeXtBlock(_InvertedBottleneck):
    """MedNeXt block with residual: ``(B, C, *S) -> (B, C, *S)``."""

    def __init__(self, conv_op: type[nn.Module], channels: int, expansion: int, kernel_size: Sequence[int]):
        depthwise = conv_op(channels, channels, kernel_size, padding=same_padding(kernel_size), groups=channels)
        super().__init__(depthwise, channels, channels, expansion, conv_op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class MedNeXtDownBlock(_InvertedBottleneck):
    """Strided MedNeXt block with a strided 1x1 conv shortcut: ``(B, C, *S) -> (B, C_out, *S / stride)``."""

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int, expansion: int,
                 kernel_size: Sequence[int], stride: Sequence[int]):
        depthwise = conv_op(in_channels, in_channels, kernel_size, stride=stride,
                            padding=same_padding(kernel_size), groups=in_channels)
        super().__init__(depthwise, in_channels, out_channels, expansion, conv_op)
        self.shortcut = conv_op(in_channels, out_channels, kernel_size=1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shortcut(x)


class MedNeXtUpBlock(_InvertedBottleneck):
    """MedNeXt block with a depthwise transposed conv and a transposed 1x1 shortcut:
    ``(B, C, *S) -> (B, C_out, *S * stride)``.

    A transposed conv with stride s and padding k//2 returns ``(N - 1) * s + 1`` voxels per axis; like
    the reference, the missing ``s - 1`` voxels are zeros prepended to the axis.
    """

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int, expansion: int,
                 kernel_size: Sequence[int], stride: Sequence[int]):
        transposed_op = get_matching_convtransp(conv_op)
        depthwise = transposed_op(in_channels, in_channels, kernel_size, stride=stride,
                                  padding=same_padding(kernel_size), groups=in_channels)
        super().__init__(depthwise, in_channels, out_channels, expansion, conv_op)
        self.shortcut = transposed_op(in_channels, out_channels, kernel_size=1, stride=stride)
        # F.pad lists (before, after) pairs starting at the last axis
        self._pad = [p for s in reversed(stride) for p in (s - 1, 0)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(super().forward(x) + self.shortcut(x), self._pad)


class MedNeXtEncoder(nn.Module):
    """Stem and the blocks of every level (``stages[l]``); returns the output of every level, highest resolution
    first."""

    def __init__(self, input_channels: int, conv_op: type[nn.Module], features_per_level: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                 expansion: Sequence[int], blocks: Sequence[int], gradient_checkpointing: bool):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.stem = conv_op(input_channels, features_per_level[0], kernel_size=1)
        stages = []
        for level, channels in enumerate(features_per_level):
            layers = []
            if level > 0:
                layers.append(MedNeXtDownBlock(conv_op, features_per_level[level - 1], channels, expansion[level],
                                               kernel_sizes[level], strides[level]))
            layers += [MedNeXtBlock(conv_op, channels, expansion[level], kernel_sizes[level])
                       for _ in range(blocks[level])]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = _run_blocks(stage, x, self.gradient_checkpointing)
            skips.append(x)
        return skips


class MedNeXtDecoder(nn.Module):
    """Up block, added skip and blocks per level, and a 1x1 head (``seg_layers[l]``) on every level.

    With ``deep_supervision`` the output is a list ``[level 0, level 1, ..., bottleneck]`` (highest
    resolution first, as nnU-Net expects); without it, only the level-0 logits. The heads exist either
    way so that checkpoints load strictly.
    """

    def __init__(self, num_classes: int, conv_op: type[nn.Module], features_per_level: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                 expansion: Sequence[int], blocks: Sequence[int], deep_supervision: bool,
                 gradient_checkpointing: bool):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.gradient_checkpointing = gradient_checkpointing
        levels = range(len(features_per_level) - 1)
        # the up block into level l mirrors the down block into level l + 1
        self.upsamplers = nn.ModuleList([
            MedNeXtUpBlock(conv_op, features_per_level[level + 1], features_per_level[level], expansion[level],
                           kernel_sizes[level + 1], strides[level + 1]) for level in levels])
        self.stages = nn.ModuleList([
            nn.Sequential(*[MedNeXtBlock(conv_op, features_per_level[level], expansion[level], kernel_sizes[level])
                            for _ in range(blocks[level])]) for level in levels])
        self.seg_layers = nn.ModuleList([conv_op(channels, num_classes, kernel_size=1)
                                         for channels in features_per_level])

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs = [self.seg_layers[-1](x)] if self.deep_supervision else []
        for level in reversed(range(len(self.stages))):
            x = skips[level] + _run_blocks([self.upsamplers[level]], x, self.gradient_checkpointing)
            x = _run_blocks(self.stages[level], x, self.gradient_checkpointing)
            if self.deep_supervision or level == 0:
                outputs.insert(0, self.seg_layers[level](x))
        return outputs if self.deep_supervision else outputs[0]


class MedNeXt(nn.Module):
    """MedNeXt encoder-decoder for 2d or 3d input.

    Args:
        input_channels: channels of the input image.
        num_classes: output channels (nnU-Net's number of segmentation heads).
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        features_per_level: channels per resolution level; one entry per level, at least two levels.
        strides: per level, the stride per axis of the down block into that level; level 0 must be all ones.
        kernel_sizes: per level, the depthwise kernel per axis (odd sizes).
        encoder_expansion, encoder_blocks: one entry per level (see :class:`MedNeXtVariant`).
        decoder_expansion, decoder_blocks: one entry per level except the bottleneck.
        deep_supervision: return one output per level instead of the full-resolution logits alone.
        gradient_checkpointing: recompute each block's activations in the backward pass (non-reentrant)
            to trade speed for memory; results are unchanged. Can be switched later by setting the attribute.

    Input ``(B, input_channels, *S)``; every axis of ``S`` must be divisible by the product of its
    strides. Output ``(B, num_classes, *S)``, or with deep supervision a list whose entry ``l`` has
    spatial size ``S`` divided by the strides of levels ``0..l``.
    """

    def __init__(self, input_channels: int, num_classes: int, conv_op: type[nn.Module],
                 features_per_level: Sequence[int], strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], encoder_expansion: Sequence[int],
                 decoder_expansion: Sequence[int], encoder_blocks: Sequence[int], decoder_blocks: Sequence[int],
                 deep_supervision: bool = True, gradient_checkpointing: bool = False):
        super().__init__()
        n_levels = len(features_per_level)
        if n_levels < 2:
            raise ValueError('MedNeXt needs at least two resolution levels')
        for name, value, expected in (('strides', strides, n_levels), ('kernel_sizes', kernel_sizes, n_levels),
                                      ('encoder_expansion', encoder_expansion, n_levels),
                                      ('encoder_blocks', encoder_blocks, n_levels),
                                      ('decoder_expansion', decoder_expansion, n_levels - 1),
                                      ('decoder_blocks', decoder_blocks, n_levels - 1)):
            if len(value) != expected:
                raise ValueError(f'{name} has {len(value)} entries, expected {expected} for {n_levels} levels')
        if any(s != 1 for s in strides[0]):
            raise ValueError(f'the first level cannot be strided (MedNeXt starts with a 1x1 stem), got {strides[0]}')
        if any(k % 2 == 0 for kernel in kernel_sizes for k in kernel):
            raise ValueError(f'MedNeXt kernels must be odd, got {kernel_sizes}')
        self.strides = [tuple(s) for s in strides]
        self.kernel_sizes = [tuple(k) for k in kernel_sizes]
        self.encoder = MedNeXtEncoder(input_channels, conv_op, features_per_level, strides, kernel_sizes,
                                      encoder_expansion, encoder_blocks, gradient_checkpointing)
        self.decoder = MedNeXtDecoder(num_classes, conv_op, features_per_level, strides, kernel_sizes,
                                      decoder_expansion, decoder_blocks, deep_supervision, gradient_checkpointing)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder(x))

    def extra_repr(self) -> str:
        return (f'{len(self.strides)} levels, strides {self.strides}, kernels {self.kernel_sizes}, '
                f'gradient checkpointing {"on" if self.gradient_checkpointing else "off"}')


def mednext_levels(plan_strides: Sequence[Sequence[int]], plan_kernel_sizes: Sequence[Sequence[int]]) -> Levels:
    """MedNeXt's levels on an nnU-Net plans configuration: its first :data:`MAX_LEVELS` stages, their strides and
    kernels. A plan of a single stage raises :class:`ShallowPlanError` (MedNeXt needs a downsampling)."""
    n_levels = min(MAX_LEVELS, len(plan_strides))
    if n_levels < 2:
        raise ShallowPlanError(f'MedNeXt needs at least two resolution levels, but the plans configuration has '
                               f'{n_levels} (strides {[list(s) for s in plan_strides]})')
    return levels_of(plan_strides[:n_levels], plan_kernel_sizes[:n_levels])


def mednext_from_plan(input_channels: int, num_classes: int, plan_strides: Sequence[Sequence[int]],
                      plan_kernel_sizes: Sequence[Sequence[int]], variant: str | MedNeXtVariant = 'S',
                      kernel_size: int = 3, deep_supervision: bool = True,
                      gradient_checkpointing: bool | None = None) -> MedNeXt:
    """Build a MedNeXt size (a name of :data:`VARIANTS` or a :class:`MedNeXtVariant`) on the topology of an
    nnU-Net plans configuration.

    The levels are :func:`mednext_levels`: their strides, and their kernels with every axis of nnU-Net kernel 1
    kept at 1 and every other axis set to ``kernel_size``. ``gradient_checkpointing=None`` takes the variant's
    default (on for M and L, as in the reference).
    """
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f'unknown MedNeXt variant {variant!r}; choose one of {sorted(VARIANTS)}')
        variant = VARIANTS[variant]
    levels = mednext_levels(plan_strides, plan_kernel_sizes)
    n_levels = len(levels.strides)
    if gradient_checkpointing is None:
        gradient_checkpointing = variant.gradient_checkpointing
    return MedNeXt(
        input_channels, num_classes, convert_dim_to_conv_op(len(levels.strides[0])),
        features_per_level=[STEM_FEATURES * 2 ** level for level in range(n_levels)],
        strides=levels.strides, kernel_sizes=levels.kernels(kernel_size),
        encoder_expansion=variant.encoder_expansion[:n_levels],
        decoder_expansion=variant.decoder_expansion[:n_levels - 1],
        encoder_blocks=variant.encoder_blocks[:n_levels],
        decoder_blocks=variant.decoder_blocks[:n_levels - 1],
        deep_supervision=deep_supervision, gradient_checkpointing=gradient_checkpointing)


def _run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, gradient_checkpointing: bool) -> torch.Tensor:
    for block in blocks:
        if gradient_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x
