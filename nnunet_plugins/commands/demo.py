"""``nnunet-plugins demo``: the whole nnU-Net workflow with a plugin trainer on the synthetic dataset.

Generates the dataset, then runs the stock CLIs as a user would (plan and preprocess, train with a
short schedule, predict the held-out cases) and reports per-label Dice on those cases, with a PNG of
one of them. Everything lives in the work folder; the nnU-Net folder variables are set for the
demo's own commands only.
"""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_plugins import settings, synthetic
from nnunet_plugins.workspace import NNUNET_FOLDERS, nnunet_environment, run_stock

DATASET_ID = 990
DATASET_NAME = 'SyntheticCT'
CONFIGURATION = '3d_fullres'
FOLD = 0
PREDICTIONS = 'predictions_heldout'
PICTURE = 'demo_heldout_case.png'
SUMMARY = 'demo_summary.json'
_DEMO_OUTPUTS = (*NNUNET_FOLDERS, PREDICTIONS, PICTURE, SUMMARY)


def run_demo(work: Path, trainer: str, epochs: int, iterations: int, num_training: int, num_test: int,
             device: str, processes: int, overwrite: bool, seed: int = 0,
             size: synthetic.SyntheticSize = synthetic.DEMO) -> dict:
    """Run the demo in ``work`` and return its summary (also written to ``work/demo_summary.json``)."""
    work = Path(work).resolve()
    _prepare_work_folder(work, overwrite)
    env = nnunet_environment(work, processes)
    env[settings.EPOCHS], env[settings.ITERATIONS] = str(epochs), str(iterations)
    started = time.time()
    timings = {}

    def step(number: int, title: str) -> None:
        print(f'\n[demo {number}/5, {time.time() - started:.0f} s] {title}', flush=True)

    step(1, f'writing the synthetic dataset ({num_training} training and {num_test} held-out cases)')
    raw = synthetic.write_dataset(work / 'nnUNet_raw', DATASET_ID, DATASET_NAME, num_training, num_test, seed=seed,
                                  size=size)

    step(2, 'nnUNetv2_plan_and_preprocess')
    t = time.time()
    run_stock(['nnUNetv2_plan_and_preprocess', '-d', DATASET_ID, '-c', CONFIGURATION, '-np', processes,
               '-npfp', processes, '--verify_dataset_integrity'], env)
    timings['plan_and_preprocess_s'] = time.time() - t

    step(3, f'nnUNetv2_train -tr {trainer} on {device}: {epochs} epochs x {iterations} iterations')
    t = time.time()
    run_stock(['nnUNetv2_train', DATASET_ID, CONFIGURATION, FOLD, '-tr', trainer, '-device', device], env)
    timings['train_s'] = time.time() - t

    step(4, 'nnUNetv2_predict on the held-out cases')
    t = time.time()
    predictions = work / PREDICTIONS
    run_stock(['nnUNetv2_predict', '-i', raw / 'imagesTs', '-o', predictions, '-d', DATASET_ID, '-c',
               CONFIGURATION, '-f', FOLD, '-tr', trainer, '-device', device, '-npp', processes, '-nps', processes],
              env)
    timings['predict_s'] = time.time() - t

    step(5, 'Dice on the held-out cases')
    dice = heldout_dice(raw / 'labelsTs', predictions, processes)
    picture = work / PICTURE
    save_case_picture(raw / 'imagesTs', raw / 'labelsTs', predictions, picture)
    timings['total_s'] = time.time() - started
    summary = {'trainer': trainer, 'device': device, 'epochs': epochs, 'iterations_per_epoch': iterations,
               'num_training': num_training, 'num_heldout': num_test, 'dice': dice,
               'timings': {k: round(v, 1) for k, v in timings.items()}, 'picture': str(picture)}
    (work / SUMMARY).write_text(json.dumps(summary, indent=2))

    print(f'\nDice on {num_test} held-out cases ({trainer}, {epochs} x {iterations} iterations):')
    for label, value in dice.items():
        print(f'  {label:<8} {value:.3f}')
    print(f'picture: {picture}\nsummary: {work / SUMMARY}\ntotal time: {timings["total_s"] / 60:.1f} min')
    return summary


def heldout_dice(reference_folder: Path, prediction_folder: Path, processes: int = 1) -> dict[str, float]:
    """Mean Dice per foreground label over the cases of ``reference_folder``, by nnU-Net's own folder evaluation
    (which also writes ``summary.json`` into ``prediction_folder``). As there, a label absent from both reference
    and prediction of a case is left out of that label's mean."""
    labels = {name: value for name, value in synthetic.LABELS.items() if value > 0}
    summary = compute_metrics_on_folder(str(reference_folder), str(prediction_folder),
                                        str(prediction_folder / 'summary.json'), SimpleITKIO(),
                                        synthetic.FILE_ENDING, list(labels.values()), num_processes=processes,
                                        chill=False)
    return {name: float(summary['mean'][value]['Dice']) for name, value in labels.items()}


def save_case_picture(image_folder: Path, reference_folder: Path, prediction_folder: Path, path: Path) -> None:
    """Image, reference and prediction of the first held-out case, on the axial slice with most lesion."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    reference_file = sorted(reference_folder.glob(f'*{synthetic.FILE_ENDING}'))[0]
    case = reference_file.name[:-len(synthetic.FILE_ENDING)]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_folder / f'{case}_0000{synthetic.FILE_ENDING}')))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_file)))
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction_folder / reference_file.name)))
    z = int(np.argmax((reference == synthetic.LABELS['lesion']).sum(axis=(1, 2))))
    n_labels = max(synthetic.LABELS.values())
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for axis, title, labels in zip(axes, ('image', 'reference', 'prediction'), (None, reference, prediction)):
        axis.imshow(image[z], cmap='gray', vmin=-200, vmax=300)
        if labels is not None:
            axis.imshow(np.ma.masked_equal(labels[z], 0), cmap='viridis', vmin=1, vmax=n_labels, alpha=0.6,
                        interpolation='nearest')
        axis.set_title(f'{title} ({case}, slice {z})')
        axis.axis('off')
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _prepare_work_folder(work: Path, overwrite: bool) -> None:
    existing = [name for name in _DEMO_OUTPUTS if (work / name).exists()]
    if existing and not overwrite:
        raise SystemExit(f'{work} already holds a demo run ({", ".join(existing)}). Pass --overwrite to replace it, '
                         f'or --work with another folder.')
    for name in existing:  # only what an earlier demo wrote; the folder may hold other things
        target = work / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    work.mkdir(parents=True, exist_ok=True)
