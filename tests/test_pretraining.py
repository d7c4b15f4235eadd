"""RCR pre-training (paper 003): the proxy-task views, NT-Xent, the DDP gathers of both contrastive losses (one
harness), one pre-training step of every network family in-process (RCR and token-level CL, the machinery they
share), the checkpoint, the settings of a run, and the stock CLI from pre-training (RCR and MAE) to
``-pretrained_weights``."""
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from torch import nn

from nnunet_plugins import ext_trainer_folder, settings
from nnunet_plugins.pretraining.checkpoint import HEADS_KEY
from nnunet_plugins.weights.files import is_seg_head
from nnunet_plugins.pretraining.rcr_heads import RCRModel, upsampling_steps
from nnunet_plugins.pretraining.rcr_views import (
    LOSS_TERMS, allowed_rotations, make_views, nt_xent, proxy_losses)
from nnunet_plugins.pretraining.token_cl import token_contrastive_loss_across_ranks
from nnunet_plugins.pretraining.token_heads import TokenHead
from nnunet_plugins.pretraining.token_losses import CollapseReading, token_contrastive_loss
from nnunet_plugins.pretraining.trainer import REPORT_FILE
from nnunet_plugins.registry import plugin_trainers
from nnunet_plugins.training.base import Role
from nnunet_plugins.training.mednext import (
    nnUNetTrainerMedNeXtS, nnUNetTrainerMedNeXtS_PretrainRCR, nnUNetTrainerMedNeXtS_PretrainTokenCL)
from nnunet_plugins.training.swinunetr import nnUNetTrainerSwinUNETR_PretrainRCR

from helpers import (
    CONFIGURATION, DATASET_ID, FAMILIES, NUM_TRAINING, PRETRAINING_PATCH, SWIN_PATCH, on_two_ranks,
    on_two_torchrun_agents, pretraining_step, pretrainer, saved_checkpoint_and_supervised_network, training_log)

PRETRAIN = 'nnUNetTrainerMedNeXtS_PretrainRCR'
PRETRAIN_MAE = 'nnUNetTrainerMedNeXtS_PretrainMAE'
FINETUNE = 'nnUNetTrainerMedNeXtS_Finetune'
PRETRAINERS = plugin_trainers(Role.PRETRAINING)
# per method: its heads and what a step returns besides the loss; both take RCR's AdamW 4e-4, weight decay 1e-5
METHODS = {
    'RCR': (('reconstruction', 'rotation', 'contrastive'), LOSS_TERMS),
    'TokenCL': (('projection',), ('token_contrastive', *CollapseReading._fields)),
}


@pytest.mark.parametrize('trainer_class', PRETRAINERS, ids=lambda c: c.__name__)
def test_nnunet_finds_each_pretraining_trainer_in_the_shim_folder(trainer_class, monkeypatch):
    monkeypatch.setenv('nnUNet_extTrainer', ext_trainer_folder())
    found = recursive_find_trainer_class_by_name(trainer_class.__name__)
    assert found is trainer_class and pickle.loads(pickle.dumps(found)) is trainer_class
    assert found.__module__.startswith('nnunet_plugins.training.')  # declared beside the network it pre-trains


# ---- the views ----

def test_views_are_the_rotated_patch_with_labels_of_the_rotation_and_cut_out():
    batch = torch.randn(3, 2, 4, 6, 6)
    views = make_views(batch, allowed_rotations(batch.shape[2:]), np.random.default_rng(0))
    assert views.inputs.shape == views.targets.shape == (6, 2, 4, 6, 6)
    assert set(views.rotations.tolist()) <= {0, 1, 2, 3}
    for i, k in enumerate(views.rotations.tolist()):
        expected = np.rot90(batch[i % 3].numpy(), k, axes=(-2, -1))  # counter-clockwise in the y-x plane
        np.testing.assert_array_equal(views.targets[i].numpy(), expected)  # the reconstruction target: uncut
        mask = views.masks[i].numpy()
        np.testing.assert_array_equal(views.inputs[i].numpy()[:, mask], 0)
        np.testing.assert_array_equal(views.inputs[i].numpy()[:, ~mask], expected[:, ~mask])


def test_a_patch_not_square_in_y_x_draws_only_half_turns():
    assert allowed_rotations((16, 32, 32)) == (0, 1, 2, 3) and allowed_rotations((48, 48)) == (0, 1, 2, 3)
    assert allowed_rotations((16, 32, 64)) == (0, 2) and allowed_rotations((32, 48)) == (0, 2)
    views = make_views(torch.randn(64, 1, 4, 6, 8), (0, 2), np.random.default_rng(2))
    assert set(views.rotations.tolist()) == {0, 2} and views.targets.shape[2:] == (4, 6, 8)


def test_reconstruction_upsamples_by_the_encoders_factors():
    assert upsampling_steps([16, 32, 32]) == [[2, 2, 2]] * 4 + [[1, 2, 2]]
    assert upsampling_steps([3, 4]) == [[3, 2], [1, 2]]


def test_2d_networks_pretrain_in_their_plane():
    """A 2d configuration: the same views and heads on (B, C, Y, X) patches."""
    network = PlainConvUNet(1, 3, [8, 16, 32], nn.Conv2d, 3, [1, 2, 2], 2, 4, [2, 2], conv_bias=True,
                            norm_op=nn.InstanceNorm2d, nonlin=nn.LeakyReLU, deep_supervision=False)
    model = RCRModel(network, 1, (32, 32))
    assert model.bottleneck == (32, 8, 8) and model.upsampling == [[2, 2], [2, 2]]
    views = make_views(torch.randn(2, 1, 32, 32), allowed_rotations((32, 32)), np.random.default_rng(8))
    reconstruction, rotation, embedding = model(views.inputs)
    assert reconstruction.shape == (4, 1, 32, 32) and rotation.shape == (4, 4) and embedding.shape == (4, 512)
    losses = proxy_losses((reconstruction, rotation, embedding), views)
    losses['total'].backward()
    assert torch.isfinite(losses['total']) and all(p.grad is not None for p in network.encoder.parameters())


# ---- NT-Xent ----

def nt_xent_by_loop(view1: torch.Tensor, view2: torch.Tensor, temperature: float = 0.5) -> float:
    """The paper's eq. 3 (SimCLR's NT-Xent) over all 2N views, written out."""
    views, n = [*view1.tolist(), *view2.tolist()], len(view1)

    def similarity(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    losses = []
    for i, anchor in enumerate(views):
        positive = views[(i + n) % (2 * n)]
        denominator = sum(math.exp(similarity(anchor, other) / temperature) for k, other in enumerate(views) if k != i)
        losses.append(-math.log(math.exp(similarity(anchor, positive) / temperature) / denominator))
    return sum(losses) / len(losses)


def test_nt_xent_matches_the_explicit_computation():
    generator = torch.Generator().manual_seed(3)
    view1, view2 = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    assert nt_xent(view1, view2).item() == pytest.approx(nt_xent_by_loop(view1, view2), rel=1e-5)
    # identical views of orthogonal sub-volumes: each positive is the closest, the loss is low
    orthogonal = torch.eye(4, 5)
    assert nt_xent(orthogonal, orthogonal).item() < nt_xent(orthogonal, orthogonal.roll(1, 0)).item()


# ---- the DDP gathers: every rank's views or tokens are negatives, with gradient ----

def _inputs_and_projection() -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """Two views of 6 sub-volumes (3 per rank), 5 features each, and a projection to 4-d, the same everywhere."""
    generator = torch.Generator().manual_seed(4)
    first, second = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    torch.manual_seed(5)
    return first, second, nn.Linear(5, 4)


def _nt_xent_step(rank: int) -> dict:
    first, second, projection = _inputs_and_projection()
    model = nn.parallel.DistributedDataParallel(projection)
    mine = slice(3 * rank, 3 * rank + 3)
    loss = nt_xent(model(first[mine]), model(second[mine]))
    loss.backward()  # DDP averages the gradients over the ranks
    return {'loss': loss.detach(), 'weight': projection.weight.grad, 'bias': projection.bias.grad}


def _both_steps(rank: int) -> dict:
    """RCR's and the token method's steps in one process group: one spawned rank for both tests below."""
    return {'nt_xent': _nt_xent_step(rank), 'token': _token_step(rank)}


@pytest.fixture(scope='module', params=['spawned', pytest.param('torchrun', marks=pytest.mark.e2e)])
def two_rank_steps(request, tmp_path_factory) -> list[dict]:
    """Each rank's steps, the ranks started by ``multiprocessing`` or as two torchrun agents (two nodes' way)."""
    folder = tmp_path_factory.mktemp('ddp')
    if request.param == 'spawned':
        return on_two_ranks(_both_steps, folder)
    return on_two_torchrun_agents(Path(__file__).resolve().parent / 'ddp_steps.py', folder)


def test_ddp_gather_gives_the_single_process_loss_and_gradients(two_rank_steps):
    ranks = [r['nt_xent'] for r in two_rank_steps]
    first, second, projection = _inputs_and_projection()
    loss = nt_xent(projection(first), projection(second))
    loss.backward()
    # nnU-Net logs the mean over ranks
    assert torch.stack([r['loss'] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    for r in ranks:
        torch.testing.assert_close(r['weight'], projection.weight.grad)
        torch.testing.assert_close(r['bias'], projection.bias.grad)


def _tokens_and_head() -> tuple[torch.Tensor, torch.Tensor, TokenHead]:
    """Encoder tokens of two views of 4 volumes (2 per rank), 6 channels on a 1 x 2 x 3 grid, and a projection head,
    the same everywhere."""
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randn(4, 6, 1, 2, 3, generator=generator)
    tokens_hat = torch.randn(4, 6, 1, 2, 3, generator=generator)
    torch.manual_seed(12)
    return tokens, tokens_hat, TokenHead(6, 5, 7)


def _token_step(rank: int) -> dict:
    tokens, tokens_hat, head = _tokens_and_head()
    model = nn.parallel.DistributedDataParallel(head)
    mine = slice(2 * rank, 2 * rank + 2)
    loss = token_contrastive_loss_across_ranks(model(tokens[mine]), model(tokens_hat[mine]), 5.0, 0.5)
    loss.backward()
    return {'loss': loss.detach(), **{name: p.grad for name, p in head.named_parameters()}}


def test_ddp_gather_gives_the_single_process_token_loss_and_gradients(two_rank_steps):
    """Every rank's tokens are candidates of every anchor (eq. 3 of paper 004)."""
    ranks = [r['token'] for r in two_rank_steps]
    tokens, tokens_hat, head = _tokens_and_head()
    loss = token_contrastive_loss(head(tokens), head(tokens_hat), 5.0, 0.5)
    loss.backward()
    assert ranks[0]['loss'].item() != pytest.approx(ranks[1]['loss'].item())  # each rank its own anchors
    assert torch.stack([r['loss'] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    for r in ranks:
        for name, p in head.named_parameters():
            torch.testing.assert_close(r[name], p.grad)


def test_losses_are_finite_and_each_term_counts():
    views = make_views(torch.randn(2, 1, 4, 8, 8), (0, 1, 2, 3), np.random.default_rng(6))
    outputs = (torch.zeros_like(views.targets), torch.zeros(4, 4), torch.randn(4, 8))
    losses = proxy_losses(outputs, views)
    assert losses['reconstruction'].item() == pytest.approx(views.targets.abs().mean().item())
    assert losses['rotation'].item() == pytest.approx(math.log(4))
    assert losses['total'].item() == pytest.approx(sum(losses[k].item() for k in
                                                       ('reconstruction', 'rotation', 'contrastive')))


# ---- the trainers in-process ----

@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('family', FAMILIES)
def test_one_step_trains_encoder_and_heads_only_and_saves_the_supervised_keys(make_trainer, family, method, tmp_path):
    supervised, configuration = FAMILIES[family]
    heads, outputs = METHODS[method]
    trainer = make_trainer(pretrainer(supervised, method), configuration)
    trainer.initialize()
    # the method's settings for every network: nothing from the network's supervised trainer (MedNeXt's eps 1e-4,
    # UTNetV2's 1e-5 and weight decay 0.05, nnU-Net's 1e-8 ...)
    assert not trainer.enable_deep_supervision and isinstance(trainer.optimizer, torch.optim.AdamW)
    group = trainer.optimizer.param_groups[0]
    assert (trainer.initial_lr, group['weight_decay'], group['eps']) == (4e-4, 1e-5, 1e-4)
    model = trainer.pretraining_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = pretraining_step(trainer)
    assert all(np.isfinite(result[key]) for key in ('loss', *outputs))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    encoder_and_heads = {name for name in before if name.startswith(('network.encoder.', 'heads.'))}
    assert changed <= encoder_and_heads  # the decoder (and UTNetV2's map fusion) stays at its initialisation
    assert any(n.startswith('network.encoder.') for n in changed) and any(n.startswith('heads.') for n in changed)
    for head in heads:
        assert any(n.startswith(f'heads.{head}.') for n in changed), head

    checkpoint, network = saved_checkpoint_and_supervised_network(trainer, supervised, tmp_path / 'checkpoint.pth')
    assert list(checkpoint['network_weights']) == list(network.state_dict())
    assert set(checkpoint[HEADS_KEY]) == {n.removeprefix('heads.') for n in before if n.startswith('heads.')}


def test_continue_restores_the_heads_and_the_schedule(make_trainer, tmp_path):
    trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainRCR, PRETRAINING_PATCH)
    trainer.initialize()
    pretraining_step(trainer)
    trainer.current_epoch = 3
    trainer.logger.log('lrs', 1e-4, 0)
    trainer.save_checkpoint(str(tmp_path / 'checkpoint_latest.pth'))
    resumed = make_trainer(nnUNetTrainerMedNeXtS_PretrainRCR, PRETRAINING_PATCH)
    resumed.load_checkpoint(str(tmp_path / 'checkpoint_latest.pth'))
    assert resumed.current_epoch == 4
    for ours, theirs in zip(resumed.pretraining_model().state_dict().values(),
                            trainer.pretraining_model().state_dict().values()):
        torch.testing.assert_close(ours, theirs)
    # warm-up then cosine, a function of the epoch
    scheduler = resumed.lr_scheduler
    assert [round(scheduler.learning_rate(e) / 4e-4, 4) for e in (0, 1, 2)] == [round(1 / 3, 4), round(2 / 3, 4), 1]
    assert scheduler.learning_rate(1000) == pytest.approx(0)
    assert 'learning rate: linear warm-up to 0.0004 over the first 2 epochs, then cosine decay over 998 epochs' in \
        training_log(resumed.output_folder)


def test_a_supervised_checkpoint_is_refused_by_continue(make_trainer, tmp_path):
    trainer = make_trainer(nnUNetTrainerMedNeXtS)
    trainer.initialize()
    trainer.save_checkpoint(str(tmp_path / 'checkpoint_latest.pth'))
    with pytest.raises(Exception, match=f'has no {HEADS_KEY}: it was not written by a pre-training trainer'):
        make_trainer(nnUNetTrainerMedNeXtS_PretrainRCR).load_checkpoint(str(tmp_path / 'checkpoint_latest.pth'))


class _SlowerMedNeXt(nnUNetTrainerMedNeXtS_PretrainRCR):
    """A setting declared on a subclass, as on a supervised trainer."""
    initial_lr = 1e-4


def test_a_subclass_sets_the_learning_rate_and_the_log_and_report_state_every_setting(make_trainer):
    trainer = make_trainer(_SlowerMedNeXt, PRETRAINING_PATCH)
    trainer.initialize()
    trainer.lr_scheduler.step(2)
    group = trainer.optimizer.param_groups[0]
    assert (group['lr'], group['eps'], group['weight_decay']) == (1e-4, 1e-4, 1e-5)
    assert ('pre-training optimiser: AdamW, learning rate 0.0001, eps 0.0001, weight decay 1e-05; linear warm-up to '
            '0.0001 over the first 2 epochs, then cosine decay over 998 epochs; gradient-norm clipping at 12') in \
        training_log(trainer.output_folder)
    assert trainer.report()['optimiser'] == {'initial_lr': 1e-4, 'weight_decay': 1e-5, 'adam_eps': 1e-4,
                                             'warmup_epochs': 2, 'algorithm': 'AdamW', 'sgd_momentum': 0.99,
                                             'warmup_from_zero': False, 'decay': 'cosine'}
    with pytest.raises(TypeError, match=r'declares same_position_weight, a setting of its method, on the trainer.*'
                                        r'declare method = TokenCL\(same_position_weight=0\) instead'):
        type('Misplaced', (nnUNetTrainerMedNeXtS_PretrainTokenCL,), {'same_position_weight': 0})


def test_pre_training_keeps_the_rotation_task_unambiguous(make_trainer):
    trainer = make_trainer(nnUNetTrainerSwinUNETR_PretrainRCR, {'patch_size': SWIN_PATCH})
    trainer.initialize()
    assert trainer.method.rotations == (0, 2) and nnUNetTrainerSwinUNETR_PretrainRCR.method.rotations == ()
    rotation, _, _, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes == (0,) and max(abs(r) for r in rotation) <= math.pi / 6 + 1e-9


# ---- the stock CLI: pre-train, then fine-tune with -pretrained_weights ----

@pytest.mark.e2e
def test_stock_cli_pretrains_and_fine_tunes_from_the_checkpoint_with_warmup(workspace, tmp_path):
    """RCR and MAE pre-training through nnUNetv2_train, then ``-pretrained_weights`` of MAE's checkpoint into a
    ``_Finetune`` trainer: the log shows the warm-up learning rates, and the trained network, encoder and decoder, is
    the pre-trained one after three small steps."""
    fold = workspace.train(PRETRAIN, 'all', epochs=1, iterations=2)
    pretrained = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert pretrained['trainer_name'] == PRETRAIN and HEADS_KEY in pretrained
    log = training_log(fold)
    assert 'RCR pre-training:' in log and 'reconstruction' in log and 'contrastive' in log
    assert 'Pre-training: no segmentation to validate or export' in log
    assert (fold / 'progress.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and not (fold / 'validation').exists()
    report = json.loads((fold / REPORT_FILE).read_text())
    assert (report['trainer'], report['configuration'], report['fold']) == (PRETRAIN, CONFIGURATION, 'all')
    assert len(report['cases']['training']) == NUM_TRAINING
    assert (report['epochs'], report['iterations_per_epoch']) == (1, 2)
    encoder = [k for k in pretrained['network_weights'] if k.startswith('encoder.')]
    assert report['pretrained_tensors'] == encoder and encoder
    assert set(report['initialised_tensors']) == set(pretrained['network_weights']) - set(encoder)

    # MAE: the whole network pre-trained, every key of the supervised network's state dict in network_weights
    fold = workspace.train(PRETRAIN_MAE, 'all', epochs=1, iterations=2)
    supervised_keys = list(pretrained['network_weights'])  # RCR's: the keys of nnUNetTrainerMedNeXtS's network
    pretrained = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert pretrained['trainer_name'] == PRETRAIN_MAE and list(pretrained['network_weights']) == supervised_keys
    assert 'MAE pre-training:' in training_log(fold) and 'masked_mse' in training_log(fold)
    report = json.loads((fold / REPORT_FILE).read_text())
    trained = [k for k in supervised_keys if not is_seg_head(k)]
    assert report['pretrained_tensors'] == trained and any(k.startswith('decoder.stages.') for k in trained)

    # fine-tuning with the _Finetune trainer: 3 epochs x 1 iteration, warm-up over the first 2
    results = tmp_path / 'nnUNet_results'  # the shared results folder's MedNeXt-S fold 0 belongs to other tests
    env = {**workspace.env, 'nnUNet_results': str(results), settings.EPOCHS: '3', settings.ITERATIONS: '1',
           settings.WARMUP_EPOCHS: '2'}
    workspace.run('nnUNetv2_train', DATASET_ID, CONFIGURATION, 0, '-tr', FINETUNE, '-device', 'cpu',
                  '-pretrained_weights', fold / 'checkpoint_final.pth', env=env)
    tuned_fold = results / workspace.results(FINETUNE).relative_to(workspace.root / 'nnUNet_results') / 'fold_0'
    rates = [float(line.split(': ')[-1]) for line in training_log(tuned_fold).splitlines()
             if 'Current learning rate' in line]
    assert rates == pytest.approx([5e-4, 1e-3, 1e-3])
    # the pre-training on fold all trained on fold 0's validation cases: the fine-tuning log warns, naming them
    assert (f'!!!!! WARNING: the pre-training (fold all, {NUM_TRAINING} training cases, {fold / REPORT_FILE}) '
            f'trained on validation cases of fold 0: 2 of its 2 validation cases') in training_log(tuned_fold)
    tuned = torch.load(tuned_fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    # three AdamW steps (learning rate at most 1e-3) from the pre-trained network move no weight by more than a few
    # 1e-3; a fresh initialisation would differ by the weights' own scale
    for key in trained:
        if pretrained['network_weights'][key].is_floating_point() and pretrained['network_weights'][key].numel() > 64:
            torch.testing.assert_close(tuned['network_weights'][key], pretrained['network_weights'][key],
                                       atol=5e-3, rtol=0)
