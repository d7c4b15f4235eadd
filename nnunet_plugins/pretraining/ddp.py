"""What pre-training gathers across DDP ranks (``nnUNetv2_train -num_gpus N``): embeddings or tokens, with gradient,
for the contrastive losses' negatives; and the per-step losses, for the epoch's logged means.
"""
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


def is_distributed() -> bool:
    """Whether this process is one of several DDP ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every DDP rank's rows of ``x`` ``(N_rank, D)`` in rank order, with gradient to each rank's own rows, and the
    index of this rank's first row. Ranks may hold different numbers of rows (nnU-Net splits a batch unevenly)."""
    if not is_distributed():
        return x, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(s) for s in sizes]
    padded = F.pad(x, (0, 0, 0, max(sizes) - len(x)))
    gathered = all_gather(padded)
    return torch.cat([rows[:n] for rows, n in zip(gathered, sizes)]), sum(sizes[:dist.get_rank()])


def gather_values(values: np.ndarray) -> np.ndarray:
    """Every rank's ``values`` (one per step), concatenated in rank order; ``values`` itself in one process."""
    if not is_distributed():
        return values
    everywhere = [None] * dist.get_world_size()
    dist.all_gather_object(everywhere, values)
    return np.concatenate(everywhere)
