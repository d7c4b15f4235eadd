"""The heads of paper 003's self-supervised pre-training (Sec. 4), on the bottleneck of any segmentation network's
encoder (:mod:`~nnunet_plugins.pretraining.encoder`). On that bottleneck (``C_b`` channels, shape ``S_b``):

- reconstruction: transposed convolutions (the paper's head), one per factor of 2 (or other integer factor) the
  encoder downsampled each axis by, halving the channels, then a 1x1 conv to the input channels: ``(B, C_in, *S)``;
- rotation: an MLP on the spatially averaged bottleneck -> 4 logits (0/90/180/270 degrees);
- contrastive: a linear layer on the spatially averaged bottleneck -> a 512-d embedding.

The authors' code feeds the rotation and contrastive heads tokens 0 and 1 of the flattened bottleneck instead of a
pooled vector (MONAI research-contributions #87, #167: two corner voxels, not the sub-volume); the paper describes
a representation of the sub-volume, so here both heads take the spatial mean.
"""
from typing import Sequence

import torch
from dynamic_network_architectures.building_blocks.helper import (
    convert_dim_to_conv_op, get_matching_convtransp, get_matching_instancenorm)
from torch import nn

from nnunet_plugins.pretraining.encoder import encoder_bottleneck, stage_shape
from nnunet_plugins.pretraining.method import PretrainingModel

ROTATION_CLASSES = 4  # quarter turns: 0, 90, 180, 270 degrees
EMBEDDING_SIZE = 512  # the paper's contrastive feature size (Sec. 5.2)
ROTATION_HIDDEN = 512
MIN_RECONSTRUCTION_CHANNELS = 16


def upsampling_steps(factors: Sequence[int]) -> list[list[int]]:
    """Per-axis strides of the reconstruction head's transposed convs: a factor 2 per step along every axis that
    still needs one, an odd remainder in one step; their product per axis is ``factors``."""
    remaining, steps = list(factors), []
    while any(r > 1 for r in remaining):
        step = [1 if r == 1 else 2 if r % 2 == 0 else r for r in remaining]
        steps.append(step)
        remaining = [r // s for r, s in zip(remaining, step)]
    return steps


class RCRHeads(nn.Module):
    """The three pre-training heads on a ``(B, bottleneck_channels, *S_b)`` bottleneck.

    Args:
        bottleneck_channels: ``C_b``.
        input_channels: ``C_in`` of the reconstruction.
        upsampling: per step, the stride per axis of a transposed conv (:func:`upsampling_steps`); two or three
            entries each make the 2d or 3d head.

    ``forward`` returns ``(reconstruction (B, C_in, *S), rotation logits (B, 4), embedding (B, 512))``.
    """

    def __init__(self, bottleneck_channels: int, input_channels: int, upsampling: Sequence[Sequence[int]]):
        super().__init__()
        dims = len(upsampling[0]) if upsampling else None
        if dims not in (2, 3):
            raise ValueError(f'the reconstruction head needs at least one upsampling step of 2 or 3 axes, got '
                             f'{upsampling}: the encoder does not downsample')
        conv_op = convert_dim_to_conv_op(dims)
        layers, channels = [], bottleneck_channels
        for stride in upsampling:
            out = max(MIN_RECONSTRUCTION_CHANNELS, channels // 2)
            layers += [get_matching_convtransp(conv_op)(channels, out, stride, stride),
                       get_matching_instancenorm(conv_op)(out, affine=True), nn.LeakyReLU(inplace=True)]
            channels = out
        layers.append(conv_op(channels, input_channels, 1))
        self.reconstruction = nn.Sequential(*layers)
        self.rotation = nn.Sequential(nn.Linear(bottleneck_channels, ROTATION_HIDDEN), nn.ReLU(inplace=True),
                                      nn.Linear(ROTATION_HIDDEN, ROTATION_CLASSES))
        self.contrastive = nn.Linear(bottleneck_channels, EMBEDDING_SIZE)

    def forward(self, bottleneck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = bottleneck.mean(dim=tuple(range(2, bottleneck.ndim)))
        return self.reconstruction(bottleneck), self.rotation(pooled), self.contrastive(pooled)


class RCRModel(PretrainingModel):
    """A segmentation network and the pre-training heads on its encoder; only the encoder runs.

    ``network`` keeps exactly the keys the matching supervised trainer's network has (its decoder stays at its
    initialisation), ``heads`` are separate, so the two are saved apart.

    Args:
        network: the segmentation network, with an ``encoder`` submodule.
        input_channels: channels of its input.
        patch_size: the input's spatial shape ``S`` (the reconstruction's).

    ``forward``: ``(B, C_in, *S) -> (reconstruction (B, C_in, *S), rotation logits (B, 4), embedding (B, 512))``.
    """

    def __init__(self, network: nn.Module, input_channels: int, patch_size: Sequence[int]):
        super().__init__()
        self.network = network
        channels, *spatial = stage_shape(network.encoder, input_channels, patch_size, -1)
        if any(p % s for p, s in zip(patch_size, spatial)):
            raise ValueError(f'the encoder turns patch {list(patch_size)} into a bottleneck of {spatial} voxels, '
                             f'which does not divide it; the reconstruction head cannot upsample back')
        self.bottleneck = (channels, *spatial)
        self.upsampling = upsampling_steps([p // s for p, s in zip(patch_size, spatial)])
        self.heads = RCRHeads(channels, input_channels, self.upsampling)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(encoder_bottleneck(self.network.encoder, x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The encoder's and the heads' parameters (the decoder gets no gradient and is left out)."""
        return [*self.network.encoder.parameters(), *self.heads.parameters()]

    def extra_repr(self) -> str:
        return (f'pre-training heads on the encoder\'s bottleneck of {self.bottleneck[0]} channels x '
                f'{list(self.bottleneck[1:])}: reconstruction by transposed convs of strides {self.upsampling}, '
                f'rotation MLP, {EMBEDDING_SIZE}-d contrastive projection')
