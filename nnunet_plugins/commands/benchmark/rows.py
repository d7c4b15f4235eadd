"""What the benchmark measures: a row per network and setting, and the JSON record every row becomes."""
import copy
import statistics
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_plugins.commands.benchmark.peers import trainer_class
from nnunet_plugins.macs import forward_macs

ROW_FIELDS = (
    'mode', 'case', 'label', 'name', 'kind', 'trainer', 'plans_name', 'configuration', 'network_class', 'device',
    'patch_size', 'batch_size', 'input_channels', 'output_channels',
    'parameters', 'forward_gmacs_per_patch',
    'gradient_checkpointing', 'memory_layout', 'autocast_dtype', 'compiled',
    'warmup_steps', 'steps', 'step_times_s', 'step_time_s', 'step_cpu_times_s', 'cpu_time_s', 'voxels_per_second',
    'peak_memory_bytes', 'process_peak_rss_bytes', 'baseline_rss_bytes', 'first_loss',
    'status', 'null_reasons')


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
    # {'mode': 'training'}, or for prediction rows {'mode': 'inference', 'case': ..., 'case_shape': ..., ...}
    inference: dict = field(default_factory=lambda: {'mode': 'training'})


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
    model = cls.build_network_architecture(plans_manager, configuration_manager, in_channels, out_channels,
                                           enable_deep_supervision=False)
    patch_size = list(configuration_manager.patch_size)
    return {'network_class': type(model).__name__, 'patch_size': patch_size,
            'batch_size': configuration_manager.batch_size, 'input_channels': in_channels,
            'output_channels': out_channels,
            'forward_gmacs_per_patch': forward_macs(model, [1, in_channels, *patch_size]) / 1e9,
            'default_checkpointing': getattr(model, 'gradient_checkpointing', None)}


def plan_rows(networks: Sequence[Network], configuration: str, dataset_json: dict, variants: Sequence[str],
              device: str, inference: dict | None = None) -> list[Row]:
    """Rows for every network: its trainer's settings, plus one row per requested variant that applies.

    With ``inference`` (the case to predict, see worker.load_case) the rows time a prediction instead of a
    training step; of the variants only the memory layout applies there.
    """
    mode = {'mode': 'training'} if inference is None else {'mode': 'inference', **inference}
    training = inference is None
    rows = []
    for network in networks:
        try:
            facts = probe(network, configuration, dataset_json)
        except Exception as error:  # a network that cannot be built here is reported, not fatal
            rows.append(Row(network, skip_reason=f'{type(error).__name__}: {error}', inference=mode))
            continue
        rows.append(Row(network, facts=facts, inference=mode))
        if training and 'checkpointing' in variants and facts['default_checkpointing'] is not None:
            rows.append(Row(network, checkpointing=not facts['default_checkpointing'], facts=facts, inference=mode))
        if 'channels-last' in variants:
            rows.append(Row(network, flip_layout=True, facts=facts, inference=mode))
        if training and 'bf16' in variants and device == 'cuda':
            rows.append(Row(network, bf16=True, facts=facts, inference=mode))
        if training and 'compile' in variants and device == 'cuda':
            rows.append(Row(network, flip_compile=True, facts=facts, inference=mode))
    return rows



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
    inference = row.inference['mode'] == 'inference'
    values = {'mode': row.inference['mode'], 'case': row.inference.get('case_label'),
              'label': network.label, 'name': network.name, 'kind': network.kind, 'trainer': network.trainer,
              'plans_name': network.plans['plans_name'], 'configuration': configuration, 'device': device,
              'warmup_steps': warmup, 'steps': steps, 'status': status}
    for key in ('network_class', 'patch_size', 'batch_size', 'input_channels', 'output_channels',
                'forward_gmacs_per_patch'):
        values[key] = facts.get(key)
    for key in ('parameters', 'gradient_checkpointing', 'memory_layout', 'autocast_dtype', 'compiled',
                'step_times_s', 'step_cpu_times_s', 'peak_memory_bytes', 'process_peak_rss_bytes',
                'baseline_rss_bytes', 'first_loss'):
        values[key] = result.get(key)
    times, cpu_times = result.get('step_times_s'), result.get('step_cpu_times_s')
    values['step_time_s'] = statistics.median(times[warmup:]) if times else None
    values['cpu_time_s'] = statistics.median(cpu_times[warmup:]) if cpu_times else None
    voxels = float(np.prod(row.inference['case_shape'])) if inference else \
        facts.get('batch_size', 0) * float(np.prod(facts.get('patch_size', [0])))
    values['voxels_per_second'] = voxels / values['step_time_s'] if values['step_time_s'] else None
    if inference:
        values['batch_size'] = values['first_loss'] = None
    null_reasons = {}
    for key, value in values.items():
        if value is not None:
            continue
        if key == 'case' and not inference:
            null_reasons[key] = 'a training row: a random batch at the plans\' patch and batch size'
        elif key == 'batch_size' and inference:
            null_reasons[key] = 'nnU-Net predicts one patch at a time'
        elif key == 'first_loss' and inference:
            null_reasons[key] = 'no loss in a prediction'
        elif key == 'gradient_checkpointing' and inference:
            null_reasons[key] = 'no gradients in a prediction, so nothing to checkpoint'
        elif key == 'gradient_checkpointing' and 'memory_layout' in result:
            null_reasons[key] = 'the network has no gradient-checkpointing switch'
        elif key == 'autocast_dtype' and 'memory_layout' in result:
            null_reasons[key] = 'no autocast on a CPU (nnUNetTrainer.train_step autocasts on CUDA only)'
        else:
            null_reasons[key] = reason or 'not measured'
    values['null_reasons'] = null_reasons
    return {key: values[key] for key in ROW_FIELDS}


