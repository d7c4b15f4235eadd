"""``torchrun [torchrun's options] -m nnunet_plugins.train DATASET CONFIGURATION FOLD [nnUNetv2_train's options]``.

The arguments, their defaults and the trainer lookup are ``nnUNetv2_train``'s own (its ``run_training_entry`` parses
them; ``get_trainer_from_args`` and ``maybe_load_checkpoint`` build and load the trainer), so every trainer that
``nnUNetv2_train -tr`` finds trains here. Without torchrun's environment the command *is* ``nnUNetv2_train``, on one
process. Under torchrun (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, the rendezvous in ``MASTER_ADDR``/``MASTER_PORT``):

- the process group is NCCL on ``cuda:LOCAL_RANK`` (``-device cuda``) or gloo on the CPU (``-device cpu``);
- a world larger than the plans' global batch is refused before any work (nnU-Net splits the batch over the ranks);
- every rank checks that it sees the ``nnUNet_preprocessed`` and ``nnUNet_results`` that rank 0 sees (a shared file
  system): rank 0 writes a file into each, every rank looks for it;
- a fold that holds ``checkpoint_final.pth`` is not trained again: the command says so and ends (``--val`` still
  validates it);
- after torchrun restarted the group (``--max-restarts``, ``TORCHELASTIC_RESTART_COUNT`` > 0) the run continues
  from ``checkpoint_latest.pth`` by itself (as ``--c``, which the first start needs to continue a stopped run).

Only global rank 0 writes the log, ``progress.png`` and checkpoints (nnU-Net's gate ``local_rank == 0`` is on the
global rank). The trainer's device is fixed for nodes after the first by
:func:`~nnunet_plugins.training.distributed.place_trainer`.
"""
import multiprocessing
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2 import paths
from nnunetv2.run import run_training as nnunet_run
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch.backends import cudnn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.rendezvous import rendezvous

from nnunet_plugins.training.distributed import place_trainer, process_device

FINAL, LATEST, BEST = 'checkpoint_final.pth', 'checkpoint_latest.pth', 'checkpoint_best.pth'
SHARED_FOLDERS = ('nnUNet_preprocessed', 'nnUNet_results')
_CHECK_FILE = '.nnunet_plugins_shared_check_'


class LaunchError(RuntimeError):
    """A torchrun launch that cannot train: refused before any work, with what to change."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the torchrun group, from torchrun's environment."""

    rank: int  # global
    local_rank: int  # on this node: the CUDA device index
    world_size: int
    local_world_size: int  # processes on this node
    restart: int  # how often torchrun has restarted the group (0 on the first start)
    max_restarts: int

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> 'Launch | None':
        """The launch that ``environ`` (default ``os.environ``) describes; None without torchrun's ``RANK``,
        ``LOCAL_RANK`` and ``WORLD_SIZE``."""
        environ = os.environ if environ is None else environ
        if not all(name in environ for name in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')):
            return None
        def number(name: str, default: int) -> int:
            return int(environ.get(name, default))
        return cls(rank=number('RANK', 0), local_rank=number('LOCAL_RANK', 0), world_size=number('WORLD_SIZE', 1),
                   local_world_size=number('LOCAL_WORLD_SIZE', 1), restart=number('TORCHELASTIC_RESTART_COUNT', 0),
                   max_restarts=number('TORCHELASTIC_MAX_RESTARTS', 0))


@record
def main() -> None:
    """``python -m nnunet_plugins.train``: nnUNetv2_train's command line, trained in torchrun's group when there is
    one."""
    launch = Launch.from_environment()
    if launch is None:
        nnunet_run.run_training_entry()
        return
    # run_training_entry parses and checks nnUNetv2_train's arguments, then calls its module's run_training with them
    single_process = nnunet_run.run_training
    nnunet_run.run_training = lambda *args, **kwargs: train_in_group(launch, *args, **kwargs)
    try:
        nnunet_run.run_training_entry()
    finally:
        nnunet_run.run_training = single_process


def check_world_fits_batch(world_size: int, dataset_name_or_id: str, configuration: str,
                           plans_identifier: str) -> int:
    """The global batch size the plans give ``configuration``; raise LaunchError, saying what to change, when it is
    smaller than ``world_size`` (nnU-Net gives every rank at least one sample)."""
    dataset = maybe_convert_to_dataset_name(dataset_name_or_id)
    plans = load_json(join(paths.nnUNet_preprocessed, dataset, f'{plans_identifier}.json'))
    batch_size = PlansManager(plans).get_configuration(configuration).batch_size
    if world_size > batch_size:
        raise LaunchError(
            f'{world_size} processes cannot share the global batch of {batch_size} that {plans_identifier} plans for '
            f'{configuration} of {dataset}: nnU-Net splits the batch over the processes, at least one sample each. '
            f'Start at most {batch_size} processes (torchrun --nnodes x --nproc-per-node), or train a configuration '
            f'with a batch of at least {world_size}: `nnunet-plugins plans {dataset} --preset NAME -c NEW_NAME '
            f'--batch {world_size}` adds one (`nnunet-plugins plans --list` shows the presets), or set "batch_size": '
            f'{world_size} in a configuration that inherits_from {configuration}.')
    return batch_size


def check_shared_folders(folders: Mapping[str, str | None]) -> None:
    """Raise LaunchError on every rank, naming each rank (and host) and folder, unless every rank sees the folders
    that rank 0 sees. ``folders``: variable name (``nnUNet_results``) to the folder as this rank has it (None: unset).

    Rank 0 writes a file with a fresh name into each of its folders; every rank looks for it in its own. Needs the
    process group; rank 0 creates a missing folder (nnU-Net would, for ``nnUNet_results``) and removes the files.
    """
    rank = dist.get_rank()
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    name = _CHECK_FILE + token[0]
    if rank == 0:
        for folder in filter(None, folders.values()):
            os.makedirs(folder, exist_ok=True)
            with open(join(folder, name), 'w') as file:
                file.write(f'written by rank 0 on {socket.gethostname()} to check that every rank sees this folder\n')
    dist.barrier()
    unseen = {variable: folder for variable, folder in folders.items() if not folder or not isfile(join(folder, name))}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), dict(folders), unseen))  # every rank has looked
    if rank == 0:
        for folder in filter(None, folders.values()):
            os.remove(join(folder, name))
    dist.barrier()  # the files are gone when any rank goes on
    first = everyone[0][1]
    problems = [f'rank {r} (host {host}) does not see the {variable} of rank 0 ({first[variable]}): '
                + (f'{variable} is not set there' if not folder else
                   f'its {variable}, {folder}, lacks the file rank 0 wrote there')
                for r, (host, own, missing) in enumerate(everyone) for variable, folder in missing.items()]
    if problems:
        raise LaunchError('; '.join(problems) + '. Every rank must read and write the same nnUNet_preprocessed and '
                          'nnUNet_results: one shared file system, mounted on every node, with the variables set to '
                          'it on every node. Nothing was trained.')


def train_in_group(launch: Launch, dataset_name_or_id: str, configuration: str, fold: str,
                   trainer_class_name: str = 'nnUNetTrainer', plans_identifier: str = 'nnUNetPlans',
                   pretrained_weights: str | None = None, num_gpus: int = 1,
                   export_validation_probabilities: bool = False, continue_training: bool = False,
                   only_run_validation: bool = False, disable_checkpointing: bool = False,
                   val_with_best: bool = False, device: torch.device = torch.device('cuda')) -> None:
    """nnUNetv2_train's ``run_training`` (same arguments) as rank ``launch.rank`` of torchrun's group."""
    if num_gpus != 1:
        raise LaunchError(f'-num_gpus {num_gpus} starts processes of its own; under torchrun, --nproc-per-node sets '
                          f'the processes per node. Leave -num_gpus out.')
    if continue_training and only_run_validation:
        raise LaunchError('--c and --val cannot be used together')
    fold = fold if fold == 'all' else int(fold)
    check_world_fits_batch(launch.world_size, dataset_name_or_id, configuration, plans_identifier)
    own_device = process_device(device.type, launch.local_rank)
    if own_device.type == 'cuda':
        torch.cuda.set_device(own_device)
    else:  # nnU-Net gives a CPU run every core; here the node's processes share them
        torch.set_num_threads(max(1, multiprocessing.cpu_count() // launch.local_world_size))
    store, rank, world_size = next(rendezvous('env://'))
    # a restarted group meets in the store of the group before it, whose keys (the dead ranks' addresses) would
    # mislead it: every start keeps to keys of its own
    store = dist.PrefixStore(f'nnunet_plugins/start_{launch.restart}', store)
    dist.init_process_group('nccl' if own_device.type == 'cuda' else 'gloo', store=store, rank=rank,
                            world_size=world_size)
    try:
        check_shared_folders({variable: getattr(paths, variable) for variable in SHARED_FOLDERS})
        output_folder = get_output_folder(dataset_name_or_id, trainer_class_name, plans_identifier, configuration,
                                          fold)
        if not only_run_validation and isfile(join(output_folder, FINAL)):
            if launch.rank == 0:
                print(f'{output_folder} holds {FINAL}: this fold has finished training, nothing is trained again '
                      f'(torchrun start {launch.restart}). `--val` validates it again; move the folder away to train '
                      f'it anew.')
            return
        _train(launch, own_device, dataset_name_or_id, configuration, fold, trainer_class_name, plans_identifier,
               pretrained_weights, export_validation_probabilities, continue_training, only_run_validation,
               disable_checkpointing, val_with_best, output_folder)
    finally:
        dist.destroy_process_group()


def _train(launch: Launch, device: torch.device, dataset_name_or_id: str, configuration: str, fold: int | str,
           trainer_class_name: str, plans_identifier: str, pretrained_weights: str | None, npz: bool,
           continue_training: bool, only_run_validation: bool, disable_checkpointing: bool, val_with_best: bool,
           output_folder: str) -> None:
    """What nnU-Net's ``run_ddp`` does for one rank, on ``device``, continuing by itself after a restart."""
    resumed = next((name for name in (LATEST, BEST) if isfile(join(output_folder, name))), None)
    resume = launch.restart > 0 and not only_run_validation and resumed is not None
    trainer = nnunet_run.get_trainer_from_args(dataset_name_or_id, configuration, fold, trainer_class_name,
                                               plans_identifier, continue_training or resume, device=device)
    if disable_checkpointing:
        trainer.disable_checkpointing = disable_checkpointing
    place_trainer(trainer, device)
    splits = join(trainer.preprocessed_dataset_folder_base, 'splits_final.json')
    if launch.rank == 0 and fold != 'all' and not isfile(splits):
        trainer.do_split()  # every rank writes a missing split file: rank 0 writes it first, whole
    dist.barrier()
    _log_group(trainer, launch, device)
    # the trained weights are in the checkpoint: -pretrained_weights only starts a run
    nnunet_run.maybe_load_checkpoint(trainer, continue_training or resume, only_run_validation,
                                     None if resume else pretrained_weights)
    if resume:
        trainer.print_to_log_file(f'torchrun restarted the group (restart {launch.restart} of at most '
                                  f'{launch.max_restarts}): resumed from {resumed} at epoch {trainer.current_epoch}')
    if device.type == 'cuda':
        cudnn.deterministic = False
        cudnn.benchmark = True
    if not only_run_validation:
        trainer.run_training()
    if val_with_best:
        trainer.load_checkpoint(join(trainer.output_folder, BEST))
    trainer.perform_actual_validation(npz)


def _log_group(trainer: nnUNetTrainer, launch: Launch, device: torch.device) -> None:
    """Say in rank 0's log how the group trains: world size, backend, devices, the batch per rank."""
    batches: list = [None] * launch.world_size
    dist.all_gather_object(batches, trainer.batch_size)
    nodes = launch.world_size // launch.local_world_size
    trainer.print_to_log_file(
        f'torchrun: world size {launch.world_size} ({nodes} node{"s" * (nodes > 1)} x {launch.local_world_size} '
        f'process{"es" * (launch.local_world_size > 1)}), backend {dist.get_backend()}, rank 0 on {device} of '
        f'{socket.gethostname()}; the global batch of {sum(batches)} split as {"+".join(map(str, batches))} over the '
        f'ranks')
