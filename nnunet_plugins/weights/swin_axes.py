"""The Swin UNETR authors' released encoder moved from their arrays' axis order, (x, y, z), to nnU-Net's, (z, y, x).

The authors pre-trained MONAI's ``SwinTransformer`` on arrays as MONAI reads NIfTI files, (x, y, z); nnU-Net feeds
arrays as SimpleITK reads them, (z, y, x). Axis ``k`` of nnU-Net's array is axis ``order[k]`` of theirs
(:data:`AXES_ORDER`). Three kinds of tensor depend on the order of the axes:

- the patch embedding's kernel ``(out, in, k0, k1, k2)``: its kernel axes are permuted as the image's are;
- each window attention's relative position bias table ``((2W - 1)^3, heads)``: its row
  ``((d0 + W - 1)(2W - 1) + d1 + W - 1)(2W - 1) + d2 + W - 1`` is the bias of an offset ``(d0, d1, d2)`` along the
  array's axes, so the table, seen as ``(2W - 1, 2W - 1, 2W - 1, heads)``, is permuted as the image is (the index
  buffer depends on ``W`` alone and stays);
- patch merging's (MONAI's ``'merging'``, which both the authors' network and ours use) norm and reduction on
  ``8C`` channels: the 8 voxels of each 2x2x2 neighbourhood are concatenated in the order of
  :data:`MERGING_OFFSETS`, ``C`` channels each; permuting the axes moves a voxel to another chunk, so the norm's
  weight and bias and the reduction's input columns are reordered by chunk.

Everything else acts per token (qkv, MLPs, norms) or alike along every axis (windows, shifts and the shifted
windows' masks when the window is the same along every axis; padding at the end of each axis), and attention does not
depend on the order of the tokens within a window once the bias follows them. So the converted encoder on the
permuted image gives the original's features, permuted, exactly where MONAI shrinks no window (every stage's token
grid at least as long as the window along every axis): where it shrinks one, it looks the bias up in the array's
flattening order (:mod:`nnunet_plugins.networks.swinunetr`), which no table can carry over, and the features differ
from that stage on.

Not converted: the authors' intensities (CT windowed to -1000..1000 HU and scaled to [0, 1], where nnU-Net normalises
per its plans: the patch embedding could absorb an affine map, but not the different clipping, nor a z-score that
differs per image) and their reorientation to RAS (flips that depend on each image's direction).
"""
from collections.abc import Mapping

import torch

AXES_ORDER = (2, 1, 0)  # axis k of nnU-Net's (z, y, x) array is axis AXES_ORDER[k] of the authors' (x, y, z) one
# MONAI's PatchMerging ('merging'): the offset along the array's three axes of each of the 8 concatenated chunks
MERGING_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
# the line reports and logs carry for an encoder converted by to_nnunet_axes
AXES_NOTE = ("the Swin UNETR authors' encoder was converted from their (x, y, z) arrays to nnU-Net's (z, y, x) (patch "
             "embedding kernel, relative position bias tables, patch merging's channel order; exact where MONAI "
             "shrinks no attention window); not converted: their intensities (CT windowed to -1000..1000 HU, scaled to "
             "[0, 1]; nnU-Net normalises per its plans) and their reorientation to RAS")
_BIAS_TABLE = '.attn.relative_position_bias_table'
_MERGING_NORM = ('.downsample.norm.weight', '.downsample.norm.bias')  # (8C,)
_MERGING_REDUCTION = '.downsample.reduction.weight'  # (2C, 8C)


def permute_kernel(kernel: torch.Tensor, order: tuple[int, int, int] = AXES_ORDER) -> torch.Tensor:
    """A convolution's kernel ``(out, in, k0, k1, k2)`` for the image with its axes permuted by ``order``: kernel axis
    ``k`` of the result is axis ``order[k]`` of ``kernel``.

    Raises:
        ValueError: the kernel is not that of a 3d convolution.
    """
    if kernel.dim() != 5:
        raise ValueError(f'a patch embedding kernel of shape {tuple(kernel.shape)} is not that of a 3d convolution '
                         f'(out, in, k0, k1, k2); its axes cannot be permuted')
    return kernel.permute(0, 1, *(2 + axis for axis in order)).contiguous()


def permute_bias_table(table: torch.Tensor, order: tuple[int, int, int] = AXES_ORDER) -> torch.Tensor:
    """A relative position bias table ``((2W - 1)^3, heads)`` of a window of ``W`` tokens along every axis, for the
    image with its axes permuted by ``order``: the result's bias of offset ``d`` (along the permuted axes) is the
    table's bias of the offset ``e`` with ``e[order[k]] = d[k]``.

    Raises:
        ValueError: the table's rows are not ``(2W - 1)^3`` for a whole ``W`` (a window that differs between axes).
    """
    rows, heads = table.shape
    side = round(rows ** (1 / 3))
    if side ** 3 != rows or side % 2 == 0:
        raise ValueError(f'a relative position bias table of {rows} rows is not that of a window of the same size '
                         f'along three axes ((2W - 1)^3 rows); its axes cannot be permuted')
    return table.reshape(side, side, side, heads).permute(*order, 3).reshape(rows, heads).contiguous()


def merging_chunk_order(order: tuple[int, int, int] = AXES_ORDER) -> list[int]:
    """For each of the 8 chunks that patch merging concatenates on the image with its axes permuted by ``order``, the
    chunk of the original concatenation that holds the same voxel (e.g. ``[0, 3, 2, 1, 6, 5, 4, 7]`` for (2, 1, 0))."""
    return [MERGING_OFFSETS.index(tuple(offset[order.index(axis)] for axis in range(3))) for offset in MERGING_OFFSETS]


def permute_merging(tensor: torch.Tensor, dim: int, order: tuple[int, int, int] = AXES_ORDER) -> torch.Tensor:
    """Patch merging's norm weight or bias ``(8C,)`` (``dim`` 0), or its reduction's weight ``(2C, 8C)`` (``dim`` 1),
    with its 8 chunks of ``C`` along ``dim`` reordered by :func:`merging_chunk_order`."""
    chunks = tensor.chunk(len(MERGING_OFFSETS), dim)
    return torch.cat([chunks[index] for index in merging_chunk_order(order)], dim)


def to_nnunet_axes(state: Mapping[str, torch.Tensor], order: tuple[int, int, int] = AXES_ORDER
                   ) -> dict[str, torch.Tensor]:
    """The tensors of a 3d MONAI ``SwinTransformer`` trained on arrays of one axis order (the authors' (x, y, z)), for
    arrays with their axes permuted by ``order`` (nnU-Net's (z, y, x) by default); found by the end of their names,
    with or without a prefix (``module.``, ``encoder.``); all other tensors are returned as they are.

    Raises:
        ValueError: a tensor the axis order concerns does not have a 3d network's shape (it names the tensor).
    """
    converted = {}
    for name, tensor in state.items():
        try:
            if name.endswith('patch_embed.proj.weight'):
                tensor = permute_kernel(tensor, order)
            elif name.endswith(_BIAS_TABLE):
                tensor = permute_bias_table(tensor, order)
            elif name.endswith(_MERGING_NORM):
                tensor = permute_merging(tensor, 0, order)
            elif name.endswith(_MERGING_REDUCTION):
                tensor = permute_merging(tensor, 1, order)
        except ValueError as error:
            raise ValueError(f'{name}: {error}') from None
        converted[name] = tensor
    return converted
