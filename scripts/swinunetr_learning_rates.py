"""Swin UNETR on synthetic data under four optimiser recipes: which one learns on nnU-Net's data and loss?

Every recipe trains the same network (same initial weights) on the same batches (fixed seeds, nnU-Net's data
loader and augmentation in one process) for the same number of iterations, with nnU-Net's Dice + cross-entropy
loss; then nnU-Net's sliding-window predictor (no mirroring) segments the held-out cases, whose Dice per label
is printed as a row of a Markdown table. The learning rate is set per iteration: a linear warm-up over the
recipe's fraction of the run (its warm-up epochs over its epochs), then poly decay (nnU-Net's) to the end.
AdamW eps is 1e-4 in every recipe (the value the trainer needs for fp16 autocast), so the recipes differ in
learning rate, weight decay, warm-up, betas and gradient clipping only.

Data: the tiny synthetic CT-like dataset (14 x 32 x 32 voxels at 3.0 x 1.2 x 1.2 mm; an organ, a vessel, a
lesion), planned by nnU-Net, with a configuration of the ``swinunetr`` preset at the dataset's own spacing and
the smallest patch Swin UNETR takes there (16 x 32 x 64, patch embedding 1 x 2 x 2), batch 2, fold 0.

Usage: ``python scripts/swinunetr_learning_rates.py WORK_FOLDER [--iterations 60] [--recipes NAME ...]``
(each recipe runs in a process of its own; about 20 s per iteration on two busy CPU cores).
"""
import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DATASET_ID, DATASET_NAME = 992, 'SwinLR'
NUM_TRAINING, NUM_HELDOUT = 20, 8
CONFIGURATION = '3d_fullres_swinunetr_lr'
PATCH = [16, 32, 64]
EPS = 1e-4


@dataclass(frozen=True)
class Recipe:
    lr: float
    weight_decay: float
    warmup_fraction: float  # of the run, linear from lr / warm-up iterations to lr
    betas: tuple[float, float]
    clip: float  # gradient-norm clipping
    source: str


RECIPES = {
    'nnunet-2.8': Recipe(3e-4, 5e-2, 50 / 1000, (0.9, 0.98), 1.0,
                         'nnU-Net 2.8 primus_trainers.py: 50 of 1000 epochs warm-up, then poly; clip 1'),
    'forks': Recipe(8e-4, 1e-2, 0.0, (0.9, 0.999), 12.0, 'U-Mamba / TriALS Swin UNETR trainers (cosine there)'),
    'mednext-paper': Recipe(2.5e-3, 3e-5, 0.0, (0.9, 0.999), 12.0,
                            'MedNeXt paper Sec. 3.1, Swin baselines in nnU-Net (nnU-Net\'s weight decay)'),
    'monai-finetuning': Recipe(1e-4, 1e-5, 50 / 5000, (0.9, 0.999), 12.0,
                               'authors\' BTCV fine-tuning: 50 of 5000 epochs warm-up (cosine there)'),
}


def learning_rate(recipe: Recipe, iteration: int, iterations: int) -> float:
    """Linear warm-up over ``warmup_fraction`` of the run (at least one iteration when the fraction is not 0), then
    poly decay with exponent 0.9 over the rest."""
    warmup = max(1, round(recipe.warmup_fraction * iterations)) if recipe.warmup_fraction else 0
    if iteration < warmup:
        return recipe.lr * (iteration + 1) / warmup
    return recipe.lr * (1 - (iteration - warmup) / (iterations - warmup)) ** 0.9


def prepare(work: Path) -> dict:
    """The dataset, nnU-Net's plans and the Swin UNETR configuration, preprocessed (once); nnU-Net's environment."""
    from nnunet_plugins import synthetic
    from nnunet_plugins.workspace import nnunet_environment, run_stock
    env = nnunet_environment(work, processes=1)
    plans = work / 'nnUNet_preprocessed' / f'Dataset{DATASET_ID:03d}_{DATASET_NAME}' / 'nnUNetPlans.json'
    if plans.is_file() and CONFIGURATION in json.loads(plans.read_text())['configurations']:
        return env
    synthetic.write_dataset(work / 'nnUNet_raw', DATASET_ID, DATASET_NAME, NUM_TRAINING, NUM_HELDOUT, seed=3,
                            size=synthetic.TINY)
    run_stock(['nnUNetv2_plan_and_preprocess', '-d', DATASET_ID, '-c', '3d_fullres', '-np', 1], env, capture=True)
    spacing = json.loads(plans.read_text())['configurations']['3d_fullres']['spacing']
    run_stock(['nnunet-plugins', 'plans', DATASET_ID, '--preset', 'swinunetr', '-c', CONFIGURATION, '--spacing',
               *spacing, '--patch', *PATCH, '--batch', 2], env, capture=True)
    run_stock(['nnUNetv2_preprocess', '-d', DATASET_ID, '-c', CONFIGURATION, '-np', 1], env, capture=True)
    return env


def train_and_predict(work: Path, name: str, iterations: int) -> dict:
    """One recipe, in this process (nnU-Net's folder variables must be set before nnunetv2 is imported)."""
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_plugins.commands.demo import heldout_dice
    from nnunet_plugins.training.swinunetr import nnUNetTrainerSwinUNETR

    recipe = RECIPES[name]
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    preprocessed = work / 'nnUNet_preprocessed' / f'Dataset{DATASET_ID:03d}_{DATASET_NAME}'
    plans = json.loads((preprocessed / 'nnUNetPlans.json').read_text())
    plans['continue_training'] = False  # what nnUNetv2_train adds for a fresh run
    dataset_json = json.loads((preprocessed / 'dataset.json').read_text())
    trainer = nnUNetTrainerSwinUNETR(plans, CONFIGURATION, 0, dataset_json, torch.device('cpu'))
    trainer.initialize()
    network = trainer.network
    optimizer = torch.optim.AdamW(network.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, eps=EPS,
                                  betas=recipe.betas)
    loader, _ = trainer.get_dataloaders()
    losses = []
    started = time.time()
    network.train()
    for iteration in range(iterations):
        for group in optimizer.param_groups:
            group['lr'] = learning_rate(recipe, iteration, iterations)
        batch = next(loader)
        optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss(network(batch['data']), batch['target'])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), recipe.clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        print(f'{name} iteration {iteration + 1}/{iterations}: loss {losses[-1]:.4f}', flush=True)
    seconds_per_iteration = (time.time() - started) / iterations

    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device('cpu'),
                                allow_tqdm=False)
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                    [network.state_dict()], dataset_json, type(trainer).__name__, None)
    out = work / 'predictions' / name
    out.mkdir(parents=True, exist_ok=True)
    raw = work / 'nnUNet_raw' / f'Dataset{DATASET_ID:03d}_{DATASET_NAME}'
    predictor.predict_from_files_sequential(str(raw / 'imagesTs'), str(out), save_probabilities=False, overwrite=True)
    dice = heldout_dice(raw / 'labelsTs', out)
    return {'recipe': name, 'iterations': iterations, 'dice': dice, 'mean_dice': float(np.mean(list(dice.values()))),
            'loss_first': losses[0], 'loss_last_5': float(np.mean(losses[-5:])),
            'finite': bool(np.all(np.isfinite(losses))), 'seconds_per_iteration': seconds_per_iteration}


def table_row(result: dict) -> str:
    recipe = RECIPES[result['recipe']]
    dice = result['dice']
    return (f'| {result["recipe"]} | {recipe.lr:g} | {recipe.weight_decay:g} | {recipe.warmup_fraction:.0%} | '
            f'{recipe.clip:g} | {dice["organ"]:.3f} / {dice["vessel"]:.3f} / {dice["lesion"]:.3f} | '
            f'{result["mean_dice"]:.3f} | {result["loss_last_5"]:.3f} |')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('work', type=Path, help='folder for the dataset, nnU-Net\'s folders and the results')
    parser.add_argument('--iterations', type=int, default=60)
    parser.add_argument('--recipes', nargs='+', choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument('--child', choices=list(RECIPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work.resolve()
    if args.child:
        result = train_and_predict(work, args.child, args.iterations)
        (work / f'result_{args.child}.json').write_text(json.dumps(result, indent=2) + '\n')
        return
    env = prepare(work)
    print('| recipe | lr | weight decay | warm-up | clip | held-out Dice organ / vessel / lesion | mean | '
          f'loss, last 5 of {args.iterations} it. |\n|---|---|---|---|---|---|---|---|', flush=True)
    for name in args.recipes:
        subprocess.run([sys.executable, __file__, str(work), '--iterations', str(args.iterations), '--child', name],
                       # nnU-Net's single-process augmenter: the same batches in every run
                       env={**env, 'nnUNet_n_proc_DA': '0'}, check=True, stdout=subprocess.DEVNULL)
        print(table_row(json.loads((work / f'result_{name}.json').read_text())), flush=True)


if __name__ == '__main__':
    main()
