"""Swin UNETR (Tang et al., CVPR 2022; paper 003) with its patch embedding taken from nnU-Net plans.

Encoder (paper Sec. 3): the input is cut into patches (2x2x2 in the paper) and linearly embedded to C = 48
channels; four stages of Swin transformer blocks (window attention then shifted-window attention, window 7,
heads 3, 6, 12, 24; two blocks each) at 1/2, 1/4, 1/8 and 1/16, each followed by patch merging (2x2x2
neighbours -> 2x the channels), so the last merging brings 16C channels to 1/32. Every stage's output is
layer-normalised (without parameters) before the decoder sees it. The encoder is MONAI's maintained
``SwinTransformer``: window attention, the shifted-window masks and patch merging are MONAI's, not ours.

Decoder: residual conv blocks (two 3x3x3 convs with instance norm, LeakyReLU) on the raw input and on the
outputs at 1/2, 1/4 and 1/8, one on the 1/32 bottleneck; five up blocks (transposed conv, concatenated skip,
residual block; the 1/16 output is concatenated as it is) back to full resolution; a 1x1 head. These are
MONAI's UNETR blocks, as in MONAI's ``SwinUNETR``, which is the authors' implementation.

The network has six resolution levels: full resolution (level 0), the patch embedding's tokens (level 1), and
one level per patch merging (levels 2-5). On isotropic plans it is the paper's network: with the same
weights it computes what ``monai.networks.nets.SwinUNETR(feature_size=48)`` computes, with the same
parameters (62,187,296 for 1 input channel and 14 classes). What the plans change (:func:`swinunetr_from_plan`):

- the patch embedding's stride is the plan's first downsampling (e.g. 1x2x2 on thick-slice CT, as paper 004
  did); patch merging stays 2x2x2 (MONAI's), so every later level halves every axis;
- an axis whose nnU-Net kernel is 1 gets kernel 1 in the decoder's residual blocks (level 0 where plan stage 0
  has it, levels 1-5 where stage 1 has it, as patch merging keeps level 1's spacing ratios);
- three strides per level build the 3d network, two the 2d one (MONAI's blocks in 2d).

MONAI shrinks a window at run time to the token grid along every axis where the grid is not longer than the
window, and does not shift it along that axis (:meth:`SwinUNETR.windows` says which windows a patch gets). Like the
reference, it then looks the relative position bias up as if the window had not shrunk along the later axes
(``relative_position_index[:n, :n]``); this is the reference's function (at 96^3 its last stage runs 6x6x6
windows that way), kept so that weights and outputs stay exchangeable with MONAI's.

MONAI is imported where a network is built, not with this module: nnU-Net imports every trainer module to find a
trainer by name, and importing MONAI would add about a second to every nnU-Net command that looks one up.

As in the reference there is one output and no deep supervision.
"""
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_plugins.networks.topology import Levels, ShallowPlanError, levels_of
from nnunet_plugins.weights.files import read_checkpoint, swin_authors_name_to_ours
from nnunet_plugins.weights.swin_axes import AXES_NOTE, to_nnunet_axes

if TYPE_CHECKING:
    from monai.networks.nets.swin_unetr import SwinTransformer, SwinTransformerBlock

LEVELS = 6  # full resolution, the patch embedding (level 1), four patch mergings (levels 2-5, down to 1/32)
SWIN_STAGES = 4  # Swin blocks at levels 1-4; level 5 is the bottleneck after the last merging
MERGE_STRIDE = 2  # MONAI's patch merging halves every axis
NORM = 'instance'  # of the decoder's residual blocks, as in MONAI's SwinUNETR


@dataclass(frozen=True)
class SwinUNETRVariant:
    """The settings of Swin UNETR that the plans do not decide.

    ``patch_size`` is the embedding's stride along every axis the plan downsamples at its first stage (the
    others get 1); ``decoder_kernel`` is the residual blocks' kernel along every axis whose nnU-Net kernel is
    not 1.
    """

    feature_size: int  # C, the embedding's width; level l has C * 2^(l - 1) channels
    depths: tuple[int, ...]  # Swin blocks per stage
    num_heads: tuple[int, ...]
    window_size: int
    patch_size: int
    mlp_ratio: float
    decoder_kernel: int
    gradient_checkpointing: bool


VARIANTS: dict[str, SwinUNETRVariant] = {
    'paper': SwinUNETRVariant(feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7,
                              patch_size=2, mlp_ratio=4.0, decoder_kernel=3, gradient_checkpointing=False),
}


class SwinUNETRDecoder(nn.Module):
    """Residual blocks on the input and the encoder's outputs, up blocks with concatenated skips, head.

    Level ``l`` of the decoder has ``channels[l]`` channels (C, C, 2C, 4C, 8C, 16C). ``skip_blocks[l]`` maps
    the raw input (level 0) or the encoder's level-``l`` output to them, for levels 0-3; the level-4 output
    is concatenated as it is; ``bottleneck`` is the block on level 5. ``stages[l]`` (transposed conv with
    kernel = stride = the level-``l + 1`` stride, concatenated skip, residual block) brings level ``l + 1``
    to level ``l``.
    """

    def __init__(self, input_channels: int, num_classes: int, spatial_dims: int, strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], feature_size: int):
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetOutBlock
        from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrUpBlock
        channels = [feature_size] + [feature_size * 2 ** (level - 1) for level in range(1, LEVELS)]
        common = dict(spatial_dims=spatial_dims, norm_name=NORM, res_block=True)
        self.skip_blocks = nn.ModuleList([
            UnetrBasicBlock(in_channels=input_channels if level == 0 else channels[level],
                            out_channels=channels[level], kernel_size=kernel_sizes[level], stride=1, **common)
            for level in range(SWIN_STAGES)])
        self.bottleneck = UnetrBasicBlock(in_channels=channels[-1], out_channels=channels[-1],
                                          kernel_size=kernel_sizes[-1], stride=1, **common)
        self.stages = nn.ModuleList([
            UnetrUpBlock(in_channels=channels[level + 1], out_channels=channels[level],
                         kernel_size=kernel_sizes[level], upsample_kernel_size=strides[level + 1], **common)
            for level in range(LEVELS - 1)])
        # nested and named like nnU-Net's heads ('.seg_layers.' in the key): -pretrained_weights leaves it out
        self.seg_layers = UnetOutBlock(spatial_dims=spatial_dims, in_channels=channels[0], out_channels=num_classes)

    def forward(self, image: torch.Tensor, encoder_outputs: list[torch.Tensor]) -> torch.Tensor:
        """``image`` ``(B, C_in, *S)`` and the encoder's outputs of levels 1-5 -> logits ``(B, classes, *S)``."""
        skips = [block(x) for block, x in zip(self.skip_blocks, [image, *encoder_outputs[:SWIN_STAGES - 1]])]
        skips.append(encoder_outputs[SWIN_STAGES - 1])
        x = self.bottleneck(encoder_outputs[-1])
        for level in reversed(range(LEVELS - 1)):
            x = self.stages[level](x, skips[level])
        return self.seg_layers(x)


class SwinUNETR(nn.Module):
    """Swin UNETR for 2d or 3d input, one output (no deep supervision).

    Args:
        input_channels: channels of the input image.
        num_classes: output channels (nnU-Net's number of segmentation heads).
        strides: per level (:data:`LEVELS` of them), the stride per axis into that level: level 0 all ones,
            level 1 the patch embedding's (its kernel too), levels 2-5 all 2 (patch merging). Three entries
            per level build the 3d network, two the 2d one.
        kernel_sizes: per level, the kernel per axis of the decoder's residual blocks there (odd; 3 in the paper).
        feature_size: embedding width C (48 in the paper).
        depths: Swin blocks in each of the four stages (2, 2, 2, 2).
        num_heads: attention heads per stage (3, 6, 12, 24); each stage's width must be a multiple.
        window_size: attention window along every axis, in tokens (7).
        mlp_ratio: hidden width of the blocks' MLP relative to their width (4).
        gradient_checkpointing: recompute the Swin blocks' activations in the backward pass (MONAI's
            ``use_checkpoint``, non-reentrant); changes memory and time, not results.

    Input ``(B, input_channels, *S)``; every axis of ``S`` must be divisible by the product of its strides.
    Output ``(B, num_classes, *S)``.
    """

    def __init__(self, input_channels: int, num_classes: int, strides: Sequence[Sequence[int]],
                 kernel_sizes: Sequence[Sequence[int]], *, feature_size: int, depths: Sequence[int],
                 num_heads: Sequence[int], window_size: int, mlp_ratio: float, gradient_checkpointing: bool = False):
        super().__init__()
        dims = len(strides[0])
        for name, value, expected in (('strides', strides, LEVELS), ('kernel_sizes', kernel_sizes, LEVELS),
                                      ('depths', depths, SWIN_STAGES), ('num_heads', num_heads, SWIN_STAGES)):
            if len(value) != expected:
                raise ValueError(f'{name} has {len(value)} entries, Swin UNETR needs {expected}')
        if dims not in (2, 3) or any(len(s) != dims for s in strides) or any(len(k) != dims for k in kernel_sizes):
            raise ValueError(f'strides and kernel_sizes need 2 or 3 entries per level, all alike; got {strides} and '
                             f'{kernel_sizes}')
        if any(s != 1 for s in strides[0]):
            raise ValueError(f'the first level is the full-resolution input and cannot be strided, got {strides[0]}')
        if any(s != MERGE_STRIDE for stride in strides[2:] for s in stride):
            raise ValueError(f'levels 2-5 follow MONAI\'s patch merging, which halves every axis; got strides '
                             f'{[list(s) for s in strides[2:]]}')
        if any(k % 2 == 0 for kernel in kernel_sizes for k in kernel):
            raise ValueError(f'Swin UNETR decoder kernels must be odd, got {kernel_sizes}')
        widths = [feature_size * 2 ** stage for stage in range(SWIN_STAGES)]
        if any(width % heads for width, heads in zip(widths, num_heads)):
            raise ValueError(f'the stage widths {widths} must be multiples of their num_heads {list(num_heads)}')
        self.strides = [tuple(s) for s in strides]
        self.kernel_sizes = [tuple(k) for k in kernel_sizes]
        self.window_size = (window_size,) * dims
        self.encoder = _swin_transformer(
            in_chans=input_channels, embed_dim=feature_size, window_size=self.window_size, patch_size=self.strides[1],
            depths=tuple(depths), num_heads=tuple(num_heads), mlp_ratio=mlp_ratio, qkv_bias=True, drop_rate=0.0,
            attn_drop_rate=0.0, drop_path_rate=0.0, patch_norm=False, use_checkpoint=gradient_checkpointing,
            spatial_dims=dims, downsample='merging')
        self.decoder = SwinUNETRDecoder(input_channels, num_classes, dims, self.strides, self.kernel_sizes,
                                        feature_size)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the Swin blocks recompute their activations in the backward pass; can be switched by setting it."""
        return all(block.use_checkpoint for block in self._swin_blocks())

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        for block in self._swin_blocks():
            block.use_checkpoint = enabled

    def _swin_blocks(self) -> list['SwinTransformerBlock']:
        from monai.networks.nets.swin_unetr import SwinTransformerBlock
        return [module for module in self.encoder.modules() if isinstance(module, SwinTransformerBlock)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, self.encoder(x, normalize=True))

    def windows(self, patch_size: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per Swin stage (levels 1-4), the window and shift, in tokens per axis, that MONAI uses on ``patch_size``:
        the window is clipped to the token grid along every axis where the grid is not longer, and not shifted
        along it."""
        from monai.networks.nets.swin_unetr import get_window_size
        grid = np.array(patch_size)
        windows = []
        for level in range(1, SWIN_STAGES + 1):
            grid = grid // np.array(self.strides[level])
            windows.append(get_window_size(tuple(grid.tolist()), self.window_size,
                                           tuple(w // 2 for w in self.window_size)))
        return windows

    def extra_repr(self) -> str:
        return (f'strides {self.strides}, decoder kernels {self.kernel_sizes}, window {self.window_size}, '
                f'gradient checkpointing {"on" if self.gradient_checkpointing else "off"}, no deep supervision')


def swinunetr_levels(plan_strides: Sequence[Sequence[int]], plan_kernel_sizes: Sequence[Sequence[int]],
                     variant: str | SwinUNETRVariant = 'paper') -> Levels:
    """Swin UNETR's :data:`LEVELS` levels on an nnU-Net plans configuration (2d or 3d from its strides), for a
    variant (a name of :data:`VARIANTS` or a :class:`SwinUNETRVariant`).

    Level 1 is the patch embedding: the variant's ``patch_size`` along every axis the plan's stage 1 downsamples, 1
    along the others; levels 2-5 are the patch mergings, which halve every axis whatever the plan's later stages do.
    Level 0 keeps the kernel pattern of plan stage 0, levels 1-5 that of stage 1 (patch merging keeps the spacing
    ratios of level 1). A plan without a downsampling stage raises :class:`ShallowPlanError`.
    """
    if len(plan_strides) < 2:
        raise ShallowPlanError(f'Swin UNETR takes its patch embedding from the plan\'s first downsampling, but the '
                               f'plans configuration has none (strides {[list(s) for s in plan_strides]})')
    patch_size = (VARIANTS[variant] if isinstance(variant, str) else variant).patch_size
    dims = len(plan_strides[0])
    embedding = [patch_size if s > 1 else 1 for s in plan_strides[1]]
    return levels_of([[1] * dims, embedding] + [[MERGE_STRIDE] * dims] * (LEVELS - 2),
                     [plan_kernel_sizes[0]] + [plan_kernel_sizes[1]] * (LEVELS - 1))


def swinunetr_from_plan(input_channels: int, num_classes: int, plan_strides: Sequence[Sequence[int]],
                        plan_kernel_sizes: Sequence[Sequence[int]], variant: str | SwinUNETRVariant = 'paper',
                        gradient_checkpointing: bool | None = None) -> SwinUNETR:
    """Build Swin UNETR (a name of :data:`VARIANTS` or a :class:`SwinUNETRVariant`) on the topology of an nnU-Net
    plans configuration, on the levels of :func:`swinunetr_levels`; the decoder's kernels are the variant's
    ``decoder_kernel`` where the plan's are not 1. ``gradient_checkpointing`` (of the Swin blocks) None takes the
    variant's default.
    """
    if isinstance(variant, str):
        variant = VARIANTS[variant]
    levels = swinunetr_levels(plan_strides, plan_kernel_sizes, variant)
    hyperparameters = asdict(variant)
    for name in ('patch_size', 'decoder_kernel', 'gradient_checkpointing'):
        hyperparameters.pop(name)
    return SwinUNETR(input_channels, num_classes, levels.strides, levels.kernels(variant.decoder_kernel),
                     **hyperparameters, gradient_checkpointing=variant.gradient_checkpointing
                     if gradient_checkpointing is None else gradient_checkpointing)


def _swin_transformer(**kwargs) -> 'SwinTransformer':
    """MONAI's ``SwinTransformer(**kwargs)``, also under ``torch.device('meta')``: its ``__init__`` reads a tensor's
    value (the drop-path schedule), which meta tensors do not have, so there it is built on the CPU and moved."""
    from monai.networks.nets.swin_unetr import SwinTransformer
    if torch.empty(0).device.type != 'meta':
        return SwinTransformer(**kwargs)
    with torch.device('cpu'):
        encoder = SwinTransformer(**kwargs)
    return encoder.to('meta')


# ---- the authors' pre-trained encoder (its layout and renaming: nnunet_plugins.weights.files) ----

class PretrainedEncoderError(ValueError):
    """A pre-trained encoder file that cannot initialise the network's encoder; the message says why."""


@dataclass(frozen=True)
class EncoderLoad:
    """What :func:`load_pretrained_encoder` did, by state-dict name of our network."""

    source: str
    loaded: tuple[str, ...]  # encoder tensors copied from the file
    missing: tuple[str, ...]  # encoder tensors the file does not have (left as they were)
    unused: tuple[str, ...]  # tensors of the file that are not the encoder's (e.g. the pre-training heads)

    def summary(self) -> str:
        """Two lines: the counts, then what was converted to nnU-Net's axis order and what was not."""
        return (f'pre-trained encoder from {self.source}: {len(self.loaded)} of {len(self.loaded) + len(self.missing)}'
                f' encoder tensors loaded, {len(self.unused)} tensors of the file unused\n{AXES_NOTE}')


def load_pretrained_encoder(network: SwinUNETR, weights: str | Path | Mapping[str, object]) -> EncoderLoad:
    """Copy the authors' released pre-trained encoder (a file or its loaded dict, MONAI's ``load_from`` format)
    into ``network.encoder``, converted from their (x, y, z) arrays to nnU-Net's (z, y, x)
    (:func:`~nnunet_plugins.weights.swin_axes.to_nnunet_axes`); the decoder and head are left as they are.

    Raises :class:`PretrainedEncoderError` when nothing matches (the silent no-op of
    ``load_state_dict(strict=False)``), when a matching tensor has another shape (another embedding width,
    input channels or patch embedding), and a ``CheckpointError`` naming a file that cannot be read.
    """
    source = str(weights) if isinstance(weights, (str, Path)) else 'the given state dict'
    content = read_checkpoint(weights) if isinstance(weights, (str, Path)) else weights
    state = content.get('state_dict') if isinstance(content, Mapping) else None
    if not isinstance(state, Mapping):
        found = list(content)[:5] if isinstance(content, Mapping) else type(content).__name__
        raise PretrainedEncoderError(f'{source} has no "state_dict" entry (found {found}); the pre-trained encoder '
                                     f'format is {{"state_dict": {{"module.layers1.0.blocks.0.mlp.fc1.weight": ...}}}}')
    ours = network.encoder.state_dict()
    try:
        converted = to_nnunet_axes(state)
    except ValueError as error:
        raise PretrainedEncoderError(f'{source} cannot be converted to nnU-Net\'s axis order: {error}') from None
    renamed = {swin_authors_name_to_ours(key): (key, value) for key, value in converted.items()}
    loaded = [name for name in ours if name in renamed]
    if not loaded:
        raise PretrainedEncoderError(
            f'none of the {len(state)} tensors of {source} is a Swin UNETR encoder tensor (its first keys: '
            f'{list(state)[:3]}; expected keys such as "module.layers1.0.blocks.0.mlp.fc1.weight"), so nothing would '
            f'be loaded. Is it a whole network\'s checkpoint? nnUNetv2_train -pretrained_weights loads those.')
    wrong = [f'{renamed[name][0]} {tuple(renamed[name][1].shape)} vs ours {tuple(ours[name].shape)}'
             for name in loaded if renamed[name][1].shape != ours[name].shape]
    if wrong:
        raise PretrainedEncoderError(
            f'{len(wrong)} tensors of {source} do not fit this network\'s encoder (another embedding width, number of '
            f'input channels or patch embedding?): {"; ".join(wrong[:3])}')
    with torch.no_grad():
        for name in loaded:
            ours[name].copy_(renamed[name][1])
    return EncoderLoad(source=source, loaded=tuple(loaded), missing=tuple(name for name in ours if name not in renamed),
                       unused=tuple(renamed[name][0] for name in renamed if name not in ours))
