"""3D UX-Net: the authors' network on isotropic plans, nnU-Net's downsampling on the others; its trainer
in-process on the tiny dataset (see conftest.py)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrUpBlock
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_plugins.macs import forward_macs
from nnunet_plugins.networks.uxnet import VARIANTS, UXNet, uxnet_from_plan, uxnet_levels
from nnunet_plugins.training.uxnet import nnUNetTrainerUXNet

from helpers import (CONFIGURATION, ISOTROPIC_KERNELS, ISOTROPIC_STRIDES, TINY_KERNELS, TINY_STRIDES,
                     assert_segments_a_heldout_case, parameter_count, train_in_process, training_log)

UXNET = 'nnUNetTrainerUXNet'
# authors' implementation (MASILab/3DUX-Net), 1 input channel, 14 classes; paper Table 1: 53.0M
REFERENCE_PARAMETERS = 53_006_510
# multiply-adds of one forward pass of a 96^3 patch, counted on the authors' implementation and on ours
REFERENCE_MACS_96 = 577_785_747_456

# thick-slice CT: in-plane downsampling first, nnU-Net kernel 1 along z there, six levels
THICK_SLICE_STRIDES = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
THICK_SLICE_KERNELS = [[1, 3, 3], [1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
PLANS_2D_STRIDES = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]]
PLANS_2D_KERNELS = [[3, 3]] * 6
# the constructor's arguments that are not kernels
PAPER = {key: value for key, value in dataclasses.asdict(VARIANTS['paper']).items()
         if key not in ('large_kernel', 'decoder_kernel')}


# ---- network ----

def on_meta(build, *args) -> nn.Module:
    """A network built on the meta device: shapes and counts without memory or compute."""
    with torch.device('meta'):
        return build(*args)


def test_parameters_and_macs_equal_the_reference_on_isotropic_plans():
    network = on_meta(uxnet_from_plan, 1, 14, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS)
    assert parameter_count(network) == REFERENCE_PARAMETERS
    macs = forward_macs(network, (1, 1, 96, 96, 96))
    assert macs == REFERENCE_MACS_96
    assert round(macs / 1e9, 1) == 577.8


@pytest.mark.parametrize('plan_strides,plan_kernels,patch,strides,stem_kernel,full_resolution_kernel', [
    (ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, (32, 32, 32),
     [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], (7, 7, 7), (3, 3, 3)),
    (TINY_STRIDES, TINY_KERNELS, (14, 32, 32),  # a fourth downsampling the plan lacks downsamples no axis
     [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2], [1, 1, 1]], (7, 7, 7), (1, 3, 3)),
    (THICK_SLICE_STRIDES, THICK_SLICE_KERNELS, (8, 64, 48),  # the plan's sixth level is left out
     [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]], (1, 7, 7), (1, 3, 3)),
    (PLANS_2D_STRIDES, PLANS_2D_KERNELS, (48, 32),
     [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]], (7, 7), (3, 3)),
], ids=['isotropic', 'tiny', 'thick-slice', '2d'])
def test_downsampling_and_kernels_follow_the_plan(plan_strides, plan_kernels, patch, strides, stem_kernel,
                                                  full_resolution_kernel):
    network = on_meta(uxnet_from_plan, 2, 4, plan_strides, plan_kernels)
    assert network.strides == [tuple(s) for s in strides]
    conv_op = nn.Conv2d if len(patch) == 2 else nn.Conv3d
    stem = network.encoder.downsamplers[0][0]
    assert isinstance(stem, conv_op)
    assert (stem.kernel_size, stem.stride) == (stem_kernel, tuple(strides[1]))
    assert network.encoder.stages[0][0].depthwise.kernel_size == stem_kernel
    for level in (2, 3, 4):  # kernel-2 downsampling conv and the transposed conv mirroring it: kernel = stride
        downsample = network.encoder.downsamplers[level - 1][1]
        upsample = network.decoder.upsamplers[level - 1]
        assert downsample.kernel_size == downsample.stride == upsample.kernel_size == upsample.stride == \
            tuple(strides[level])
    assert network.decoder.skip_blocks[0].conv1.conv.kernel_size == full_resolution_kernel
    assert network.decoder.last_block.conv2.conv.kernel_size == full_resolution_kernel

    x = torch.empty(2, 2, *patch, device='meta')
    stage_outputs = network.encoder(x)
    size = np.array(patch)
    for level, (output, channels) in enumerate(zip(stage_outputs, (48, 96, 192, 384)), start=1):
        size = size // np.array(strides[level])
        assert output.shape == (2, channels, *size)
    assert network(x).shape == (2, 4, *patch)


IN_PLANE_STRIDES = [[1, 1, 1]] + [[1, 2, 2]] * 4  # keeps a test input thin: 2 x 32 x 32 voxels


def _monai_decoder_with_our_weights(ours: UXNet) -> nn.ModuleDict:
    """The reference's decoder, built from the MONAI blocks the authors' code uses, holding our weights."""
    kwargs = dict(spatial_dims=3, kernel_size=3, norm_name='instance', res_block=True)
    widths = (48, 96, 192, 384, 768)
    reference = nn.ModuleDict({
        'encoders': nn.ModuleList([UnetrBasicBlock(in_channels=i, out_channels=o, stride=1, **kwargs)
                                   for i, o in zip((1, 48, 96, 192, 384), widths)]),
        'decoders': nn.ModuleList([UnetrUpBlock(in_channels=widths[level + 1], out_channels=widths[level],
                                                upsample_kernel_size=IN_PLANE_STRIDES[level + 1], **kwargs)
                                   for level in range(4)]),
        'last': UnetrBasicBlock(in_channels=48, out_channels=48, stride=1, **kwargs),
        'out': UnetOutBlock(spatial_dims=3, in_channels=48, out_channels=3),
    })

    def residual(monai_block, our_block):
        monai_block.conv1.conv.weight.data.copy_(our_block.conv1.conv.weight.data)
        monai_block.conv2.conv.weight.data.copy_(our_block.conv2.conv.weight.data)
        if hasattr(monai_block, 'conv3'):
            monai_block.conv3.conv.weight.data.copy_(our_block.skip[0].conv.weight.data)

    decoder = ours.decoder
    for level in range(5):
        residual(reference['encoders'][level].layer, decoder.skip_blocks[level])
    for level in range(4):
        reference['decoders'][level].transp_conv.conv.weight.data.copy_(decoder.upsamplers[level].weight.data)
        residual(reference['decoders'][level].conv_block, decoder.stages[level])
    residual(reference['last'].layer, decoder.last_block)
    reference['out'].conv.conv.load_state_dict(decoder.seg_layers.state_dict())
    return reference


def test_decoder_equals_the_references_monai_blocks():
    """Same weights, same output as the authors' decoder (MONAI's UNETR blocks: residual conv blocks with
    instance norm, transposed convs, upsampled features concatenated before the skip)."""
    torch.manual_seed(0)
    ours = uxnet_from_plan(1, 3, IN_PLANE_STRIDES, [[3, 3, 3]] * 5)
    reference = _monai_decoder_with_our_weights(ours)
    assert parameter_count(reference) == parameter_count(ours.decoder)
    x = torch.randn(1, 1, 2, 32, 32)
    with torch.no_grad():
        stage_outputs = ours.encoder(x)
        skips = [block(f) for block, f in zip(reference['encoders'], [x, *stage_outputs])]
        y = skips[4]
        for level in reversed(range(4)):
            y = reference['decoders'][level](y, skips[level])
        expected = reference['out'](reference['last'](y))
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('plan_strides,plan_kernels,expected', [
    (ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, ISOTROPIC_STRIDES[:5]),
    (THICK_SLICE_STRIDES, THICK_SLICE_KERNELS, THICK_SLICE_STRIDES[:5]),
    (PLANS_2D_STRIDES, PLANS_2D_KERNELS, PLANS_2D_STRIDES[:5]),
    (TINY_STRIDES[:3], TINY_KERNELS[:3], TINY_STRIDES[:3] + [[1, 1, 1]] * 2),  # continued without downsampling
], ids=['isotropic', 'anisotropic', '2d', 'shallow'])
def test_levels_are_those_the_factory_builds(plan_strides, plan_kernels, expected):
    """uxnet_levels, which the trainer's patch check reads, states the built topology."""
    levels = uxnet_levels(plan_strides, plan_kernels)
    network = on_meta(uxnet_from_plan, 1, 2, plan_strides, plan_kernels)
    assert [list(s) for s in levels.strides] == expected
    assert list(levels.strides) == network.strides
    assert [tuple(k) for k in levels.kernels(3)] == network.kernel_sizes
    assert [tuple(k) for k in levels.kernels(7)[1:]] == network.large_kernel_sizes


@pytest.mark.parametrize('strides,message', [
    ([[2, 2, 2]] + [[2, 2, 2]] * 4, 'cannot be strided'),
    ([[1, 1, 1]] + [[2, 2, 2]] * 3, 'strides has 4 entries'),
])
def test_invalid_topology_is_refused(strides, message):
    with pytest.raises(ValueError, match=message):
        UXNet(1, 2, nn.Conv3d, strides, [[7, 7, 7]] * 4, [[3, 3, 3]] * 5, **PAPER)


def test_even_kernels_are_refused():
    with pytest.raises(ValueError, match='odd'):
        UXNet(1, 2, nn.Conv3d, ISOTROPIC_STRIDES[:5], [[6, 6, 6]] * 4, [[3, 3, 3]] * 5, **PAPER)


# ---- trainer, in-process ----

def test_trainer_has_one_output_and_no_deep_supervision(make_trainer):
    trainer = make_trainer(nnUNetTrainerUXNet)
    trainer.initialize()
    assert trainer._get_deep_supervision_scales() is None
    assert not isinstance(trainer.loss, DeepSupervisionWrapper)
    assert ('3D UX-Net: strides [(1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2), (1, 1, 1)], large kernels '
            '[(7, 7, 7), (7, 7, 7), (7, 7, 7), (7, 7, 7)], decoder kernels [(1, 3, 3), (3, 3, 3)') \
        in training_log(trainer.output_folder)
    trainer.set_deep_supervision_enabled(True)  # nnU-Net calls this after validation; one output stays one
    patch = trainer.configuration_manager.patch_size
    with torch.no_grad():
        output = trainer.network(torch.randn(1, 1, *patch))
    assert isinstance(output, torch.Tensor) and output.shape == (1, 4, *patch)


def test_checkpoint_loads_strictly_into_the_inference_network(make_trainer):
    trainer = make_trainer(nnUNetTrainerUXNet)
    trainer.initialize()
    arguments = (trainer.plans_manager, trainer.configuration_manager, 1, 4)
    rebuilt = nnUNetTrainerUXNet.build_network_architecture(*arguments, enable_deep_supervision=False)
    rebuilt.load_state_dict(trainer.network.state_dict(), strict=True)
    rebuilt.to(memory_format=torch.channels_last_3d)  # as the CPU trainer keeps it
    x = torch.randn(1, 1, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trainer.network(x))
    with pytest.raises(ValueError, match='no deep supervision'):
        nnUNetTrainerUXNet.build_network_architecture(*arguments, enable_deep_supervision=True)


def test_optimiser_and_schedule(make_trainer):
    trainer = make_trainer(nnUNetTrainerUXNet)
    trainer.initialize()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    group = trainer.optimizer.param_groups[0]
    assert (group['lr'], group['weight_decay'], group['eps']) == (2.5e-3, 1e-3, 1e-4)
    # the paper's total decoupled weight decay, sum of lr x weight decay over its 40,000 iterations at 1e-4 and
    # 0.08, is kept over nnU-Net's 1000 x 250 iterations with poly decay (mean factor 1 / 1.9)
    total = group['lr'] * group['weight_decay'] * trainer.num_epochs * trainer.num_iterations_per_epoch / 1.9
    assert total == pytest.approx(1e-4 * 0.08 * 40_000, rel=0.05)
    trainer.lr_scheduler.step(500)
    assert group['lr'] == pytest.approx(2.5e-3 * 0.5 ** 0.9)


def test_two_d_configuration_builds_the_two_d_network(workspace):
    plans_manager = PlansManager(json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text()))
    configuration = plans_manager.get_configuration('2d')
    network = nnUNetTrainerUXNet.build_network_architecture(plans_manager, configuration, 1, 4, False)
    assert isinstance(network.encoder.stages[3][1].depthwise, nn.Conv2d)
    output = network(torch.randn(1, 1, *configuration.patch_size))
    assert output.shape == (1, 4, *configuration.patch_size)
    output.square().mean().backward()
    assert all(p.grad is not None for p in network.parameters())


def test_incompatible_patch_size_is_refused_with_what_each_axis_needs(make_trainer, workspace):
    trainer = make_trainer(nnUNetTrainerUXNet, {'patch_size': [13, 32, 30]})
    with pytest.raises(ValueError, match=r'axis 0 \(13\) must be divisible by 2, axis 2 \(30\) must be divisible '
                                         r'by 8 .*such as \[12, 32, 32\]: `nnunet-plugins plans DATASET --preset uxnet '
                                         r'--patch 12 32 32 --spacing 3\.033 1\.18 1\.189`'):
        trainer.initialize()
    # on an isotropic plan every axis needs the reference's 16
    architecture = json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text())[
        'configurations'][CONFIGURATION]['architecture']
    architecture['arch_kwargs'].update(strides=ISOTROPIC_STRIDES[:5], kernel_sizes=ISOTROPIC_KERNELS[:5])
    trainer = make_trainer(nnUNetTrainerUXNet, {'patch_size': [24, 32, 32], 'architecture': architecture})
    with pytest.raises(ValueError, match=r'axis 0 \(24\) must be divisible by 16 .*such as \[32, 32, 32\]'):
        trainer.initialize()
    # divisible, but the 1/16 level would be one voxel
    trainer = make_trainer(nnUNetTrainerUXNet, {'patch_size': [16, 16, 16], 'architecture': architecture})
    with pytest.raises(ValueError, match=r'would be \[1, 1, 1\], a single voxel.*such as \[32, 16, 16\]'):
        trainer.initialize()


def test_every_parameter_learns_and_a_batch_of_synthetic_cases_is_fitted(make_trainer):
    """Every parameter gets a finite gradient, and, a cheap learning check, on one batch of synthetic training
    patches the Dice of every label rises from near zero within six steps, the organ's and vessel's above 0.9
    (held-out Dice of longer runs, per optimiser setting: README)."""
    torch.manual_seed(0)
    np.random.seed(0)  # nnU-Net's data loader draws cases and crops with numpy
    patch = [8, 16, 16]
    trainer = make_trainer(nnUNetTrainerUXNet, {'patch_size': patch})
    trainer.initialize()
    training_cases, _ = trainer.get_tr_and_val_datasets()
    loader = nnUNetDataLoader(training_cases, 2, patch, patch, trainer.label_manager,
                              oversample_foreground_percent=1.0)
    batch = loader.generate_train_batch()
    batch['target'] = batch['target'].float()

    def dice_per_label() -> np.ndarray:
        counts = trainer.validation_step(batch)  # nnU-Net's online evaluation: hard tp, fp, fn per label
        return 2 * counts['tp_hard'] / np.maximum(2 * counts['tp_hard'] + counts['fp_hard'] + counts['fn_hard'], 1)

    before = dice_per_label()
    assert np.isfinite(trainer.train_step(batch)['loss'])
    assert [name for name, p in trainer.network.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in trainer.network.parameters())
    for _ in range(5):
        trainer.train_step(batch)
    after = dice_per_label()
    print(f'Dice organ, vessel, lesion on the batch: {before.round(3)} before, {after.round(3)} after 6 steps')
    assert after[0] > 0.9 and after[1] > 0.9  # organ and vessel (measured: 0.96, 0.98)
    assert np.all(after > before + 0.15)  # the small lesion too (measured: 0.01 -> 0.25)


# ---- as nnUNetv2_train and nnUNetv2_predict run it, in this process ----

def test_trains_on_the_datasets_batches_and_nnunets_predictor_segments_with_its_checkpoint(workspace, make_trainer):
    """The trainer as nnUNetv2_train builds it, a step on the tiny dataset's augmented batches, its checkpoint;
    then nnU-Net's predictor, set up from the fold as nnUNetv2_predict sets it up (trainer found by name on
    nnUNet_extTrainer), segments a held-out case. The epoch loop, closing validation and ``--c`` are the trainer
    base's, shared by every family: they run through the stock CLI with MedNeXt (test_stock_cli.py, test_upkern.py)."""
    # one step: a UX-Net step costs 11x the multiply-adds of MedNeXt-S's
    fold = train_in_process(make_trainer(nnUNetTrainerUXNet), steps=1)
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False, mmap=True)
    assert checkpoint['trainer_name'] == UXNET and checkpoint['init_args']['configuration'] == CONFIGURATION
    assert '3D UX-Net: strides' in training_log(fold)
    assert_segments_a_heldout_case(workspace.raw, fold.parent)
