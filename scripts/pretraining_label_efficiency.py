"""Does self-supervised pre-training help when only two cases are labeled? A label-efficiency study.

For every pre-training trainer given (e.g. ``nnUNetTrainerMedNeXtS_PretrainRCR``), the trainer pre-trains on fold
``all`` of a synthetic dataset (every training image; the loss reads no label). Then the supervised trainer (the
pre-training trainer's name without its ``_Pretrain...`` suffix) trains fold 0, whose training split holds only two
labeled cases, under each seed: once from scratch and once from each pre-training run with stock
``-pretrained_weights``, each for the same epochs x iterations. By default each seed pre-trains too; with
``--pretrain-seed S`` one pre-training per trainer, under seed S, serves every seed's fine-tuning. nnU-Net's
predictor (``-f 0``, no mirroring) then segments the held-out cases, and ``nnunet-plugins evaluate`` measures
them: Dice, NSD and HD95 per label, with paired Wilcoxon tests of every start against scratch over the held-out
cases of all seeds (case c of seed s is the pair's unit). Written to WORK_FOLDER:
``label_efficiency_<DATA>_pretrain<E>x<I>_finetune<E>x<I>`` with ``evaluation.md/.json/.csv/.png``, ``study.json``
(settings, each run's seconds, per-seed means, each pre-training's loss per epoch) and ``pretraining_curves.png``;
the per-seed table and the evaluation's report are also printed. On the varied data the held-out cases are
evaluated again in two groups, ``organ_contrast_seen`` and ``organ_contrast_unseen``: those whose organ is brighter
(or darker) than its tissue as in a labeled case, and the rest. Every run's folder under ``results/`` names the
schedules (and, for a fine-tuning, the pre-training's seed) it depends on, and keeps the seconds its training and
prediction took (``seconds.json``), so that a rerun reusing it reports them.

Every training is a stock ``nnUNetv2_train`` run (nnU-Net's own entry point) in a process of its own that first
seeds Python, NumPy and PyTorch; nnU-Net's data augmentation runs in that process (``nnUNet_n_proc_DA=0``), so a
seed fixes the initial weights, the patches and the augmentation (on a GPU, cuDNN's kernels are not bit-for-bit
deterministic, so repeated GPU runs differ in the last digits). ``--jobs N`` runs N trainings at once (every
pre-training is started before any fine-tuning), on the CPU with the cores shared out (``OMP_NUM_THREADS``); each
is the same as alone. On a 2-core CPU ``--jobs 2`` was slower in all than one at a time (a step took 4-6x as long);
use it on a GPU or with many cores.

Data (``--data``), both drawn by ``nnunet_plugins.synthetic`` at its tiny size (about 14 x 32 x 32 voxels at
3.0 x 1.2 x 1.2 mm; an organ, a vessel and a lesion), nnU-Net's 3d_fullres plan:

- ``varied`` (default): ``synthetic.VARIED``, MR-like cases whose contrasts flip sign, with bias fields, noise
  levels, mirrored positions, sizes and shapes that vary, and no lesion in some; 100 training images (2 of them
  labeled for fold 0, 2 more for its validation), 10 held-out cases; the plans' batch size set to 2 (nnU-Net
  plans 5 for these tiny images) so that the study fits a 2-core CPU.
- ``tiny``: the CT-like default set, 20 training images (2 labeled, 4 validation) and 8 held-out cases, the plans'
  batch size (the README's runs before the varied set).

Usage: ``python scripts/pretraining_label_efficiency.py WORK_FOLDER --pretrainers nnUNetTrainerMedNeXtS_PretrainRCR
[--data varied] [--pretrain-epochs 30] [--pretrain-iterations 20] [--finetune-epochs 20] [--iterations 10]
[--seeds 0 1] [--pretrain-seed 0] [--device cuda] [--jobs 4]``. Runs already finished in WORK_FOLDER are reused
(pre-training and fine-tuning alike), so more pre-training trainers can be added later. Trainers declared outside
the package (ablations) come in with ``--trainer-folder FOLDER`` (put on ``nnUNet_extTrainer``).
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CONFIGURATION = '3d_fullres'
LABELED = 2  # labeled training cases of fold 0


@dataclass(frozen=True)
class Data:
    dataset_id: int
    name: str
    training: int
    heldout: int
    validation: int           # fold 0's validation cases (nnU-Net needs some; they do not train)
    varied: bool              # synthetic.VARIED, or the default cases
    batch_size: int | None    # set in the plans; None keeps nnU-Net's


DATA = {'varied': Data(994, 'LabelEfficiencyVaried', 100, 10, 2, True, 2),
        'tiny': Data(993, 'LabelEfficiency', 20, 8, 4, False, None)}


def dataset_folder(data: Data) -> str:
    return f'Dataset{data.dataset_id:03d}_{data.name}'


def prepare(work: Path, data: Data) -> dict:
    """The dataset, planned and preprocessed once, with fold 0 = two labeled training cases; nnU-Net's environment."""
    from nnunet_plugins import synthetic
    from nnunet_plugins.workspace import nnunet_environment, run_stock
    env = nnunet_environment(work, processes=1)
    preprocessed = work / 'nnUNet_preprocessed' / dataset_folder(data)
    splits = preprocessed / 'splits_final.json'
    if not splits.is_file():
        synthetic.write_dataset(work / 'nnUNet_raw', data.dataset_id, data.name, data.training, data.heldout, seed=5,
                                size=synthetic.TINY, variation=synthetic.VARIED if data.varied else None)
        run_stock(['nnUNetv2_plan_and_preprocess', '-d', data.dataset_id, '-c', CONFIGURATION, '-np', 1], env,
                  capture=True)
        if data.batch_size:
            plans_file = preprocessed / 'nnUNetPlans.json'
            plans = json.loads(plans_file.read_text())
            plans['configurations'][CONFIGURATION]['batch_size'] = data.batch_size
            plans_file.write_text(json.dumps(plans, indent=4))
        labels = work / 'nnUNet_raw' / dataset_folder(data) / 'labelsTr'
        cases = sorted(case_name(p) for p in labels.glob('*.nii.gz'))
        splits.write_text(json.dumps([{'train': cases[:LABELED], 'val': cases[LABELED:LABELED + data.validation]}]))
    return env


def train(env: dict, data: Data, results: Path, trainer: str, fold: str, epochs: int, iterations: int, seed: int,
          device: str, pretrained: Path | None = None) -> Path:
    """``nnUNetv2_train`` in a seeded process of its own (once: a finished run is reused); the fold folder."""
    from nnunet_plugins import settings
    folder = results / dataset_folder(data) / f'{trainer}__nnUNetPlans__{CONFIGURATION}' / f'fold_{fold}'
    if (folder / 'checkpoint_final.pth').is_file():
        return folder
    args = [str(data.dataset_id), CONFIGURATION, fold, '-tr', trainer, '-device', device]
    if pretrained is not None:
        args += ['-pretrained_weights', str(pretrained)]
    run_env = {**env, 'nnUNet_results': str(results), 'nnUNet_n_proc_DA': '0', settings.EPOCHS: str(epochs),
               settings.ITERATIONS: str(iterations), 'nnUNet_compile': 'f'}
    start = time.time()
    results.mkdir(parents=True, exist_ok=True)
    # the log keeps what nnU-Net prints, the weights it loads among it
    with open(results / f'nnUNetv2_train_fold_{fold}_seed{seed}.log', 'w') as log:
        subprocess.run([sys.executable, __file__, '--seeded-train', str(seed), *args], env=run_env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    record_seconds(results, 'training', seconds)
    origin = f' from {pretrained.parent.parent.parent.parent.name}' if pretrained else ''
    print(f'  {trainer} fold {fold} seed {seed}{origin}: {seconds:.0f} s', flush=True)
    return folder


def record_seconds(results: Path, step: str, seconds: float) -> None:
    """Keep how long a run's step took in the run's folder, so that a rerun reusing the run still reports it."""
    file = results / 'seconds.json'
    file.write_text(json.dumps({**recorded_seconds(results), step: round(seconds)}))


def recorded_seconds(results: Path) -> dict[str, int]:
    """A run's recorded seconds per step (``training``, ``prediction``); empty for a run made before they were kept."""
    file = results / 'seconds.json'
    return json.loads(file.read_text()) if file.is_file() else {}


def seeded_train(seed: int, args: list[str]) -> None:
    """Seed everything, then run nnU-Net's own ``nnUNetv2_train`` entry point with ``args``."""
    import torch
    from nnunetv2.run.run_training import run_training_entry
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    sys.argv = ['nnUNetv2_train', *args]
    run_training_entry()


def predict_heldout(env: dict, data: Data, results: Path, trainer: str, out: Path, device: str) -> Path:
    """Segment the held-out images with fold 0 (no mirroring) into ``out`` (once)."""
    from nnunet_plugins.workspace import run_stock
    if not out.is_dir() or len(list(out.glob('*.nii.gz'))) < data.heldout:
        start = time.time()
        run_stock(['nnUNetv2_predict', '-i', Path(env['nnUNet_raw']) / dataset_folder(data) / 'imagesTs', '-o', out,
                   '-d', data.dataset_id, '-c', CONFIGURATION, '-f', 0, '-tr', trainer, '-device', device,
                   '--disable_tta', '-npp', 1, '-nps', 1], {**env, 'nnUNet_results': str(results)}, capture=True)
        record_seconds(results, 'prediction', time.time() - start)
    return out


def supervised_trainer(pretrainer: str) -> str:
    match = re.fullmatch(r'(\w+?)_Pretrain\w+', pretrainer)
    if not match:
        raise SystemExit(f'{pretrainer} is not a pre-training trainer (its name ends in _Pretrain...)')
    return match.group(1)


def pretraining_log(checkpoint: Path) -> dict[str, list[float]]:
    """A pre-training run's logged training loss, loss terms and readings (e.g. TokenCL's collapse monitor), each
    per epoch."""
    import torch
    logged = torch.load(checkpoint, map_location='cpu', weights_only=False)['logging']
    return {'loss' if name == 'train_losses' else name.removeprefix('train_'): [float(v) for v in values]
            for name, values in logged.items()
            if name.startswith('train_') and values and isinstance(values[0], (int, float, np.floating))}


def start_name(pretrainer: str | None, supervised: str) -> str:
    """What the tables call a start: ``scratch``, or the pre-training trainer's method part (``PretrainMAE``)."""
    return 'scratch' if pretrainer is None else pretrainer.removeprefix(supervised + '_')


def pretraining_seed(seed: int, args) -> int:
    """The seed of the pre-training that the fine-tuning under ``seed`` starts from."""
    return seed if args.pretrain_seed is None else args.pretrain_seed


def pretraining_schedule(args) -> str:
    """The pre-training's epochs x iterations, part of every folder that depends on it, so that a run of another
    length is never taken for a finished one."""
    return f'{args.pretrain_epochs}x{args.pretrain_iterations}'


def pretraining_results(work: Path, pretrainer: str, seed: int, args) -> Path:
    return work / 'results' / f'{pretrainer}_seed{seed}_{pretraining_schedule(args)}'


def pretrain(env: dict, data: Data, work: Path, pretrainer: str, seed: int, args) -> Path:
    folder = train(env, data, pretraining_results(work, pretrainer, seed, args), pretrainer, 'all',
                   args.pretrain_epochs, args.pretrain_iterations, seed, args.device)
    return folder / 'checkpoint_final.pth'


def chain(env: dict, data: Data, work: Path, supervised: str, pretrainer: str | None, pretraining: Future | None,
          seed: int, args) -> dict:
    """Fine-tune fold 0 (from scratch, or from ``pretraining``'s checkpoint) and segment the held-out cases."""
    name = start_name(pretrainer, supervised)
    checkpoint = pretraining.result() if pretraining else None
    origin = f'_from_seed{pretraining_seed(seed, args)}_{pretraining_schedule(args)}' if pretrainer else ''
    results = work / 'results' / f'finetune_{name}{origin}_seed{seed}_{args.finetune_epochs}x{args.iterations}'
    train(env, data, results, supervised, '0', args.finetune_epochs, args.iterations, seed, args.device, checkpoint)
    heldout = predict_heldout(env, data, results, supervised, results / 'heldout', args.device)
    return {'start': name, 'seed': seed, 'heldout': heldout, 'results': results}


def evaluate(env: dict, data: Data, rows: list[dict], out: Path, cases: list[str] | None = None) -> dict:
    """``nnunet-plugins evaluate`` of every start, the held-out cases of all seeds pooled (case c of seed s is
    ``<c>_seed<s>`` in every start's folder and in the reference folder), against scratch; its evaluation.json.
    ``cases``: only these held-out cases (default: all)."""
    from nnunet_plugins.workspace import run_stock
    raw = Path(env['nnUNet_raw']) / dataset_folder(data)
    pooled = out / 'pooled'
    references = [file for file in (raw / 'labelsTs').glob('*.nii.gz') if cases is None or case_name(file) in cases]

    def pooled_name(case_file: Path, seed: int) -> str:
        return f'{case_name(case_file)}_seed{seed}.nii.gz'
    shutil.rmtree(pooled, ignore_errors=True)  # copies only; an earlier run's other seeds must not stay in
    (pooled / 'reference').mkdir(parents=True)
    for seed in {row['seed'] for row in rows}:
        for reference in references:
            shutil.copyfile(reference, pooled / 'reference' / pooled_name(reference, seed))
    for row in rows:
        folder = pooled / row['start']
        folder.mkdir(exist_ok=True)
        for reference in references:  # the prediction has the reference's file name
            shutil.copyfile(row['heldout'] / reference.name, folder / pooled_name(reference, row['seed']))
    starts = list(dict.fromkeys(row['start'] for row in rows))
    run_stock(['nnunet-plugins', 'evaluate', '--pred', *[pooled / start for start in starts], '--ref',
               pooled / 'reference', '--dataset-json', raw / 'dataset.json', '--baseline', 'scratch', '-np', 1,
               '--out', out], env, capture=True)
    return json.loads((out / 'evaluation.json').read_text())


def case_name(segmentation: Path) -> str:
    return segmentation.name.removesuffix('.nii.gz')


def organ_is_brighter(image_file: Path, label_file: Path, organ: int) -> bool:
    """Whether a ``VARIED`` case's organ is brighter than the tissue around it, as its image shows: the organ's
    median intensity against that of the unlabeled voxels within 2 voxels of it (those darker than half the
    tissue level are air, left out). On the 110 cases of the varied set the ratio of the two is 0.29-0.75 or
    1.23-1.62, never near 1."""
    import SimpleITK as sitk
    from scipy import ndimage
    from nnunet_plugins.synthetic import MR_TISSUE
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file)))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
    inside = labels == organ
    around = ndimage.binary_dilation(inside, iterations=2) & (labels == 0) & (image > MR_TISSUE / 2)
    return bool(np.median(image[inside]) > np.median(image[around]))


def organ_contrast_groups(raw: Path, labeled: list[str]) -> dict[str, list[str]]:
    """The held-out cases split by their organ's contrast: ``seen`` if a labeled case's organ is brighter (or
    darker) than its tissue as theirs is, else ``unseen``. Two labeled cases show at most two of the varied set's
    contrasts; this tells a gain on what they show from one on what they do not."""
    organ = json.loads((raw / 'dataset.json').read_text())['labels']['organ']

    def brighter(split: str, case: str) -> bool:
        return organ_is_brighter(raw / f'images{split}' / f'{case}_0000.nii.gz',
                                 raw / f'labels{split}' / f'{case}.nii.gz', organ)
    seen = {brighter('Tr', case) for case in labeled}
    groups = {'seen': [], 'unseen': []}
    for case in sorted(case_name(file) for file in (raw / 'labelsTs').glob('*.nii.gz')):
        groups['seen' if brighter('Ts', case) in seen else 'unseen'].append(case)
    return groups


def per_seed_means(evaluation: dict) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """start -> seed -> label -> {'dice': mean, 'nsd': mean} over that seed's held-out cases (NaNs, e.g. Dice where
    a label is absent in both, left out as evaluate leaves them out)."""
    means = {}
    for start, model in evaluation['models'].items():
        by_seed = {}
        for case in model['cases']:
            seed = int(case['case'].rsplit('_seed', 1)[1])
            for label, values in case['metrics'].items():
                for metric in ('dice', 'nsd'):
                    by_seed.setdefault(seed, {}).setdefault(label, {}).setdefault(metric, []).append(values[metric])
        means[start] = {seed: {label: {m: float(np.nanmean([v if v is not None else np.nan for v in values]))
                                       for m, values in metrics.items()} for label, metrics in labels.items()}
                        for seed, labels in sorted(by_seed.items())}
    return means


def plot_curves(logs: dict[str, dict[int, dict[str, list[float]]]], path: Path) -> None:
    """Each pre-training's loss per epoch, a panel per method, a line per seed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(logs), figsize=(4 * len(logs), 3.2), squeeze=False)
    for axis, (start, by_seed) in zip(axes[0], logs.items()):
        for seed, log in by_seed.items():
            axis.plot(range(1, len(log['loss']) + 1), log['loss'], label=f'seed {seed}')
        axis.set_title(start)
        axis.set_xlabel('epoch')
        axis.set_ylabel('training loss')
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == '--seeded-train':
        return seeded_train(int(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('work', type=Path)
    parser.add_argument('--pretrainers', nargs='+', required=True, metavar='TRAINER')
    parser.add_argument('--data', choices=sorted(DATA), default='varied')
    parser.add_argument('--pretrain-epochs', type=int, default=30)
    parser.add_argument('--pretrain-iterations', type=int, default=20)
    parser.add_argument('--finetune-epochs', type=int, default=20)
    parser.add_argument('--iterations', type=int, default=10, help='fine-tuning iterations per epoch')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--pretrain-seed', type=int, metavar='S',
                        help='one pre-training per trainer, under seed S, for every seed (default: one per seed)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--jobs', type=int, default=1, help='trainings run at once')
    parser.add_argument('--trainer-folder', type=Path, metavar='FOLDER',
                        help='a folder of modules declaring more trainers (e.g. ablations), put on nnUNet_extTrainer')
    args = parser.parse_args()
    work, data = args.work.resolve(), DATA[args.data]
    env = prepare(work, data)
    if args.trainer_folder:
        env['nnUNet_extTrainer'] = os.pathsep.join([str(args.trainer_folder.resolve()), env['nnUNet_extTrainer']])
    if args.device == 'cpu' and args.jobs > 1:  # each process would start a thread per core: the cores oversubscribed
        env['OMP_NUM_THREADS'] = str(max(1, os.cpu_count() // args.jobs))
    supervised = {supervised_trainer(p) for p in args.pretrainers}
    if len(supervised) != 1:
        raise SystemExit(f'the pre-training trainers serve different networks ({sorted(supervised)}); give one')
    supervised = supervised.pop()
    pretrain_seeds = args.seeds if args.pretrain_seed is None else [args.pretrain_seed]
    with ThreadPoolExecutor(args.jobs) as pool:  # FIFO: every pre-training starts before any chain waits on one
        pretrainings = {(p, s): pool.submit(pretrain, env, data, work, p, s, args)
                        for p in args.pretrainers for s in pretrain_seeds}
        runs = [pool.submit(chain, env, data, work, supervised, p, p and pretrainings[p, pretraining_seed(s, args)], s,
                            args)
                for p in [None, *args.pretrainers] for s in args.seeds]
        rows = [run.result() for run in runs]
    seconds = {'pretraining': {f'{start_name(p, supervised)}_seed{s}':
                               recorded_seconds(pretraining_results(work, p, s, args)) for p, s in pretrainings},
               'fine-tuning': {f'{row["start"]}_seed{row["seed"]}': recorded_seconds(row['results']) for row in rows}}
    out = work / (f'label_efficiency_{args.data}_pretrain{pretraining_schedule(args)}'
                  f'_finetune{args.finetune_epochs}x{args.iterations}')
    evaluation = evaluate(env, data, rows, out)
    means = per_seed_means(evaluation)
    by_contrast = {}
    if data.varied:
        splits = Path(env['nnUNet_preprocessed']) / dataset_folder(data) / 'splits_final.json'
        groups = organ_contrast_groups(Path(env['nnUNet_raw']) / dataset_folder(data),
                                       json.loads(splits.read_text())[0]['train'])
        by_contrast = {group: {'cases': cases, 'evaluation': evaluate(env, data, rows,
                                                                      out / f'organ_contrast_{group}', cases)}
                       for group, cases in groups.items() if cases}
    logs = {}
    for (pretrainer, seed), pretraining in pretrainings.items():
        logs.setdefault(start_name(pretrainer, supervised), {})[seed] = pretraining_log(pretraining.result())
    plot_curves(logs, out / 'pretraining_curves.png')
    (out / 'study.json').write_text(json.dumps({
        'settings': {k: str(v) for k, v in vars(args).items()}, 'data': asdict(data),
        'seconds': seconds, 'per_seed_means': means, 'pretraining_logs': logs,
        'organ_contrast_groups': {group: values['cases'] for group, values in by_contrast.items()}}, indent=1))

    labels = list(next(iter(next(iter(means.values())).values())))
    print(f'\n{supervised}, {args.data} data, fold 0 with {LABELED} labeled cases, {args.finetune_epochs} x '
          f'{args.iterations} iterations; pre-training {args.pretrain_epochs} x {args.pretrain_iterations} iterations '
          f'on {data.training} images; held-out cases: {data.heldout}')
    for phase, runs in seconds.items():
        steps = {step for run in runs.values() for step in run}
        unrecorded = sum(not run for run in runs.values())
        print(f'{phase}: ' + ', '.join(f'{step} {sum(run.get(step, 0) for run in runs.values())} s'
                                        for step in sorted(steps)) +
              (f' ({unrecorded} of {len(runs)} runs were made before their time was kept)' if unrecorded else ''))
    print()
    print('| start | seed | ' + ' | '.join(f'{label} Dice / NSD' for label in labels) +
          ' | pre-training loss, first -> last epoch |')
    print('|---|---|' + '---|' * (len(labels) + 1))
    for name, by_seed in means.items():
        for seed, values in by_seed.items():
            log = logs.get(name, {}).get(pretraining_seed(seed, args))
            loss = f'{log["loss"][0]:.3f} -> {log["loss"][-1]:.3f}' if log else '-'
            print(f'| {name} | {seed} | ' +
                  ' | '.join(f'{values[label]["dice"]:.3f} / {values[label]["nsd"]:.3f}' for label in labels) +
                  f' | {loss} |')
    print('\n' + (out / 'evaluation.md').read_text())
    for group, values in by_contrast.items():
        shown = 'show' if group == 'seen' else 'do not show'
        print(f'Held-out cases whose organ contrast the labeled cases {shown} '
              f'({len(values["cases"])}: {", ".join(values["cases"])}), organ Dice over the (case, seed) pairs:')
        p_values = {test['model']: test['p_value'] for test in values['evaluation']['tests']
                    if test['label'] == 'organ' and test['metric'] == 'dice'}
        for start, model in values['evaluation']['models'].items():
            dice = model['mean']['organ']['dice']
            p = f', p = {p_values[start]:.2g}' if p_values.get(start) is not None else ''
            print(f'  {start}: {dice["mean"]:.3f} ± {dice["std"]:.3f}{p}')
    print(f'Written to {out}')


if __name__ == '__main__':
    main()
