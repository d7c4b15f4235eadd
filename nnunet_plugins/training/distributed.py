"""What a trainer needs to run as one process of a ``torchrun`` group, on any node: the right device.

nnU-Net 2.8.1's DDP path (``nnUNetv2_train -num_gpus N``) starts every process on one machine, so its trainer takes
the *global* rank for the CUDA device: ``nnUNetTrainer.__init__`` sets ``torch.device('cuda', rank)`` and
``initialize`` wraps ``DDP(network, device_ids=[rank])``. On the second node, rank 8 has no ``cuda:8``; on the CPU
(gloo) there is no CUDA device at all. Everything else that uses the rank is right across nodes and is left alone: the
batch split over the world (``_set_batch_size_and_oversample``), the validation cases per rank, and the gate
``self.local_rank == 0`` on logs, ``progress.png`` and checkpoints (nnU-Net's ``local_rank`` *is* the global rank).

:func:`place_trainer` fixes the two device uses on the built trainer, for any trainer class (nnU-Net's own, the
plugin's supervised and pre-training trainers, a user's), without a subclass. It also makes the trainer write each
checkpoint whole or not at all: torchrun stops the surviving workers of a group with SIGTERM when one dies, which
may hit rank 0 inside ``torch.save``, and a half-written ``checkpoint_latest.pth`` would stop the restarted run.
"""
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# the module, not the class of the same name: its global DDP is what nnUNetTrainer.initialize calls
_NNUNET_TRAINER_MODULE = importlib.import_module(nnUNetTrainer.__module__)


def process_device(kind: str, local_rank: int) -> torch.device:
    """The device of the process with node-local rank ``local_rank``: ``cuda:LOCAL_RANK`` for ``kind`` 'cuda', else
    the CPU (``kind`` 'cpu'). Raises ValueError for another kind (nnU-Net's 'mps' has no process groups), and for a
    ``local_rank`` beyond the node's CUDA devices (NCCL takes one GPU per rank)."""
    if kind == 'cuda':
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(
                f'LOCAL_RANK {local_rank} trains on cuda:{local_rank}, but this node has {count} CUDA device'
                f'{"s" * (count != 1)} (CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}): '
                f'start at most {count} process{"es" * (count != 1)} per node (torchrun --nproc-per-node {count}), '
                f'one per GPU, as NCCL needs')
        return torch.device('cuda', local_rank)
    if kind == 'cpu':
        return torch.device('cpu')
    raise ValueError(f'-device {kind} cannot train in a torchrun group: use -device cuda (NCCL) or -device cpu '
                     f'(gloo)')


@contextmanager
def _ddp_on_the_network_device() -> Iterator[None]:
    """Inside the block, nnUNetTrainer.initialize's ``DDP(network, device_ids=[rank])`` drops ``device_ids``: DDP then
    takes the device of the network's parameters (``cuda:LOCAL_RANK``, or the CPU, where gloo refuses any
    ``device_ids``)."""
    original = _NNUNET_TRAINER_MODULE.DDP

    def wrap(module: torch.nn.Module, device_ids: list[int] | None = None, **kwargs) -> torch.nn.Module:
        return original(module, **kwargs)

    _NNUNET_TRAINER_MODULE.DDP = wrap
    try:
        yield
    finally:
        _NNUNET_TRAINER_MODULE.DDP = original


def place_trainer(trainer: nnUNetTrainer, device: torch.device) -> None:
    """Put ``trainer`` (built inside the process group, not yet initialized) on ``device`` and initialize it there.

    Replaces the device nnUNetTrainer.__init__ chose from the global rank, drops its CUDA gradient scaler on the
    CPU (as nnU-Net does for a CPU trainer), makes its checkpoints appear only once written whole, and builds the
    network and its DDP wrapper on ``device``.
    """
    if trainer.was_initialized:
        raise RuntimeError('place_trainer needs a trainer that is not initialized yet: its network would already be '
                           f'on {trainer.device}')
    trainer.device = device
    if device.type != 'cuda':
        trainer.grad_scaler = None
    trainer.save_checkpoint = _whole_or_nothing(trainer.save_checkpoint)
    with _ddp_on_the_network_device():
        trainer.initialize()


def _whole_or_nothing(save_checkpoint: Callable[[str], None]) -> Callable[[str], None]:
    """``save_checkpoint(filename)`` that writes ``filename.partial`` and renames it to ``filename`` once written (a
    rename within a folder is atomic); ranks that write nothing (all but rank 0) rename nothing."""
    @functools.wraps(save_checkpoint)
    def save(filename: str) -> None:
        partial = f'{filename}.partial'
        save_checkpoint(partial)
        if os.path.isfile(partial):
            os.replace(partial, filename)
    return save
