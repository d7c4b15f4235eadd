"""The benchmark report: the Markdown table, our networks against MONAI's (MedNeXt, Swin UNETR), and the chart."""
from pathlib import Path
from typing import Sequence

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_plugins.commands.benchmark.peers import PEERS, MONAIMedNeXtPeer, MONAISwinUNETRPeer, trainer_class
from nnunet_plugins.commands.benchmark.rows import Row, setting_text
from nnunet_plugins.training.mednext import MedNeXtTrainer
from nnunet_plugins.pretraining import PretrainingTrainer
from nnunet_plugins.training.swinunetr import nnUNetTrainerSwinUNETR

# a CPU row's peak memory is its process's peak RSS above the RSS after the imports; below this it is allocator
# noise (freed heap reused), not a measurement
CPU_MEMORY_RESOLUTION_BYTES = 2 ** 20


def measured_memory(rec: dict) -> float | None:
    """The row's peak memory in bytes, or None when there is none or it is below the CPU measurement's resolution."""
    peak = rec['peak_memory_bytes']
    if peak is None or (rec['device'] == 'cpu' and peak < CPU_MEMORY_RESOLUTION_BYTES):
        return None
    return peak


def step_clock(rec: dict) -> str:
    """The clock a row's step times are compared by: on a CPU the process's CPU time (user + system, all threads),
    which another process's load on a shared machine barely changes; on CUDA the wall clock."""
    return 'cpu_time_s' if rec['device'] == 'cpu' else 'step_time_s'


def counterpart(cls: type) -> tuple | None:
    """What one of our trainers and a MONAI peer share when they build the same network (MedNeXt of a size and
    kernel, or Swin UNETR), or None (also for a pre-training trainer: MONAI's networks do not pre-train)."""
    if issubclass(cls, PretrainingTrainer):
        return None
    if issubclass(cls, (MedNeXtTrainer, MONAIMedNeXtPeer)):
        return 'MedNeXt', cls.variant, cls.kernel_size
    if issubclass(cls, (nnUNetTrainerSwinUNETR, MONAISwinUNETRPeer)):
        return ('SwinUNETR',)
    return None


def topology_versus_monai(cls: type, configuration_manager: ConfigurationManager) -> str:
    """'same' when our network (MedNeXt or Swin UNETR) has the fixed topology of MONAI's on these plans (isotropic 2x
    downsamplings, as many as MONAI's, the kernel on every axis), otherwise what differs."""
    peer = next(peer for peer in PEERS.values() if counterpart(peer) == counterpart(cls))
    levels = cls.network_levels(configuration_manager)
    ours = [list(stride) for stride in levels.strides]
    if ours != peer.network_strides(configuration_manager):
        return f'differs: the plans give strides {ours}'
    if any(size == 1 for kernel in levels.plan_kernels for size in kernel):
        return 'differs: the plans give kernel size 1 on some axes'
    return 'same'


def ratios(rows: Sequence[Row], records: Sequence[dict], configuration: str) -> list[dict]:
    """Our MedNeXt and Swin UNETR rows against MONAI's network of the same kind (MedNeXt of the same size and
    kernel) run with the same layout, precision and compilation: step time and peak memory, ours / MONAI, and
    whether the topologies are the same."""
    def size(row: Row) -> tuple | None:
        return counterpart(trainer_class(row.network.trainer))

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
        clock, ours_memory, monai_memory = step_clock(rec), measured_memory(rec), measured_memory(peer)
        out.append({'ours': rec['label'], 'monai': peer['label'], 'setting': setting_text(rec),
                    'clock': 'process CPU time' if clock == 'cpu_time_s' else 'wall clock',
                    'step_time_ratio': rec[clock] / peer[clock],
                    # None when a row's memory is below what the measurement resolves (a tiny patch on a CPU)
                    'peak_memory_ratio': ours_memory / monai_memory if ours_memory and monai_memory else None,
                    'parameter_difference': rec['parameters'] - peer['parameters'],
                    'topology': topology_versus_monai(trainer_class(row.network.trainer), configuration_manager)})
    return out


def markdown(meta: dict, records: Sequence[dict], peer_ratios: Sequence[dict]) -> str:
    """The report: a header saying what was measured and how, the table, and the ratios against MONAI."""
    lines = [f'## {meta["date"]}, {meta["device_name"]}, torch {meta["torch"]}',
             '',
             f'{meta["source"]}; patch {"x".join(map(str, meta["patch_size"]))}, batch {meta["batch_size"]}, '
             f'{meta["input_channels"]} input channel(s), {meta["output_channels"]} output channels. '
             + (f'Step: median of {meta["steps"]} training steps after {meta["warmup"]} warm-up, each the trainer\'s '
              f'own train_step.' if meta['mode'] == 'training' else
              f'Step: median of {meta["steps"]} predictions after {meta["warmup"]} warm-up, each nnU-Net\'s '
              f'sliding-window prediction of {meta["case"]} (nnUNetPredictor, mirroring '
              f'{"on" if meta["mirroring"] else "off"}).')
             + f' Memory: {meta["memory_counter"]}. MACs: {meta["mac_counter"]}. Ratios by {meta["ratio_clock"]}.',
             '',
             '| network | setting | parameters | GMAC/patch | step (s) | step, CPU time (s) | memory (GiB) '
             '| voxels/s |',
             '|---|---|---:|---:|---:|---:|---:|---:|']
    notes = []
    for rec in records:
        def shown(key: str, fmt: str) -> str:
            return '—' if rec[key] is None else format(rec[key], fmt)
        memory = '—' if rec['peak_memory_bytes'] is None else f'{rec["peak_memory_bytes"] / 2 ** 30:.3g}'
        if rec['peak_memory_bytes'] is not None and measured_memory(rec) is None:
            memory = f'< {CPU_MEMORY_RESOLUTION_BYTES / 2 ** 30:.3g} (resolution)'
        lines.append(f'| {rec["label"]} | {setting_text(rec)} | {shown("parameters", ",")} | '
                     f'{shown("forward_gmacs_per_patch", ".1f")} | {shown("step_time_s", ".3g")} | '
                     f'{shown("cpu_time_s", ".3g")} | {memory} | {shown("voxels_per_second", ",.0f")} |')
        if rec['status'] != 'ok':
            notes.append(f'- {rec["label"]}: {rec["status"]}, {rec["null_reasons"].get("step_time_s")}')
    if notes:
        lines += ['', *notes]
    if peer_ratios:
        lines += ['', 'Ours / MONAI\'s network of the same kind (MedNeXt of the same size and kernel, SwinUNETR), same '
                  'layout and precision (MONAI\'s MedNeXt B, M and L have fewer parameters than the authors\' '
                  'networks, see "parameters"):', '',
                  '| ours | MONAI | setting | step time (clock) | peak memory | parameters, ours - MONAI | topology |',
                  '|---|---|---|---:|---:|---:|---|']
        lines += [f'| {r["ours"]} | {r["monai"]} | {r["setting"]} | {r["step_time_ratio"]:.2f}x ({r["clock"]}) | '
                  f'{"—" if r["peak_memory_ratio"] is None else format(r["peak_memory_ratio"], ".2f") + "x"} | '
                  f'{r["parameter_difference"]:+,} | {r["topology"]} |' for r in peer_ratios]
    return '\n'.join(lines) + '\n'


def chart(records: Sequence[dict], path: Path, title: str) -> None:
    """Step time against parameters; bubble area proportional to peak memory."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    measured = [rec for rec in records if rec['status'] == 'ok']
    biggest = max([rec['peak_memory_bytes'] for rec in measured], default=0) or 1  # every row can measure 0 bytes
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


