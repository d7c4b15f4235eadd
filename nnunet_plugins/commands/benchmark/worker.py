"""One benchmark row's measurement, in a fresh process: ``python -m nnunet_plugins.commands.benchmark.worker SPEC
RESULT`` reads the row's spec (JSON), builds its trainer, times its training steps and writes the result (JSON).

:func:`run_row` starts that process and follows its steps; every row runs in its own, so rows share no
memory, allocator caches or compiled code.
"""
import ctypes
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from unittest import mock

import monai.networks.nets  # noqa: F401  (the peers' networks, imported before the memory baseline like the rest)
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn
from torch._dynamo import OptimizedModule

from nnunet_plugins import settings
from nnunet_plugins.commands.benchmark.peers import trainer_class
from nnunet_plugins.commands.benchmark.rows import Row
from nnunet_plugins.networks.layout import memory_layout
from nnunet_plugins.workspace import environment

_STEP_MARKER = '@@nnunet-plugins-benchmark-step@@'


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


def random_batch(trainer: nnUNetTrainer, seed: int = 0) -> dict:
    """Noise and random labels at the plans' patch and batch size, targets per output scale as nnU-Net's loader
    makes them (``DownsampleSegForDSTransform``)."""
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
    """Build the row's trainer and time its training step, or nnU-Net's prediction of one case with its network
    (``spec['mode']``); runs inside the row's own process."""
    # everything a row may import is imported at the top of this module, before the baseline, so baselines are
    # equal across rows
    baseline_rss = _reset_peak_rss()
    device = torch.device(spec['device'])
    if device.type == 'cuda':  # as nnUNetv2_train
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    measure_mode = _measure_inference if spec['mode'] == 'inference' else _measure_training
    result = {'baseline_rss_bytes': baseline_rss}
    with tempfile.TemporaryDirectory() as results, environment({'nnUNet_results': results}):
        result.update(measure_mode(spec, device))
    if result['status'] == 'ok':
        result['peak_memory_bytes'] = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else \
            peak_rss_bytes() - baseline_rss
        result['process_peak_rss_bytes'] = peak_rss_bytes()
    return result


def _timed_steps(step, spec: dict, device: torch.device) -> dict:
    """Wall and process CPU time of every call of ``step()``, warm-up included; 'failed' with the reason if one
    raises (e.g. out of memory)."""
    times, cpu_times, outputs = [], [], []
    try:
        for _ in range(spec['warmup'] + spec['steps']):
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs.append(step())
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)  # user + system, every thread of this process
            print(_STEP_MARKER, flush=True)
    except Exception as error:
        return {'status': 'failed', 'reason': f'{type(error).__name__}: {str(error)[:300]}'}
    return {'status': 'ok', 'step_times_s': times, 'step_cpu_times_s': cpu_times, 'outputs': outputs}


def _measure_training(spec: dict, device: torch.device) -> dict:
    cls = trainer_class(spec['trainer'])
    trainer = cls({**spec['plans'], 'continue_training': False}, spec['configuration'], 0, spec['dataset_json'], device)
    if hasattr(trainer, 'plugin_settings'):  # the row's checkpointing; None: the trainer's default
        trainer.plugin_settings = dataclasses.replace(trainer.plugin_settings, checkpointing=spec['checkpointing'])
    if spec['flip_compile']:
        os.environ['nnUNet_compile'] = 'f' if trainer._do_i_compile() else 't'
    # there is no preprocessed data to pick a dataset class for, and the step does not load any
    with mock.patch.object(nnunet_trainer_module, 'infer_dataset_class', return_value=None):
        trainer.initialize()
    network = trainer.network._orig_mod if isinstance(trainer.network, OptimizedModule) else trainer.network
    if spec['flip_layout']:
        _flip_layout(network, device, len(trainer.configuration_manager.patch_size))
    if spec['bf16']:
        if not torch.cuda.is_bf16_supported():
            return {'status': 'skipped', 'reason': f'{torch.cuda.get_device_name()} has no bf16'}
        torch.set_autocast_dtype('cuda', torch.bfloat16)
    facts = {'parameters': sum(p.numel() for p in network.parameters()),
             'gradient_checkpointing': getattr(network, 'gradient_checkpointing', None),
             'autocast_dtype': str(torch.get_autocast_dtype('cuda')).removeprefix('torch.') if device.type == 'cuda'
             else None,
             'compiled': isinstance(trainer.network, OptimizedModule)}
    batch = random_batch(trainer)
    timed = _timed_steps(lambda: float(trainer.train_step(batch)['loss']), spec, device)
    losses = timed.pop('outputs', None)
    return {**facts, **timed, 'memory_layout': memory_layout(network), 'first_loss': losses[0] if losses else None}


def _measure_inference(spec: dict, device: torch.device) -> dict:
    """nnU-Net's sliding-window prediction (nnUNetPredictor, as nnUNetv2_predict runs it: Gaussian weighting, step
    0.5, mirroring unless switched off) of one case with the trainer's network at its initial weights."""
    cls = trainer_class(spec['trainer'])
    plans_manager = PlansManager(spec['plans'])
    configuration_manager = plans_manager.get_configuration(spec['configuration'])
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, spec['dataset_json'])
    label_manager = plans_manager.get_label_manager(spec['dataset_json'])
    network = cls.build_network_architecture(plans_manager, configuration_manager, num_inputs,
                                             label_manager.num_segmentation_heads, enable_deep_supervision=False)
    if spec['flip_layout']:
        _flip_layout(network, device, len(configuration_manager.patch_size))
    predictor = nnUNetPredictor(use_mirroring=spec['mirroring'], device=device, allow_tqdm=False)
    mirror_axes = tuple(range(len(configuration_manager.patch_size))) if spec['mirroring'] else None
    predictor.manual_initialization(network, plans_manager, configuration_manager, [network.state_dict()],
                                    spec['dataset_json'], cls.__name__, mirror_axes)
    case = torch.from_numpy(load_case(spec)).float()
    timed = _timed_steps(lambda: predictor.predict_logits_from_preprocessed_data(case).shape, spec, device)
    timed.pop('outputs', None)
    return {**timed, 'parameters': sum(p.numel() for p in network.parameters()),
            'memory_layout': memory_layout(network), 'compiled': isinstance(predictor.network, OptimizedModule),
            'autocast_dtype': 'float16' if device.type == 'cuda' else None}


def load_case(spec: dict) -> np.ndarray:
    """The case to predict, ``(C, *S)``: a preprocessed case of the dataset, or noise of ``spec['volume']``."""
    if spec.get('case_folder'):
        folder = spec['case_folder']
        data, _, _, _ = infer_dataset_class(folder)(folder, [spec['case']]).load_case(spec['case'])
        return np.asarray(data[:])
    generator = np.random.default_rng(0)
    return generator.standard_normal((spec['input_channels'], *spec['volume']), dtype=np.float32)


def _flip_layout(network: nn.Module, device: torch.device, dims: int) -> None:
    """Run ``network`` in the memory layout its trainer does not use on this device."""
    if device.type == 'cpu' and hasattr(network, 'cpu_layout'):  # follows its input's device (networks.layout)
        network.cpu_layout = 'contiguous' if network.cpu_layout == 'channels-last' else 'channels-last'
    else:  # runs in PyTorch's default layout here
        network.to(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)


def _measure_in_process(spec_file: str, result_file: str) -> None:
    """Entry point of a row's subprocess: read the spec, measure, write the result."""
    spec = json.loads(Path(spec_file).read_text())
    Path(result_file).write_text(json.dumps(measure(spec)))


def row_spec(row: Row, configuration: str, dataset_json: dict, device: str, steps: int, warmup: int) -> dict:
    """What :func:`measure` needs to know of ``row`` (JSON-serialisable; the row's process reads it)."""
    return {'trainer': row.network.trainer, 'plans': row.network.plans, 'configuration': configuration,
            'dataset_json': dataset_json, 'device': device, 'steps': steps, 'warmup': warmup,
            'checkpointing': row.checkpointing, 'flip_layout': row.flip_layout, 'bf16': row.bf16,
            'flip_compile': row.flip_compile, **row.inference}


def run_row(row: Row, configuration: str, dataset_json: dict, device: str, steps: int, warmup: int,
            on_step, work: Path) -> dict:
    """Measure ``row`` in a fresh Python process; ``on_step()`` is called after every step it takes."""
    spec_file, result_file = work / 'spec.json', work / 'result.json'
    spec_file.write_text(json.dumps(row_spec(row, configuration, dataset_json, device, steps, warmup)))
    result_file.unlink(missing_ok=True)
    # the row runs with its trainer's own settings and the row's checkpointing (passed in the spec), not the user's
    env = {name: value for name, value in os.environ.items()
           if name != 'nnUNet_wandb_enabled' and name not in settings.VARIABLES}
    env['PYTHONUNBUFFERED'] = '1'
    command = [sys.executable, '-m', 'nnunet_plugins.commands.benchmark.worker', str(spec_file), str(result_file)]
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


if __name__ == '__main__':
    _measure_in_process(sys.argv[1], sys.argv[2])
