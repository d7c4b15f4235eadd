"""One stage of a segmentation network's encoder, the input of every pre-training method's heads.

Every network here and nnU-Net's own (PlainConvUNet, ResidualEncoderUNet) keeps its encoder in the submodule
``network.encoder`` (state-dict keys ``encoder.*``); :func:`encoder_stage` runs it and returns one stage's output,
:func:`encoder_bottleneck` the deepest, and :func:`stage_shape` says a stage's shape without computing it.
"""
import copy
from typing import Sequence

import torch
from torch import nn


def encoder_stage(encoder: nn.Module, x: torch.Tensor, stage: int = -1) -> torch.Tensor:
    """The feature map of stage ``stage`` of ``encoder`` (a network's ``encoder`` submodule) on ``x``: an index into
    the encoder's outputs, shallowest first, so -1 is the bottleneck.

    ``(B, C_in, *S) -> (B, C_stage, *S_stage)``. Swin UNETR's encoder (MONAI's ``SwinTransformer``) is called with
    ``normalize=True`` as its network does; UTNetV2's returns ``(skips, semantic maps)``; the others return their
    skips, deepest last.
    """
    from monai.networks.nets.swin_unetr import SwinTransformer  # imported on use, as in networks/swinunetr.py
    features = encoder(x, normalize=True) if isinstance(encoder, SwinTransformer) else encoder(x)
    if isinstance(features, tuple):
        features = features[0]
    return features[stage]


def encoder_bottleneck(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The deepest feature map of ``encoder`` on ``x``: ``(B, C_in, *S) -> (B, C_b, *S_b)``."""
    return encoder_stage(encoder, x, -1)


def stage_shape(encoder: nn.Module, input_channels: int, patch_size: Sequence[int], stage: int = -1) -> tuple[int, ...]:
    """``(C_stage, *S_stage)`` of ``encoder``'s stage ``stage`` (:func:`encoder_stage`) on a ``(1, input_channels,
    *patch_size)`` input, found on the meta device (no memory, no compute)."""
    meta_encoder = copy.deepcopy(encoder).to('meta')
    with torch.no_grad():
        features = encoder_stage(meta_encoder, torch.empty(1, input_channels, *patch_size, device='meta'), stage)
    return tuple(features.shape[1:])
