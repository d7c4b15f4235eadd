"""Swin UNETR: MONAI's network on isotropic plans, the plans' patch embedding on the others, the pre-trained encoder
converter; its trainer in-process on the tiny dataset, on a configuration of the swinunetr preset (see conftest.py)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR as MONAISwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformerBlock
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_plugins import settings
from nnunet_plugins.commands.plans import add_preset
from nnunet_plugins.weights import CheckpointError
from nnunet_plugins.macs import forward_macs
from nnunet_plugins.networks.swinunetr import (
    VARIANTS, PretrainedEncoderError, SwinUNETR, load_pretrained_encoder, swinunetr_from_plan, swinunetr_levels)
from nnunet_plugins.networks.topology import ShallowPlanError
from nnunet_plugins.weights.swin_axes import AXES_NOTE, to_nnunet_axes
from nnunet_plugins.training.swinunetr import nnUNetTrainerSwinUNETR
from nnunet_plugins.workspace import NNUNET_FOLDERS, environment

from helpers import (CONFIGURATION, DATASET_ID, ISOTROPIC_KERNELS, ISOTROPIC_STRIDES, SMALL, SWIN_PATCH, TINY_KERNELS,
                     TINY_STRIDES, assert_segments_a_heldout_case, parameter_count, released_format, small_monai,
                     train_in_process, training_log)

SWIN = 'nnUNetTrainerSwinUNETR'
# a configuration of the swinunetr preset with SWIN_PATCH (helpers.py) on the tiny dataset
SWIN_CONFIGURATION = '3d_fullres_swinunetr_ci'
# monai.networks.nets.SwinUNETR(feature_size=48), 1 input channel, 14 classes; paper 003 Table: 62.2M
MONAI_PARAMETERS = 62_187_296
MONAI_MACS_96 = 318_524_732_736  # one forward pass of a 96^3 patch, counted on MONAI's network and on ours
# where MONAI's SwinUNETR keeps each of our modules (ours: MONAI's)
MONAI_NAMES = {'encoder.': 'swinViT.', 'decoder.skip_blocks.0.': 'encoder1.', 'decoder.skip_blocks.1.': 'encoder2.',
               'decoder.skip_blocks.2.': 'encoder3.', 'decoder.skip_blocks.3.': 'encoder4.',
               'decoder.bottleneck.': 'encoder10.', 'decoder.stages.4.': 'decoder5.',
               'decoder.stages.3.': 'decoder4.', 'decoder.stages.2.': 'decoder3.',
               'decoder.stages.1.': 'decoder2.', 'decoder.stages.0.': 'decoder1.', 'decoder.seg_layers.': 'out.'}

THICK_SLICE_STRIDES = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
THICK_SLICE_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
PLANS_2D_STRIDES = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]]
PLANS_2D_KERNELS = [[3, 3]] * 6
PAPER = {key: value for key, value in dataclasses.asdict(VARIANTS['paper']).items()
         if key not in ('patch_size', 'decoder_kernel')}


def on_meta(build, *args) -> nn.Module:
    with torch.device('meta'):
        return build(*args)


def monai_state_dict_as_ours(state: dict) -> dict:
    converted = {}
    for key, value in state.items():
        ours, theirs = next((o, t) for o, t in MONAI_NAMES.items() if key.startswith(t))
        converted[ours + key[len(theirs):]] = value
    return converted


# ---- network ----

def test_parameters_macs_and_outputs_equal_monais_on_isotropic_plans():
    torch.manual_seed(0)
    monai = MONAISwinUNETR(in_channels=1, out_channels=14, feature_size=48).eval()
    ours = swinunetr_from_plan(1, 14, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS).eval()
    assert parameter_count(ours) == parameter_count(monai) == MONAI_PARAMETERS
    assert forward_macs(ours, (1, 1, 96, 96, 96)) == forward_macs(monai, (1, 1, 96, 96, 96)) == MONAI_MACS_96
    ours.load_state_dict(monai_state_dict_as_ours(monai.state_dict()), strict=True)
    x = torch.randn(1, 1, 32, 32, 64)  # the smallest isotropic patch with a bottleneck of two voxels
    with torch.no_grad():
        difference = (ours(x) - monai(x)).abs().max().item()
    print(f'max |ours - MONAI| = {difference:.3g}')
    assert difference <= 1e-5


@pytest.mark.parametrize('plan_strides,plan_kernels,patch,embedding,kernel_0,kernel_1', [
    (ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, (32, 32, 64), (2, 2, 2), (3, 3, 3), (3, 3, 3)),
    (TINY_STRIDES, TINY_KERNELS, (16, 32, 64), (1, 2, 2), (1, 3, 3), (3, 3, 3)),
    (THICK_SLICE_STRIDES, THICK_SLICE_KERNELS, (16, 64, 64), (1, 2, 2), (1, 3, 3), (1, 3, 3)),
    (PLANS_2D_STRIDES, PLANS_2D_KERNELS, (64, 32), (2, 2), (3, 3), (3, 3)),
], ids=['isotropic', 'tiny', 'thick-slice', '2d'])
def test_patch_embedding_and_kernels_follow_the_plan(plan_strides, plan_kernels, patch, embedding, kernel_0,
                                                     kernel_1):
    network = on_meta(swinunetr_from_plan, 2, 4, plan_strides, plan_kernels)
    dims = len(patch)
    assert network.strides == [(1,) * dims, embedding] + [(2,) * dims] * 4  # MONAI's patch merging: 2 on every axis
    projection = network.encoder.patch_embed.proj
    assert isinstance(projection, nn.Conv2d if dims == 2 else nn.Conv3d)
    assert projection.kernel_size == projection.stride == embedding
    assert network.decoder.skip_blocks[0].layer.conv1.conv.kernel_size == kernel_0
    assert network.decoder.stages[0].transp_conv.conv.stride == embedding  # mirrors the embedding
    for level in range(1, 6):
        assert network.kernel_sizes[level] == kernel_1
    assert network.decoder.bottleneck.layer.conv2.conv.kernel_size == kernel_1

    x = torch.empty(2, 2, *patch, device='meta')
    size = np.array(patch)
    for level, (output, channels) in enumerate(zip(network.encoder(x), (48, 96, 192, 384, 768)), start=1):
        size = size // np.array(network.strides[level])
        assert output.shape == (2, channels, *size)
    assert network(x).shape == (2, 4, *patch)


def test_windows_are_clipped_per_axis_where_the_token_grid_is_short():
    network = on_meta(swinunetr_from_plan, 1, 2, THICK_SLICE_STRIDES, THICK_SLICE_KERNELS)
    # tokens per stage: 16x32x32, 8x16x16, 4x8x8, 2x4x4; a window no longer than the grid is not shifted there
    assert network.windows([16, 64, 64]) == [((7, 7, 7), (3, 3, 3)), ((7, 7, 7), (3, 3, 3)),
                                             ((4, 7, 7), (0, 3, 3)), ((2, 4, 4), (0, 0, 0))]
    isotropic = on_meta(swinunetr_from_plan, 1, 2, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS)
    assert isotropic.windows([96, 96, 96])[3] == ((6, 6, 6), (0, 0, 0))  # the paper's last stage, as MONAI runs it


@pytest.mark.parametrize('plan_strides,plan_kernels,embedding', [
    (ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, [2, 2, 2]),
    (THICK_SLICE_STRIDES, THICK_SLICE_KERNELS, [1, 2, 2]),
    (PLANS_2D_STRIDES, PLANS_2D_KERNELS, [2, 2]),
    (THICK_SLICE_STRIDES[:2], THICK_SLICE_KERNELS[:2], [1, 2, 2]),  # two stages are enough: merging halves the rest
], ids=['isotropic', 'anisotropic', '2d', 'shallow'])
def test_levels_are_those_the_factory_builds(plan_strides, plan_kernels, embedding):
    """swinunetr_levels, which the trainer's patch check reads, states the built topology."""
    levels = swinunetr_levels(plan_strides, plan_kernels)
    network = on_meta(swinunetr_from_plan, 1, 2, plan_strides, plan_kernels)
    dims = len(embedding)
    assert [list(s) for s in levels.strides] == [[1] * dims, embedding] + [[2] * dims] * 4
    assert list(levels.strides) == network.strides
    assert [tuple(k) for k in levels.kernels(3)] == network.kernel_sizes


def test_a_plan_without_downsampling_is_too_shallow():
    with pytest.raises(ShallowPlanError, match=r'the plans configuration has none \(strides \[\[1, 1, 1\]\]\)'):
        swinunetr_from_plan(1, 2, [[1, 1, 1]], [[3, 3, 3]])


@pytest.mark.parametrize('strides,kernels,message', [
    ([[2, 2, 2]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, 'cannot be strided'),
    ([[1, 1, 1], [2, 2, 2], [1, 2, 2]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 6, 'halves every axis'),
    ([[1, 1, 1]] + [[2, 2, 2]] * 4, [[3, 3, 3]] * 5, 'strides has 5 entries'),
    ([[1, 1, 1]] + [[2, 2, 2]] * 5, [[4, 3, 3]] * 6, 'odd'),
], ids=['strided-input', 'anisotropic-merging', 'five-levels', 'even-kernel'])
def test_invalid_topology_is_refused(strides, kernels, message):
    with pytest.raises(ValueError, match=message):
        SwinUNETR(1, 2, strides, kernels, **PAPER)


def test_heads_must_divide_the_widths():
    with pytest.raises(ValueError, match=r'widths \[36, 72, 144, 288\] must be multiples of their num_heads'):
        SwinUNETR(1, 2, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, **{**PAPER, 'feature_size': 36, 'num_heads': (8,) * 4})


# ---- the authors' pre-trained encoder ----

def test_pretrained_encoder_loads_as_monais_load_from_does_then_in_nnunets_axis_order(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / 'model_swinvit.pt'
    torch.save(released_format(small_monai()), path)
    monai = small_monai()
    monai.load_from(torch.load(path, weights_only=True))
    ours = swinunetr_from_plan(1, 14, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, SMALL)
    decoder_before = {k: v.clone() for k, v in ours.decoder.state_dict().items()}

    report = load_pretrained_encoder(ours, path)
    encoder_tensors = len(ours.encoder.state_dict())
    # the patch embedding, 8 Swin blocks and 4 patch mergings: the 126 tensors MONAI's load_from copies
    assert len(report.loaded) == encoder_tensors == 2 + 8 * 14 + 4 * 3
    assert report.missing == () and report.unused == ('module.rotation_head.weight',)
    assert report.summary() == (f'pre-trained encoder from {path}: {encoder_tensors} of {encoder_tensors} encoder '
                                f'tensors loaded, 1 tensors of the file unused\n{AXES_NOTE}')
    # MONAI's load_from copies them as they are; converted (tests/test_swin_axes.py), they are the same tensors
    expected = to_nnunet_axes(monai_state_dict_as_ours(monai.state_dict()))
    for name, value in ours.encoder.state_dict().items():
        assert torch.equal(value, expected['encoder.' + name]), name
    for name, value in ours.decoder.state_dict().items():
        assert torch.equal(value, decoder_before[name]), name  # the decoder is not the encoder file's business


def test_pretrained_encoder_that_matches_nothing_or_does_not_fit_is_refused(tmp_path):
    ours = swinunetr_from_plan(1, 14, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, SMALL)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    # a whole network's weights (e.g. MONAI's fine-tuned SwinUNETR) match no encoder key: never a silent no-op
    whole = {'state_dict': small_monai().state_dict()}
    with pytest.raises(PretrainedEncoderError, match=r'none of the 159 tensors of the given state dict is a Swin UNETR '
                                                     r'encoder tensor .*swinViT\.patch_embed\.proj\.weight'):
        load_pretrained_encoder(ours, whole)
    with pytest.raises(PretrainedEncoderError, match=r'has no "state_dict" entry \(found \[\'model\'\]\)'):
        load_pretrained_encoder(ours, {'model': {}})
    # an isotropic 2x2x2 embedding does not fit a network that embeds 1x2x2 patches
    thick = swinunetr_from_plan(1, 14, THICK_SLICE_STRIDES, THICK_SLICE_KERNELS, SMALL)
    released = released_format(small_monai())
    with pytest.raises(PretrainedEncoderError, match=r'1 tensors of the given state dict do not fit .*'
                                                     r'module\.patch_embed\.proj\.weight \(12, 1, 2, 2, 2\) vs ours '
                                                     r'\(12, 1, 1, 2, 2\)'):
        load_pretrained_encoder(thick, released)
    empty = tmp_path / 'empty.pt'
    empty.write_bytes(b'')
    with pytest.raises(CheckpointError, match=f'{empty} cannot be read as a checkpoint: it is empty'):
        load_pretrained_encoder(ours, empty)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())  # nothing half-loaded


# ---- trainer, in-process ----

def test_trainer_has_one_output_logs_its_windows_every_parameter_learns_and_reloads_strictly(make_trainer):
    trainer = make_trainer(nnUNetTrainerSwinUNETR, {'patch_size': SWIN_PATCH})
    trainer.initialize()
    assert trainer._get_deep_supervision_scales() is None
    assert not isinstance(trainer.loss, DeepSupervisionWrapper)
    log = training_log(trainer.output_folder)
    assert ('Swin UNETR: strides [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)], decoder kernels '
            '[(1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)], window (7, 7, 7), gradient '
            'checkpointing off, no deep supervision, 62,010,646 parameters') in log  # 1x3x3 at level 0, 4 outputs
    assert ('Swin UNETR windows (shifts) per stage on patch [16, 32, 64]: [7, 7, 7] ([3, 3, 3]), [7, 7, 7] '
            '([3, 3, 3]), [4, 4, 7] ([0, 0, 3]), [2, 2, 4] ([0, 0, 0])') in log
    trainer.set_deep_supervision_enabled(True)  # nnU-Net calls this after validation; one output stays one
    torch.manual_seed(0)
    batch = {'data': torch.randn(2, 1, *SWIN_PATCH), 'target': torch.randint(0, 4, (2, 1, *SWIN_PATCH)).float()}
    assert np.isfinite(trainer.train_step(batch)['loss'])
    assert [name for name, p in trainer.network.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in trainer.network.parameters())

    # nnUNetv2_predict builds the network without deep supervision and loads the checkpoint strictly
    arguments = (trainer.plans_manager, trainer.configuration_manager, 1, 4)
    rebuilt = nnUNetTrainerSwinUNETR.build_network_architecture(*arguments, enable_deep_supervision=False)
    rebuilt.load_state_dict(trainer.network.state_dict(), strict=True)
    with pytest.raises(ValueError, match='no deep supervision'):
        nnUNetTrainerSwinUNETR.build_network_architecture(*arguments, enable_deep_supervision=True)


def test_optimiser_and_schedule(make_trainer):
    trainer = make_trainer(nnUNetTrainerSwinUNETR, {'patch_size': SWIN_PATCH})
    trainer.initialize()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    group = trainer.optimizer.param_groups[0]
    # the MedNeXt authors' Swin UNETR setting in nnU-Net; eps 1e-4 for fp16 autocast
    assert (group['lr'], group['weight_decay'], group['eps']) == (2.5e-3, 3e-5, 1e-4)
    trainer.lr_scheduler.step(500)
    assert group['lr'] == pytest.approx(2.5e-3 * 0.5 ** 0.9)


@pytest.mark.parametrize('value,expected', [(None, False), ('1', True), ('0', False)])
def test_gradient_checkpointing_follows_the_variable(make_trainer, monkeypatch, value, expected):
    """The factory builds the variant's default whatever the environment says; the trainer gives the network it
    trains the variable's value (in initialize(), before the first step)."""
    if value is not None:
        monkeypatch.setenv(settings.CHECKPOINTING, value)
    trainer = make_trainer(nnUNetTrainerSwinUNETR, {'patch_size': SWIN_PATCH})
    network = on_meta(nnUNetTrainerSwinUNETR.network_from_plan, trainer.configuration_manager, 1, 4, False)
    assert network.gradient_checkpointing is False
    trainer.switch_gradient_checkpointing(network)
    assert network.gradient_checkpointing is expected
    assert {block.use_checkpoint for block in network.encoder.modules() if isinstance(block, SwinTransformerBlock)} \
        == {expected}


def test_two_d_configuration_builds_the_two_d_network(workspace):
    plans = json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text())
    plans['configurations']['2d']['patch_size'] = [32, 64]  # nnU-Net's 32 x 32 would leave one bottleneck voxel
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration('2d')
    network = nnUNetTrainerSwinUNETR.build_network_architecture(plans_manager, configuration, 1, 4, False)
    assert network.strides == [(1, 1), (2, 2), (2, 2), (2, 2), (2, 2), (2, 2)]
    assert isinstance(network.decoder.seg_layers.conv.conv, nn.Conv2d)
    output = network(torch.randn(2, 1, 32, 64))
    assert output.shape == (2, 4, 32, 64)
    output.square().mean().backward()
    assert all(p.grad is not None for p in network.parameters())


@pytest.mark.parametrize('patch,message', [
    ([14, 32, 32], r'axis 0 \(14\) must be divisible by 16 \(the product .*such as \[16, 64, 32\]: `nnunet-plugins '
                   r'plans DATASET --preset swinunetr --patch 16 64 32 --spacing 3\.033 1\.18 1\.189`'),
    ([16, 32, 32], r'bottleneck would be \[1, 1, 1\], a single voxel, on which instance norm is undefined.*such as '
                   r'\[16, 64, 32\]'),
], ids=['not-divisible', 'one-voxel-bottleneck'])
def test_incompatible_patch_size_is_refused_with_what_each_axis_needs(make_trainer, patch, message):
    trainer = make_trainer(nnUNetTrainerSwinUNETR, {'patch_size': patch})
    with pytest.raises(ValueError, match=message):
        trainer.initialize()


# ---- the swinunetr preset through the console script and nnU-Net's preprocessing, then the trainer on it ----

def swin_configuration(workspace) -> str:
    """A configuration that Swin UNETR takes on the tiny dataset, made as `nnunet-plugins plans --preset swinunetr`
    makes it (its ``add_preset``, in this process; the console script's own run is in test_presets.py) at the
    dataset's own spacing with :data:`SWIN_PATCH`, and preprocessed by nnUNetv2_preprocess; once per session."""
    plans = json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text())
    if SWIN_CONFIGURATION not in plans['configurations']:
        spacing = plans['configurations'][CONFIGURATION]['spacing']
        with environment({name: workspace.env[name] for name in NNUNET_FOLDERS}):
            add_preset(DATASET_ID, 'swinunetr', configuration=SWIN_CONFIGURATION, spacing=spacing,
                       patch_size=SWIN_PATCH, batch_size=2)
        workspace.run('nnUNetv2_preprocess', '-d', DATASET_ID, '-c', SWIN_CONFIGURATION, '-np', 1)
    return SWIN_CONFIGURATION


@pytest.mark.e2e
def test_trains_on_the_presets_preprocessed_batches_and_nnunets_predictor_segments(workspace, make_trainer):
    """The 3d preset's configuration, written as `nnunet-plugins plans --preset swinunetr` writes it and
    preprocessed by nnUNetv2_preprocess (a subprocess), feeds the trainer as nnUNetv2_train builds it on that configuration: a step
    on its augmented batches, then its checkpoint segments a held-out case through nnU-Net's predictor, set up as
    nnUNetv2_predict sets it up. The epoch loop, closing validation and ``--c`` are the trainer base's, shared by
    every family: they run through the stock CLI with MedNeXt (test_stock_cli.py, test_upkern.py)."""
    configuration = swin_configuration(workspace)
    # one step: a Swin UNETR step costs about as much as UX-Net's
    fold = train_in_process(make_trainer(nnUNetTrainerSwinUNETR, name=configuration), steps=1)
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False, mmap=True)
    assert checkpoint['trainer_name'] == SWIN and checkpoint['init_args']['configuration'] == configuration
    assert 'Swin UNETR: strides [(1, 1, 1), (1, 2, 2), (2, 2, 2)' in training_log(fold)
    assert_segments_a_heldout_case(workspace.raw, fold.parent)
