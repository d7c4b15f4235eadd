"""Settings that restore what papers 003 and 004 or their authors' code did: RCR's two cutout rules (the paper's
text, the authors' code) and paper 004's SGD with the authors' schedule. Expected values are written from the
papers' text and the authors' code as the README's departures table describes them, not from this package's code."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from nnunet_plugins import settings
from nnunet_plugins.pretraining import PAPER_004_SGD, RCR, TokenBYOL, TokenCL
from nnunet_plugins.pretraining.rcr_views import (
    authors_cutout_boxes, make_views, noise_fill, proxy_losses, text_cutout_boxes)
from nnunet_plugins.training.mednext import (
    nnUNetTrainerMedNeXtS_PretrainTokenBYOL, nnUNetTrainerMedNeXtS_PretrainTokenCL)

from helpers import PRETRAINING_PATCH, training_log


def box_sides(box: tuple[slice, ...]) -> list[int]:
    return [s.stop - s.start for s in box]


# ---- RCR's cutout: the paper's text ----

@pytest.mark.parametrize('shape', [(16, 32, 32), (32, 32)])
def test_text_cutout_drops_nearly_30_percent_in_boxes_of_at_most_40_percent_of_each_axis(shape):
    rng = np.random.default_rng(1)
    for _ in range(10):
        boxes = text_cutout_boxes(shape, rng)
        mask = np.zeros(shape, dtype=bool)
        for box in boxes:
            assert all(1 <= side <= round(0.4 * n) for side, n in zip(box_sides(box), shape))
            assert all(0 <= s.start and s.stop <= n for s, n in zip(box, shape))
            mask[box] = True
        assert 0.27 < mask.mean() <= 0.3  # "dropping rate ... 30%", the regions summing up to it


def test_text_cutout_fills_with_zero():
    batch = torch.randn(2, 2, 6, 10, 10) + 5  # no voxel is 0 before the cutout
    views = make_views(batch, (0,), np.random.default_rng(3), cutout='text')
    for i in range(4):
        cut = views.masks[i].numpy()
        assert 0.27 < cut.mean() <= 0.3
        np.testing.assert_array_equal(views.inputs[i].numpy()[:, cut], 0)
        np.testing.assert_array_equal(views.inputs[i].numpy()[:, ~cut], batch[i % 2].numpy()[:, ~cut])


# ---- RCR's cutout: the authors' code ----

def test_authors_cutout_draws_its_rate_from_u_0_03_and_boxes_until_their_volumes_reach_it():
    shape = (20, 40, 100)
    # sides per axis, from the authors' int(5% n) to int(25% n) - 1: 1..4, 2..9, 5..24 voxels
    sides = [(1, 4), (2, 9), (5, 24)]
    rng = np.random.default_rng(7)
    rates = []
    for _ in range(200):
        rate, boxes = authors_cutout_boxes(shape, rng)
        rates.append(rate)
        assert 0 <= rate < 0.3
        volumes = [math.prod(box_sides(box)) for box in boxes]
        target = rate * math.prod(shape)
        assert sum(volumes) >= target and sum(volumes[:-1]) < target  # stop at the first box that reaches it
        for box in boxes:
            for s, n, (low, high) in zip(box, shape, sides):
                assert 0 <= s.start <= n - low
                side = s.stop - s.start
                # clipped only at the end of the axis
                assert low <= side <= high or (s.stop == n and 1 <= side < low)
    assert np.mean(rates) == pytest.approx(0.15, abs=0.02)  # U(0, 0.3)
    assert min(rates) < 0.03 and max(rates) > 0.27


def test_authors_cutout_boxes_are_at_least_one_voxel_on_small_axes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        for box in authors_cutout_boxes((8, 16, 16), rng)[1]:
            # int(5% n) is 0 here (an empty box in the authors' code), int(25% n) - 1 is 1, 3, 3: sides 1, 1..3, 1..3
            z, y, x = box_sides(box)
            assert z == 1 and 1 <= y <= 3 and 1 <= x <= 3


def test_authors_noise_fill_spans_exactly_0_to_1():
    fill = noise_fill((2, 3, 4, 5), np.random.default_rng(2))
    assert fill.shape == (2, 3, 4, 5) and fill.min() == 0 and fill.max() == 1
    assert len(np.unique(fill)) == fill.size  # noise, not a constant


def test_authors_cutout_fills_with_noise_and_pastes_from_another_patch_of_the_same_view():
    # every patch a constant far from [0, 1], so a voxel tells where it came from
    values = [10., 20., 30.]
    batch = torch.stack([torch.full((2, 8, 20, 20), v) for v in values])
    noise_voxels = pasted_voxels = 0
    for seed in range(6):
        views = make_views(batch, (0,), np.random.default_rng(seed), cutout='authors')
        assert torch.equal(views.targets, torch.cat([batch, batch]))
        for i in range(6):
            own, view = values[i % 3], views.inputs[i].numpy()
            cut = views.masks[i].numpy()
            np.testing.assert_array_equal(cut, view[0] != own)  # the mask is every box, noise or pasted
            np.testing.assert_array_equal(cut, view[1] != own)  # the same boxes in every channel
            inside = view[:, cut]
            noise = (inside >= 0) & (inside <= 1)
            pasted = np.isin(inside, [v for v in values if v != own])
            assert np.all(noise | pasted)
            noise_voxels, pasted_voxels = noise_voxels + noise.sum(), pasted_voxels + pasted.sum()
            assert cut.mean() <= 0.6  # two sets of boxes, each at most 30% of the voxels counted with overlaps
    assert noise_voxels > 0 and pasted_voxels > 0


def test_authors_cutout_of_a_single_patch_has_nothing_to_paste():
    batch = torch.full((1, 1, 8, 20, 20), 10.)
    for seed in range(5):
        views = make_views(batch, (0,), np.random.default_rng(seed), cutout='authors')
        for i in range(2):
            inside = views.inputs[i].numpy()[:, views.masks[i].numpy()]
            assert np.all((inside >= 0) & (inside <= 1))


def test_rcr_cutout_setting_is_checked_reported_and_gives_finite_losses():
    assert RCR().cutout == 'text'  # the default: the paper's text
    method = RCR(cutout='authors')
    method.check()
    assert method.report()['cutout'] == 'authors' and "the authors' code" in method.describe()
    with pytest.raises(ValueError, match="cutout 'noise' is not one of"):
        RCR(cutout='noise').check()
    views = make_views(torch.randn(2, 1, 8, 16, 16), (0, 1, 2, 3), np.random.default_rng(4), cutout='authors')
    outputs = (torch.zeros_like(views.targets), torch.zeros(4, 4), torch.randn(4, 8))
    assert all(torch.isfinite(value) for value in proxy_losses(outputs, views).values())


# ---- paper 004's optimiser ----

def authors_lr(epoch: int, warmup: int, epochs: int, lr: float = 1e-4) -> float:
    """The authors' LinearWarmupCosineAnnealingLR (warm-up start 0, minimum 0), stepped once per epoch."""
    if epoch < warmup:
        return lr * epoch / (warmup - 1)
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


class _PaperSGDTokenCL(nnUNetTrainerMedNeXtS_PretrainTokenCL):
    method = TokenCL(optimiser=PAPER_004_SGD)


class _PaperSGDTokenBYOL(nnUNetTrainerMedNeXtS_PretrainTokenBYOL):
    method = TokenBYOL(optimiser=PAPER_004_SGD)


@pytest.mark.parametrize('trainer_class', [_PaperSGDTokenCL, _PaperSGDTokenBYOL], ids=['TokenCL', 'TokenBYOL'])
def test_the_paper_sgd_setting_builds_nesterov_sgd_with_the_authors_schedule(make_trainer, trainer_class):
    assert TokenCL().optimiser.algorithm == 'AdamW'  # the default until the fair re-run
    trainer = make_trainer(trainer_class, PRETRAINING_PATCH)
    trainer.initialize()
    optimizer = trainer.optimizer
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group['momentum'], group['nesterov'], group['weight_decay'], group['dampening']) == (0.99, True, 1e-5, 0)
    for epoch in (0, 1, 25, 49, 50, 51, 500, 999):
        trainer.lr_scheduler.step(epoch)
        assert group['lr'] == pytest.approx(authors_lr(epoch, 50, 1000), abs=1e-12), epoch
    assert authors_lr(49, 50, 1000) == pytest.approx(authors_lr(50, 50, 1000)) == 1e-4  # the peak, twice
    assert ('pre-training optimiser: SGD, Nesterov momentum 0.99, learning rate 0.0001, weight decay 1e-05; linear '
            'warm-up from 0 to 0.0001 over the first 50 epochs, then cosine decay over 950 epochs; gradient-norm '
            'clipping at 12') in training_log(trainer.output_folder)
    assert trainer.report()['optimiser'] == {
        'algorithm': 'SGD', 'initial_lr': 1e-4, 'sgd_momentum': 0.99, 'weight_decay': 1e-5, 'warmup_epochs': 50,
        'warmup_from_zero': True, 'adam_eps': 1e-4, 'decay': 'cosine'}


def test_a_short_schedule_keeps_the_authors_warm_up_share(make_trainer, monkeypatch):
    monkeypatch.setenv(settings.EPOCHS, '100')
    trainer = make_trainer(_PaperSGDTokenCL, PRETRAINING_PATCH)
    trainer.initialize()
    assert (trainer.num_epochs, trainer.optimiser_settings_of_run().warmup_epochs) == (100, 5)
    for epoch in (0, 2, 4, 5, 60):
        trainer.lr_scheduler.step(epoch)
        assert trainer.optimizer.param_groups[0]['lr'] == pytest.approx(authors_lr(epoch, 5, 100), abs=1e-12)


def test_an_unknown_optimiser_is_refused():
    with pytest.raises(ValueError, match="optimiser algorithm 'Adam' is not one of"):
        dataclasses.replace(PAPER_004_SGD, algorithm='Adam')
