"""``nnunet-plugins benchmark``: choose the rows, measure each in its own process, write the report."""
import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_plugins.commands.benchmark.peers import PEERS, default_trainers, trainer_class
from nnunet_plugins.commands.benchmark.plans import dataset_plans, resenc_l_plans, synthetic_dataset_json, \
    synthetic_plans
from nnunet_plugins.commands.benchmark.report import chart, markdown, ratios
from nnunet_plugins.commands.benchmark.rows import Network, plan_rows, record
from nnunet_plugins.commands.benchmark.worker import run_row
from nnunet_plugins.registry import plugin_trainer, pretraining_trainers_of

BASELINES = ('nnUNetTrainer', 'ResEncL')


def networks_to_run(args: argparse.Namespace, plans: dict, configuration: str, dataset_json: dict,
                    folder: Path | None) -> list[Network]:
    """The plugin trainers (or -tr), the baselines and the MONAI peers the user asked for, in table order."""
    trainers = args.trainers or default_trainers()
    # a prediction compares the plugin networks with nnU-Net's own on the same plans, unless asked for more
    baselines = (('nnUNetTrainer',) if args.inference else BASELINES) if args.baselines is None else args.baselines
    peers = ([] if args.inference else list(PEERS)) if args.peers is None else args.peers
    unknown = [name for name in peers if name not in PEERS] + [name for name in baselines if name not in BASELINES]
    if unknown:
        raise ValueError(f'unknown baseline or peer {", ".join(unknown)}; baselines are {", ".join(BASELINES)}, '
                         f'peers {", ".join(PEERS)}')
    for name in trainers:
        trainer_class(name)  # an unknown name stops here, before anything is measured
    networks = [Network(name, 'baseline' if plugin_trainer(name) is None else 'plugin', name, name, plans)
                for name in trainers]
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
    return with_pretraining(networks) if args.pretraining else networks


def with_pretraining(networks: list[Network]) -> list[Network]:
    """``networks`` with, right after each trainer's, its network's pre-training trainers
    (:func:`~nnunet_plugins.registry.pretraining_trainers_of`) on the same plans."""
    rows = []
    for network in networks:
        rows.append(network)
        for pretrainer in (t.__name__ for t in pretraining_trainers_of(trainer_class(network.trainer))):
            suffix = pretrainer.removeprefix(network.trainer)
            label = network.label.replace(network.trainer, pretrainer, 1)
            rows.append(Network(network.name + suffix, network.kind, label, pretrainer, network.plans))
    return rows


def inference_case(args: argparse.Namespace, plans: dict, configuration: str, dataset_json: dict,
                   folder: Path | None) -> dict:
    """What the inference rows predict: a preprocessed case of the dataset (``--case``, default its first), or
    without a dataset noise of ``--volume`` (default twice the patch per axis, so several windows overlap)."""
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    base = {'mirroring': not args.disable_tta,
            'input_channels': determine_num_input_channels(plans_manager, configuration_manager, dataset_json)}
    if folder is None:
        volume = args.volume or [2 * p for p in configuration_manager.patch_size]
        if len(volume) != len(configuration_manager.patch_size):
            raise ValueError(f'--volume needs one size per patch axis ({len(configuration_manager.patch_size)})')
        return {**base, 'volume': list(volume), 'case_shape': list(volume),
                'case_label': f'noise {"x".join(map(str, volume))}'}
    data_folder = folder / configuration_manager.data_identifier
    cases = sorted(path.stem for path in data_folder.glob('*.pkl')) if data_folder.is_dir() else []
    if not cases:
        raise ValueError(f'{data_folder} holds no preprocessed cases; run nnUNetv2_preprocess -d {folder.name} -c '
                         f'{configuration} first, or benchmark a synthetic volume with --patch and --volume')
    case = args.case or cases[0]
    if case not in cases:
        raise ValueError(f'--case {case}: {data_folder} has no such case; it has {", ".join(cases[:10])}'
                         + (', ...' if len(cases) > 10 else ''))
    data, _, _, _ = infer_dataset_class(str(data_folder))(str(data_folder), [case]).load_case(case)
    shape = list(data.shape[1:])
    return {**base, 'case_folder': str(data_folder), 'case': case, 'case_shape': shape,
            'case_label': f'{case} ({"x".join(map(str, shape))})'}


def run(args: argparse.Namespace) -> int:
    """``nnunet-plugins benchmark``: measure, print the Markdown table, write JSON, Markdown and PNG to ``--out``.

    ``args`` are the parsed command line, checked by :mod:`nnunet_plugins.cli` (positive sizes, either a
    dataset and configuration or ``--patch``). Returns the exit code: 1 when no row could be measured.
    """
    from tqdm import tqdm
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda, but torch sees no CUDA GPU; use --device cpu')
    # a prediction of a whole case is many training steps' worth of forward passes
    steps = args.steps if args.steps is not None else (10 if device == 'cuda' else 2 if args.inference else 3)
    warmup = args.warmup if args.warmup is not None else (3 if device == 'cuda' else 1)
    if args.patch:
        spacing = args.spacing or [1.0] * len(args.patch)
        dataset_json = synthetic_dataset_json(args.in_channels, args.classes)
        plans, configuration = synthetic_plans(args.patch, spacing, args.batch or 2, dataset_json)
        folder, source = None, f'plans of nnU-Net\'s default planner for this patch at spacing {spacing}'
    else:
        configuration = args.configuration
        plans, dataset_json, folder = dataset_plans(args.dataset, configuration, args.plans)
        source = f'{folder.name}, {args.plans}, {configuration}'
    networks = networks_to_run(args, plans, configuration, dataset_json, folder)
    inference = inference_case(args, plans, configuration, dataset_json, folder) if args.inference else None
    if args.batch:
        for network in networks:
            network.plans['configurations'][configuration]['batch_size'] = args.batch
    if device == 'cpu' and {'bf16', 'compile'} & set(args.variants):
        print('bf16 and compile variants apply on CUDA only (nnU-Net trains in fp32 and eager mode on a CPU).')
    rows = plan_rows(networks, configuration, dataset_json, args.variants, device, inference)
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
            'mode': 'inference' if inference else 'training', 'case': inference and inference['case_label'],
            'mirroring': inference and inference['mirroring'],
            'ratio_clock': 'process CPU time (user + system of the row\'s process, all threads)' if device == 'cpu'
            else 'wall clock',
            'memory_counter': 'torch.cuda.max_memory_allocated' if device == 'cuda' else
            'peak RSS of the row\'s own process while it builds and runs the network, minus its RSS after the '
            'imports (below 1 MiB shown as such: allocator noise, not a measurement)',
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
    if not any(rec['status'] == 'ok' for rec in records):
        print(f'nnunet-plugins benchmark: error: no row was measured ({len(records)} skipped or failed; the notes '
              f'under the table say why)', file=sys.stderr)
        return 1
    return 0
