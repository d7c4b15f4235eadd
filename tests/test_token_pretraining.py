"""Token-level pre-training trainers (paper 004): BYOL's target in a trainer, the heads in the optimiser and the
checkpoint, the method's settings for ablations, whole TokenCL and BYOL runs in-process through nnU-Net's training loop
and nnU-Net's ``-pretrained_weights`` loading of the result (the stock CLI pre-trains in test_pretraining.py). (One TokenCL step per network family and the DDP
gather of eq. 3 are in test_pretraining.py, beside RCR's.)"""
import json
import math
from pathlib import Path

import pytest
import torch
from nnunetv2.run.run_training import maybe_load_checkpoint
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_plugins import settings
from nnunet_plugins.pretraining import TokenCL
from nnunet_plugins.pretraining.checkpoint import HEADS_KEY
from nnunet_plugins.pretraining.token_cl import token_contrastive_loss_across_ranks
from nnunet_plugins.pretraining.token_method import IDENTITY
from nnunet_plugins.pretraining.trainer import REPORT_FILE
from nnunet_plugins.training.mednext import (
    nnUNetTrainerMedNeXtS_PretrainTokenBYOL, nnUNetTrainerMedNeXtS_PretrainTokenCL)
from nnunet_plugins.training.nnunet_network import nnUNetTrainer_PretrainTokenBYOL

from helpers import CONFIGURATION, PRETRAINING_PATCH, pretraining_step, training_log

READINGS = ('across_volumes', 'across_views', 'within_volume')




# ---- the trainers in-process ----

def test_byol_step_trains_online_heads_and_moves_the_target_by_its_momentum(make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenBYOL, PRETRAINING_PATCH)
    trainer.initialize()
    model = trainer.pretraining_model()
    target = model.heads['target'].module
    online_before = {name: p.detach().clone() for name, p in model.online().named_parameters()}
    target_before = {name: p.detach().clone() for name, p in target.named_parameters()}
    assert online_before.keys() == target_before.keys()
    heads_before = {name: p.detach().clone() for name, p in model.heads.named_parameters()}
    result = pretraining_step(trainer)
    assert 0 <= result['token_byol'] <= 4 and all(-1 <= result[r] <= 1 for r in READINGS)
    m = trainer.method.target_momentum
    assert m == 0.996
    online_after = dict(model.online().named_parameters())
    moved = 0
    for name, p in target.named_parameters():
        assert not p.requires_grad and p.grad is None
        torch.testing.assert_close(p, m * target_before[name] + (1 - m) * online_after[name].detach())
        moved += not torch.equal(p, target_before[name])
    assert moved > len(target_before) // 2
    for head in ('projection', 'predictor'):
        assert all(not torch.equal(p, heads_before[name]) for name, p in model.heads.named_parameters()
                   if name.startswith(f'{head}.')), head
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group['params']}
    assert optimised == {id(p) for p in (*model.network.encoder.parameters(), *model.heads['projection'].parameters(),
                                         *model.heads['predictor'].parameters())}


def test_continue_restores_the_heads_and_the_byol_target(make_trainer, tmp_path):
    trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenBYOL, PRETRAINING_PATCH)
    trainer.initialize()
    pretraining_step(trainer)
    trainer.save_checkpoint(str(tmp_path / 'checkpoint_latest.pth'))
    checkpoint = torch.load(tmp_path / 'checkpoint_latest.pth', weights_only=False)
    assert {key.split('.')[0] for key in checkpoint[HEADS_KEY]} == {'projection', 'predictor', 'target'}
    assert not any(key.startswith('heads.') for key in checkpoint['network_weights'])
    resumed = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenBYOL, PRETRAINING_PATCH)
    resumed.load_checkpoint(str(tmp_path / 'checkpoint_latest.pth'))
    ours, theirs = resumed.pretraining_model().state_dict(), trainer.pretraining_model().state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])
    # the target is not the online path: what was restored is the target's own moving average
    assert any(not torch.equal(ours[f'heads.target.module.{key}'], value) for key, value in
               resumed.pretraining_model().online().state_dict().items())


class _Ablation(nnUNetTrainerMedNeXtS_PretrainTokenCL):
    """Table 4's SimCLR row without the weight (w = 1, eq. 1) and without rotate-and-restore, masking the tokens'
    regions with 0, as a user would declare it."""
    method = TokenCL(same_position_weight=1.0, rotate_and_restore=False, mask_granularity='token', mask_noise_std=0)


def test_ablation_settings_reach_the_views_the_loss_and_the_report(make_trainer, monkeypatch):
    trainer = make_trainer(_Ablation, PRETRAINING_PATCH)
    trainer.initialize()
    assert trainer.method.transforms == (IDENTITY,) and trainer.method.token_grid == [4, 2, 2]
    assert trainer.method.mask_block == (2, 8, 8)
    description = trainer.method.describe()
    assert 'w = 1.0' in description and '(off)' in description
    assert 'token regions masked on one (filled with 0)' in description
    report = trainer.report()
    assert (report['same_position_weight'], report['rotate_and_restore']) == (1.0, False)
    assert (report['mask_granularity'], report['mask_block'], report['mask_noise_std']) == ('token', [2, 8, 8], 0)
    assert report['transforms'] == ['rot0']
    weights = []

    def recording(z, z_hat, same_position_weight, temperature):
        weights.append((same_position_weight, temperature))
        return token_contrastive_loss_across_ranks(z, z_hat, same_position_weight, temperature)
    monkeypatch.setattr('nnunet_plugins.pretraining.token_cl.token_contrastive_loss_across_ranks', recording)
    pretraining_step(trainer)
    assert weights == [(1.0, 0.5)]
    default = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenCL, {'patch_size': [32, 64, 64]})
    default.initialize()
    assert len(default.method.transforms) == 16 and default.method.same_position_weight == 5.0
    assert (default.method.mask_granularity, default.method.mask_block, default.method.mask_noise_std) == (
        'input', (2, 4, 4), 0.1)
    lines = default.method.log_lines([32, 64, 64])
    assert lines[0] == ('masking, per patch [32, 64, 64]: 3072 of its [16, 16, 16] blocks of [2, 4, 4] voxels (input '
                        'granularity; token grid [16, 8, 8], 4 blocks per token region).')


@pytest.mark.parametrize('setting, message', [
    ({'mask_ratio': 0.85}, 'no visual information'), ({'mask_ratio': 0.9}, 'no visual information'),
    ({'mask_granularity': 'voxel'}, "mask_granularity 'voxel'"), ({'mask_noise_std': -0.1}, 'mask_noise_std -0.1')])
def test_masking_settings_the_method_cannot_train_with_are_refused_before_training(make_trainer, setting, message):
    masked_out = type('Masked', (nnUNetTrainerMedNeXtS_PretrainTokenCL,), {'method': TokenCL(**setting)})
    with pytest.raises(ValueError, match=message):
        make_trainer(masked_out, PRETRAINING_PATCH)


def test_a_token_grid_not_square_in_y_x_draws_half_turns_and_says_so(make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenCL, {'patch_size': [8, 16, 32]})
    trainer.initialize()
    assert trainer.method.token_grid == [4, 2, 4]
    assert {t.quarter_turns for t in trainer.method.transforms} == {0, 2} and len(trainer.method.transforms) == 8
    lines = trainer.method.log_lines(trainer.configuration_manager.patch_size)
    assert 'draws from 8 transforms of the [4, 2, 4] token grid' in lines[1] and 'only half turns' in lines[2]
    assert math.isfinite(pretraining_step(trainer)['token_contrastive'])


# ---- whole runs: TokenCL in-process, BYOL through the stock CLI, then fine-tuning with -pretrained_weights ----

def check_run(fold, trainer: str, term: str) -> tuple[dict, list[str]]:
    """Check a finished one-epoch pre-training run's log, progress.png and report in ``fold``; return its final
    checkpoint and the encoder's keys."""
    pretrained = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert pretrained['trainer_name'] == trainer and HEADS_KEY in pretrained
    log = training_log(fold)
    assert 'pre-training: token-level' in log and 'rotate-and-restore draws from' in log and term in log
    readings = [line for line in log.splitlines() if 'collapse monitor (mean cosine): across_volumes' in line]
    assert len(readings) == 2  # train and val, once per epoch
    assert (fold / 'progress.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and not (fold / 'validation').exists()
    report = json.loads((fold / REPORT_FILE).read_text())
    assert (report['trainer'], report['configuration'], report['epochs']) == (trainer, CONFIGURATION, 1)
    encoder = [k for k in pretrained['network_weights'] if k.startswith('encoder.')]
    # nnU-Net's decoder holds its encoder too (decoder.encoder.*): the same tensors, pre-trained as well
    assert encoder and set(encoder) <= set(report['pretrained_tensors'])
    assert set(report['initialised_tensors']) == set(pretrained['network_weights']) - set(report['pretrained_tensors'])
    return pretrained, encoder


def test_token_cl_pretrains_mednext_through_nnunets_training_loop(make_trainer, monkeypatch):
    """What ``nnUNetv2_train D 3d_fullres 0 -tr nnUNetTrainerMedNeXtS_PretrainTokenCL`` runs after building the trainer
    (nnU-Net's run_training and the closing validation), in this process, one epoch of one step: the CLI's own path
    is the one test_pretraining.py runs (RCR)."""
    for variable, value in ((settings.EPOCHS, '1'), (settings.ITERATIONS, '1'), ('nnUNet_n_proc_DA', '0')):
        monkeypatch.setenv(variable, value)
    trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenCL)
    trainer.run_training()
    trainer.perform_actual_validation()
    check_run(Path(trainer.output_folder), 'nnUNetTrainerMedNeXtS_PretrainTokenCL', 'token_contrastive')


def test_token_byol_pretrains_nnunets_network_that_nnunets_own_trainer_starts_from(make_trainer, monkeypatch):
    """BYOL pre-training of nnU-Net's own network through nnU-Net's training loop, as the TokenCL test above; then
    what ``nnUNetv2_train -tr nnUNetTrainer -pretrained_weights FILE`` does before training (nnU-Net's
    maybe_load_checkpoint): nnU-Net's trainer takes every pre-trained encoder tensor as it is."""
    for variable, value in ((settings.EPOCHS, '1'), (settings.ITERATIONS, '1'), ('nnUNet_n_proc_DA', '0')):
        monkeypatch.setenv(variable, value)
    pretraining = make_trainer(nnUNetTrainer_PretrainTokenBYOL)
    pretraining.run_training()
    pretraining.perform_actual_validation()
    fold = Path(pretraining.output_folder)
    pretrained, encoder = check_run(fold, 'nnUNetTrainer_PretrainTokenBYOL', 'token_byol')
    assert any(key.startswith('target.module.encoder.') for key in pretrained[HEADS_KEY])
    trainer = make_trainer(nnUNetTrainer)
    maybe_load_checkpoint(trainer, continue_training=False, validation_only=False,
                          pretrained_weights_file=str(fold / 'checkpoint_final.pth'))
    loaded = trainer.network.state_dict()
    for key in encoder:
        assert torch.equal(loaded[key], pretrained['network_weights'][key]), key
