"""3D UX-Net (Lee et al., ICLR 2023; paper 000) with its downsampling taken from nnU-Net plans.

Encoder (paper Sec. 4.1): a large-kernel stem conv with stride 2 and LayerNorm, then four stages (the
paper's word; here levels 1-4) of two blocks each (widths 48, 96, 192, 384), with LayerNorm and a
kernel-2 stride-2 conv between them and a LayerNorm on every level's output. Block: depthwise 7^3 conv
-> LayerNorm -> grouped 1x1 conv C -> 4C ("depthwise convolution scaling", groups=C) -> GELU -> grouped
1x1 conv 4C -> C -> layer scale -> residual.

Decoder (paper Sec. 4.2, as in Swin UNETR): a residual conv block (instance norm, LeakyReLU) on the raw
input (to 48 channels) and on each of the four encoder levels' outputs (to 96, 192, 384 and, at 1/16, 768); four
up blocks (transposed conv, concatenated skip, residual block) from 768 back to 48 channels at full
resolution; a last residual block and a 1x1 head.

The network has five resolution levels: full resolution (level 0, the raw-input block), the stem's
output (level 1) and one level per downsampling between the blocks (levels 2-4, down to 1/16). On isotropic plans
it is the authors' network layer for layer (53,006,510 parameters for 1 input channel and 14 classes).
What the plans change (see :func:`uxnet_from_plan`):

- the stride of the stem and of each downsampling is the plans' stride of the level it leads
  into; an axis the plans do not downsample there is not downsampled (the kernel-2 downsampling conv
  and the transposed conv that mirrors it get kernel 1 on that axis);
- an axis whose nnU-Net kernel is 1 at a level gets kernel 1 there, in the 7^3 convs as in the 3^3
  residual blocks;
- ``conv_op=nn.Conv2d`` builds the same network in 2d.

As in the reference there is one output and no deep supervision; weights keep PyTorch's default
initialisation, which the reference also uses.
"""
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import (
    convert_dim_to_conv_op, get_matching_convtransp, get_matching_instancenorm)
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from torch import nn

from nnunet_plugins.networks.topology import Levels, levels_of, same_padding

LEVELS = 5  # full resolution + stem (1/2) + three downsamplings (down to 1/16)
LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class UXNetVariant:
    """The settings of 3D UX-Net that the plans do not decide.

    ``features_per_level`` are the widths of the encoder's levels 1-4 (the paper's four stages); the
    decoder adds ``hidden_features`` at 1/16. Kernel sizes are per axis where the plans' kernel is not 1.
    """

    features_per_level: tuple[int, ...]
    hidden_features: int  # width of the decoder's residual block on the last encoder level
    blocks_per_level: int
    large_kernel: int  # stem and depthwise convs
    decoder_kernel: int  # residual conv blocks of the decoder
    expansion: int  # of the grouped 1x1 convs
    layer_scale_init: float


VARIANTS: dict[str, UXNetVariant] = {
    'paper': UXNetVariant(features_per_level=(48, 96, 192, 384), hidden_features=768, blocks_per_level=2,
                          large_kernel=7, decoder_kernel=3, expansion=4, layer_scale_init=1e-6),
}


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first tensor: ``(B, C, *S) -> (B, C, *S)``."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)


class UXNetBlock(nn.Module):
    """Depthwise large-kernel conv -> LayerNorm -> grouped 1x1 expansion -> GELU -> grouped 1x1 projection
    -> per-channel layer scale, added to the input: ``(B, C, *S) -> (B, C, *S)``."""

    def __init__(self, conv_op: type[nn.Module], channels: int, kernel_size: Sequence[int], expansion: int,
                 layer_scale_init: float):
        super().__init__()
        self.depthwise = conv_op(channels, channels, kernel_size, padding=same_padding(kernel_size), groups=channels)
        self.norm = ChannelLayerNorm(channels)
        # "depthwise convolution scaling": each channel is widened to `expansion` channels and back on its own
        self.expand = conv_op(channels, expansion * channels, kernel_size=1, groups=channels)
        self.act = nn.GELU()
        self.project = conv_op(expansion * channels, channels, kernel_size=1, groups=channels)
        self.layer_scale = nn.Parameter(torch.full((channels,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.project(self.act(self.expand(self.norm(self.depthwise(x)))))
        return x + self.layer_scale.view(-1, *[1] * (x.ndim - 2)) * update


class UXNetEncoder(nn.Module):
    """Stem and the blocks of levels 1 to 4 (``stages[l - 1]``); returns the LayerNorm-ed output of every level.

    ``downsamplers[0]`` is the stem (large-kernel conv with the level-1 stride, then LayerNorm);
    ``downsamplers[i]`` for ``i > 0`` is LayerNorm then a conv whose kernel equals its stride (the
    level-``i + 1`` stride).
    """

    def __init__(self, input_channels: int, conv_op: type[nn.Module], strides: Sequence[Sequence[int]],
                 large_kernel_sizes: Sequence[Sequence[int]], features_per_level: Sequence[int],
                 blocks_per_level: int, expansion: int, layer_scale_init: float):
        super().__init__()
        stem_kernel = large_kernel_sizes[0]
        downsamplers = [nn.Sequential(
            conv_op(input_channels, features_per_level[0], stem_kernel, stride=strides[1],
                    padding=same_padding(stem_kernel)),
            ChannelLayerNorm(features_per_level[0]))]
        for i in range(1, len(features_per_level)):
            stride = strides[i + 1]
            downsamplers.append(nn.Sequential(
                ChannelLayerNorm(features_per_level[i - 1]),
                conv_op(features_per_level[i - 1], features_per_level[i], stride, stride=stride)))
        self.downsamplers = nn.ModuleList(downsamplers)
        self.stages = nn.ModuleList([
            nn.Sequential(*[UXNetBlock(conv_op, channels, kernel, expansion, layer_scale_init)
                            for _ in range(blocks_per_level)])
            for channels, kernel in zip(features_per_level, large_kernel_sizes)])
        self.output_norms = nn.ModuleList([ChannelLayerNorm(channels) for channels in features_per_level])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for downsample, stage, norm in zip(self.downsamplers, self.stages, self.output_norms):
            x = stage(downsample(x))
            outputs.append(norm(x))
        return outputs


class UXNetDecoder(nn.Module):
    """Residual blocks on the input and the encoder's outputs, up blocks with concatenated skips, last block, head.

    Level ``l`` of the decoder has ``features[l]`` channels: ``skip_blocks[l]`` maps the raw input (level 0)
    or the encoder's level-``l`` output to that width; ``upsamplers[l]`` (transposed conv, kernel = stride =
    the level-``l + 1`` stride) brings level ``l + 1`` to level ``l``, where ``stages[l]`` merges it with the
    concatenated skip.
    """

    def __init__(self, input_channels: int, num_classes: int, conv_op: type[nn.Module],
                 strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]],
                 encoder_features: Sequence[int], hidden_features: int):
        super().__init__()
        features = (*encoder_features, hidden_features)
        skip_inputs = (input_channels, *encoder_features)
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

    def forward(self, image: torch.Tensor, encoder_outputs: list[torch.Tensor]) -> torch.Tensor:
        skips = [block(x) for block, x in zip(self.skip_blocks, [image, *encoder_outputs])]
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
            all ones, level 1 is the stem's stride, levels 2-4 those of the downsamplings between the blocks.
        large_kernel_sizes: per encoder level (1-4), the kernel per axis of its depthwise convs; the stem
            uses level 1's. Odd sizes (7 in the paper).
        kernel_sizes: per level, the kernel per axis of the decoder's residual blocks at that level. Odd
            sizes (3 in the paper).
        features_per_level: widths of the encoder's levels 1-4 (48, 96, 192, 384 in the paper).
        hidden_features: width of the decoder at the deepest level (768).
        blocks_per_level: UX-Net blocks per encoder level (2).
        expansion: of the grouped 1x1 convs of a block (4).
        layer_scale_init: initial per-channel layer scale of a block (1e-6).

    Input ``(B, input_channels, *S)``; every axis of ``S`` must be divisible by the product of its
    strides. Output ``(B, num_classes, *S)``.
    """

    def __init__(self, input_channels: int, num_classes: int, conv_op: type[nn.Module],
                 strides: Sequence[Sequence[int]], large_kernel_sizes: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], *, features_per_level: Sequence[int], hidden_features: int,
                 blocks_per_level: int, expansion: int, layer_scale_init: float):
        super().__init__()
        for name, value, expected in (('strides', strides, LEVELS), ('kernel_sizes', kernel_sizes, LEVELS),
                                      ('features_per_level', features_per_level, LEVELS - 1),
                                      ('large_kernel_sizes', large_kernel_sizes, LEVELS - 1)):
            if len(value) != expected:
                raise ValueError(f'{name} has {len(value)} entries, 3D UX-Net needs {expected}')
        if any(s != 1 for s in strides[0]):
            raise ValueError(f'the first level is the full-resolution input and cannot be strided, got {strides[0]}')
        if any(k % 2 == 0 for kernel in (*large_kernel_sizes, *kernel_sizes) for k in kernel):
            raise ValueError(f'3D UX-Net kernels must be odd, got {large_kernel_sizes} and {kernel_sizes}')
        self.strides = [tuple(s) for s in strides]
        self.large_kernel_sizes = [tuple(k) for k in large_kernel_sizes]
        self.kernel_sizes = [tuple(k) for k in kernel_sizes]
        self.encoder = UXNetEncoder(input_channels, conv_op, strides, large_kernel_sizes, features_per_level,
                                    blocks_per_level, expansion, layer_scale_init)
        self.decoder = UXNetDecoder(input_channels, num_classes, conv_op, strides, kernel_sizes, features_per_level,
                                    hidden_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, self.encoder(x))

    def extra_repr(self) -> str:
        return (f'strides {self.strides}, large kernels {self.large_kernel_sizes}, decoder kernels '
                f'{self.kernel_sizes}, no deep supervision')


def uxnet_levels(plan_strides: Sequence[Sequence[int]], plan_kernel_sizes: Sequence[Sequence[int]]) -> Levels:
    """3D UX-Net's :data:`LEVELS` levels on an nnU-Net plans configuration: level ``l`` takes the plan's stage ``l``.

    A plan with more stages has its deeper ones left out (the network stops at 1/16, as in the paper); a plan with
    fewer is continued with levels that downsample no axis and keep the deepest stage's kernels, so no plan is too
    shallow.
    """
    n_plan = min(LEVELS, len(plan_strides))
    no_stride = [1] * len(plan_strides[0])
    return levels_of([list(s) for s in plan_strides[:n_plan]] + [no_stride] * (LEVELS - n_plan),
                     [list(k) for k in plan_kernel_sizes[:n_plan]] + [list(plan_kernel_sizes[n_plan - 1])] *
                     (LEVELS - n_plan))


def uxnet_from_plan(input_channels: int, num_classes: int, plan_strides: Sequence[Sequence[int]],
                    plan_kernel_sizes: Sequence[Sequence[int]], variant: str | UXNetVariant = 'paper') -> UXNet:
    """Build 3D UX-Net (a name of :data:`VARIANTS` or a :class:`UXNetVariant`) on the topology of an nnU-Net
    plans configuration (2d or 3d from its strides), on the levels of :func:`uxnet_levels`.

    Every axis whose nnU-Net kernel is 1 at a level gets kernel 1 there, every other axis the variant's large
    kernel in the stem and encoder and its decoder kernel in the decoder's residual blocks. The network has no
    gradient checkpointing.
    """
    if isinstance(variant, str):
        variant = VARIANTS[variant]
    levels = uxnet_levels(plan_strides, plan_kernel_sizes)
    hyperparameters = asdict(variant)
    large_kernel, decoder_kernel = hyperparameters.pop('large_kernel'), hyperparameters.pop('decoder_kernel')
    return UXNet(input_channels, num_classes, convert_dim_to_conv_op(len(levels.strides[0])), levels.strides,
                 large_kernel_sizes=levels.kernels(large_kernel)[1:], kernel_sizes=levels.kernels(decoder_kernel),
                 **hyperparameters)


def _residual_block(conv_op: type[nn.Module], in_channels: int, out_channels: int,
                    kernel_size: Sequence[int]) -> BasicBlockD:
    """Conv -> instance norm -> LeakyReLU -> conv -> instance norm, plus the input (through a 1x1 conv and
    instance norm when the width changes), then LeakyReLU; no conv bias, no affine norm (the reference's)."""
    return BasicBlockD(conv_op, in_channels, out_channels, kernel_size, stride=1, conv_bias=False,
                       norm_op=get_matching_instancenorm(conv_op), norm_op_kwargs={'eps': 1e-5, 'affine': False},
                       nonlin=nn.LeakyReLU, nonlin_kwargs={'negative_slope': 0.01, 'inplace': True})
