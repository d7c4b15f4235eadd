"""``nnunet-plugins benchmark``: a model card per trainer (size, cost, speed, memory), measured side by side.

How each row is measured
- Everything is the trainer's own, as in ``nnUNetv2_train``: the trainer class is instantiated on the plans
  (its log file goes to a temporary folder), ``initialize()`` builds the network, the deep-supervision loss
  and the optimiser, and each step is its ``train_step`` (forward, loss, backward, gradient clipping,
  optimiser step; autocast and GradScaler on CUDA, channels-last where the trainer uses it, ``torch.compile``
  where nnU-Net uses it) on a random batch at the plans' patch and batch size.
- Step time: the median of ``steps`` steps after ``warmup`` steps, wall clock around ``train_step`` (which
  copies the batch to the device and reads the loss back, a synchronisation point).
- Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU the peak resident set size of the row's
  own process while it builds and trains, minus its resident size after the imports. Every row runs in a fresh
  subprocess, so rows share no memory, caches or compiled code.
- Multiply-accumulates: one forward pass of the inference network (deep supervision off) on one patch,
  counted by :func:`nnunet_plugins.macs.forward_macs` on the meta device.
- Parameters: the network as trained (deep-supervision heads included).

Rows: the plugin trainers; two baselines, ``nnUNetTrainer`` on the same plans and on ResEnc L plans; and,
with MONAI installed (``pip install nnunet-plugins[bench]``), MONAI's MedNeXt S/B/M/L (kernel 3 and 5) and
SwinUNETR as peers, trained with the MedNeXt trainers' recipe so that only the network differs.
"""
import argparse
import copy
import ctypes
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence
from unittest import mock

import numpy as np
import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
    nnUNetPlannerResEncL
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule

from nnunet_plugins import settings
from nnunet_plugins.macs import forward_macs
from nnunet_plugins.training import TRAINERS
from nnunet_plugins.training.base import nnUNetTrainerPlugin
from nnunet_plugins.training.mednext import MedNeXtTrainer

BASELINES = ('nnUNetTrainer', 'ResEncL')
RESENC_L_PLANS = 'nnUNetResEncUNetLPlans'
STAND_IN_DATASET = 'Dataset000_BenchmarkPatch'
# nnU-Net's planners shrink the patch until their GPU-memory estimate fits this budget; the benchmark
# measures the patch it is given, so the budget is set out of reach
_UNLIMITED_GPU_MEMORY_GB = 1e6
_STEP_MARKER = '@@nnunet-plugins-benchmark-step@@'
ROW_FIELDS = (
    'label', 'name', 'kind', 'trainer', 'plans_name', 'configuration', 'network_class', 'device',
    'patch_size', 'batch_size', 'input_channels', 'output_channels',
    'parameters', 'forward_gmacs_per_patch',
    'gradient_checkpointing', 'memory_layout', 'autocast_dtype', 'compiled',
    'warmup_steps', 'steps', 'step_times_s', 'step_time_s', 'voxels_per_second',
    'peak_memory_bytes', 'process_peak_rss_bytes', 'baseline_rss_bytes', 'first_loss',
    'status', 'null_reasons')


# ---- peers: MONAI networks trained with the MedNeXt trainers' recipe ----

class PeerTrainer(nnUNetTrainerPlugin):
    """A MONAI network trained like the MedNeXt trainers (optimiser, loss weights, layout), so only the network
    differs. Its topology is fixed: ``downsamplings`` halvings along every axis, whatever the plans say."""

    initial_lr = MedNeXtTrainer.initial_lr
    weight_decay = MedNeXtTrainer.weight_decay
    adam_eps = MedNeXtTrainer.adam_eps
    downsamplings: int

    @classmethod
    def network_strides(cls, configuration_manager: ConfigurationManager) -> list[list[int]]:
        dims = len(configuration_manager.patch_size)
        return [[1] * dims] + [[2] * dims] * cls.downsamplings

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        divisor = 2 ** cls.downsamplings
        patch_size = list(configuration_manager.patch_size)
        if any(size % divisor for size in patch_size):
            raise ValueError(f'{cls.__name__} needs every patch axis divisible by {divisor} (it downsamples '
                             f'{cls.downsamplings} times by 2 along every axis); the patch is {patch_size}')
        return cls.build_peer(len(configuration_manager.patch_size), num_input_channels, num_output_channels,
                              enable_deep_supervision)

    @classmethod
    def build_peer(cls, dims: int, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
        raise NotImplementedError


class MONAIMedNeXtPeer(PeerTrainer):
    """MONAI's ``create_mednext(variant, kernel_size=...)``; outputs full, 1/2, ..., 1/16 with deep supervision."""

    variant: str
    kernel_size: int
    downsamplings = 4

    @classmethod
    def build_peer(cls, dims: int, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
        from monai.networks.nets.mednext import create_mednext
        return create_mednext(cls.variant, spatial_dims=dims, in_channels=in_channels, out_channels=num_classes,
                              kernel_size=cls.kernel_size, deep_supervision=deep_supervision)


class MONAISwinUNETRPeer(PeerTrainer):
    """MONAI's SwinUNETR with the paper's embedding size 48 (about 62M parameters); one output."""

    downsamplings = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False

    @classmethod
    def build_peer(cls, dims: int, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
        from monai.networks.nets import SwinUNETR
        return SwinUNETR(in_channels=in_channels, out_channels=num_classes, feature_size=48, spatial_dims=dims)


PEERS: dict[str, type[PeerTrainer]] = {
    **{f'MedNeXt{variant}{"_k5" if kernel == 5 else ""}':
       type(f'MONAIMedNeXt{variant}_k{kernel}', (MONAIMedNeXtPeer,), {'variant': variant, 'kernel_size': kernel})
       for kernel in (3, 5) for variant in 'SBML'},
    'SwinUNETR': MONAISwinUNETRPeer,
}


def default_trainers() -> list[str]:
    """Every plugin trainer except the UpKern ones, which build the same networks as the ``_k5`` trainers."""
    return [trainer.__name__ for trainer in TRAINERS if not trainer.__name__.endswith('_UpKern')]


def trainer_class(name: str) -> type[nnUNetTrainer]:
    """The trainer (or peer) class called ``name``: a peer, a plugin trainer, or any trainer nnU-Net finds."""
    if name in PEERS:
        return PEERS[name]
    if name == nnUNetTrainer.__name__:
        return nnUNetTrainer
    plugins = {trainer.__name__: trainer for trainer in TRAINERS}
    if name in plugins:
        return plugins[name]
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        return recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        raise ValueError(f'no trainer named {name!r}: it is neither a plugin trainer (`nnunet-plugins trainers` lists '
                         f'them), nor a peer ({", ".join(PEERS)}), nor a trainer nnU-Net finds in nnunetv2 or in '
                         f'nnUNet_extTrainer') from None


def monai_available() -> bool:
    return importlib.util.find_spec('monai') is not None


# ---- plans: the user's, or what nnU-Net's planners make of a patch ----

@contextmanager
def _environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables inside the block; restore them afterwards."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def synthetic_dataset_json(in_channels: int, num_classes: int) -> dict:
    """A dataset.json with ``in_channels`` image channels and ``num_classes`` labels, background included."""
    return {'channel_names': {str(c): f'channel{c}' for c in range(in_channels)},
            'labels': {'background': 0, **{f'class{c}': c for c in range(1, num_classes)}},
            'numTraining': 0, 'file_ending': '.nii.gz'}


def plan_configuration(planner_class: type[ExperimentPlanner], patch_size: Sequence[int], spacing: Sequence[float],
                       dataset_json: dict) -> dict:
    """The plans configuration ``planner_class`` gives a dataset whose median image is one ``patch_size`` patch.

    nnU-Net's own planner derives the topology (``get_pool_and_conv_props``) and the architecture block;
    it runs on a stand-in dataset in a temporary folder (a dataset.json and a fingerprint, no images).
    Raises ValueError when nnU-Net would not plan exactly this patch (e.g. an axis not divisible by
    2 to the power of its number of poolings).
    """
    patch_size, spacing = [int(p) for p in patch_size], [float(s) for s in spacing]
    with tempfile.TemporaryDirectory() as root:
        raw, preprocessed = Path(root, 'raw', STAND_IN_DATASET), Path(root, 'preprocessed', STAND_IN_DATASET)
        raw.mkdir(parents=True)
        preprocessed.mkdir(parents=True)
        (raw / 'dataset.json').write_text(json.dumps({**dataset_json, 'dataset': {}}))
        (preprocessed / 'dataset_fingerprint.json').write_text(json.dumps({'median_relative_size_after_cropping': 1}))
        with _environment({'nnUNet_raw': str(raw.parent), 'nnUNet_preprocessed': str(preprocessed.parent)}), \
                warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the ResEnc planners warn about a non-standard memory budget
            planner = planner_class(STAND_IN_DATASET, gpu_memory_target_in_gb=_UNLIMITED_GPU_MEMORY_GB)
            name = '3d_fullres' if len(patch_size) == 3 else '2d'
            plan = planner.get_plans_for_configuration(spacing, patch_size, planner.generate_data_identifier(name),
                                                       float(np.prod(patch_size)), {})
    recursive_fix_for_json_export(plan)
    if list(plan['patch_size']) != patch_size:
        raise ValueError(f'nnU-Net\'s {planner_class.__name__} would train patch {list(plan["patch_size"])} rather '
                         f'than {patch_size} at spacing {spacing} (every axis must be divisible by 2 to the power '
                         f'of its number of poolings); benchmark that patch instead.')
    return plan


def synthetic_plans(patch_size: Sequence[int], spacing: Sequence[float], batch_size: int,
                    dataset_json: dict) -> tuple[dict, str]:
    """Plans as nnU-Net's default planner makes them for ``patch_size`` at ``spacing``.

    Returns (plans, configuration name): ``3d_fullres``, or ``2d`` for a 2d patch.
    """
    configuration = '3d_fullres' if len(patch_size) == 3 else '2d'
    plan = plan_configuration(ExperimentPlanner, patch_size, spacing, dataset_json)
    plan.update(batch_size=batch_size, batch_dice=configuration == '2d')  # nnU-Net's choice without a lowres stage
    plans = {'dataset_name': STAND_IN_DATASET, 'plans_name': 'nnUNetPlans',
             'original_median_spacing_after_transp': list(spacing),
             'original_median_shape_after_transp': list(patch_size),
             'image_reader_writer': 'SimpleITKIO', 'transpose_forward': [0, 1, 2], 'transpose_backward': [0, 1, 2],
             'configurations': {configuration: plan}, 'experiment_planner_used': ExperimentPlanner.__name__,
             'label_manager': 'LabelManager', 'foreground_intensity_properties_per_channel': {}}
    return plans, configuration


def dataset_plans(dataset: str, configuration: str, plans_name: str) -> tuple[dict, dict, Path]:
    """The user's plans and dataset.json from ``nnUNet_preprocessed``; returns (plans, dataset_json, folder)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_preprocessed.is_set():
        raise ValueError('nnUNet_preprocessed is not set. Set it to the folder nnUNetv2_plan_and_preprocess wrote, '
                         'or benchmark without a dataset: --patch 128 128 128 --in-channels 1 --classes 14')
    folder = Path(nnUNet_preprocessed.get()) / maybe_convert_to_dataset_name(dataset)
    plans_file = folder / f'{plans_name}.json'
    if not plans_file.is_file():
        raise ValueError(f'{plans_file} does not exist. Run nnUNetv2_plan_and_preprocess -d {dataset} first, or '
                         f'name existing plans with -p.')
    plans = json.loads(plans_file.read_text())
    if configuration not in plans['configurations']:
        raise ValueError(f'{plans_file.name} has no configuration {configuration!r}; it has '
                         f'{", ".join(plans["configurations"])}.')
    return plans, json.loads((folder / 'dataset.json').read_text()), folder


def resenc_l_plans(plans: dict, configuration: str, dataset_json: dict, folder: Path | None) -> tuple[dict, str]:
    """ResEnc L plans for the benchmark: the user's ``nnUNetResEncUNetLPlans.json`` when ``folder`` has it with
    this configuration, otherwise ``plans`` with the architecture nnU-Net's ResEnc L planner builds for the same
    patch and spacing. Returns (plans, where they came from)."""
    if folder is not None and (folder / f'{RESENC_L_PLANS}.json').is_file():
        user_plans = json.loads((folder / f'{RESENC_L_PLANS}.json').read_text())
        if configuration in user_plans['configurations']:
            return user_plans, f'{RESENC_L_PLANS}.json (patch and batch as planned there)'
    configuration_manager = PlansManager(plans).get_configuration(configuration)
    plan = plan_configuration(nnUNetPlannerResEncL, configuration_manager.patch_size, configuration_manager.spacing,
                              dataset_json)
    derived = copy.deepcopy(plans)
    derived['plans_name'] = RESENC_L_PLANS
    derived['configurations'][configuration]['architecture'] = plan['architecture']
    return derived, f'{nnUNetPlannerResEncL.__name__} architecture for the same patch and spacing'


# ---- the rows ----

@dataclass
class Network:
    """One network to benchmark: a trainer (or peer) and the plans it trains on."""

    name: str  # as the user selects it: trainer name, baseline or peer name
    kind: str  # 'plugin', 'baseline' or 'peer'
    label: str
    trainer: str  # the class name a row's subprocess resolves with trainer_class()
    plans: dict


@dataclass
class Row:
    """One measurement: a network and the settings it runs with (None/False: as its trainer does it)."""

    network: Network
    checkpointing: bool | None = None
    flip_layout: bool = False
    bf16: bool = False
    flip_compile: bool = False
    facts: dict = field(default_factory=dict)  # from probe(): network_class, forward_gmacs_per_patch, ...
    result: dict = field(default_factory=dict)  # from the row's subprocess
    skip_reason: str | None = None


def probe(network: Network, configuration: str, dataset_json: dict) -> dict:
    """Build the inference network (deep supervision off) once on the CPU, without running it: class, MACs,
    checkpointing default, shapes. (Not on the meta device: MONAI's SwinUNETR reads tensor values in __init__.)

    Raises what the trainer raises when it cannot build this network (e.g. a patch it cannot take).
    """
    cls = trainer_class(network.trainer)
    plans_manager = PlansManager(copy.deepcopy(network.plans))
    configuration_manager = plans_manager.get_configuration(configuration)
    in_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    out_channels = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    with _environment({settings.CHECKPOINTING: None}):
        model = cls.build_network_architecture(plans_manager, configuration_manager, in_channels, out_channels,
                                               enable_deep_supervision=False)
    patch_size = list(configuration_manager.patch_size)
    return {'network_class': type(model).__name__, 'patch_size': patch_size,
            'batch_size': configuration_manager.batch_size, 'input_channels': in_channels,
            'output_channels': out_channels,
            'forward_gmacs_per_patch': forward_macs(model, [1, in_channels, *patch_size]) / 1e9,
            'default_checkpointing': getattr(model, 'gradient_checkpointing', None)}


def plan_rows(networks: Sequence[Network], configuration: str, dataset_json: dict, variants: Sequence[str],
              device: str) -> list[Row]:
    """Rows for every network: its trainer's settings, plus one row per requested variant that applies."""
    rows = []
    for network in networks:
        try:
            facts = probe(network, configuration, dataset_json)
        except Exception as error:  # a network that cannot be built here is reported, not fatal
            rows.append(Row(network, skip_reason=f'{type(error).__name__}: {error}'))
            continue
        rows.append(Row(network, facts=facts))
        if 'checkpointing' in variants and facts['default_checkpointing'] is not None:
            rows.append(Row(network, checkpointing=not facts['default_checkpointing'], facts=facts))
        if 'channels-last' in variants:
            rows.append(Row(network, flip_layout=True, facts=facts))
        if 'bf16' in variants and device == 'cuda':
            rows.append(Row(network, bf16=True, facts=facts))
        if 'compile' in variants and device == 'cuda':
            rows.append(Row(network, flip_compile=True, facts=facts))
    return rows


# ---- measuring one row, in its own process ----

def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far, in bytes."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS where Linux allows it; return that RSS in bytes.

    Heap memory freed after the imports is first given back to the system, so that what the row allocates
    shows in its RSS instead of reusing it unseen. Elsewhere the peak stays the one since the process
    started, which includes the imports.
    """
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
        Path('/proc/self/clear_refs').write_text('5')
    except (OSError, AttributeError):  # not Linux, or a C library without malloc_trim
        pass
    return peak_rss_bytes()


def _memory_layout(network: nn.Module) -> str:
    """'channels-last' or 'contiguous': the strides of the first conv weight whose two layouts differ.

    (``is_contiguous`` cannot tell: depthwise and 1x1 weights count as contiguous in both layouts, yet
    their strides, which decide the layout of the activations, differ.)
    """
    for parameter in network.parameters():
        if parameter.dim() in (4, 5):
            layout = torch.channels_last if parameter.dim() == 4 else torch.channels_last_3d
            channels_last = torch.empty(parameter.shape, device='meta', memory_format=layout).stride()
            contiguous = torch.empty(parameter.shape, device='meta').stride()
            if channels_last != contiguous:
                return 'channels-last' if parameter.stride() == channels_last else 'contiguous'
    return 'contiguous'


def _random_batch(trainer: nnUNetTrainer, seed: int = 0) -> dict:
    """Noise and random labels at the plans' patch and batch size, targets per output scale as nnU-Net's loader
    makes them (``DownsampleSegForDSTransform``)."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    generator = torch.Generator().manual_seed(seed)
    shape = (trainer.batch_size, *trainer.configuration_manager.patch_size)
    data = torch.randn(shape[0], trainer.num_input_channels, *shape[1:], generator=generator)
    label_manager = trainer.label_manager
    if label_manager.has_regions:
        target = torch.randint(0, 2, (shape[0], label_manager.num_segmentation_heads, *shape[1:]), generator=generator)
    else:
        target = torch.randint(0, label_manager.num_segmentation_heads, (shape[0], 1, *shape[1:]), generator=generator)
    target = target.to(torch.int16)
    scales = trainer._get_deep_supervision_scales()
    if scales is not None:
        per_sample = [DownsampleSegForDSTransform(scales)(segmentation=sample)['segmentation'] for sample in target]
        target = [torch.stack(scale) for scale in zip(*per_sample)]
    if trainer.device.type == 'cuda':
        data = data.pin_memory()
        target = [t.pin_memory() for t in target] if isinstance(target, list) else target.pin_memory()
    return {'data': data, 'target': target}


def measure(spec: dict) -> dict:
    """Build the row's trainer and time its training step; runs inside the row's own process."""
    # everything a row may import is imported before the baseline, so baselines are equal across rows
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform  # noqa
    if monai_available():
        import monai.networks.nets  # noqa: F401
    baseline_rss = _reset_peak_rss()
    device = torch.device(spec['device'])
    if device.type == 'cuda':  # as nnUNetv2_train
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    cls = trainer_class(spec['trainer'])
    result = {'baseline_rss_bytes': baseline_rss}
    with tempfile.TemporaryDirectory() as results, _environment({'nnUNet_results': results}):
        torch.manual_seed(0)
        trainer = cls({**spec['plans'], 'continue_training': False}, spec['configuration'], 0, spec['dataset_json'],
                      device)
        if spec['flip_compile']:
            os.environ['nnUNet_compile'] = 'f' if trainer._do_i_compile() else 't'
        # there is no preprocessed data to pick a dataset class for, and the step does not load any
        with mock.patch.object(nnunet_trainer_module, 'infer_dataset_class', return_value=None):
            trainer.initialize()
        network = trainer.network._orig_mod if isinstance(trainer.network, OptimizedModule) else trainer.network
        if spec['flip_layout']:
            flipped = 'contiguous' if _memory_layout(network) == 'channels-last' else 'channels-last'
            channels_last = torch.channels_last_3d if len(trainer.configuration_manager.patch_size) == 3 \
                else torch.channels_last
            network.to(memory_format=channels_last if flipped == 'channels-last' else torch.contiguous_format)
        if spec['bf16']:
            if not torch.cuda.is_bf16_supported():
                return {**result, 'status': 'skipped', 'reason': f'{torch.cuda.get_device_name()} has no bf16'}
            torch.set_autocast_dtype('cuda', torch.bfloat16)
        result.update(
            parameters=sum(p.numel() for p in network.parameters()),
            gradient_checkpointing=getattr(network, 'gradient_checkpointing', None),
            memory_layout=_memory_layout(network),
            autocast_dtype=str(torch.get_autocast_dtype('cuda')).removeprefix('torch.') if device.type == 'cuda'
            else None,
            compiled=isinstance(trainer.network, OptimizedModule))
        batch = _random_batch(trainer)
        times, losses = [], []
        try:
            for _ in range(spec['warmup'] + spec['steps']):
                start = time.perf_counter()
                losses.append(float(trainer.train_step(batch)['loss']))
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
                print(_STEP_MARKER, flush=True)
        except Exception as error:  # e.g. out of memory: the row is reported as failed, with what was measured
            return {**result, 'status': 'failed', 'reason': f'{type(error).__name__}: {str(error)[:300]}'}
        peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else peak_rss_bytes() - baseline_rss
        return {**result, 'status': 'ok', 'step_times_s': times, 'first_loss': losses[0],
                'peak_memory_bytes': peak, 'process_peak_rss_bytes': peak_rss_bytes()}


def _measure_in_process(spec_file: str, result_file: str) -> None:
    """Entry point of a row's subprocess: read the spec, measure, write the result."""
    spec = json.loads(Path(spec_file).read_text())
    Path(result_file).write_text(json.dumps(measure(spec)))


def run_row(row: Row, configuration: str, dataset_json: dict, device: str, steps: int, warmup: int,
            on_step, work: Path) -> dict:
    """Measure ``row`` in a fresh Python process; ``on_step()`` is called after every step it takes."""
    spec = {'trainer': row.network.trainer, 'plans': row.network.plans, 'configuration': configuration,
            'dataset_json': dataset_json, 'device': device, 'steps': steps, 'warmup': warmup,
            'flip_layout': row.flip_layout, 'bf16': row.bf16, 'flip_compile': row.flip_compile}
    spec_file, result_file = work / 'spec.json', work / 'result.json'
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    env = {name: value for name, value in os.environ.items() if name != 'nnUNet_wandb_enabled'}
    env['PYTHONUNBUFFERED'] = '1'
    if row.checkpointing is not None:
        env[settings.CHECKPOINTING] = '1' if row.checkpointing else '0'
    else:
        env.pop(settings.CHECKPOINTING, None)
    command = [sys.executable, '-c', 'import sys; from nnunet_plugins.benchmark import _measure_in_process; '
               '_measure_in_process(sys.argv[1], sys.argv[2])', str(spec_file), str(result_file)]
    output = deque(maxlen=60)
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL) as process:
        for line in process.stdout:
            if line.strip() == _STEP_MARKER:
                on_step()
            else:
                output.append(line)
    if process.returncode == 0 and result_file.is_file():
        return json.loads(result_file.read_text())
    last = next((line.strip() for line in reversed(output) if line.strip()), 'no output')
    return {'status': 'failed', 'reason': f'the row\'s process exited with code {process.returncode}: {last}',
            'output': ''.join(output)}


# ---- report ----

def setting_text(record: dict) -> str:
    """The settings a row ran with, e.g. 'checkpointing off, channels-last, fp32'."""
    if record['memory_layout'] is None:
        return '—'
    parts = []
    if record['gradient_checkpointing'] is not None:
        parts.append(f'checkpointing {"on" if record["gradient_checkpointing"] else "off"}')
    parts.append(record['memory_layout'])
    parts.append({None: 'fp32', 'float16': 'fp16 autocast', 'bfloat16': 'bf16 autocast'}[record['autocast_dtype']])
    if record['compiled']:
        parts.append('compiled')
    return ', '.join(parts)


def record(row: Row, device: str, steps: int, warmup: int, configuration: str) -> dict:
    """The JSON record of a row: every field of ROW_FIELDS; each null field has its reason in ``null_reasons``."""
    network, facts, result = row.network, row.facts, row.result
    status = 'skipped' if row.skip_reason else result.get('status', 'failed')
    reason = row.skip_reason or result.get('reason')
    values = {'label': network.label, 'name': network.name, 'kind': network.kind, 'trainer': network.trainer,
              'plans_name': network.plans['plans_name'], 'configuration': configuration, 'device': device,
              'warmup_steps': warmup, 'steps': steps, 'status': status}
    for key in ('network_class', 'patch_size', 'batch_size', 'input_channels', 'output_channels',
                'forward_gmacs_per_patch'):
        values[key] = facts.get(key)
    for key in ('parameters', 'gradient_checkpointing', 'memory_layout', 'autocast_dtype', 'compiled',
                'step_times_s', 'peak_memory_bytes', 'process_peak_rss_bytes', 'baseline_rss_bytes', 'first_loss'):
        values[key] = result.get(key)
    times = result.get('step_times_s')
    values['step_time_s'] = statistics.median(times[warmup:]) if times else None
    values['voxels_per_second'] = (facts['batch_size'] * float(np.prod(facts['patch_size'])) / values['step_time_s']
                                   if values['step_time_s'] else None)
    null_reasons = {}
    for key, value in values.items():
        if value is not None:
            continue
        if key == 'gradient_checkpointing' and 'memory_layout' in result:
            null_reasons[key] = 'the network has no gradient-checkpointing switch'
        elif key == 'autocast_dtype' and 'memory_layout' in result:
            null_reasons[key] = 'no autocast on a CPU (nnUNetTrainer.train_step autocasts on CUDA only)'
        else:
            null_reasons[key] = reason or 'not measured'
    values['null_reasons'] = null_reasons
    return {key: values[key] for key in ROW_FIELDS}


def _topology_versus_monai(cls: type[MedNeXtTrainer], configuration_manager: ConfigurationManager) -> str:
    """'same' when our MedNeXt has MONAI's fixed topology on these plans (four isotropic 2x downsamplings, the
    kernel on every axis), otherwise what differs."""
    ours = [list(stride) for stride in cls.network_strides(configuration_manager)]
    _, kernel_sizes = cls.plan_topology(configuration_manager)
    if ours != MONAIMedNeXtPeer.network_strides(configuration_manager):
        return f'differs: the plans give strides {ours}'
    if any(size == 1 for level in kernel_sizes[:len(ours)] for size in level):
        return 'differs: the plans give kernel size 1 on some axes'
    return 'same'


def ratios(rows: Sequence[Row], records: Sequence[dict], configuration: str) -> list[dict]:
    """Our MedNeXt rows against MONAI's MedNeXt of the same size and kernel run with the same layout, precision
    and compilation: step time and peak memory, ours / MONAI, and whether the topologies are the same."""
    def size(row: Row) -> tuple | None:
        cls = trainer_class(row.network.trainer)
        return (cls.variant, cls.kernel_size) if issubclass(cls, (MedNeXtTrainer, MONAIMedNeXtPeer)) else None

    def conditions(rec: dict) -> tuple:
        return rec['memory_layout'], rec['autocast_dtype'], rec['compiled']

    peers = {(size(row), conditions(rec)): rec for row, rec in zip(rows, records)
             if row.network.kind == 'peer' and size(row) and rec['status'] == 'ok'}
    out = []
    for row, rec in zip(rows, records):
        if row.network.kind != 'plugin' or rec['status'] != 'ok' or size(row) is None:
            continue
        peer = peers.get((size(row), conditions(rec)))
        if peer is None:
            continue
        configuration_manager = PlansManager(row.network.plans).get_configuration(configuration)
        out.append({'ours': rec['label'], 'monai': peer['label'], 'setting': setting_text(rec),
                    'step_time_ratio': rec['step_time_s'] / peer['step_time_s'],
                    # None when MONAI's row used no measurable memory (a tiny patch on a CPU)
                    'peak_memory_ratio': rec['peak_memory_bytes'] / peer['peak_memory_bytes']
                    if peer['peak_memory_bytes'] else None,
                    'parameter_difference': rec['parameters'] - peer['parameters'],
                    'topology': _topology_versus_monai(trainer_class(row.network.trainer), configuration_manager)})
    return out


def markdown(meta: dict, records: Sequence[dict], peer_ratios: Sequence[dict]) -> str:
    """The report: a header saying what was measured and how, the table, and the ratios against MONAI."""
    lines = [f'## {meta["date"]}, {meta["device_name"]}, torch {meta["torch"]}',
             '',
             f'{meta["source"]}; patch {"x".join(map(str, meta["patch_size"]))}, batch {meta["batch_size"]}, '
             f'{meta["input_channels"]} input channel(s), {meta["output_channels"]} output channels. '
             f'Step: median of {meta["steps"]} training steps after {meta["warmup"]} warm-up, each the trainer\'s '
             f'own train_step. Memory: {meta["memory_counter"]}. MACs: {meta["mac_counter"]}.',
             '',
             '| network | setting | parameters | GMAC/patch | step (s) | memory (GiB) | voxels/s |',
             '|---|---|---:|---:|---:|---:|---:|']
    notes = []
    for rec in records:
        def shown(key: str, fmt: str) -> str:
            return '—' if rec[key] is None else format(rec[key], fmt)
        memory = '—' if rec['peak_memory_bytes'] is None else f'{rec["peak_memory_bytes"] / 2 ** 30:.3g}'
        lines.append(f'| {rec["label"]} | {setting_text(rec)} | {shown("parameters", ",")} | '
                     f'{shown("forward_gmacs_per_patch", ".1f")} | {shown("step_time_s", ".3g")} | {memory} | '
                     f'{shown("voxels_per_second", ",.0f")} |')
        if rec['status'] != 'ok':
            notes.append(f'- {rec["label"]}: {rec["status"]}, {rec["null_reasons"].get("step_time_s")}')
    if notes:
        lines += ['', *notes]
    if peer_ratios:
        lines += ['', 'Ours / MONAI\'s MedNeXt of the same size and kernel, same layout and precision (MONAI\'s B, M '
                  'and L have fewer parameters than the authors\' networks, see "parameters"):', '',
                  '| ours | MONAI | setting | step time | peak memory | parameters, ours - MONAI | topology |',
                  '|---|---|---|---:|---:|---:|---|']
        lines += [f'| {r["ours"]} | {r["monai"]} | {r["setting"]} | {r["step_time_ratio"]:.2f}x | '
                  f'{"—" if r["peak_memory_ratio"] is None else format(r["peak_memory_ratio"], ".2f") + "x"} | '
                  f'{r["parameter_difference"]:+,} | {r["topology"]} |' for r in peer_ratios]
    return '\n'.join(lines) + '\n'


def chart(records: Sequence[dict], path: Path, title: str) -> None:
    """Step time against parameters; bubble area proportional to peak memory."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    measured = [rec for rec in records if rec['status'] == 'ok']
    biggest = max([rec['peak_memory_bytes'] for rec in measured], default=1)
    figure, axes = plt.subplots(figsize=(10, 7))
    for kind, colour in (('plugin', 'tab:blue'), ('baseline', 'tab:green'), ('peer', 'tab:orange')):
        chosen = [rec for rec in measured if rec['kind'] == kind]
        if not chosen:
            continue
        axes.scatter([rec['parameters'] / 1e6 for rec in chosen], [rec['step_time_s'] for rec in chosen],
                     s=[30 + 1500 * rec['peak_memory_bytes'] / biggest for rec in chosen], alpha=0.45, c=colour,
                     edgecolors='black', linewidths=0.5, label=kind)
        for rec in chosen:
            short = rec['label'] if rec['gradient_checkpointing'] is None else \
                f'{rec["label"]} ({"ckpt" if rec["gradient_checkpointing"] else "no ckpt"})'
            axes.annotate(short, (rec['parameters'] / 1e6, rec['step_time_s']), fontsize=6,
                          xytext=(4, 4), textcoords='offset points')
    axes.set_xscale('log')
    plain_numbers = matplotlib.ticker.FuncFormatter(lambda value, _: f'{value:g}')
    axes.xaxis.set_major_formatter(plain_numbers)
    axes.xaxis.set_minor_formatter(plain_numbers)
    axes.set_xlabel('parameters (millions)')
    axes.set_ylabel('training step (s, median)')
    axes.set_title(f'{title}\nbubble area: peak memory (largest {biggest / 2 ** 30:.2f} GiB)', fontsize=9)
    axes.grid(True, which='both', alpha=0.3)
    if measured:
        for handle in axes.legend(loc='upper left', fontsize=8).legend_handles:
            handle.set_sizes([40])
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


# ---- the command ----

def networks_to_run(args: argparse.Namespace, plans: dict, configuration: str, dataset_json: dict,
                    folder: Path | None) -> list[Network]:
    """The plugin trainers (or -tr), the baselines and the MONAI peers the user asked for, in table order."""
    trainers = args.trainers or default_trainers()
    baselines = BASELINES if args.baselines is None else args.baselines
    peers = args.peers
    if peers is None:
        peers = list(PEERS) if monai_available() else []
        if not peers:
            print('MONAI is not installed, so the table has no peers (pip install nnunet-plugins[bench]).')
    elif peers and not monai_available():
        raise ValueError('--peers needs MONAI: pip install nnunet-plugins[bench]')
    unknown = [name for name in peers if name not in PEERS] + [name for name in baselines if name not in BASELINES]
    if unknown:
        raise ValueError(f'unknown baseline or peer {", ".join(unknown)}; baselines are {", ".join(BASELINES)}, '
                         f'peers {", ".join(PEERS)}')
    for name in trainers:
        trainer_class(name)  # an unknown name stops here, before anything is measured
    plugins = {trainer.__name__ for trainer in TRAINERS}
    networks = [Network(name, 'plugin' if name in plugins else 'baseline', name, name, plans) for name in trainers]
    if 'nnUNetTrainer' in baselines:
        networks.append(Network('nnUNetTrainer', 'baseline', f'nnUNetTrainer ({plans["plans_name"]})',
                                'nnUNetTrainer', plans))
    if 'ResEncL' in baselines:
        try:
            resenc, origin = resenc_l_plans(plans, configuration, dataset_json, folder)
        except ValueError as error:  # e.g. a hand-edited patch nnU-Net's planner would not choose
            print(f'ResEnc L baseline left out: {error}')
        else:
            print(f'ResEnc L baseline: {origin}')
            networks.append(Network('ResEncL', 'baseline', 'nnUNetTrainer (ResEnc L)', 'nnUNetTrainer', resenc))
    networks += [Network(name, 'peer', f'MONAI {name}', name, plans) for name in peers]
    return networks


def run(args: argparse.Namespace) -> int:
    """``nnunet-plugins benchmark``: measure, print the Markdown table, write JSON, Markdown and PNG to ``--out``."""
    from tqdm import tqdm
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda, but torch sees no CUDA GPU; use --device cpu')
    steps = args.steps if args.steps is not None else (10 if device == 'cuda' else 3)
    warmup = args.warmup if args.warmup is not None else (3 if device == 'cuda' else 1)
    if steps < 1 or warmup < 0:
        raise ValueError(f'--steps must be at least 1 and --warmup at least 0 (got {steps}, {warmup})')
    if args.patch:
        if args.dataset or args.configuration:
            raise ValueError('give either DATASET CONFIGURATION or --patch, not both')
        if len(args.patch) not in (2, 3):
            raise ValueError(f'--patch takes 2 or 3 sizes, got {len(args.patch)}')
        spacing = args.spacing or [1.0] * len(args.patch)
        if len(spacing) != len(args.patch):
            raise ValueError(f'--spacing needs one value per patch axis ({len(args.patch)})')
        dataset_json = synthetic_dataset_json(args.in_channels, args.classes)
        plans, configuration = synthetic_plans(args.patch, spacing, args.batch or 2, dataset_json)
        folder, source = None, f'plans of nnU-Net\'s default planner for this patch at spacing {spacing}'
    elif args.dataset and args.configuration:
        configuration = args.configuration
        plans, dataset_json, folder = dataset_plans(args.dataset, configuration, args.plans)
        source = f'{folder.name}, {args.plans}, {configuration}'
    else:
        raise ValueError('give DATASET CONFIGURATION (e.g. 4 3d_fullres), or --patch Z Y X for a patch without a '
                         'dataset')
    networks = networks_to_run(args, plans, configuration, dataset_json, folder)
    if args.batch:
        for network in networks:
            network.plans['configurations'][configuration]['batch_size'] = args.batch
    if device == 'cpu' and {'bf16', 'compile'} & set(args.variants):
        print('bf16 and compile variants apply on CUDA only (nnU-Net trains in fp32 and eager mode on a CPU).')
    rows = plan_rows(networks, configuration, dataset_json, args.variants, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runnable = [row for row in rows if not row.skip_reason]
    with tempfile.TemporaryDirectory() as work, \
            tqdm(total=len(runnable) * (steps + warmup), unit='step', desc='benchmark') as bar:
        for number, row in enumerate(runnable):
            bar.set_description(f'{row.network.label} ({number + 1}/{len(runnable)})')
            row.result = run_row(row, configuration, dataset_json, device, steps, warmup, lambda: bar.update(1),
                                 Path(work))
            if 'output' in row.result:
                log = out / f'failed_row_{number + 1}.log'
                log.write_text(row.result.pop('output'))
                row.result['reason'] += f' (full output: {log})'
    records = [record(row, device, steps, warmup, configuration) for row in rows]
    plans_manager = PlansManager(plans)
    base = plans_manager.get_configuration(configuration)
    meta = {'date': datetime.date.today().isoformat(), 'device': device,
            'device_name': torch.cuda.get_device_name() if device == 'cuda' else
            f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)',
            'torch': torch.__version__, 'source': source, 'configuration': configuration,
            'patch_size': list(base.patch_size), 'batch_size': args.batch or base.batch_size,
            'input_channels': determine_num_input_channels(plans_manager, base, dataset_json),
            'output_channels': plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
            'steps': steps, 'warmup': warmup, 'command': ' '.join(sys.argv),
            'memory_counter': 'torch.cuda.max_memory_allocated' if device == 'cuda' else
            'peak RSS of the row\'s own process while it builds and trains, minus its RSS after the imports',
            'mac_counter': 'forward pass of the inference network on one patch, FlopCounterMode on the meta device '
                           '(convolutions and matrix products; norms and activations not counted)'}
    peer_ratios = ratios(rows, records, configuration)
    report = markdown(meta, records, peer_ratios)
    print(report)
    (out / 'benchmark.md').write_text(report)
    (out / 'benchmark.json').write_text(json.dumps({'meta': meta, 'rows': records, 'ratios': peer_ratios}, indent=1))
    chart(records, out / 'benchmark.png', f'{meta["device_name"]}, patch {"x".join(map(str, meta["patch_size"]))}, '
                                          f'batch {meta["batch_size"]}')
    print(f'Wrote {out / "benchmark.md"}, {out / "benchmark.json"} and {out / "benchmark.png"}')
    return 0
