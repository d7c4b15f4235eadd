"""UTNetV2 (Gao et al.; paper 002) with its topology taken from nnU-Net plans.

A hybrid U-shaped network: a convolutional stem at full and half resolution, then resolution levels
that each generate a small fixed-size *semantic map* (default 3x3x3) and refine feature map and
semantic map together with bidirectional multi-head attention (B-MHA), whose cost is linear in the
number of voxels. The encoder's semantic maps are fused across levels by a small standard
transformer; the decoder upsamples, concatenates skips, uses B-MHA blocks (with the fused maps) at
its coarse levels and residual conv blocks at the two finest, and ends in a 1x1 head. An auxiliary
1x1 head on the decoder output at level 2 (1/4 in the paper), interpolated to full resolution, gives the
paper's auxiliary loss.

Levels follow the plans: level 0 is full resolution, level ``l`` is reached with the plan's
``strides[l]``. Levels 0 and 1 form the stem, levels 2 and deeper are B-MHA levels, the last one is the
bottleneck. On the authors' BCV setting (five levels with strides [1,1,1], [1,2,2], [1,2,2], [2,2,2],
[2,2,2]) this is their network: widths 32, 64, 128, 256, 320, B-MHA blocks 2, 4, 6 at levels 2, 3, 4
and 4, 2 in the decoder, heads of 32 channels, instance norm without affine parameters, ReLU, MBConv
feed-forward with expansion 4 and squeeze-excitation, map fusion at width 320 with 10 heads, depth 2,
a 3x3x3 semantic map (their current ``config/bcv/medformer_3d.yaml``; the paper's text says 4x4x4), instance
norm eps 1e-4 in the norm-activation-conv layers and 1e-5 elsewhere, as theirs.

Given the same weights (:func:`convert_authors_state_dict`) it computes the authors' function. What differs
is the layout of the weights, and why:

- the last decoder B-MHA block does not compute the semantic-map update nor the value projection of
  the feature map that only that update uses (the reference computes and discards them), so every
  parameter gets a gradient: 16,384 fewer parameters on the BCV setting;
- the fusion transformer is PyTorch's ``nn.TransformerEncoder`` (pre-norm), whose attention input
  projection has a bias (the reference's has none; zero gives theirs): 960 more parameters per fusion layer;
- B-MHA keeps the channels of one head together (``h * head_dim + d``; the reference interleaves the heads,
  ``d * heads + h``), as PyTorch's attention does.
"""
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, convert_dim_to_conv_op
from torch import nn

from nnunet_plugins.networks.topology import Levels, ShallowPlanError, levels_of, same_padding
from nnunet_plugins.networks.utnetv2_blocks import (BMHABlock, PatchMerging, ResidualConvBlock, SemanticMapFusion,
                                                    SemanticMapGeneration)

MAX_LEVELS = 5  # full resolution, the stem's 1/2, and B-MHA levels 1/4, 1/8 and the 1/16 bottleneck
MIN_LEVELS = 4  # the stem's two levels, one B-MHA level and a B-MHA bottleneck below it
FIRST_BMHA_LEVEL = 2  # levels from here on have semantic maps and B-MHA blocks
AUX_LEVEL = 2  # the auxiliary head reads the decoder output at this level (the last B-MHA block's)
KERNEL = 3  # of every conv with a spatial extent, where the plans' kernel is not 1


@dataclass(frozen=True)
class UTNetV2Variant:
    """The settings of UTNetV2 that the plans do not decide (arguments of :class:`UTNetV2` of the same names)."""

    features_per_level: tuple[int, ...]
    transformer_blocks: tuple[int, ...]  # N1, N2, N3: B-MHA blocks at levels 2, 3, 4 (the decoder repeats them)
    map_size: int | tuple[int, ...]  # semantic map tokens per axis
    stem_blocks: int  # residual conv blocks at level 1 and in each conv decoder stage
    head_dim: int
    expansion: int  # of the MBConv feed-forward
    fusion_dim: int
    fusion_heads: int
    fusion_depth: int


VARIANTS: dict[str, UTNetV2Variant] = {
    # the authors' BCV configuration (config/bcv/medformer_3d.yaml); the paper's text and their earlier
    # configuration have a 4x4x4 map: dataclasses.replace(VARIANTS['bcv'], map_size=4)
    'bcv': UTNetV2Variant(features_per_level=(32, 64, 128, 256, 320), transformer_blocks=(2, 4, 6), map_size=3,
                          stem_blocks=2, head_dim=32, expansion=4, fusion_dim=320, fusion_heads=10, fusion_depth=2),
}



class EncoderBMHAStage(nn.Module):
    """Patch merging into a B-MHA level, its initial semantic map and B-MHA blocks:
    ``(B, C_in, *S) -> (B, C, *S / stride)`` and a ``(B, C, *map_size)`` map."""

    def __init__(self, conv_op: type[nn.Module], in_channels: int, channels: int, stride: Sequence[int],
                 kernel_size: Sequence[int], blocks: int, map_size: Sequence[int], head_dim: int, expansion: int):
        super().__init__()
        self.merge = PatchMerging(conv_op, in_channels, channels, stride, kernel_size)
        self.map_generation = SemanticMapGeneration(conv_op, channels, map_size, kernel_size)
        self.blocks = nn.ModuleList([BMHABlock(conv_op, channels, channels, channels, head_dim, expansion, kernel_size)
                                     for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.merge(x)
        semantic_map = self.map_generation(x)
        for block in self.blocks:
            x, semantic_map = block(x, semantic_map)
        return x, semantic_map


class UTNetV2Encoder(nn.Module):
    """Conv stem (levels 0 and 1) and the B-MHA levels; returns every level's features, highest resolution
    first, and the semantic maps of the B-MHA levels."""

    def __init__(self, input_channels: int, conv_op: type[nn.Module], features: Sequence[int],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                 transformer_blocks: Sequence[int], stem_blocks: int, map_size: Sequence[int], head_dim: int,
                 expansion: int):
        super().__init__()
        self.stem = nn.ModuleList([
            nn.Sequential(
                conv_op(input_channels, features[0], kernel_sizes[0], padding=same_padding(kernel_sizes[0]),
                        bias=False),
                ResidualConvBlock(conv_op, features[0], features[0], kernel_sizes[0])),
            nn.Sequential(
                PatchMerging(conv_op, features[0], features[1], strides[1], kernel_sizes[1]),
                *[ResidualConvBlock(conv_op, features[1], features[1], kernel_sizes[1]) for _ in range(stem_blocks)]),
        ])
        self.bmha_stages = nn.ModuleList([
            EncoderBMHAStage(conv_op, features[level - 1], features[level], strides[level], kernel_sizes[level],
                             transformer_blocks[level - FIRST_BMHA_LEVEL], map_size, head_dim, expansion)
            for level in range(FIRST_BMHA_LEVEL, len(features))])

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        skips, maps = [], []
        for stage in self.stem:
            x = stage(x)
            skips.append(x)
        for stage in self.bmha_stages:
            x, semantic_map = stage(x)
            skips.append(x)
            maps.append(semantic_map)
        return skips, maps


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Interpolate ``x`` linearly with corners aligned, as the reference: ``(B, C, *S) -> (B, C, *size)``."""
    return F.interpolate(x, size=tuple(size), mode='bilinear' if x.ndim == 4 else 'trilinear', align_corners=True)


def _upsample_and_concatenate(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Upsample ``x`` to the skip's size and put the two together."""
    return torch.cat([_upsample(x, skip.shape[2:]), skip], dim=1)


class DecoderBMHAStage(nn.Module):
    """Upsampling into a B-MHA level: concatenated skip, the semantic map from below concatenated with the
    level's fused encoder map and reduced (1x1) to ``channels``, then B-MHA blocks.
    ``(B, C_below, *S_below), (B, C, *S), (B, C_below, *map), (B, C, *map) -> (B, C, *S), (B, C, *map) or None``
    (None when ``update_last_map`` is off)."""

    def __init__(self, conv_op: type[nn.Module], below_channels: int, channels: int, kernel_size: Sequence[int],
                 blocks: int, head_dim: int, expansion: int, update_last_map: bool):
        super().__init__()
        self.map_reduction = conv_op(below_channels + channels, channels, kernel_size=1, bias=False)
        self.blocks = nn.ModuleList([
            BMHABlock(conv_op, below_channels + channels if i == 0 else channels, channels, channels, head_dim,
                      expansion, kernel_size, update_map=update_last_map or i < blocks - 1)
            for i in range(blocks)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor, map_below: torch.Tensor,
                encoder_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = _upsample_and_concatenate(x, skip)
        semantic_map = self.map_reduction(torch.cat([map_below, encoder_map], dim=1))
        for block in self.blocks:
            x, semantic_map = block(x, semantic_map)
        return x, semantic_map


class DecoderConvStage(nn.Module):
    """Upsampling into a stem level: concatenated skip, then residual conv blocks.
    ``(B, C_below, *S_below), (B, C, *S) -> (B, C, *S)``."""

    def __init__(self, conv_op: type[nn.Module], below_channels: int, channels: int, kernel_size: Sequence[int],
                 blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*[
            ResidualConvBlock(conv_op, below_channels + channels if i == 0 else channels, channels, kernel_size)
            for i in range(blocks)])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(_upsample_and_concatenate(x, skip))


class UTNetV2Decoder(nn.Module):
    """B-MHA stages into the levels above the bottleneck down to level 2, conv stages into levels 1 and 0,
    and two 1x1 heads: ``seg_layers[0]`` on level 0 and the auxiliary ``seg_layers[1]`` on level 2.

    With ``deep_supervision`` the output is ``[logits, auxiliary logits]``, both at full resolution: the
    auxiliary head's level-2 logits are interpolated up (linearly, corners aligned), as the reference does before
    its auxiliary loss. Without it, the logits alone. Both heads exist either way, so checkpoints load strictly.
    """

    def __init__(self, num_classes: int, conv_op: type[nn.Module], features: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], transformer_blocks: Sequence[int], stem_blocks: int,
                 head_dim: int, expansion: int, deep_supervision: bool):
        super().__init__()
        self.deep_supervision = deep_supervision
        # stage i goes from level len(features) - 1 - i up to level len(features) - 2 - i
        bmha_levels = range(len(features) - 2, FIRST_BMHA_LEVEL - 1, -1)
        self.bmha_stages = nn.ModuleList([
            DecoderBMHAStage(conv_op, features[level + 1], features[level], kernel_sizes[level],
                             transformer_blocks[level - FIRST_BMHA_LEVEL], head_dim, expansion,
                             update_last_map=level > FIRST_BMHA_LEVEL)
            for level in bmha_levels])
        self.conv_stages = nn.ModuleList([
            DecoderConvStage(conv_op, features[level + 1], features[level], kernel_sizes[level], stem_blocks)
            for level in range(FIRST_BMHA_LEVEL - 1, -1, -1)])
        self.seg_layers = nn.ModuleList([conv_op(features[0], num_classes, kernel_size=1),
                                         conv_op(features[AUX_LEVEL], num_classes, kernel_size=1)])

    def forward(self, skips: Sequence[torch.Tensor],
                fused_maps: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x, semantic_map = skips[-1], fused_maps[-1]
        for i, stage in enumerate(self.bmha_stages):
            level = len(skips) - 2 - i
            x, semantic_map = stage(x, skips[level], semantic_map, fused_maps[level - FIRST_BMHA_LEVEL])
        auxiliary = self.seg_layers[1](x) if self.deep_supervision else None
        for i, stage in enumerate(self.conv_stages):
            x = stage(x, skips[FIRST_BMHA_LEVEL - 1 - i])
        logits = self.seg_layers[0](x)
        return [logits, _upsample(auxiliary, logits.shape[2:])] if self.deep_supervision else logits


class UTNetV2(nn.Module):
    """UTNetV2 encoder-decoder for 2d or 3d input.

    Args:
        input_channels: channels of the input image.
        num_classes: output channels (nnU-Net's number of segmentation heads).
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        strides: per level, the stride per axis of the downsampling into that level; level 0 (full
            resolution) must be all ones. Between :data:`MIN_LEVELS` and :data:`MAX_LEVELS` levels.
        kernel_sizes: per level, the conv kernel per axis (odd sizes).
        features_per_level: channels per level; the first ``len(strides)`` entries are used. Every B-MHA
            level's width must be a multiple of ``head_dim``.
        transformer_blocks: B-MHA blocks per B-MHA level (levels 2, 3, ...; the paper's N1, N2, N3), used in
            the encoder and again in the decoder stage into the same level; the first ``len(strides) - 2``
            entries are used.
        map_size: tokens of the semantic map per axis (one int for every axis, or one per axis).
        stem_blocks: residual conv blocks at level 1 and in each of the two conv decoder stages.
        head_dim: channels per attention head.
        expansion: MBConv expansion ratio.
        fusion_dim, fusion_heads, fusion_depth: width, heads and layers of the map fusion transformer.
        deep_supervision: return ``[logits, auxiliary logits]`` instead of the logits alone.

    Input ``(B, input_channels, *S)``; every axis of ``S`` must be divisible by the product of its strides.
    Output ``(B, num_classes, *S)``, and so is the auxiliary output.
    """

    def __init__(self, input_channels: int, num_classes: int, conv_op: type[nn.Module],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]], *,
                 features_per_level: Sequence[int], transformer_blocks: Sequence[int], map_size: int | Sequence[int],
                 stem_blocks: int, head_dim: int, expansion: int, fusion_dim: int, fusion_heads: int,
                 fusion_depth: int, deep_supervision: bool = True):
        super().__init__()
        n_levels, dim = len(strides), convert_conv_op_to_dim(conv_op)
        if not MIN_LEVELS <= n_levels <= MAX_LEVELS:
            raise ValueError(f'UTNetV2 takes {MIN_LEVELS} to {MAX_LEVELS} resolution levels, got {n_levels} strides')
        map_size = [map_size] * dim if isinstance(map_size, int) else list(map_size)
        for name, value, expected in (('kernel_sizes', kernel_sizes, n_levels),
                                      ('features_per_level', features_per_level, n_levels),
                                      ('transformer_blocks', transformer_blocks, n_levels - FIRST_BMHA_LEVEL)):
            if len(value) < expected:
                raise ValueError(f'{name} has {len(value)} entries, {n_levels} levels need {expected}')
        if any(len(s) != dim for s in strides) or any(len(k) != dim for k in kernel_sizes) or len(map_size) != dim:
            raise ValueError(f'strides, kernel_sizes and map_size need {dim} entries per level for {conv_op.__name__}')
        if any(s != 1 for s in strides[0]):
            raise ValueError(f'the first level is full resolution and cannot be strided, got {strides[0]}')
        if any(k % 2 == 0 for kernel in kernel_sizes for k in kernel):
            raise ValueError(f'UTNetV2 kernels must be odd, got {kernel_sizes}')
        if math.prod(map_size) < 2:
            raise ValueError(f'the semantic map needs at least two tokens, got map_size {map_size}')
        features = list(features_per_level[:n_levels])
        if any(c % head_dim for c in features[FIRST_BMHA_LEVEL:]):
            raise ValueError(f'the B-MHA widths {features[FIRST_BMHA_LEVEL:]} must be multiples of head_dim {head_dim}')
        if fusion_dim % fusion_heads:
            raise ValueError(f'fusion_dim {fusion_dim} must be a multiple of fusion_heads {fusion_heads}')
        self.strides = [tuple(s) for s in strides]
        self.kernel_sizes = [tuple(k) for k in kernel_sizes[:n_levels]]
        self.transformer_blocks = list(transformer_blocks[:n_levels - FIRST_BMHA_LEVEL])
        self.map_size = tuple(map_size)
        self.encoder = UTNetV2Encoder(input_channels, conv_op, features, self.strides, self.kernel_sizes,
                                      self.transformer_blocks, stem_blocks, self.map_size, head_dim, expansion)
        self.map_fusion = SemanticMapFusion(conv_op, features[FIRST_BMHA_LEVEL:], fusion_dim, fusion_heads,
                                            fusion_depth)
        self.decoder = UTNetV2Decoder(num_classes, conv_op, features, self.kernel_sizes, self.transformer_blocks,
                                      stem_blocks, head_dim, expansion, deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips, maps = self.encoder(x)
        return self.decoder(skips, self.map_fusion(maps))

    def extra_repr(self) -> str:
        return (f'{len(self.strides)} levels, strides {self.strides}, kernels {self.kernel_sizes}, B-MHA blocks '
                f'{self.transformer_blocks} from level {FIRST_BMHA_LEVEL}, semantic map {self.map_size}')


def utnetv2_levels(plan_strides: Sequence[Sequence[int]], plan_kernel_sizes: Sequence[Sequence[int]]) -> Levels:
    """UTNetV2's levels on an nnU-Net plans configuration: its first :data:`MAX_LEVELS` stages, their strides and
    kernels. A plan with fewer stages drops the deepest B-MHA levels; one with fewer than :data:`MIN_LEVELS` raises
    :class:`ShallowPlanError`."""
    n_levels = min(MAX_LEVELS, len(plan_strides))
    if n_levels < MIN_LEVELS:
        raise ShallowPlanError(
            f'UTNetV2 needs at least {MIN_LEVELS} resolution levels (full resolution, the stem\'s second level, '
            f'a B-MHA level and the bottleneck), but the plans configuration has {n_levels} (strides '
            f'{[list(s) for s in plan_strides]})')
    return levels_of(plan_strides[:n_levels], plan_kernel_sizes[:n_levels])


def utnetv2_from_plan(input_channels: int, num_classes: int, plan_strides: Sequence[Sequence[int]],
                      plan_kernel_sizes: Sequence[Sequence[int]], variant: str | UTNetV2Variant = 'bcv',
                      deep_supervision: bool = True) -> UTNetV2:
    """Build UTNetV2 (a name of :data:`VARIANTS` or a :class:`UTNetV2Variant`) on the topology of an nnU-Net plans
    configuration, on the levels of :func:`utnetv2_levels`: their strides, and their kernels with every axis of
    nnU-Net kernel 1 kept at 1 and every other axis :data:`KERNEL`. The network has no gradient checkpointing.
    """
    if isinstance(variant, str):
        variant = VARIANTS[variant]
    levels = utnetv2_levels(plan_strides, plan_kernel_sizes)
    return UTNetV2(input_channels, num_classes, convert_dim_to_conv_op(len(levels.strides[0])), levels.strides,
                   levels.kernels(KERNEL), deep_supervision=deep_supervision, **asdict(variant))
