"""3D UX-Net (Lee et al., ICLR 2023; paper 000) with its downsampling taken from nnU-Net plans.

Encoder (paper Sec. 4.1): a large-kernel stem conv with stride 2 and LayerNorm, then four stages of
two blocks each (widths 48, 96, 192, 384), with LayerNorm and a kernel-2 stride-2 conv between stages
and a LayerNorm on every stage output. Block: depthwise 7^3 conv -> LayerNorm -> grouped 1x1 conv
C -> 4C ("depthwise convolution scaling", groups=C) -> GELU -> grouped 1x1 conv 4C -> C -> layer scale
-> residual.

Decoder (paper Sec. 4.2, as in Swin UNETR): a residual conv block (instance norm, LeakyReLU) on the raw
input (to 48 channels) and on each of the four stage outputs (to 96, 192, 384 and, at 1/16, 768); four
up blocks (transposed conv, concatenated skip, residual block) from 768 back to 48 channels at full
resolution; a last residual block and a 1x1 head.

The network has five resolution levels: full resolution (level 0, the raw-input block), the stem's
output (level 1) and one level per stage downsampling (levels 2-4, down to 1/16). On isotropic plans
it is the authors' network layer for layer (53,006,510 parameters for 1 input channel and 14 classes).
What the plans change (see :func:`uxnet_levels`):

- the stride of the stem and of each stage downsampling is the plans' stride of the level it leads
  into; an axis the plans do not downsample there is not downsampled (the kernel-2 downsampling conv
  and the transposed conv that mirrors it get kernel 1 on that axis);
- an axis whose nnU-Net kernel is 1 at a level gets kernel 1 there, in the 7^3 convs as in the 3^3
  residual blocks;
- ``conv_op=nn.Conv2d`` builds the same network in 2d.

As in the reference there is one output and no deep supervision; weights keep PyTorch's default
initialisation, which the reference also uses.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import (
    convert_dim_to_conv_op, get_matching_convtransp, get_matching_instancenorm)
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from torch import nn

from nnunet_plugins.networks.kernels import kernels_from_plan, same_padding

LEVELS = 5  # full resolution + stem (1/2) + three stage downsamplings (down to 1/16)
FEATURES_PER_STAGE = (48, 96, 192, 384)
HIDDEN_FEATURES = 768  # width of the decoder's residual block on the last stage output
DECODER_FEATURES = (*FEATURES_PER_STAGE, HIDDEN_FEATURES)  # per level
BLOCKS_PER_STAGE = 2
LARGE_KERNEL = 7  # stem and depthwise convs
DECODER_KERNEL = 3  # residual conv blocks of the decoder
EXPANSION = 4  # of the grouped 1x1 convs
LAYER_SCALE_INIT = 1e-6
LAYER_NORM_EPS = 1e-6


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first tensor: ``(B, C, *S) -> (B, C, *S)``."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)


class UXNetBlock(nn.Module):
    """Depthwise large-kernel conv -> LayerNorm -> grouped 1x1 expansion -> GELU -> grouped 1x1 projection
    -> per-channel layer scale, added to the input: ``(B, C, *S) -> (B, C, *S)``."""

    def __init__(self, conv_op: type[nn.Module], channels: int, kernel_size: Sequence[int]):
        super().__init__()
        self.depthwise = conv_op(channels, channels, kernel_size, padding=same_padding(kernel_size), groups=channels)
        self.norm = ChannelLayerNorm(channels)
        # "depthwise convolution scaling": each channel is widened to EXPANSION channels and back on its own
        self.expand = conv_op(channels, EXPANSION * channels, kernel_size=1, groups=channels)
        self.act = nn.GELU()
        self.project = conv_op(EXPANSION * channels, channels, kernel_size=1, groups=channels)
        self.layer_scale = nn.Parameter(torch.full((channels,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.project(self.act(self.expand(self.norm(self.depthwise(x)))))
        return x + self.layer_scale.view(-1, *[1] * (x.ndim - 2)) * update


class UXNetEncoder(nn.Module):
    """Stem and four stages; returns the LayerNorm-ed output of every stage, levels 1 to 4.

    ``downsamplers[0]`` is the stem (large-kernel conv with the level-1 stride, then LayerNorm);
    ``downsamplers[i]`` for ``i > 0`` is LayerNorm then a conv whose kernel equals its stride (the
    level-``i + 1`` stride).
    """

    def __init__(self, input_channels: int, conv_op: type[nn.Module], strides: Sequence[Sequence[int]],
                 large_kernel_sizes: Sequence[Sequence[int]]):
        super().__init__()
        stem_kernel = large_kernel_sizes[0]
        downsamplers = [nn.Sequential(
            conv_op(input_channels, FEATURES_PER_STAGE[0], stem_kernel, stride=strides[1],
                    padding=same_padding(stem_kernel)),
            ChannelLayerNorm(FEATURES_PER_STAGE[0]))]
        for stage in range(1, len(FEATURES_PER_STAGE)):
            stride = strides[stage + 1]
            downsamplers.append(nn.Sequential(
                ChannelLayerNorm(FEATURES_PER_STAGE[stage - 1]),
                conv_op(FEATURES_PER_STAGE[stage - 1], FEATURES_PER_STAGE[stage], stride, stride=stride)))
        self.downsamplers = nn.ModuleList(downsamplers)
        self.stages = nn.ModuleList([
            nn.Sequential(*[UXNetBlock(conv_op, channels, kernel) for _ in range(BLOCKS_PER_STAGE)])
            for channels, kernel in zip(FEATURES_PER_STAGE, large_kernel_sizes)])
        self.output_norms = nn.ModuleList([ChannelLayerNorm(channels) for channels in FEATURES_PER_STAGE])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for downsample, stage, norm in zip(self.downsamplers, self.stages, self.output_norms):
            x = stage(downsample(x))
            outputs.append(norm(x))
        return outputs


class UXNetDecoder(nn.Module):
    """Residual blocks on the input and the stage outputs, up blocks with concatenated skips, last block, head.

    Level ``l`` of the decoder has ``DECODER_FEATURES[l]`` channels: ``skip_blocks[l]`` maps the raw input
    (level 0) or the output of stage ``l - 1`` to that width; ``upsamplers[l]`` (transposed conv, kernel =
    stride = the level-``l + 1`` stride) brings level ``l + 1`` to level ``l``, where ``stages[l]`` merges it
    with the concatenated skip.
    """

    def __init__(self, input_channels: int, num_classes: int, conv_op: type[nn.Module],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]]):
        super().__init__()
        features = DECODER_FEATURES
        skip_inputs = (input_channels, *FEATURES_PER_STAGE)
        transposed_op = get_matching_convtransp(conv_op)
        self.skip_blocks = nn.ModuleList([
            _residual_block(conv_op, skip_inputs[level], features[level], kernel_sizes[level])
            for level in range(LEVELS)])
        self.upsamplers = nn.ModuleList([
            transposed_op(features[level + 1], features[level], strides[level + 1], stride=strides[level + 1],
                          bias=False) for level in range(LEVELS - 1)])
        self.stages = nn.ModuleList([
            _residual_block(conv_op, 2 * features[level], features[level], kernel_sizes[level])
            for level in range(LEVELS - 1)])
        self.last_block = _residual_block(conv_op, features[0], features[0], kernel_sizes[0])
        # named like nnU-Net's heads, so that nnUNetv2_train -pretrained_weights leaves it out
        self.seg_layers = conv_op(features[0], num_classes, kernel_size=1)

    def forward(self, image: torch.Tensor, stage_outputs: list[torch.Tensor]) -> torch.Tensor:
        skips = [block(x) for block, x in zip(self.skip_blocks, [image, *stage_outputs])]
        x = skips[-1]
        for level in reversed(range(LEVELS - 1)):
            x = self.stages[level](torch.cat((self.upsamplers[level](x), skips[level]), dim=1))
        return self.seg_layers(self.last_block(x))


class UXNet(nn.Module):
    """3D UX-Net for 2d or 3d input, one output (no deep supervision).

    Args:
        input_channels: channels of the input image.
        num_classes: output channels (nnU-Net's number of segmentation heads).
        conv_op: ``nn.Conv3d`` (the paper's network) or ``nn.Conv2d``.
        strides: per level (:data:`LEVELS` of them), the stride per axis into that level: level 0 must be
            all ones, level 1 is the stem's stride, levels 2-4 those of the stage downsamplings.
        large_kernel_sizes: per stage (four), the kernel per axis of its depthwise convs; the stem uses
            the first stage's. Odd sizes (7 in the paper).
        kernel_sizes: per level, the kernel per axis of the decoder's residual blocks at that level. Odd
            sizes (3 in the paper).

    Input ``(B, input_channels, *S)``; every axis of ``S`` must be divisible by the product of its
    strides. Output ``(B, num_classes, *S)``.
    """

    def __init__(self, input_channels: int, num_classes: int, conv_op: type[nn.Module],
                 strides: Sequence[Sequence[int]], large_kernel_sizes: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]]):
        super().__init__()
        for name, value, expected in (('strides', strides, LEVELS), ('kernel_sizes', kernel_sizes, LEVELS),
                                      ('large_kernel_sizes', large_kernel_sizes, len(FEATURES_PER_STAGE))):
            if len(value) != expected:
                raise ValueError(f'{name} has {len(value)} entries, 3D UX-Net needs {expected}')
        if any(s != 1 for s in strides[0]):
            raise ValueError(f'the first level is the full-resolution input and cannot be strided, got {strides[0]}')
        if any(k % 2 == 0 for kernel in (*large_kernel_sizes, *kernel_sizes) for k in kernel):
            raise ValueError(f'3D UX-Net kernels must be odd, got {large_kernel_sizes} and {kernel_sizes}')
        self.strides = [tuple(s) for s in strides]
        self.large_kernel_sizes = [tuple(k) for k in large_kernel_sizes]
        self.kernel_sizes = [tuple(k) for k in kernel_sizes]
        self.encoder = UXNetEncoder(input_channels, conv_op, strides, large_kernel_sizes)
        self.decoder = UXNetDecoder(input_channels, num_classes, conv_op, strides, kernel_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, self.encoder(x))


def uxnet_levels(plan_strides: Sequence[Sequence[int]],
                 plan_kernel_sizes: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """The strides and nnU-Net kernels of UX-Net's :data:`LEVELS` levels, read off a plans configuration.

    Level ``l`` takes the plan's level ``l``. A plan with more levels has its deeper ones left out (the
    network stops at 1/16, as in the paper); a plan with fewer is continued with levels that downsample
    no axis and keep the deepest level's kernels, so the network keeps its four stages.
    """
    n_plan = min(LEVELS, len(plan_strides))
    no_stride = [1] * len(plan_strides[0])
    strides = [list(s) for s in plan_strides[:n_plan]] + [no_stride] * (LEVELS - n_plan)
    kernels = [list(k) for k in plan_kernel_sizes[:n_plan]] + [list(plan_kernel_sizes[n_plan - 1])] * (LEVELS - n_plan)
    return strides, kernels


def uxnet_from_plan(input_channels: int, num_classes: int, plan_strides: Sequence[Sequence[int]],
                    plan_kernel_sizes: Sequence[Sequence[int]]) -> UXNet:
    """Build 3D UX-Net on the topology of an nnU-Net plans configuration (2d or 3d from its strides).

    Strides per level from :func:`uxnet_levels`; every axis whose nnU-Net kernel is 1 at a level gets
    kernel 1 there, every other axis :data:`LARGE_KERNEL` in the stem and stages and
    :data:`DECODER_KERNEL` in the decoder's residual blocks.
    """
    strides, plan_kernels = uxnet_levels(plan_strides, plan_kernel_sizes)
    return UXNet(input_channels, num_classes, convert_dim_to_conv_op(len(strides[0])), strides,
                 large_kernel_sizes=kernels_from_plan(plan_kernels[1:], LARGE_KERNEL),
                 kernel_sizes=kernels_from_plan(plan_kernels, DECODER_KERNEL))


def _residual_block(conv_op: type[nn.Module], in_channels: int, out_channels: int,
                    kernel_size: Sequence[int]) -> BasicBlockD:
    """Conv -> instance norm -> LeakyReLU -> conv -> instance norm, plus the input (through a 1x1 conv and
    instance norm when the width changes), then LeakyReLU; no conv bias, no affine norm (the reference's)."""
    return BasicBlockD(conv_op, in_channels, out_channels, kernel_size, stride=1, conv_bias=False,
                       norm_op=get_matching_instancenorm(conv_op), norm_op_kwargs={'eps': 1e-5, 'affine': False},
                       nonlin=nn.LeakyReLU, nonlin_kwargs={'negative_slope': 0.01, 'inplace': True})
