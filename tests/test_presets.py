"""Paper presets (``nnunet-plugins plans``): the configurations they add, their checks, and the stock CLIs on them.

The tiny dataset is about 14 x 32 x 32 voxels at 3.0 x 1.18 x 1.19 mm. The papers' patches (128^3, 96^3,
32 x 128 x 128) are larger than its images and far too slow for a CPU, so the presets are checked at their
own values in the plans (and by building the networks on the meta device); preprocessing, training and
prediction run on configurations made with small --spacing/--patch overrides.
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_plugins import presets, synthetic
from nnunet_plugins.commands import plans as plans_command
from nnunet_plugins.commands.plans import PRESET_KEY, add_preset
from nnunet_plugins.presets import PresetError
from nnunet_plugins.registry import plugin_trainer, plugin_trainers
from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS

from helpers import (CONFIGURATION, DATASET_ID, NUM_TRAINING, read_labels, run_cli, segment, train_in_process,
                     trained_predictor)

COMMAND = str(Path(sys.executable).parent / 'nnunet-plugins')
MEDNEXT_TRAINERS = {f'nnUNetTrainerMedNeXt{v}{k}' for v in 'SBML' for k in ('', '_k5', '_k5_UpKern')}


# ---- the preset files ----

def test_presets_hold_the_papers_settings_and_name_existing_trainers():
    found = presets.load_presets()
    settings = {name: (p.configuration, p.inherits_from, p.spacing, p.patch_size, p.batch_size, set(p.trainers))
                for name, p in found.items()}
    assert settings == {
        'mednext': ('3d_fullres_mednext', '3d_fullres', (1.0, 1.0, 1.0), (128, 128, 128), 2, MEDNEXT_TRAINERS),
        'mednext-2d': ('2d_mednext', '2d', (1.0, 1.0), (512, 512), 14, MEDNEXT_TRAINERS),
        'uxnet': ('3d_fullres_uxnet', '3d_fullres', None, (96, 96, 96), 2, {'nnUNetTrainerUXNet'}),
        'utnetv2-bcv': ('3d_fullres_utnetv2_bcv', '3d_fullres', (3.0, 0.75, 0.75), (32, 128, 128), 3,
                        {'nnUNetTrainerUTNetV2'}),
        # the authors' 1.5 x 1.5 x 2.0 mm in (x, y, z), z first here; their batch 1 x 4 crops per image
        'swinunetr': ('3d_fullres_swinunetr', '3d_fullres', (2.0, 1.5, 1.5), (96, 96, 96), 4,
                      {'nnUNetTrainerSwinUNETR'}),
    }
    assert found['mednext'].trainers[0] == 'nnUNetTrainerMedNeXtL'  # the one the printed command suggests
    assert 'Sec. 3.1' in found['mednext'].source and 'Table 4' in found['uxnet'].source
    assert 'BCV' in found['utnetv2-bcv'].source
    assert 'SwinUNETR/BTCV' in found['swinunetr'].source and 'num_samples=4' in found['swinunetr'].source
    registered = {trainer.__name__ for trainer in plugin_trainers()}
    for preset in found.values():
        assert set(preset.trainers) <= registered, f'{preset.name} names trainers that are not registered'


def test_list_shows_every_preset_with_its_source(capsys):
    result = run_cli(capsys, 'plans', '--list')
    assert result.returncode == 0, result.stderr
    for preset in presets.load_presets().values():
        assert f'{preset.name}: adds {preset.configuration} (inherits_from {preset.inherits_from})' in result.stdout
        assert f'source: {preset.source}' in result.stdout
    assert 'spacing 1 x 1 x 1 mm, patch 128 x 128 x 128, batch 2' in result.stdout
    assert 'spacing of 3d_fullres, patch 96 x 96 x 96, batch 2' in result.stdout
    assert 'spacing 2 x 1.5 x 1.5 mm, patch 96 x 96 x 96, batch 4' in result.stdout


def test_a_broken_preset_file_is_reported(tmp_path):
    (tmp_path / 'broken.json').write_text(json.dumps({'configuration': '3d_fullres_x', 'patch': [1]}))
    with pytest.raises(PresetError, match='broken.json: missing description, source, inherits_from, spacing, '
                                          'patch_size, batch_size, trainers; unknown patch'):
        presets.load_presets(tmp_path)


# ---- the configurations, in process, on a copy of the tiny dataset's plans ----

@pytest.fixture
def nnunet_env(workspace, monkeypatch):
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(variable, workspace.env[variable])
    return workspace


@pytest.fixture
def plans_copy(nnunet_env):
    """A plans file ``nnUNetPlansPresetTest`` with the planner's configurations of the tiny dataset's plans."""
    plans = json.loads((nnunet_env.preprocessed / 'nnUNetPlans.json').read_text())
    plans['configurations'] = {name: config for name, config in plans['configurations'].items()
                               if PRESET_KEY not in config}
    path = nnunet_env.preprocessed / 'nnUNetPlansPresetTest.json'
    path.write_text(json.dumps(plans, indent=4))
    yield path
    path.unlink()


def _tiny_3d_spacing(workspace) -> list[float]:
    return json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text())['configurations']['3d_fullres'][
        'spacing']


def _build_on_meta(plans: dict, name: str, trainer=None) -> torch.Tensor:
    """Output of the configuration's stock network (or ``trainer``'s), built and run on the meta device, no DS."""
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(name)
    with torch.device('meta'):
        if trainer is None:
            network = get_network_from_plans(
                configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                configuration.network_arch_init_kwargs_req_import, 1, 4, allow_init=False, deep_supervision=False)
        else:
            network = trainer.build_network_architecture(plans_manager, configuration, 1, 4, False)
        return network(torch.empty(1, 1, *configuration.patch_size))


_3D_LISTS = dict(features_per_stage=[32, 64, 128, 256, 320, 320], n_conv_per_stage=[2] * 6,
                 n_conv_per_stage_decoder=[2] * 5)
EXPECTED = {  # nnU-Net's get_pool_and_conv_props worked by hand for each preset on the tiny dataset
    'mednext': dict(spacing=[1.0, 1.0, 1.0], patch_size=[128, 128, 128], batch_size=2,
                    strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, kernel_sizes=[[3, 3, 3]] * 6, **_3D_LISTS),
    'mednext-2d': dict(spacing=[1.0, 1.0], patch_size=[512, 512], batch_size=14,
                       strides=[[1, 1]] + [[2, 2]] * 7, kernel_sizes=[[3, 3]] * 8,
                       features_per_stage=[32, 64, 128, 256, 512, 512, 512, 512], n_conv_per_stage=[2] * 8,
                       n_conv_per_stage_decoder=[2] * 7),
    # 3.0 mm along z is more than twice 1.18 mm, so the first downsampling is in-plane only and the
    # first kernel flat; then z catches up, and the last stage pools z alone (96 -> 6 on every axis)
    'uxnet': dict(spacing=None,  # the paper gives none: 3d_fullres's
                  patch_size=[96, 96, 96], batch_size=2,
                  strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 1, 1]],
                  kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 5, **_3D_LISTS),
    # two in-plane downsamplings bring 0.75 mm to 3.0 mm, then isotropic ones: the paper's
    # [1,2,2],[1,2,2],[2,2,2],[2,2,2] (UTNetV2 uses these four) and one more for nnU-Net's U-Net
    'utnetv2-bcv': dict(spacing=[3.0, 0.75, 0.75], patch_size=[32, 128, 128], batch_size=3,
                        strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                        kernel_sizes=[[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 4, **_3D_LISTS),
    # 2.0 mm is less than twice 1.5 mm: every axis is downsampled from the first stage (Swin UNETR's 2x2x2 patch
    # embedding), four times, down to 6 voxels per axis
    'swinunetr': dict(spacing=[2.0, 1.5, 1.5], patch_size=[96, 96, 96], batch_size=4,
                      strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, kernel_sizes=[[3, 3, 3]] * 5,
                      features_per_stage=[32, 64, 128, 256, 320], n_conv_per_stage=[2] * 5,
                      n_conv_per_stage_decoder=[2] * 4),
}


@pytest.mark.parametrize('preset_name', list(EXPECTED))
def test_preset_adds_its_configuration_with_nnunet_topology(nnunet_env, plans_copy, preset_name):
    before = json.loads(plans_copy.read_text())
    added = add_preset(DATASET_ID, preset_name, plans_copy.stem)
    preset = added.preset
    plans = json.loads(plans_copy.read_text())
    assert plans['configurations'] == {**before['configurations'], preset.configuration: added.configuration}
    assert {k: v for k, v in plans.items() if k != 'configurations'} == \
        {k: v for k, v in before.items() if k != 'configurations'}

    config = plans['configurations'][preset.configuration]
    expected = dict(EXPECTED[preset_name])
    expected['spacing'] = expected['spacing'] or _tiny_3d_spacing(nnunet_env)
    base_kwargs = before['configurations'][preset.inherits_from]['architecture']['arch_kwargs']
    assert config['inherits_from'] == preset.inherits_from and config[PRESET_KEY] == preset_name
    assert config['data_identifier'] == f'nnUNetPlansPresetTest_{preset.configuration}'
    assert {k: config[k] for k in ('spacing', 'patch_size', 'batch_size')} == \
        {k: expected[k] for k in ('spacing', 'patch_size', 'batch_size')}
    arch_kwargs = config['architecture']['arch_kwargs']
    assert config['architecture']['network_class_name'] == \
        before['configurations'][preset.inherits_from]['architecture']['network_class_name']
    topology_keys = ('strides', 'kernel_sizes', 'features_per_stage', 'n_conv_per_stage', 'n_conv_per_stage_decoder')
    assert {k: arch_kwargs[k] for k in topology_keys} == {k: expected[k] for k in topology_keys}
    assert arch_kwargs['n_stages'] == len(expected['strides'])
    # everything that does not depend on the topology stays the planner's
    assert {k: v for k, v in arch_kwargs.items() if k not in (*topology_keys, 'n_stages')} == \
        {k: v for k, v in base_kwargs.items() if k not in (*topology_keys, 'n_stages')}

    # the stock U-Net and every trainer of the preset take the configuration at the paper's full patch
    output_shape = (1, 4, *expected['patch_size'])
    assert _build_on_meta(plans, preset.configuration).shape == output_shape
    for name in preset.trainers:
        assert _build_on_meta(plans, preset.configuration, plugin_trainer(name)).shape == output_shape, name

    text = plans_command.describe_added(added)
    assert f'nnUNetv2_preprocess -d {DATASET_ID} -c {preset.configuration} -plans_name nnUNetPlansPresetTest' in text
    assert (f'nnUNetv2_train {DATASET_ID} {preset.configuration} 0 -tr {preset.trainers[0]} '
            f'-p nnUNetPlansPresetTest') in text


def test_overrides_and_overwrite_replace_only_the_presets_own_configuration(nnunet_env, plans_copy):
    add_preset(DATASET_ID, 'mednext', plans_copy.stem, configuration='mine', patch_size=[64, 64, 64])
    before = json.loads(plans_copy.read_text())
    added = add_preset(DATASET_ID, 'mednext', plans_copy.stem, configuration='mine', spacing=[1.5, 1.5, 1.5],
                       batch_size=4, overwrite=True)
    after = json.loads(plans_copy.read_text())
    assert {k: added.configuration[k] for k in ('spacing', 'patch_size', 'batch_size')} == \
        {'spacing': [1.5, 1.5, 1.5], 'patch_size': [128, 128, 128], 'batch_size': 4}
    assert added.configuration['architecture']['arch_kwargs']['strides'] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert {k: v for k, v in after['configurations'].items() if k != 'mine'} == \
        {k: v for k, v in before['configurations'].items() if k != 'mine'}


ERROR_CASES = {  # request (on top of preset mednext and the copied plans) -> part of the message
    'unknown preset': (dict(preset_name='nope'),
                       "unknown preset 'nope'; the presets are mednext, mednext-2d, swinunetr, utnetv2-bcv, uxnet"),
    'missing plans file': (dict(plans_identifier='nnUNetPlansMissing'), 'nnUNetPlansMissing.json. Plan the dataset'),
    'patch nnU-Net would pad': (dict(patch_size=[30, 32, 32]),
                                'axis 0 (30) must be a multiple of 8. Use e.g. --patch 32 32 32'),
    'patch without downsampling': (dict(patch_size=[4, 4, 4]), 'too small for any downsampling'),
    # nnU-Net plans 3 stages for it, UTNetV2 needs at least 4
    'patch a trainer cannot take': (dict(preset_name='utnetv2-bcv', patch_size=[8, 16, 16]), 'nnUNetTrainerUTNetV2'),
    'batch of one': (dict(batch_size=1), 'batch size 1 is too small'),
    'spacing with two axes': (dict(spacing=[1.0, 1.0]), 'spacing [1.0, 1.0] has 2 axes, but 3d_fullres is 3d'),
    'existing configuration': (dict(configuration='3d_fullres'),
                               "already have a configuration '3d_fullres'; pass --overwrite"),
    'planner configuration with overwrite': (dict(configuration='3d_fullres', overwrite=True),
                                             "'3d_fullres' was not made by a preset"),
    'name with a double underscore': (dict(configuration='a__b'), "configuration name 'a__b' is not usable"),
}


@pytest.mark.parametrize('case', list(ERROR_CASES))
def test_invalid_requests_fail_clearly_and_leave_the_plans_file_byte_identical(nnunet_env, plans_copy, case):
    arguments, message = ERROR_CASES[case]
    arguments = {'preset_name': 'mednext', 'plans_identifier': plans_copy.stem, **arguments}
    before = plans_copy.read_bytes()
    with pytest.raises(PresetError) as error:
        add_preset(DATASET_ID, **arguments)
    assert message in str(error.value)
    assert plans_copy.read_bytes() == before


def test_a_data_identifier_in_use_by_another_plans_file_is_refused(nnunet_env, plans_copy):
    other = nnunet_env.preprocessed / 'OtherPlans.json'
    other.write_text(json.dumps({'configurations': {
        'hand_made': {'data_identifier': 'nnUNetPlansPresetTest_3d_fullres_mednext'}}}))
    before = plans_copy.read_bytes()
    try:
        with pytest.raises(PresetError, match="'hand_made' of OtherPlans.json already keeps its preprocessed data in "
                                              'nnUNetPlansPresetTest_3d_fullres_mednext'):
            add_preset(DATASET_ID, 'mednext', plans_copy.stem)
    finally:
        other.unlink()
    assert plans_copy.read_bytes() == before


def test_a_configuration_others_inherit_from_is_not_overwritten(nnunet_env, plans_copy):
    add_preset(DATASET_ID, 'mednext', plans_copy.stem)
    plans = json.loads(plans_copy.read_text())
    plans['configurations']['child'] = {'inherits_from': '3d_fullres_mednext', 'batch_size': 4}
    plans_copy.write_text(json.dumps(plans, indent=4))
    before = plans_copy.read_bytes()
    with pytest.raises(PresetError, match="'3d_fullres_mednext' cannot be replaced: child inherit"):
        add_preset(DATASET_ID, 'mednext', plans_copy.stem, overwrite=True)
    assert plans_copy.read_bytes() == before


@pytest.mark.parametrize('failing', ['json.dump', 'os.replace'])
def test_a_crash_while_writing_leaves_the_old_plans_file_intact(nnunet_env, plans_copy, monkeypatch, failing):
    module, function = failing.split('.')

    def crash(*args, **kwargs):
        raise OSError(f'simulated failure in {failing}')
    monkeypatch.setattr(getattr(plans_command, module), function, crash)
    before = plans_copy.read_bytes()
    with pytest.raises(OSError, match='simulated failure'):
        add_preset(DATASET_ID, 'mednext', plans_copy.stem)
    assert plans_copy.read_bytes() == before
    assert sorted(p.name for p in plans_copy.parent.glob(f'.{plans_copy.name}*')) == []  # no temporary file left


# ---- through the stock CLIs ----

def _checksums(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.e2e
def test_resenc_plans_keep_their_architecture_and_get_their_own_data(nnunet_env):
    """ResEnc planners give 3d_fullres the default plans' data folder; the preset must not reuse it."""
    workspace = nnunet_env
    workspace.run('nnUNetv2_plan_experiment', '-d', DATASET_ID, '-pl', 'nnUNetPlannerResEncM')
    plans_file = workspace.preprocessed / 'nnUNetResEncUNetMPlans.json'
    assert json.loads(plans_file.read_text())['configurations']['3d_fullres']['data_identifier'] == \
        'nnUNetPlans_3d_fullres'
    default_data = workspace.preprocessed / 'nnUNetPlans_3d_fullres'
    before = _checksums(default_data)

    add_preset(DATASET_ID, 'mednext', 'nnUNetResEncUNetMPlans')
    plans = json.loads(plans_file.read_text())
    config = plans['configurations']['3d_fullres_mednext']
    assert config['data_identifier'] == 'nnUNetResEncUNetMPlans_3d_fullres_mednext'
    assert config['architecture']['network_class_name'] == \
        'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
    arch_kwargs = config['architecture']['arch_kwargs']
    assert arch_kwargs['n_blocks_per_stage'] == [1, 3, 4, 6, 6, 6]  # nnUNetPlannerResEncM's, for 6 stages
    assert arch_kwargs['n_conv_per_stage_decoder'] == [1] * 5
    assert 'n_conv_per_stage' not in arch_kwargs
    assert _build_on_meta(plans, '3d_fullres_mednext').shape == (1, 4, 128, 128, 128)

    # preprocessing cost depends on the images at 1 mm (about 42 x 37 x 37 voxels), not on the patch
    workspace.run('nnUNetv2_preprocess', '-d', DATASET_ID, '-c', '3d_fullres_mednext', '-plans_name',
                  'nnUNetResEncUNetMPlans', '-np', 1)
    assert _checksums(default_data) == before
    assert len(list((workspace.preprocessed / config['data_identifier']).glob('*.pkl'))) == NUM_TRAINING


@pytest.mark.e2e
def test_cli_adds_a_configuration_prints_the_stock_commands_and_refuses_a_second_one(nnunet_env, capsys):
    workspace = nnunet_env
    plans_file = workspace.preprocessed / 'nnUNetPlans.json'
    before = json.loads(plans_file.read_text())
    name = '3d_fullres_mednext_cli'
    command = [COMMAND, 'plans', str(DATASET_ID), '--preset', 'mednext', '-c', name, '--patch', '64', '64', '64']
    result = subprocess.run(command, env=workspace.env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(f'Next:\n  nnUNetv2_preprocess -d {DATASET_ID} -c {name}\n'
                                  f'  nnUNetv2_train {DATASET_ID} {name} 0 -tr nnUNetTrainerMedNeXtL\n')
    assert 'strides [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]' in result.stdout
    after = json.loads(plans_file.read_text())
    assert {k: v for k, v in after['configurations'].items() if k != name} == before['configurations']
    assert after['configurations'][name]['patch_size'] == [64, 64, 64]

    written = plans_file.read_bytes()
    again = run_cli(capsys, *command[1:])  # the same command again, in-process
    assert again.returncode == 1 and again.stdout == ''
    assert again.stderr == (f"nnunet-plugins plans: error: the plans already have a configuration '{name}'; pass "
                            f"--overwrite to replace it, or name the new one with -c NAME.\n")
    assert plans_file.read_bytes() == written


@pytest.mark.e2e
def test_stock_cli_preprocesses_a_preset_configuration_that_a_trainer_trains_on_and_predicts(nnunet_env, make_trainer,
                                                                                          monkeypatch):
    """A preset's own code path is the configuration it writes, the same for every preset: the 2d one, at a spacing
    and patch small enough for a CPU (one sliding window per image), is preprocessed by nnUNetv2_preprocess (a
    subprocess), trained on as nnUNetv2_train builds the trainer on it, and segmented with (in this process; the
    stock CLI's training and prediction paths are the same for every configuration, test_stock_cli.py). A 3d
    preset's goes through the same steps as Swin UNETR's configuration (test_swinunetr.py); every preset's trainers are
    built on its configuration above."""
    workspace = nnunet_env
    name = f'{presets.load_preset("mednext-2d").configuration}_ci'
    added = add_preset(DATASET_ID, 'mednext-2d', configuration=name, spacing=[3.0, 3.0], patch_size=[16, 16])
    assert added.configuration['data_identifier'] == f'nnUNetPlans_{name}'

    default_data = workspace.preprocessed / 'nnUNetPlans_3d_fullres'
    before = _checksums(default_data)
    workspace.run('nnUNetv2_preprocess', '-d', DATASET_ID, '-c', name, '-np', 1)
    assert _checksums(default_data) == before
    assert len(list((workspace.preprocessed / f'nnUNetPlans_{name}').glob('*.pkl'))) == NUM_TRAINING

    fold = train_in_process(make_trainer(nnUNetTrainerMedNeXtS, name=name))
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert checkpoint['trainer_name'] == 'nnUNetTrainerMedNeXtS' and checkpoint['init_args']['configuration'] == name
    assert len(checkpoint['network_weights']['encoder.stem.weight'].shape) == 4  # a 2d network

    # nnU-Net's predictor set up from the fold as nnUNetv2_predict sets it up (the 2d network built from the preset's
    # configuration, the checkpoint loaded strictly): the case back on its own grid
    monkeypatch.setenv('nnUNet_extTrainer', workspace.env['nnUNet_extTrainer'])
    [prediction] = segment(trained_predictor(fold.parent), [workspace.raw / 'imagesTs' / 'Tiny_010_0000.nii.gz'])
    assert prediction.shape == read_labels(workspace.raw / 'labelsTs' / 'Tiny_010.nii.gz').shape
    assert set(np.unique(prediction)) <= set(synthetic.LABELS.values())


def test_a_3d_preset_on_a_2d_dataset_names_the_2d_preset(nnunet_env, plans_copy):
    plans = json.loads(plans_copy.read_text())
    plans['configurations'] = {'2d': plans['configurations']['2d']}  # what nnU-Net plans for 2d images
    plans_copy.write_text(json.dumps(plans, indent=4))
    before = plans_copy.read_bytes()
    with pytest.raises(PresetError) as error:
        add_preset(DATASET_ID, 'mednext', plans_copy.stem)
    assert 'the dataset is 2d: nnU-Net planned no 3d configuration for it (its plans have 2d)' in str(error.value)
    assert 'use the 2d preset, --preset mednext-2d' in str(error.value)
    assert 'nnUNetv2_plan_experiment' not in str(error.value)
    assert plans_copy.read_bytes() == before


def test_a_truncated_plans_file_is_named_by_plans_and_benchmark(nnunet_env, capsys):
    workspace = nnunet_env
    damaged = workspace.preprocessed / 'nnUNetPlansTruncated.json'
    damaged.write_text((workspace.preprocessed / 'nnUNetPlans.json').read_text()[:500])
    try:
        for command in (['plans', str(DATASET_ID), '--preset', 'mednext'],
                        ['benchmark', str(DATASET_ID), CONFIGURATION, '--out', str(workspace.root / 'bench_bad')]):
            result = run_cli(capsys, *command, '-p', damaged.stem)
            assert result.returncode == 1, result.stderr
            assert f'{damaged} cannot be read as JSON (JSONDecodeError' in result.stderr
            assert 'Traceback' not in result.stderr
        assert damaged.read_text() == (workspace.preprocessed / 'nnUNetPlans.json').read_text()[:500]
        assert not (workspace.root / 'bench_bad').exists()
    finally:
        damaged.unlink()


def test_plans_nnunet_cannot_read_get_a_message_instead_of_a_key_error(nnunet_env, plans_copy):
    plans = json.loads(plans_copy.read_text())
    del plans['configurations']['3d_fullres']['architecture']  # and no pre-2.4 keys for nnU-Net to convert
    plans_copy.write_text(json.dumps(plans, indent=4))
    before = plans_copy.read_bytes()
    with pytest.raises(PresetError, match="nnU-Net cannot read configuration '3d_fullres' of these plans .*neither an "
                                          '"architecture" block nor the keys of plans from before nnU-Net 2.4'):
        add_preset(DATASET_ID, 'mednext', plans_copy.stem)
    assert plans_copy.read_bytes() == before
