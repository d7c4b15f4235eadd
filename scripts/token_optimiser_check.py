"""Token-level contrastive pre-training (paper 004) under the paper's optimiser and under RCR's: which one learns
within a short nnU-Net schedule?

Both recipes pre-train nnU-Net's PlainConvUNet with ``nnUNetTrainer_PretrainTokenCL`` (eq. 3, w = 5) on the tiny
synthetic dataset (the tests' size: 10 training cases, fold 0: 8), patch 8 x 16 x 16 (a 4 x 2 x 2 token grid),
batch 2, the same seed, in one process (nnU-Net's data loader without worker processes):

- **paper**: SGD, learning rate 1e-4, Nesterov momentum 0.99 (paper 004, Sec. 4.2), nnU-Net's poly decay and weight
  decay 3e-5 (the paper states neither);
- **rcr**: AdamW 4e-4, weight decay 1e-5, linear warm-up (1 epoch here) then cosine, as the RCR trainers (eps 1e-4,
  the pre-training default since 2026-12; the README's figures of 2026-11-29 ran with nnU-Net's network's 1e-8).

Prints per recipe the training and validation loss per epoch and the collapse monitor's training readings, as JSON.

Usage: ``python scripts/token_optimiser_check.py WORK_FOLDER [--epochs 10] [--iterations 15] [--recipes paper rcr]``
(about 1 s per iteration on two busy CPU cores).
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

DATASET_ID, DATASET_NAME, CONFIGURATION = 993, 'TokenOpt', '3d_fullres'
PATCH = [8, 16, 16]
RECIPES = {'paper': (1e-4, 3e-5), 'rcr': (4e-4, 1e-5)}  # learning rate, weight decay
LOGGED = ('train_losses', 'val_losses', 'train_across_volumes', 'train_across_views', 'train_within_volume')


def prepare(work: Path) -> None:
    """The tiny synthetic dataset, planned and preprocessed by the stock CLI (once)."""
    from nnunet_plugins import synthetic
    from nnunet_plugins.workspace import nnunet_environment, run_stock

    if not (work / 'nnUNet_preprocessed' / f'Dataset{DATASET_ID}_{DATASET_NAME}' / 'nnUNetPlans.json').exists():
        synthetic.write_dataset(work / 'nnUNet_raw', DATASET_ID, DATASET_NAME, 10, 0, seed=1, size=synthetic.TINY)
        run_stock(['nnUNetv2_plan_and_preprocess', '-d', DATASET_ID, '-c', CONFIGURATION, '-np', 1],
                  nnunet_environment(work))


def run(work: Path, recipe: str, epochs: int, iterations: int) -> dict:
    """Pre-train with ``recipe`` and return what was logged per epoch."""
    import numpy as np
    import torch

    from nnunet_plugins.training.nnunet_network import nnUNetTrainer_PretrainTokenCL
    from nnunet_plugins.training.schedule import WarmupPolyLRScheduler

    def paper_optimiser(self):
        optimizer = torch.optim.SGD(self.pretraining_model().trainable_parameters(), lr=self.initial_lr,
                                    momentum=0.99, nesterov=True, weight_decay=self.weight_decay)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    lr, weight_decay = RECIPES[recipe]
    settings = {'num_epochs': epochs, 'num_iterations_per_epoch': iterations, 'num_val_iterations_per_epoch': 4,
                'initial_lr': lr, 'weight_decay': weight_decay, 'warmup_epochs': 1, 'save_every': epochs + 1}
    if recipe == 'paper':
        settings['configure_optimizers'] = paper_optimiser
    trainer_class = type(f'nnUNetTrainer_PretrainTokenCL_{recipe}', (nnUNetTrainer_PretrainTokenCL,), settings)
    preprocessed = work / 'nnUNet_preprocessed' / f'Dataset{DATASET_ID}_{DATASET_NAME}'
    plans = json.loads((preprocessed / 'nnUNetPlans.json').read_text())
    plans['configurations'][CONFIGURATION]['patch_size'] = PATCH
    plans['continue_training'] = False
    # a measurement: a rerun replaces the last one (the trainer refuses to start over a trained fold)
    results = work / 'nnUNet_results' / preprocessed.name
    shutil.rmtree(results / f'{trainer_class.__name__}__nnUNetPlans__{CONFIGURATION}', ignore_errors=True)
    np.random.seed(0)
    torch.manual_seed(0)
    trainer = trainer_class(plans, CONFIGURATION, 0, json.loads((preprocessed / 'dataset.json').read_text()),
                            torch.device('cpu'))
    start = time.time()
    trainer.run_training()
    logged = trainer.logger.local_logger.my_fantastic_logging
    return {**{key: [round(value, 4) for value in logged[key]] for key in LOGGED},
            'seconds': round(time.time() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('work', type=Path)
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--iterations', type=int, default=15)
    parser.add_argument('--recipes', nargs='+', choices=RECIPES, default=list(RECIPES))
    args = parser.parse_args()
    work = args.work.resolve()
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.environ[variable] = str(work / variable)
    os.environ.update({'nnUNet_n_proc_DA': '0', 'nnUNet_compile': 'f'})
    prepare(work)
    for recipe in args.recipes:
        print(json.dumps({recipe: run(work, recipe, args.epochs, args.iterations)}), flush=True)


if __name__ == '__main__':
    main()
