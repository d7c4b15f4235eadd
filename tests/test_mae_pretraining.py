"""MAE pre-training (nnssl's recipe): the blocks and their share, the loss on masked voxels only, one step of every
network family in-process (the whole network trains, only its segmentation head is replaced), nnssl's optimiser and
schedule, and the checkpoint that nnU-Net's own ``load_pretrained_weights`` loads into the supervised network.
The stock-CLI run (pre-training, then ``-pretrained_weights``) is test_pretraining.py's."""
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from torch import nn

from nnunet_plugins.pretraining import MAE
from nnunet_plugins.pretraining.checkpoint import HEADS_KEY
from nnunet_plugins.pretraining.mae import block_mask, mask_block, masked_count, masked_mse
from nnunet_plugins.pretraining.mae_model import MAEModel
from nnunet_plugins.weights.files import is_seg_head
from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS_PretrainMAE

from helpers import (FAMILIES, PRETRAINING_PATCH, pretraining_step, pretrainer, saved_checkpoint_and_supervised_network,
                     training_log)


def test_blocks_are_nnssls_16_voxels_fitted_to_the_patch():
    assert mask_block([160, 160, 160]) == (16, 16, 16)  # nnssl's patch: 10 blocks per axis
    assert mask_block([40, 160, 128]) == (20, 16, 16)  # anisotropic: 20 divides 40 and is nearest to 16
    assert mask_block([56, 40]) == (14, 20)  # 2d
    assert mask_block([8, 16, 16]) == (4, 8, 8)  # at least 2 blocks per axis
    assert mask_block([24, 7, 1]) == (12, 1, 1)


@pytest.mark.parametrize('patch, block, masked', [((32, 64, 64), (16, 16, 16), 24), ((40, 48), (20, 16), 4)])
def test_the_mask_sets_three_quarters_of_the_blocks_of_every_patch_to_zero(patch, block, masked):
    mask = block_mask(3, patch, block, 0.75, np.random.default_rng(0))
    assert mask.shape == (3, 1, *patch) and set(mask.unique().tolist()) == {0., 1.}
    grid = [size // edge for size, edge in zip(patch, block)]
    blocks = mask.reshape(3, *[v for g, e in zip(grid, block) for v in (g, e)])
    within = tuple(range(2, 2 * len(patch) + 1, 2))  # the voxels of one block
    assert torch.equal(blocks.amin(dim=within), blocks.amax(dim=within))  # whole blocks, never parts
    per_patch = (blocks.amax(dim=within) == 0).flatten(1).sum(1)
    assert per_patch.tolist() == [masked] * 3 == [masked_count(int(np.prod(grid)), 0.75)] * 3
    assert not torch.equal(mask[0], mask[1])  # drawn anew per patch


def test_the_loss_counts_masked_voxels_only():
    rng = np.random.default_rng(1)
    target, output = torch.randn(2, 2, 8, 16, 16), torch.randn(2, 2, 8, 16, 16)
    mask = block_mask(2, (8, 16, 16), (4, 8, 8), 0.75, rng)
    loss = masked_mse(output, target, mask)
    masked = (mask == 0).expand_as(target)
    assert loss.item() == pytest.approx(((output - target)[masked] ** 2).mean().item())
    unmasked_changed = torch.where(masked, target, target + 5)
    assert masked_mse(output, unmasked_changed, mask).item() == pytest.approx(loss.item())
    masked_changed = torch.where(masked, target + 1, target)
    assert masked_mse(output, masked_changed, mask).item() != pytest.approx(loss.item())


def test_a_2d_network_reconstructs_its_input_channels_through_encoder_and_decoder():
    network = PlainConvUNet(2, 3, [8, 16, 32], nn.Conv2d, 3, [1, 2, 2], 2, 4, [2, 2], conv_bias=True,
                            norm_op=nn.InstanceNorm2d, nonlin=nn.LeakyReLU, deep_supervision=False)
    model = MAEModel(network, 2, (32, 32))
    assert (model.head_name, model.head_channels) == ('decoder.seg_layers.1', 8)
    method = MAE()
    method.prepare(model, (32, 32))
    assert method.mask_block == (16, 16)
    data = torch.randn(3, 2, 32, 32)
    assert model(data).shape == data.shape
    losses = method.losses(model, data, np.random.default_rng(2), nullcontext)
    losses['total'].backward()
    assert all(p.grad is not None for p in network.decoder.stages.parameters())
    assert all(p.grad is None for p in network.decoder.seg_layers.parameters())


@pytest.mark.parametrize('family', FAMILIES)
def test_one_step_trains_the_whole_network_and_the_checkpoint_loads_into_the_supervised_one(make_trainer, family,
                                                                                           tmp_path):
    supervised, configuration = FAMILIES[family]
    trainer = make_trainer(pretrainer(supervised, 'MAE'), configuration)
    trainer.initialize()
    # nnssl's optimiser for every network: SGD 1e-2, Nesterov 0.99, weight decay 3e-5, poly decay, no warm-up
    assert isinstance(trainer.optimizer, torch.optim.SGD) and not trainer.enable_deep_supervision
    group = trainer.optimizer.param_groups[0]
    assert (group['lr'], group['momentum'], group['nesterov'], group['weight_decay']) == (1e-2, 0.99, True, 3e-5)
    model = trainer.pretraining_model()
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(trainer.batch_size, trainer.num_input_channels, *patch)
    # the step's loss is the masked MSE of the network's reconstruction of the masked patch
    seed = 3
    mask = block_mask(len(data), patch, trainer.method.mask_block, 0.75, np.random.default_rng(seed))
    with torch.no_grad():
        reconstruction = model(data * mask)
        loss = trainer.method.losses(model, data, np.random.default_rng(seed), trainer.autocast)['total']
    assert reconstruction.shape == data.shape  # the input channels, not the classes
    assert loss.item() == pytest.approx(masked_mse(reconstruction, data, mask).item(), rel=1e-5)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = pretraining_step(trainer)
    assert np.isfinite(result['loss']) and result['masked_mse'] == result['loss']
    # every parameter gets a gradient but the segmentation heads' (which neither change)
    with_gradient = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_gradient == {name for name in before if not is_seg_head(name)}
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed <= with_gradient and {'heads.reconstruction.weight', 'heads.reconstruction.bias'} <= changed
    assert any(n.startswith('network.encoder.') for n in changed) and any(n.startswith('network.decoder.')
                                                                           for n in changed)

    checkpoint, network = saved_checkpoint_and_supervised_network(trainer, supervised, tmp_path / 'checkpoint.pth')
    fresh = network.state_dict()
    weights = checkpoint['network_weights']
    assert list(weights) == list(fresh) and all(weights[k].shape == fresh[k].shape for k in fresh)
    assert set(checkpoint[HEADS_KEY]) == {'reconstruction.weight', 'reconstruction.bias'}
    report = trainer.report()
    assert report['pretrained_tensors'] == [k for k in weights if not is_seg_head(k)]
    assert report['initialised_tensors'] == [k for k in weights if is_seg_head(k)]
    load_pretrained_weights(network, str(tmp_path / 'checkpoint.pth'))
    loaded = network.state_dict()
    for key in fresh:
        assert torch.equal(loaded[key], fresh[key] if is_seg_head(key) else weights[key]), key


def test_the_schedule_and_the_log_are_nnssls(make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainMAE, PRETRAINING_PATCH)
    trainer.initialize()
    trainer.on_train_start()
    scheduler = trainer.lr_scheduler
    assert [scheduler.learning_rate(e) for e in (0, 500, 1000)] == pytest.approx([1e-2, 1e-2 * 0.5 ** 0.9, 0])
    log = training_log(trainer.output_folder)
    assert ('pre-training optimiser: SGD, Nesterov momentum 0.99, learning rate 0.01, weight decay 3e-05; no '
            'warm-up, poly decay (exponent 0.9) from 0.01 over 1000 epochs; gradient-norm clipping at 12') in log
    assert 'masking, per patch [8, 16, 16]: 6 of its [2, 2, 2] blocks of [4, 8, 8] voxels set to 0' in log
    assert 'reconstruction head: a 1x1 conv from the ' in log and 'in place of decoder.seg_layers.0' in log
    assert trainer.report()['mask_block'] == [4, 8, 8]
    with pytest.raises(ValueError, match='mask_ratio 1 must lie between 0 and 1'):
        type('Full', (nnUNetTrainerMedNeXtS_PretrainMAE,), {'method': MAE(mask_ratio=1)}).method.check()
