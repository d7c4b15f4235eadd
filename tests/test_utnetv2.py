"""UTNetV2: the authors' size and cost on their BCV setting, nnU-Net's topology on other plans, the trainer,
and the stock CLIs on the tiny dataset."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_plugins.commands.benchmark.worker import random_batch
from nnunet_plugins.macs import forward_macs
from nnunet_plugins.networks.utnetv2 import VARIANTS, BidirectionalAttention, utnetv2_from_plan
from nnunet_plugins.training.utnetv2 import nnUNetTrainerUTNetV2

from helpers import CONFIGURATION, TINY_KERNELS, TINY_STRIDES, parameter_count, training_log

TRAINER = nnUNetTrainerUTNetV2.__name__
# the paper's BCV setting (Supplementary): 32x128x128 patches at 3.0 x 0.75 x 0.75 mm
BCV_STRIDES = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
BCV_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
BCV_PATCH = (32, 128, 128)
# the authors' code (CBIM-Medical-Image-Segmentation, model/dim3/medformer.py) with that setting, 1 input
# channel, 14 classes, auxiliary head; MACs counted by nnunet_plugins.macs.forward_macs as below
AUTHORS_PARAMETERS = {4: 37_372_476, 3: 36_669_180}  # by semantic map size
AUTHORS_MACS = 219_153_235_968
# ours: no map update and no feature-value projection in the last decoder B-MHA block (-128 x 128), and
# PyTorch's fusion transformer layers have an attention input bias (+3 x 320 per layer, two layers)
PARAMETER_DIFFERENCE = -128 * 128 + 2 * 3 * 320
# the two computations left out: that projection at the 1/4 level (32^3 voxels) and the map update matmul
MAC_DIFFERENCE = -(128 * 128 + 64 * 128) * 32 ** 3


@pytest.fixture(scope='module')
def bcv_network():
    return utnetv2_from_plan(1, 14, BCV_STRIDES, BCV_KERNELS)


@pytest.mark.parametrize('map_size', sorted(AUTHORS_PARAMETERS))
def test_parameter_count_on_the_authors_bcv_setting(map_size):
    network = utnetv2_from_plan(1, 14, BCV_STRIDES, BCV_KERNELS, replace(VARIANTS['bcv'], map_size=map_size))
    assert parameter_count(network) == AUTHORS_PARAMETERS[map_size] + PARAMETER_DIFFERENCE
    assert abs(PARAMETER_DIFFERENCE) / AUTHORS_PARAMETERS[map_size] < 0.001


def test_forward_macs_on_the_authors_bcv_patch(bcv_network):
    macs = forward_macs(bcv_network, (1, 1, *BCV_PATCH))
    assert macs == AUTHORS_MACS + MAC_DIFFERENCE
    assert abs(macs - AUTHORS_MACS) / AUTHORS_MACS < 0.005


def test_cost_is_linear_in_the_number_of_voxels(bcv_network):
    """MACs (attention matrix products included) are affine in the voxels: no voxels x voxels term."""
    macs = [forward_macs(bcv_network, (1, 1, 32 * n, 64, 64)) for n in (1, 2, 3)]
    assert macs[2] - macs[1] == macs[1] - macs[0]


def test_one_similarity_matrix_serves_both_attention_directions():
    """Eq. 5: X' = softmax over map tokens (A) v_M and M' = softmax over voxels (A)^T v_X, A = q_X q_M^T / sqrt(d),
    checked against two independent scaled-dot-product attentions."""
    torch.manual_seed(0)
    heads, head_dim = 2, 8
    attention = BidirectionalAttention(torch.nn.Conv3d, 16, 12, 16, heads, head_dim, [3, 3, 3]).eval()
    feat, semantic_map = torch.randn(2, 16, 4, 6, 5), torch.randn(2, 12, 2, 2, 2)
    feat_out, map_out = attention(feat, semantic_map)

    def split(x):
        return x.flatten(2).unflatten(1, (heads, head_dim)).transpose(-2, -1)

    def merge(x, like):
        return x.transpose(-2, -1).flatten(1, 2).reshape(like.shape[0], -1, *like.shape[2:])

    feat_q, feat_v = map(split, attention.feat_proj(feat).chunk(2, dim=1))
    map_q, map_v = map(split, attention.map_proj(semantic_map).chunk(2, dim=1))
    expected_feat = attention.feat_out(merge(F.scaled_dot_product_attention(feat_q, map_q, map_v), feat))
    expected_map = attention.map_out(merge(F.scaled_dot_product_attention(map_q, feat_q, feat_v), semantic_map))
    torch.testing.assert_close(feat_out, expected_feat)
    torch.testing.assert_close(map_out, expected_map)


@pytest.mark.parametrize('strides,kernels,patch', [
    ([[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, (32, 32, 32)),  # isotropic: the first five levels are used
    ([[1, 1], [2, 2], [2, 2], [2, 2]], [[3, 3]] * 4, (32, 32)),  # the tiny dataset's 2d plan
], ids=['isotropic-3d', '2d'])
def test_outputs_and_gradients_on_isotropic_and_2d_plans(strides, kernels, patch):
    torch.manual_seed(0)
    network = utnetv2_from_plan(1, 3, strides, kernels)
    assert len(network.strides) == min(5, len(strides))
    outputs = network(torch.randn(1, 1, *patch))
    aux_divisor = np.prod(strides[:3], axis=0)
    assert [tuple(o.shape) for o in outputs] == [(1, 3, *patch), (1, 3, *(np.array(patch) // aux_divisor))]
    sum(o.mean() for o in outputs).backward()
    assert [name for name, p in network.named_parameters() if p.grad is None] == []
    network.decoder.deep_supervision = False
    assert network(torch.randn(1, 1, *patch)).shape == (1, 3, *patch)


def test_anisotropic_plan_with_four_levels_drops_the_deepest_bmha_level():
    network = utnetv2_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS)
    assert network.strides == [tuple(s) for s in TINY_STRIDES]
    assert network.kernel_sizes == [tuple(k) for k in TINY_KERNELS]
    assert network.transformer_blocks == [2, 4]
    assert [len(stage.blocks) for stage in network.encoder.bmha_stages] == [2, 4]
    assert [len(stage.blocks) for stage in network.decoder.bmha_stages] == [2]


def test_block_counts_and_map_size_are_arguments():
    network = utnetv2_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS,
                                replace(VARIANTS['bcv'], transformer_blocks=(1, 3), map_size=(2, 3, 3)))
    assert [len(stage.blocks) for stage in network.encoder.bmha_stages] == [1, 3]
    assert [len(stage.blocks) for stage in network.decoder.bmha_stages] == [1]
    with torch.no_grad():
        skips, maps = network.encoder(torch.randn(1, 1, 14, 32, 32))
    assert [tuple(s.shape) for s in skips] == [(1, 32, 14, 32, 32), (1, 64, 14, 16, 16), (1, 128, 7, 8, 8),
                                               (1, 256, 7, 4, 4)]
    assert [tuple(m.shape) for m in maps] == [(1, 128, 2, 3, 3), (1, 256, 2, 3, 3)]


# ---- the trainer, in-process on the tiny dataset's plan ----

def test_deep_supervision_scales_match_outputs_and_losses_weigh_equally(make_trainer):
    trainer = make_trainer(nnUNetTrainerUTNetV2)
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    np.testing.assert_allclose(scales, [[1, 1, 1], [1 / 2, 1 / 4, 1 / 4]])
    outputs = trainer.network(torch.randn(1, 1, *patch))
    assert [list(o.shape[2:]) for o in outputs] == [[round(p * s) for p, s in zip(patch, scale)] for scale in scales]
    assert trainer.loss.weight_factors == (0.5, 0.5)
    assert 'UTNetV2: 4 levels' in training_log(trainer.output_folder)


def test_every_parameter_gets_a_gradient_in_one_training_step(make_trainer):
    trainer = make_trainer(nnUNetTrainerUTNetV2)
    trainer.initialize()
    result = trainer.train_step(random_batch(trainer))
    assert np.isfinite(result['loss'])
    assert [name for name, p in trainer.network.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in trainer.network.parameters())


def test_optimiser_and_schedule(make_trainer):
    trainer = make_trainer(nnUNetTrainerUTNetV2)
    trainer.initialize()
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert (group['lr'], group['weight_decay'], group['eps']) == (6e-4, 0.05, 1e-5)
    trainer.lr_scheduler.step(500)
    assert group['lr'] == pytest.approx(6e-4 * 0.5 ** 0.9)


def test_strict_reload_with_deep_supervision_off(make_trainer):
    """What nnUNetv2_predict does: rebuild without deep supervision and load the training weights strictly."""
    trainer = make_trainer(nnUNetTrainerUTNetV2)
    trainer.initialize()
    trained = trainer.network.eval()
    rebuilt = nnUNetTrainerUTNetV2.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads,
        enable_deep_supervision=False).eval()
    rebuilt.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(1, 1, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained(x)[0])


def _three_level_plan(workspace) -> dict:
    architecture = json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text())[
        'configurations'][CONFIGURATION]['architecture']
    architecture['arch_kwargs'].update(strides=TINY_STRIDES[:3], kernel_sizes=TINY_KERNELS[:3], n_stages=3)
    return {'architecture': architecture}


@pytest.mark.parametrize('override,message', [
    (lambda _: {'patch_size': [14, 32, 30]}, r'axis 2 \(30\) must be divisible by 8.*such as \[14, 32, 32\]: '
                                              r'`nnunet-plugins plans DATASET --preset utnetv2-bcv --patch 14 32 32 '
                                              r'--spacing 3\.033 1\.18 1\.189`'),
    (lambda _: {'patch_size': [2, 8, 8]}, r'its bottleneck would be \[1, 1, 1\], a single voxel.*such as \[2, 16, 8\]'),
    (_three_level_plan, r'needs at least 4 resolution levels.*has 3.*--patch 28 64 64'),
], ids=['not-divisible', 'one-voxel-bottleneck', 'three-levels'])
def test_unusable_patch_or_plan_is_refused_before_training(make_trainer, workspace, override, message):
    trainer = make_trainer(nnUNetTrainerUTNetV2, override(workspace))
    with pytest.raises(ValueError, match=message):
        trainer.initialize()


# ---- the stock CLIs on the tiny dataset ----

def test_nnunetv2_train(workspace):
    """Trains fold 0 (predicted and ensembled in test_stock_cli.py); ``--c`` is the base trainer's, tested there."""
    fold = workspace.train(TRAINER, 0)
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert (checkpoint['trainer_name'], checkpoint['current_epoch']) == (TRAINER, 1)
    assert 'UTNetV2: 4 levels' in training_log(fold)
    summary = json.loads((fold / 'validation' / 'summary.json').read_text())
    assert set(summary['mean']) == {'1', '2', '3'}
