"""The pre-training checkpoint: nnU-Net's, with the method's heads beside the segmentation network's weights.

``network_weights`` holds the state dict of the supervised trainer's network (what stock ``-pretrained_weights``
reads), :data:`HEADS_KEY` the heads' (what ``--c`` restores besides nnU-Net's entries).
"""
import torch

HEADS_KEY = 'pretraining_heads'


def read_checkpoint(filename: str, device: torch.device) -> dict:
    """The checkpoint in ``filename`` (already checked readable), its tensors on ``device``: the one place pre-training
    reads a weight file."""
    return torch.load(filename, map_location=device, weights_only=False)
