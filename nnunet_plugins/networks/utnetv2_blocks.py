"""The building blocks of UTNetV2 (:mod:`nnunet_plugins.networks.utnetv2`): the authors' pre-activation convs and
residual blocks, patch merging, the MBConv feed-forward, semantic-map generation, bidirectional multi-head attention
(B-MHA) and the fusion of the encoder's semantic maps. Each works in 2d and 3d (``conv_op``)."""
import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import get_matching_instancenorm
from torch import nn

from nnunet_plugins.networks.topology import same_padding

PREACT_NORM_EPS = 1e-4  # the authors' conv-norm-activation layers (here every PreActConv)
NORM_EPS = 1e-5  # their other instance norms (B-MHA inputs, patch merging): PyTorch's default


def _norm(conv_op: type[nn.Module], channels: int, eps: float = NORM_EPS) -> nn.Module:
    """Instance norm without affine parameters, as the reference ('in')."""
    return get_matching_instancenorm(conv_op)(channels, eps=eps)


class PreActConv(nn.Sequential):
    """Norm (eps :data:`PREACT_NORM_EPS`) -> ReLU (optional) -> conv without bias:
    ``(B, C_in, *S) -> (B, C_out, *S)``."""

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 activation: bool = True, groups: int = 1):
        super().__init__(_norm(conv_op, in_channels, PREACT_NORM_EPS), nn.ReLU() if activation else nn.Identity(),
                         conv_op(in_channels, out_channels, kernel_size, padding=same_padding(kernel_size),
                                 groups=groups, bias=False))


class ResidualConvBlock(nn.Module):
    """Pre-activation residual block: two :class:`PreActConv` layers plus a shortcut, ``(B, C_in, *S) ->
    (B, C_out, *S)``. When the channels change, the shortcut is a third such layer (kernel ``kernel_size``,
    as in the reference), otherwise the identity."""

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int, kernel_size: Sequence[int]):
        super().__init__()
        self.residual = nn.Sequential(PreActConv(conv_op, in_channels, out_channels, kernel_size),
                                      PreActConv(conv_op, out_channels, out_channels, kernel_size))
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else PreActConv(conv_op, in_channels, out_channels, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise conv (kernel ``kernel_size``) -> pointwise 1x1 conv, no bias: ``(B, C_in, *S) -> (B, C_out, *S)``."""

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int, kernel_size: Sequence[int]):
        super().__init__(
            conv_op(in_channels, in_channels, kernel_size, padding=same_padding(kernel_size), groups=in_channels,
                    bias=False),
            conv_op(in_channels, out_channels, kernel_size=1, bias=False))


class PatchMerging(nn.Module):
    """Downsampling by space-to-depth: the ``prod(stride)`` voxels of every block become channels, then norm and
    a depthwise-separable conv. ``(B, C_in, *S) -> (B, C_out, *S / stride)``; ``S`` divisible by ``stride``."""

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int, stride: Sequence[int],
                 kernel_size: Sequence[int]):
        super().__init__()
        self.stride = tuple(stride)
        merged = in_channels * math.prod(stride)
        self.norm = _norm(conv_op, merged)
        self.reduction = DepthwiseSeparableConv(conv_op, merged, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offsets = itertools.product(*(range(s) for s in self.stride))
        blocks = [x[(..., *(slice(o, None, s) for o, s in zip(offset, self.stride)))] for offset in offsets]
        return self.reduction(self.norm(torch.cat(blocks, dim=1)))


class SqueezeExcitation(nn.Module):
    """Channel gating by the mean over all voxels: ``(B, C, *S) -> (B, C, *S)``.

    (dynamic_network_architectures' ``SqueezeExcite`` averages over axes 2 and 3 only, which in 3d leaves
    one gate per position along the last axis.)
    """

    def __init__(self, conv_op: type[nn.Module], channels: int, reduced_channels: int):
        super().__init__()
        self.gate = nn.Sequential(conv_op(channels, reduced_channels, kernel_size=1), nn.ReLU(),
                                  conv_op(reduced_channels, channels, kernel_size=1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x.mean(dim=tuple(range(2, x.ndim)), keepdim=True))


class MBConv(nn.Module):
    """Inverted residual with squeeze-excitation, the B-MHA feed-forward: pre-activation 1x1 expand ->
    depthwise conv -> squeeze-excitation (reduction 4) -> 1x1 project (norm, no activation) -> residual add.
    ``(B, C, *S) -> (B, C, *S)``."""

    def __init__(self, conv_op: type[nn.Module], channels: int, expansion: int, kernel_size: Sequence[int]):
        super().__init__()
        expanded = expansion * channels
        self.residual = nn.Sequential(
            PreActConv(conv_op, channels, expanded, [1] * len(kernel_size)),
            PreActConv(conv_op, expanded, expanded, kernel_size, groups=expanded),
            SqueezeExcitation(conv_op, expanded, expanded // 4),
            PreActConv(conv_op, expanded, channels, [1] * len(kernel_size), activation=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


class SemanticMapGeneration(nn.Module):
    """The initial semantic map of a level: ``(B, C, *S) -> (B, C, *map_size)``.

    Two convs give a base feature map and one weight map per map token; each token is the base features
    averaged over all voxels with its softmax-normalised weights. Memory is linear in the voxels.
    """

    def __init__(self, conv_op: type[nn.Module], channels: int, map_size: Sequence[int], kernel_size: Sequence[int]):
        super().__init__()
        self.map_size = tuple(map_size)
        padding = same_padding(kernel_size)
        self.base = conv_op(channels, channels, kernel_size, padding=padding, bias=False)
        self.weights = conv_op(channels, math.prod(map_size), kernel_size, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base(x).flatten(2)  # B, C, N
        weights = F.softmax(self.weights(x).flatten(2), dim=-1)  # B, T, N
        return (base @ weights.transpose(1, 2)).unflatten(2, self.map_size)


class BidirectionalAttention(nn.Module):
    """B-MHA (paper eq. 5): cross-attention between a feature map and its semantic map, both ways at once.

    The feature map X is projected by a depthwise-separable conv to queries q_X (and values v_X), the map
    M by a 1x1 conv to q_M and v_M. One similarity ``A = q_X q_M^T / sqrt(head_dim)`` (voxels x tokens, per
    head) serves both directions: ``X' = softmax over tokens(A) v_M`` and ``M' = softmax over voxels(A)^T v_X``.
    Nothing of size voxels x voxels exists, so time and memory are linear in the voxels.

    Args:
        update_map: compute ``M'``. The last B-MHA block of the network has no later use for it, so it
            skips ``M'`` and the value projection of X that only ``M'`` uses.

    Input ``(B, C_feat, *S)`` and ``(B, C_map, *map_size)``; output ``(B, C_out, *S)`` and ``(B, C_map,
    *map_size)`` (or None without ``update_map``).
    """

    def __init__(self, conv_op: type[nn.Module], feat_channels: int, map_channels: int, out_channels: int,
                 heads: int, head_dim: int, kernel_size: Sequence[int], update_map: bool = True):
        super().__init__()
        self.heads, self.head_dim, self.update_map = heads, head_dim, update_map
        inner = heads * head_dim
        self.feat_proj = DepthwiseSeparableConv(conv_op, feat_channels, inner * (2 if update_map else 1), kernel_size)
        self.map_proj = conv_op(map_channels, 2 * inner, kernel_size=1, bias=False)
        self.feat_out = DepthwiseSeparableConv(conv_op, inner, out_channels, kernel_size)
        self.map_out = conv_op(inner, map_channels, kernel_size=1, bias=False) if update_map else None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, heads * head_dim, *S) -> (B, heads, N, head_dim)``."""
        return x.flatten(2).unflatten(1, (self.heads, self.head_dim)).transpose(-2, -1)

    def _merge_heads(self, x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """``(B, heads, N, head_dim) -> (B, heads * head_dim, *S)``."""
        return x.transpose(-2, -1).flatten(1, 2).unflatten(2, tuple(spatial))

    def forward(self, feat: torch.Tensor, semantic_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feat_qv = [self._split_heads(t) for t in self.feat_proj(feat).chunk(2 if self.update_map else 1, dim=1)]
        map_q, map_v = [self._split_heads(t) for t in self.map_proj(semantic_map).chunk(2, dim=1)]
        similarity = (feat_qv[0] @ map_q.transpose(-2, -1)) * self.head_dim ** -0.5  # B, heads, N, T
        feat_out = self.feat_out(self._merge_heads(F.softmax(similarity, dim=-1) @ map_v, feat.shape[2:]))
        if not self.update_map:
            return feat_out, None
        map_update = F.softmax(similarity, dim=-2).transpose(-2, -1) @ feat_qv[1]  # B, heads, T, head_dim
        return feat_out, self.map_out(self._merge_heads(map_update, semantic_map.shape[2:]))


class BMHABlock(nn.Module):
    """B-MHA transformer block: ``X -> MBConv(B-MHA(norm X, norm M) + shortcut(X))`` and ``M -> M + M'``.

    The shortcut is the identity, or a pre-activation 1x1 conv when ``feat_channels != out_channels``.
    Shapes as :class:`BidirectionalAttention`; without ``update_map`` the returned map is None.
    """

    def __init__(self, conv_op: type[nn.Module], feat_channels: int, map_channels: int, out_channels: int,
                 head_dim: int, expansion: int, kernel_size: Sequence[int], update_map: bool = True):
        super().__init__()
        self.feat_norm = _norm(conv_op, feat_channels)
        self.map_norm = _norm(conv_op, map_channels)
        self.attention = BidirectionalAttention(conv_op, feat_channels, map_channels, out_channels,
                                                out_channels // head_dim, head_dim, kernel_size, update_map)
        self.shortcut = (nn.Identity() if feat_channels == out_channels
                         else PreActConv(conv_op, feat_channels, out_channels, [1] * len(kernel_size)))
        self.feedforward = MBConv(conv_op, out_channels, expansion, kernel_size)

    def forward(self, x: torch.Tensor, semantic_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, map_update = self.attention(self.feat_norm(x), self.map_norm(semantic_map))
        out = self.feedforward(out + self.shortcut(x))
        return out, None if map_update is None else semantic_map + map_update


class SemanticMapFusion(nn.Module):
    """Multi-scale semantic map fusion: every level's map is projected (1x1) to ``dim`` channels, all tokens
    go through one standard pre-norm transformer together, and are split and projected back.

    Input and output: a list with one ``(B, C_l, *map_size)`` map per B-MHA level.
    """

    def __init__(self, conv_op: type[nn.Module], map_channels: Sequence[int], dim: int, heads: int, depth: int):
        super().__init__()
        self.in_proj = nn.ModuleList([conv_op(c, dim, kernel_size=1, bias=False) for c in map_channels])
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=0.0, activation='gelu',
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out_proj = nn.ModuleList([conv_op(dim, c, kernel_size=1, bias=False) for c in map_channels])

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        map_size = maps[0].shape[2:]
        tokens = [proj(m).flatten(2).transpose(1, 2) for proj, m in zip(self.in_proj, maps)]  # B, T, dim each
        fused = self.transformer(torch.cat(tokens, dim=1)).split(map_size.numel(), dim=1)
        return [proj(t.transpose(1, 2).unflatten(2, map_size)) for proj, t in zip(self.out_proj, fused)]
