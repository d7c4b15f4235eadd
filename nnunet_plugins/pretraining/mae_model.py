"""The whole segmentation network with a reconstruction head in place of its segmentation head, for MAE
(:mod:`~nnunet_plugins.pretraining.mae`).

Every network here and nnU-Net's own keeps its segmentation heads under a ``seg_layers`` key (what nnU-Net's
``load_pretrained_weights`` skips); without deep supervision exactly one of them runs, the full-resolution head,
which :func:`final_head` finds by running the network once on the meta device. :class:`MAEModel` leaves that head in
the network (so ``network_weights`` keeps every key of the supervised network, with its shapes) and replaces its
output by the reconstruction head's on the same input, a forward hook: the network's own forward, layout and
gradient checkpointing run unchanged.
"""
import copy
from typing import Sequence

import torch
from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op
from torch import nn

from nnunet_plugins.pretraining.method import PretrainingModel
from nnunet_plugins.weights.files import SEG_HEADS, is_seg_head


def final_head(network: nn.Module, input_channels: int, patch_size: Sequence[int]) -> tuple[str, int]:
    """The name of the segmentation head whose output ``network`` (deep supervision off) returns, and its input
    channels, found by one forward of a ``(1, input_channels, *patch_size)`` input on the meta device (no memory, no
    compute): the outermost head module called. Raises ValueError when no head or several unrelated ones run."""
    meta = copy.deepcopy(network).to('meta')
    called: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            called[name] = inputs[0].shape[1]
        return hook

    for name, module in meta.named_modules():
        if is_seg_head(name) and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            module.register_forward_hook(record(name))
    with torch.no_grad():
        meta(torch.empty(1, input_channels, *patch_size, device='meta'))
    outermost = sorted(called, key=len)[:1]
    if not outermost or any(not name.startswith(outermost[0]) for name in called):
        raise ValueError(f'MAE replaces the one segmentation head ({SEG_HEADS}) that runs without deep supervision; '
                         f'this network ran {sorted(called) or "none"}')
    return outermost[0], called[outermost[0]]


class MAEModel(PretrainingModel):
    """A segmentation network whose output is a reconstruction of its input channels.

    Args:
        network: the segmentation network (deep supervision off), its heads under ``seg_layers``.
        input_channels: ``C_in``, the channels reconstructed.
        patch_size: the input's spatial shape ``S`` (2 or 3 axes).

    ``forward``: ``(B, C_in, *S) -> (B, C_in, *S)``: the whole network, encoder and decoder, with a 1x1 conv
    (``heads.reconstruction``) on the input of its final segmentation head instead of that head.
    """

    def __init__(self, network: nn.Module, input_channels: int, patch_size: Sequence[int]):
        super().__init__()
        self.network = network
        self.head_name, self.head_channels = final_head(network, input_channels, patch_size)
        conv_op = convert_dim_to_conv_op(len(patch_size))
        self.heads = nn.ModuleDict({'reconstruction': conv_op(self.head_channels, input_channels, 1)})
        network.get_submodule(self.head_name).register_forward_hook(self._reconstruct)

    def _reconstruct(self, head: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.heads.reconstruction(inputs[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The network's parameters but its segmentation heads' (which get no gradient), then the head's."""
        return [p for name, p in self.network.named_parameters() if not is_seg_head(name)] + \
            list(self.heads.parameters())

    def pretrained_tensors(self) -> set[int]:
        """Every tensor of the network but its segmentation heads'."""
        return {id(t) for key, t in self.network.state_dict(keep_vars=True).items() if not is_seg_head(key)}

    def extra_repr(self) -> str:
        return (f'reconstruction head: a 1x1 conv from the {self.head_channels} channels of the decoder\'s output in '
                f'place of {self.head_name}')
