"""Forward multiply-accumulate counts, the unit the papers' "FLOPs" tables use (1 MAC = 2 FLOP).

Counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device, so a full-size patch
costs no memory and no compute. Its forward formulas are exact for (grouped, transposed) convolutions
and matrix products; only its backward of grouped convolutions is wrong, so only the forward is counted.
Normalisations, activations and additions are not counted, as in the papers' counters.
"""
import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def forward_macs(network: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass of ``network`` on an input of ``input_shape`` (batch included).

    The network is copied to the ``meta`` device, so the original is left untouched.
    """
    meta_network = copy.deepcopy(network).to('meta')
    meta_network.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_network(torch.empty(*input_shape, device='meta'))
    return counter.get_total_flops() // 2
