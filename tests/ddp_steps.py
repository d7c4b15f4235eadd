"""Run by two torchrun agents in ``test_pretraining.py``: the DDP gather tests' steps (``_both_steps``) on this rank
of torchrun's gloo group (its environment gives rank, world size and rendezvous); saves ``rank{R}.pt`` in the folder
given as the only argument."""
import sys

import torch
import torch.distributed as dist

from test_pretraining import _both_steps

if __name__ == '__main__':
    dist.init_process_group('gloo')
    try:
        torch.save(_both_steps(dist.get_rank()), f'{sys.argv[1]}/rank{dist.get_rank()}.pt')
    finally:
        dist.destroy_process_group()
