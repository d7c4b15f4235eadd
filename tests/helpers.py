"""Helpers shared by the tests: the tiny dataset's constants, the stock-CLI workspace, readers and counters.

(Fixtures live in conftest.py.)
"""
import dataclasses
import glob
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.networks.nets import SwinUNETR as MONAISwinUNETR
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_plugins import settings, synthetic
from nnunet_plugins.networks.swinunetr import VARIANTS as SWINUNETR_VARIANTS
from nnunet_plugins.cli import main
from nnunet_plugins.registry import plugin_trainer
from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS
from nnunet_plugins.training.swinunetr import nnUNetTrainerSwinUNETR
from nnunet_plugins.training.utnetv2 import nnUNetTrainerUTNetV2
from nnunet_plugins.training.uxnet import nnUNetTrainerUXNet
from nnunet_plugins.workspace import run_stock

DATASET_ID = 991
DATASET_NAME = 'Tiny'
CONFIGURATION = '3d_fullres'
NUM_TRAINING, NUM_HELDOUT = 10, 3
# nnU-Net's 3d_fullres plan for the tiny dataset: three downsamplings, the first in-plane only
TINY_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]]
TINY_KERNELS = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
# plans of other datasets, for the networks' topology tests
ISOTROPIC_STRIDES = [[1, 1, 1]] + [[2, 2, 2]] * 5  # what nnU-Net plans for 128^3 at 1 mm
ISOTROPIC_KERNELS = [[3, 3, 3]] * 6
ANISOTROPIC_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
ANISOTROPIC_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
PLANS_2D_STRIDES = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]]
PLANS_2D_KERNELS = [[3, 3]] * 7
# the smallest patch Swin UNETR takes on the tiny dataset's plan (embedding 1x2x2, four 2x2x2 mergings, and a
# bottleneck of more than one voxel for instance norm)
SWIN_PATCH = [16, 32, 64]
# nnU-Net's own trainer with the test schedule of 2 iterations and no closing validation (tests/stock_trainers/, on
# the workspace's nnUNet_extTrainer): nnUNetTrainer_1epoch, nnU-Net's shortest, trains 250
STOCK_TRAINERS = Path(__file__).resolve().parent / 'stock_trainers'
STOCK_TRAINER = 'nnUNetTrainer_1epoch_2iterations'
# the plugin trainer that runs through nnU-Net's CLIs (training, validation, prediction, ensembling, --c)
MEDNEXT = 'nnUNetTrainerMedNeXtS'
UPKERN = 'nnUNetTrainerMedNeXtS_k5_UpKern'  # started from MEDNEXT's fold 0; its fold 0 is continued with --c


@dataclass
class Workspace:
    root: Path
    raw: Path
    env: dict
    _trained: dict = field(default_factory=dict)
    _runs: dict = field(default_factory=dict)  # what each of _trained was run with

    @property
    def preprocessed(self) -> Path:
        return self.root / 'nnUNet_preprocessed' / f'Dataset{DATASET_ID:03d}_{DATASET_NAME}'

    def results(self, trainer: str, configuration: str = CONFIGURATION) -> Path:
        return (self.root / 'nnUNet_results' / f'Dataset{DATASET_ID:03d}_{DATASET_NAME}'
                / f'{trainer}__nnUNetPlans__{configuration}')

    def run(self, *args, env: dict | None = None):
        """Run a stock nnU-Net command and return its completed process (output captured)."""
        return run_stock(args, env or self.env, capture=True)

    def train(self, trainer: str, fold, epochs: int = 1, iterations: int = 2, configuration: str = CONFIGURATION,
              extra: tuple = ()) -> Path:
        """Train ``trainer`` on ``fold`` through ``nnUNetv2_train`` once per session; return the fold folder.

        A second call with the same trainer, fold and configuration must ask for the same run (epochs, iterations,
        extra arguments): the fold folder holds one run, so another would be refused by nnU-Net or overwrite it."""
        key = (trainer, str(fold), configuration)
        run = (epochs, iterations, tuple(map(str, extra)))
        if key in self._runs and self._runs[key] != run:
            raise ValueError(f'{trainer} fold {fold} ({configuration}) was trained in this session with (epochs, '
                             f'iterations, extra) = {self._runs[key]}, not {run}; give the test its own trainer, fold '
                             f'or results folder')
        if key not in self._trained:
            env = {**self.env, settings.EPOCHS: str(epochs), settings.ITERATIONS: str(iterations)}
            self.run('nnUNetv2_train', DATASET_ID, configuration, fold, '-tr', trainer, '-device', 'cpu', *extra,
                     env=env)
            self._trained[key] = self.results(trainer, configuration) / f'fold_{fold}'
            self._runs[key] = run
        return self._trained[key]

    def predict_and_ensemble(self, trainers, out: Path, *extra) -> list[Path]:
        """``nnUNetv2_predict`` fold 0 of each trainer (``CONFIGURATION``) on the held-out images with probabilities,
        then ``nnUNetv2_ensemble``; asserts that every held-out case is predicted and that the ensemble is the argmax of
        the mean probabilities, and that each trainer's prediction has every case's shape and valid labels.
        Returns the trainers' prediction folders; the ensemble is ``out/ensemble``."""
        folders = [out / trainer for trainer in trainers]

        def predict(trainer: str, folder: Path) -> None:
            self.run('nnUNetv2_predict', '-i', self.raw / 'imagesTs', '-o', folder, '-d', DATASET_ID,
                     '-c', CONFIGURATION, '-f', 0, '-tr', trainer, '-device', 'cpu', '--save_probabilities',
                     '-npp', 1, '-nps', 1, *extra)
        # independent runs, side by side: mostly interpreter starts and worker spawns, which leave a core idle
        with ThreadPoolExecutor(len(trainers)) as pool:
            list(pool.map(predict, trainers, folders))
        ensemble = out / 'ensemble'
        self.run('nnUNetv2_ensemble', '-i', *folders, '-o', ensemble, '-np', 1)
        references = sorted((self.raw / 'labelsTs').glob('*.nii.gz'))
        assert len(references) == NUM_HELDOUT
        for folder in folders:  # each trainer's own prediction: loaded strictly, every case, valid labels
            for reference in references:
                prediction = read_labels(folder / reference.name)
                assert prediction.shape == read_labels(reference).shape
                assert set(np.unique(prediction)) <= set(synthetic.LABELS.values())
        cases = sorted(p.name for p in folders[0].glob('*.nii.gz'))
        assert cases == [reference.name for reference in references]
        for case in cases:
            probabilities = [np.load(folder / case.replace('.nii.gz', '.npz'))['probabilities'] for folder in folders]
            np.testing.assert_array_equal(read_labels(ensemble / case),
                                          np.argmax(np.mean(probabilities, axis=0), axis=0))
        return folders


def train_in_process(trainer: nnUNetTrainer, steps: int = 2) -> Path:
    """What ``nnUNetv2_train`` does with a trainer, in this process and cut short: ``trainer`` (built by the
    ``make_trainer`` fixture) initialised, ``steps`` training steps on batches of its own data loader (the preprocessed
    cases, augmented; single-threaded, as the fixture sets ``nnUNet_n_proc_DA=0``), each loss finite, then
    ``checkpoint_final.pth`` in the fold folder and ``plans.json`` and ``dataset.json`` beside it, where nnU-Net's
    predictor reads them. Returns the fold folder.

    nnUNetv2_train's epoch loop and closing validation are nnU-Net's, run by the MedNeXt trainer through the CLI
    (test_stock_cli.py)."""
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.network.train()
    for _ in range(steps):
        loss = trainer.train_step(next(trainer.dataloader_train))['loss']
        assert np.isfinite(loss), loss
    base = Path(trainer.output_folder_base)
    (base / 'plans.json').write_text(json.dumps(trainer.plans_manager.plans))
    (base / 'dataset.json').write_text(json.dumps(trainer.dataset_json))
    trainer.save_checkpoint(str(Path(trainer.output_folder) / 'checkpoint_final.pth'))
    return Path(trainer.output_folder)


def assert_segments_a_heldout_case(raw: Path, model_folder: Path, fold=0) -> None:
    """nnU-Net's predictor (:func:`trained_predictor`) segments the first held-out image of ``raw`` on its own grid
    with labels of the dataset (every case goes through nnUNetv2_predict in test_stock_cli.py)."""
    images = sorted((raw / 'imagesTs').glob('*.nii.gz'))[:1]
    for image, segmentation in zip(images, segment(trained_predictor(model_folder, fold), images), strict=True):
        assert segmentation.shape == read_labels(raw / 'labelsTs' / image.name.replace('_0000', '')).shape
        assert set(np.unique(segmentation)) <= set(synthetic.LABELS.values())


def trained_predictor(model_folder: Path, fold=0) -> nnUNetPredictor:
    """nnU-Net's predictor for fold ``fold`` of ``model_folder`` (a ``TRAINER__PLANS__CONFIGURATION`` folder), set up
    as nnUNetv2_predict sets it up: the trainer found by name (nnUNet_extTrainer must name the plugin's folder), its
    network built from the plans and the checkpoint loaded strictly. Without mirroring, on the CPU."""
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device('cpu'), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,))
    return predictor


def segment(predictor: nnUNetPredictor, images: list[Path]) -> list[np.ndarray]:
    """Each image's segmentation on its own grid, as nnUNetv2_predict computes it (preprocessing, sliding window,
    resampling back), in this process: no worker processes to start."""
    reader = SimpleITKIO()
    return [predictor.predict_single_npy_array(*reader.read_images([str(image)])) for image in images]


def run_cli(capsys, *args) -> subprocess.CompletedProcess:
    """``nnunet-plugins ARGS`` as its console script runs it (``sys.exit(main(ARGS))``), in this process: the exit
    status, stdout and stderr a user would see. A message ``main`` exits with goes to stderr with status 1, as Python
    prints it. Saves an interpreter start (seconds with torch and nnU-Net) where the command itself is what is tested;
    the console script itself runs in test_package_and_cli.py and the README recipe's test."""
    capsys.readouterr()
    try:
        status = main([str(arg) for arg in args])
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    if isinstance(status, str):
        status, err = 1, f'{err}{status}\n'
    return subprocess.CompletedProcess(['nnunet-plugins', *args], status or 0, out, err)


def read_labels(path: Path) -> np.ndarray:
    """A label image as an array, axes as nnU-Net's SimpleITK reader gives them."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def parameter_count(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def training_log(fold_folder: Path) -> str:
    """The text of every nnU-Net training log in a fold folder, oldest first."""
    return ''.join(Path(f).read_text() for f in sorted(glob.glob(os.path.join(fold_folder, 'training_log_*.txt'))))


# Swin UNETR with the paper's layers at a quarter of the widths, and its authors' released encoder format
SMALL = dataclasses.replace(SWINUNETR_VARIANTS['paper'], feature_size=12)


def small_monai() -> MONAISwinUNETR:
    """MONAI's SwinUNETR at :data:`SMALL`'s widths."""
    return MONAISwinUNETR(in_channels=1, out_channels=14, feature_size=SMALL.feature_size)


def released_format(monai: MONAISwinUNETR) -> dict:
    """MONAI's encoder in the format of the authors' released file: 'module.' prefix, fc1/fc2, pre-training heads."""
    state = {}
    for key, value in monai.swinViT.state_dict().items():
        state['module.' + key.replace('.mlp.linear1.', '.mlp.fc1.').replace('.mlp.linear2.', '.mlp.fc2.')] = value
    state['module.rotation_head.weight'] = torch.zeros(4, 16 * monai.swinViT.embed_dim)  # a pre-training head
    return {'state_dict': state}


# pre-training tests: a patch the tiny plan's strides divide, with a bottleneck (token grid) of 4 x 2 x 2
PRETRAINING_PATCH = {'patch_size': [8, 16, 16]}
# nnU-Net's ResEnc network on the tiny plan's topology, as a ResEnc planner writes it
RESENC = {**PRETRAINING_PATCH, 'architecture': {
    'network_class_name': 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet',
    'arch_kwargs': {'n_stages': 4, 'features_per_stage': [8, 16, 32, 64], 'conv_op': 'torch.nn.modules.conv.Conv3d',
                    'kernel_sizes': TINY_KERNELS, 'strides': TINY_STRIDES, 'n_blocks_per_stage': [1, 1, 2, 2],
                    'n_conv_per_stage_decoder': [1, 1, 1], 'conv_bias': True,
                    'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d',
                    'norm_op_kwargs': {'eps': 1e-05, 'affine': True}, 'dropout_op': None, 'dropout_op_kwargs': None,
                    'nonlin': 'torch.nn.LeakyReLU', 'nonlin_kwargs': {'inplace': True}},
    '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']}}
FAMILIES = {  # pre-training tests' network families, test id: (supervised trainer, plans configuration override)
    'MedNeXt': (nnUNetTrainerMedNeXtS, PRETRAINING_PATCH),
    'UXNet': (nnUNetTrainerUXNet, PRETRAINING_PATCH),
    'UTNetV2': (nnUNetTrainerUTNetV2, PRETRAINING_PATCH),
    'SwinUNETR': (nnUNetTrainerSwinUNETR, {'patch_size': SWIN_PATCH}),
    'PlainConvUNet': (nnUNetTrainer, PRETRAINING_PATCH),
    'ResidualEncoderUNet': (nnUNetTrainer, RESENC),
}


def pretrainer(supervised: type, method: str) -> type:
    """The plugin's pre-training trainer of ``method`` (e.g. 'RCR') for the network ``supervised`` trains."""
    return plugin_trainer(f'{supervised.__name__}_Pretrain{method}')


def pretraining_step(trainer) -> dict:
    """A pre-training step on a random batch of the plans' shape; returns its losses."""
    shape = (trainer.batch_size, trainer.num_input_channels, *trainer.configuration_manager.patch_size)
    return trainer.train_step({'data': torch.randn(shape, generator=torch.Generator().manual_seed(7)),
                               'target': None})


# ---- two gloo ranks, for the DDP gathers and the torchrun checks ----

def _rank(rank: int, rendezvous: str, out: str, step) -> None:
    """Rank ``rank`` of two: join the group, save what ``step(rank)`` returns, and leave the group even if it fails."""
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=2)
    try:
        torch.save(step(rank), f'{out}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def on_two_ranks(step, tmp_path) -> list:
    """What ``step(rank)`` (a module-level function) returns on each of two gloo ranks: rank 1 in a spawned process,
    rank 0 in this one (one interpreter start less)."""
    args = (str(tmp_path / 'rendezvous'), str(tmp_path), step)
    other = mp.get_context('spawn').Process(target=_rank, args=(1, *args))
    other.start()
    try:
        _rank(0, *args)
    finally:
        other.join(timeout=120)
        if other.exitcode is None:
            other.kill()
    assert other.exitcode == 0
    return [torch.load(tmp_path / f'rank{rank}.pt') for rank in range(2)]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def on_two_torchrun_agents(script: Path, tmp_path: Path) -> list:
    """What ``script`` saves as ``rank{R}.pt`` in ``tmp_path`` (its argument) when two torchrun agents on 127.0.0.1,
    one process each, run it as two nodes would (static rendezvous)."""
    port = free_port()
    agents = [subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc-per-node', '1', '--node-rank',
         str(node), '--master-addr', '127.0.0.1', '--master-port', str(port), str(script), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL) for node in range(2)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    for node, (agent, output) in enumerate(zip(agents, outputs)):
        assert agent.returncode == 0, f'agent {node} exited {agent.returncode}:\n{output[-6000:]}'
    return [torch.load(tmp_path / f'rank{rank}.pt') for rank in range(2)]


def saved_checkpoint_and_supervised_network(trainer, supervised, path) -> tuple[dict, nn.Module]:
    """Save a pre-training ``trainer``'s checkpoint to ``path``; return it, read back, and a fresh network of the
    ``supervised`` trainer on the same plans (the network stock ``-pretrained_weights`` loads it into)."""
    trainer.save_checkpoint(str(path))
    checkpoint = torch.load(path, weights_only=False)
    network = supervised.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads,
        enable_deep_supervision=getattr(supervised, 'enable_deep_supervision', True))
    return checkpoint, network
