"""Token-level pre-training trainers (paper 004): the DDP gather of eq. 3, BYOL's target in a trainer, the heads in
the optimiser and the checkpoint, the class settings for ablations, pre-training through the stock CLI, and
nnU-Net's ``-pretrained_weights`` loading of the result. (One TokenCL step per network family is in
test_pretraining.py, beside RCR's.)"""
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nnunetv2.run.run_training import maybe_load_checkpoint
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_plugins.networks.token_heads import TokenHead
from nnunet_plugins.training.pretrainers import (
    nnUNetTrainerMedNeXtS_PretrainTokenBYOL, nnUNetTrainerMedNeXtS_PretrainTokenCL)
from nnunet_plugins.training.pretraining import HEADS_KEY, REPORT_FILE
from nnunet_plugins.training.token_contrast import token_contrastive_loss
from nnunet_plugins.training.token_pretraining import IDENTITY, token_contrastive_loss_across_ranks

from helpers import CONFIGURATION, training_log
from test_pretraining import SMALL, one_step

READINGS = ('across_volumes', 'across_views', 'within_volume')


# ---- eq. 3 under DDP ----

def _tokens_and_head() -> tuple[torch.Tensor, torch.Tensor, TokenHead]:
    """Encoder tokens of two views of 4 volumes (2 per rank), 6 channels on a 1 x 2 x 3 grid, and a projection head,
    the same everywhere."""
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randn(4, 6, 1, 2, 3, generator=generator)
    tokens_hat = torch.randn(4, 6, 1, 2, 3, generator=generator)
    torch.manual_seed(12)
    return tokens, tokens_hat, TokenHead(6, 5, 7)


def _token_gather_worker(rank: int, world_size: int, rendezvous: str, out: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world_size)
    tokens, tokens_hat, head = _tokens_and_head()
    model = torch.nn.parallel.DistributedDataParallel(head)
    mine = slice(2 * rank, 2 * rank + 2)
    loss = token_contrastive_loss_across_ranks(model(tokens[mine]), model(tokens_hat[mine]), 5.0, 0.5)
    loss.backward()  # DDP averages the gradients over the ranks
    torch.save({'loss': loss.detach(), **{name: p.grad for name, p in head.named_parameters()}},
               f'{out}/rank{rank}.pt')
    dist.destroy_process_group()


def test_ddp_gather_gives_the_single_process_token_loss_and_gradients(tmp_path):
    """Rank 1 in a spawned process, rank 0 in this one: every rank's tokens are candidates of every anchor."""
    other = mp.get_context('spawn').Process(target=_token_gather_worker,
                                            args=(1, 2, str(tmp_path / 'rendezvous'), str(tmp_path)))
    other.start()
    try:
        _token_gather_worker(0, 2, str(tmp_path / 'rendezvous'), str(tmp_path))
    finally:
        other.join(timeout=120)
        if other.exitcode is None:
            other.kill()
    assert other.exitcode == 0
    tokens, tokens_hat, head = _tokens_and_head()
    loss = token_contrastive_loss(head(tokens), head(tokens_hat), 5.0, 0.5)
    loss.backward()
    ranks = [torch.load(tmp_path / f'rank{rank}.pt') for rank in range(2)]
    assert ranks[0]['loss'].item() != pytest.approx(ranks[1]['loss'].item())  # each rank its own anchors
    assert torch.stack([r['loss'] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    for r in ranks:
        for name, p in head.named_parameters():
            torch.testing.assert_close(r[name], p.grad)


# ---- the trainers in-process ----

def test_byol_step_trains_online_heads_and_moves_the_target_by_its_momentum(make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenBYOL, SMALL)
    trainer.initialize()
    model = trainer.pretraining_model()
    target = model.heads['target'].module
    online_before = {name: p.detach().clone() for name, p in model.online().named_parameters()}
    target_before = {name: p.detach().clone() for name, p in target.named_parameters()}
    assert online_before.keys() == target_before.keys()
    heads_before = {name: p.detach().clone() for name, p in model.heads.named_parameters()}
    result = one_step(trainer)
    assert 0 <= result['token_byol'] <= 4 and all(-1 <= result[r] <= 1 for r in READINGS)
    m = trainer.target_momentum
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
    trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenBYOL, SMALL)
    trainer.initialize()
    one_step(trainer)
    trainer.save_checkpoint(str(tmp_path / 'checkpoint_latest.pth'))
    checkpoint = torch.load(tmp_path / 'checkpoint_latest.pth', weights_only=False)
    assert {key.split('.')[0] for key in checkpoint[HEADS_KEY]} == {'projection', 'predictor', 'target'}
    assert not any(key.startswith('heads.') for key in checkpoint['network_weights'])
    resumed = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenBYOL, SMALL)
    resumed.load_checkpoint(str(tmp_path / 'checkpoint_latest.pth'))
    ours, theirs = resumed.pretraining_model().state_dict(), trainer.pretraining_model().state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])
    # the target is not the online path: what was restored is the target's own moving average
    assert any(not torch.equal(ours[f'heads.target.module.{key}'], value) for key, value in
               resumed.pretraining_model().online().state_dict().items())


class _Ablation(nnUNetTrainerMedNeXtS_PretrainTokenCL):
    """Table 4's SimCLR row without the weight and without rotate-and-restore, as a user would declare it."""
    same_position_weight = 0.0
    rotate_and_restore = False


def test_ablation_settings_reach_the_views_the_loss_and_the_report(make_trainer, monkeypatch):
    trainer = make_trainer(_Ablation, SMALL)
    trainer.initialize()
    assert trainer.transforms == (IDENTITY,) and trainer.token_grid == [4, 2, 2]
    assert 'w = 0.0' in trainer.method and '(off)' in trainer.method
    weights = []

    def recording(z, z_hat, same_position_weight, temperature):
        weights.append((same_position_weight, temperature))
        return token_contrastive_loss_across_ranks(z, z_hat, same_position_weight, temperature)
    monkeypatch.setattr('nnunet_plugins.training.token_pretraining.token_contrastive_loss_across_ranks', recording)
    one_step(trainer)
    assert weights == [(0.0, 0.5)]
    default = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenCL, SMALL)
    default.initialize()
    assert len(default.transforms) == 16 and default.same_position_weight == 5.0


@pytest.mark.parametrize('ratio', [0.85, 0.9])
def test_a_mask_ratio_the_paper_found_useless_is_refused_before_training(make_trainer, ratio):
    masked_out = type('Masked', (nnUNetTrainerMedNeXtS_PretrainTokenCL,), {'mask_ratio': ratio})
    with pytest.raises(ValueError, match='no visual information'):
        make_trainer(masked_out, SMALL)


def test_a_token_grid_not_square_in_y_x_draws_half_turns_and_says_so(make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainTokenCL, {'patch_size': [8, 16, 32]})
    trainer.initialize()
    assert trainer.token_grid == [4, 2, 4]
    assert {t.quarter_turns for t in trainer.transforms} == {0, 2} and len(trainer.transforms) == 8
    lines = trainer.method_log()
    assert 'draws from 8 transforms of the [4, 2, 4] token grid' in lines[0] and 'only half turns' in lines[1]
    assert math.isfinite(one_step(trainer)['token_contrastive'])


# ---- the stock CLI: pre-train, then fine-tune with -pretrained_weights ----

def _pretrain_and_check(workspace, trainer: str, term: str) -> tuple[dict, list[str]]:
    """Pre-train ``trainer`` (1 epoch x 2 iterations) through nnUNetv2_train; check its log, progress.png and report;
    return its final checkpoint and the encoder's keys."""
    fold = workspace.train(trainer, 'all', epochs=1, iterations=2)
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


@pytest.mark.e2e
def test_stock_cli_token_cl_pretrains_mednext(workspace):
    """Fine-tuning from a pre-training checkpoint is nnU-Net's ``-pretrained_weights`` reading the same
    ``network_weights`` for every method: RCR's test (test_pretraining.py) runs it for MedNeXt, the BYOL test below for
    nnU-Net's own network and trainer."""
    _pretrain_and_check(workspace, 'nnUNetTrainerMedNeXtS_PretrainTokenCL', 'token_contrastive')


@pytest.mark.e2e
def test_stock_cli_token_byol_pretrains_nnunets_network_that_nnunets_own_trainer_starts_from(workspace, make_trainer):
    """BYOL pre-training of nnU-Net's own network through nnUNetv2_train; then what ``nnUNetv2_train -tr
    nnUNetTrainer -pretrained_weights FILE`` does before training (nnU-Net's maybe_load_checkpoint), in this process:
    nnU-Net's trainer takes every pre-trained encoder tensor as it is."""
    pretrained, encoder = _pretrain_and_check(workspace, 'nnUNetTrainer_PretrainTokenBYOL', 'token_byol')
    assert any(key.startswith('target.module.encoder.') for key in pretrained[HEADS_KEY])
    trainer = make_trainer(nnUNetTrainer)
    maybe_load_checkpoint(trainer, continue_training=False, validation_only=False, pretrained_weights_file=str(
        workspace.results('nnUNetTrainer_PretrainTokenBYOL') / 'fold_all' / 'checkpoint_final.pth'))
    loaded = trainer.network.state_dict()
    for key in encoder:
        assert torch.equal(loaded[key], pretrained['network_weights'][key]), key
