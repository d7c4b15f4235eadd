"""Does self-supervised pre-training help when only two cases are labeled? A small label-efficiency run.

For every seed and every pre-training trainer given (e.g. ``nnUNetTrainerMedNeXtS_PretrainRCR``), the trainer
pre-trains on fold ``all`` of the synthetic dataset (every training image; the loss reads no label) under that seed.
Then the supervised trainer (the pre-training trainer's name without its ``_Pretrain...`` suffix) trains fold 0,
whose training split holds only two labeled cases, under the same seed: once from scratch and once from each
pre-training run with stock ``-pretrained_weights``, each for the same epochs x iterations. nnU-Net's predictor
(``-f 0``, no mirroring) then segments the held-out cases; the Dice per label, averaged over them, is printed as a
Markdown table, beside each pre-training run's loss and readings (e.g. TokenCL's collapse monitor) of its first and
last epoch. Everything is also written to ``label_efficiency_<E>x<I>.json`` in WORK_FOLDER.

Every training is a stock ``nnUNetv2_train`` run (nnU-Net's own entry point) in a process of its own that first
seeds Python, NumPy and PyTorch; nnU-Net's data augmentation runs in that process (``nnUNet_n_proc_DA=0``), so a
seed fixes the initial weights, the patches and the augmentation (on a GPU, cuDNN's kernels are not bit-for-bit
deterministic, so repeated GPU runs differ in the last digits). ``--jobs N`` runs N seed-and-start chains
(pre-training, fine-tuning, prediction) at once; each chain is the same as alone.

Data: the tiny synthetic CT-like dataset (about 14 x 32 x 32 voxels at 3.0 x 1.2 x 1.2 mm; an organ, a vessel and a
lesion), 20 training and 8 held-out cases, nnU-Net's 3d_fullres plan.

Usage: ``python scripts/pretraining_label_efficiency.py WORK_FOLDER --pretrainers nnUNetTrainerMedNeXtS_PretrainRCR
[--pretrain-epochs 30] [--finetune-epochs 20] [--iterations 10] [--seeds 0 1] [--device cuda] [--jobs 4]``. Runs
already finished in WORK_FOLDER are reused (pre-training and fine-tuning alike), so more pre-training trainers can
be added later. Trainers declared outside the package (ablations) come in with ``--trainer-folder FOLDER`` (put on
``nnUNet_extTrainer``).
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DATASET_ID, DATASET_NAME = 993, 'LabelEfficiency'
NUM_TRAINING, NUM_HELDOUT = 20, 8
CONFIGURATION = '3d_fullres'
LABELED = 2  # labeled training cases of fold 0
VALIDATION = 4  # fold 0's validation cases (nnU-Net needs some; they do not train)


def prepare(work: Path) -> dict:
    """The dataset, planned and preprocessed once, with fold 0 = two labeled training cases; nnU-Net's environment."""
    from nnunet_plugins import synthetic
    from nnunet_plugins.workspace import nnunet_environment, run_stock
    env = nnunet_environment(work, processes=1)
    preprocessed = work / 'nnUNet_preprocessed' / f'Dataset{DATASET_ID:03d}_{DATASET_NAME}'
    splits = preprocessed / 'splits_final.json'
    if not splits.is_file():
        synthetic.write_dataset(work / 'nnUNet_raw', DATASET_ID, DATASET_NAME, NUM_TRAINING, NUM_HELDOUT, seed=5,
                                size=synthetic.TINY)
        run_stock(['nnUNetv2_plan_and_preprocess', '-d', DATASET_ID, '-c', CONFIGURATION, '-np', 1], env,
                  capture=True)
        labels = work / 'nnUNet_raw' / f'Dataset{DATASET_ID:03d}_{DATASET_NAME}' / 'labelsTr'
        cases = sorted(p.name.removesuffix('.nii.gz') for p in labels.glob('*.nii.gz'))
        splits.write_text(json.dumps([{'train': cases[:LABELED], 'val': cases[LABELED:LABELED + VALIDATION]}]))
    return env


def train(env: dict, results: Path, trainer: str, fold: str, epochs: int, iterations: int, seed: int,
          device: str, pretrained: Path | None = None) -> Path:
    """``nnUNetv2_train`` in a seeded process of its own (once: a finished run is reused); the fold folder."""
    from nnunet_plugins import settings
    folder = results / f'Dataset{DATASET_ID:03d}_{DATASET_NAME}' / f'{trainer}__nnUNetPlans__{CONFIGURATION}' / \
        f'fold_{fold}'
    if (folder / 'checkpoint_final.pth').is_file():
        return folder
    args = [str(DATASET_ID), CONFIGURATION, fold, '-tr', trainer, '-device', device]
    if pretrained is not None:
        args += ['-pretrained_weights', str(pretrained)]
    run_env = {**env, 'nnUNet_results': str(results), 'nnUNet_n_proc_DA': '0', settings.EPOCHS: str(epochs),
               settings.ITERATIONS: str(iterations), 'nnUNet_compile': 'f'}
    start = time.time()
    results.mkdir(parents=True, exist_ok=True)
    with open(results / f'nnUNetv2_train_fold_{fold}_seed{seed}.log', 'w') as log:  # nnU-Net prints the weights it loads
        subprocess.run([sys.executable, __file__, '--seeded-train', str(seed), *args], env=run_env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    origin = f' from {pretrained.parent.parent.parent.parent.name}' if pretrained else ''
    print(f'  {trainer} fold {fold} seed {seed}{origin}: {time.time() - start:.0f} s', flush=True)
    return folder


def seeded_train(seed: int, args: list[str]) -> None:
    """Seed everything, then run nnU-Net's own ``nnUNetv2_train`` entry point with ``args``."""
    import torch
    from nnunetv2.run.run_training import run_training_entry
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    sys.argv = ['nnUNetv2_train', *args]
    run_training_entry()


def heldout_dice(env: dict, results: Path, trainer: str, out: Path, device: str) -> dict[str, float]:
    """Predict the held-out images with fold 0 (no mirroring); the Dice per label, averaged over the cases."""
    import SimpleITK as sitk
    from nnunet_plugins import synthetic
    from nnunet_plugins.workspace import run_stock
    raw = Path(env['nnUNet_raw']) / f'Dataset{DATASET_ID:03d}_{DATASET_NAME}'
    if not out.is_dir() or len(list(out.glob('*.nii.gz'))) < NUM_HELDOUT:
        run_stock(['nnUNetv2_predict', '-i', raw / 'imagesTs', '-o', out, '-d', DATASET_ID, '-c', CONFIGURATION,
                   '-f', 0, '-tr', trainer, '-device', device, '--disable_tta', '-npp', 1, '-nps', 1],
                  {**env, 'nnUNet_results': str(results)}, capture=True)
    scores = {name: [] for name in synthetic.LABELS if name != 'background'}
    for reference in sorted((raw / 'labelsTs').glob('*.nii.gz')):
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(reference)))
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / reference.name)))
        for name in scores:
            label = synthetic.LABELS[name]
            both = np.count_nonzero((truth == label) & (prediction == label))
            total = np.count_nonzero(truth == label) + np.count_nonzero(prediction == label)
            scores[name].append(2 * both / total if total else 1.0)
    return {name: float(np.mean(values)) for name, values in scores.items()}


def supervised_trainer(pretrainer: str) -> str:
    match = re.fullmatch(r'(\w+?)_Pretrain\w+', pretrainer)
    if not match:
        raise SystemExit(f'{pretrainer} is not a pre-training trainer (its name ends in _Pretrain...)')
    return match.group(1)


def pretraining_readings(checkpoint: Path) -> dict[str, list[float]]:
    """A pre-training run's logged training loss, loss terms and readings of its first and last epoch."""
    import torch
    logged = torch.load(checkpoint, map_location='cpu', weights_only=False)['logging']
    return {'loss' if name == 'train_losses' else name.removeprefix('train_'): [float(values[0]), float(values[-1])]
            for name, values in logged.items()
            if name.startswith('train_') and values and isinstance(values[0], (int, float, np.floating))}


def chain(env: dict, work: Path, supervised: str, pretrainer: str | None, seed: int, args) -> dict:
    """Pre-train (unless from scratch), fine-tune fold 0 and segment the held-out cases, all under ``seed``."""
    name, checkpoint, readings = 'scratch', None, {}
    if pretrainer is not None:
        name = pretrainer.removeprefix(supervised + '_')
        folder = train(env, work / 'results' / f'{pretrainer}_seed{seed}', pretrainer, 'all', args.pretrain_epochs,
                       args.pretrain_iterations, seed, args.device)
        checkpoint = folder / 'checkpoint_final.pth'
        readings = pretraining_readings(checkpoint)
    results = work / 'results' / f'finetune_{name}_seed{seed}_{args.finetune_epochs}x{args.iterations}'
    train(env, results, supervised, '0', args.finetune_epochs, args.iterations, seed, args.device, checkpoint)
    dice = heldout_dice(env, results, supervised, results / 'heldout', args.device)
    row = {'start': name, 'seed': seed, 'dice': dice, 'pretraining_first_last_epoch': readings}
    print(f'  done: {json.dumps(row)}', flush=True)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == '--seeded-train':
        return seeded_train(int(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('work', type=Path)
    parser.add_argument('--pretrainers', nargs='+', required=True, metavar='TRAINER')
    parser.add_argument('--pretrain-epochs', type=int, default=30)
    parser.add_argument('--pretrain-iterations', type=int, default=20)
    parser.add_argument('--finetune-epochs', type=int, default=20)
    parser.add_argument('--iterations', type=int, default=10, help='fine-tuning iterations per epoch')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--jobs', type=int, default=1, help='seed-and-start chains run at once')
    parser.add_argument('--trainer-folder', type=Path, metavar='FOLDER',
                        help='a folder of modules declaring more trainers (e.g. ablations), put on nnUNet_extTrainer')
    args = parser.parse_args()
    work = args.work.resolve()
    env = prepare(work)
    if args.trainer_folder:
        env['nnUNet_extTrainer'] = os.pathsep.join([str(args.trainer_folder.resolve()), env['nnUNet_extTrainer']])
    supervised = {supervised_trainer(p) for p in args.pretrainers}
    if len(supervised) != 1:
        raise SystemExit(f'the pre-training trainers serve different networks ({sorted(supervised)}); give one')
    supervised = supervised.pop()
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = [pool.submit(chain, env, work, supervised, pretrainer, seed, args)
                for pretrainer in [None, *args.pretrainers] for seed in args.seeds]
        rows = [run.result() for run in runs]
    table = work / f'label_efficiency_{args.finetune_epochs}x{args.iterations}.json'
    table.write_text(json.dumps({'settings': {k: str(v) for k, v in vars(args).items()},
                                 'wall_seconds': round(time.time() - start), 'rows': rows}, indent=2))
    labels = list(rows[0]['dice'])
    print(f'\n{supervised}, fold 0 with {LABELED} labeled cases, {args.finetune_epochs} x {args.iterations} '
          f'iterations; pre-training {args.pretrain_epochs} x {args.pretrain_iterations} iterations on '
          f'{NUM_TRAINING} images; held-out Dice ({NUM_HELDOUT} cases); {time.time() - start:.0f} s\n')
    print('| start | seed | ' + ' | '.join(labels) + ' | mean | pre-training, first -> last epoch |')
    print('|---|---|' + '---|' * (len(labels) + 2))
    for row in rows:
        readings = '; '.join(f'{name} {first:.3f} -> {last:.3f}'
                             for name, (first, last) in row['pretraining_first_last_epoch'].items())
        print(f'| {row["start"]} | {row["seed"]} | ' + ' | '.join(f'{row["dice"][label]:.3f}' for label in labels) +
              f' | {np.mean(list(row["dice"].values())):.3f} | {readings} |')


if __name__ == '__main__':
    main()
