"""nnssl's checkpoints (issue 28): adapt-weights maps their stem, encoder and decoder onto nnU-Net's ResEnc network of
the user's plans by their adaptation plan, stock -pretrained_weights loads the result, and what it cannot map is
refused naming the file and the key; this package's pre-training checkpoints carry an adaptation plan nnssl reads.

The nnssl checkpoints are made here as nnssl writes them (MIC-DKFZ/nnssl 7044864, AbstractBaseTrainer.save_checkpoint
and the ResEnc-L MAE trainer's plan): ResidualEncoderUNet of ResEnc-L plans of the tiny dataset, with reconstruction
heads (as many outputs as inputs), no deep supervision.
"""
import json

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_plugins.commands.adapt_weights import adapt_weights, target_network
from nnunet_plugins.pretraining.checkpoint import adaptation_plan
from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS_PretrainRCR
from nnunet_plugins.training.nnunet_network import nnUNetTrainer_Finetune, nnUNetTrainer_PretrainRCR
from nnunet_plugins.weights import CheckpointError, adapt_checkpoint, read_checkpoint
from nnunet_plugins.weights.nnssl import ADAPTATION_PLAN_KEY, AdaptationPlan, NnsslCheckpointError, nnssl_source
from helpers import CONFIGURATION, DATASET_ID, run_cli

RESENC_PLANS = 'nnUNetResEncUNetLPlans'
FINETUNE = 'nnUNetTrainer_Finetune'
RESENC_L_BLOCKS = [1, 3, 4, 6, 6, 6]  # nnUNetPlannerResEncL's encoder blocks per stage; 1 convolution per decoder stage
STEM_ALIASES = ('encoder.stem.convs.0.conv.weight', 'encoder.stem.convs.0.all_modules.0.weight')
# the state dict's names of the one input convolution: the decoder holds the encoder again
ALL_STEM_NAMES = STEM_ALIASES + tuple(f'decoder.{name}' for name in STEM_ALIASES)


@pytest.fixture
def resenc_plans(workspace, monkeypatch) -> dict:
    """ResEnc-L plans of the tiny dataset (what nnUNetPlannerResEncL makes of nnU-Net's topology: ResidualEncoderUNet,
    1, 3, 4, 6 ... residual blocks, one convolution per decoder stage), on the default plans' preprocessed data."""
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results', 'nnUNet_extTrainer'):
        monkeypatch.setenv(variable, workspace.env[variable])
    path = workspace.preprocessed / f'{RESENC_PLANS}.json'
    if not path.exists():
        plans = json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text())
        plans['plans_name'], plans['experiment_planner_used'] = RESENC_PLANS, 'nnUNetPlannerResEncL'
        architecture = plans['configurations'][CONFIGURATION]['architecture']
        kwargs = architecture['arch_kwargs']
        stages = kwargs.pop('n_conv_per_stage') and kwargs['n_stages']
        kwargs.update(n_blocks_per_stage=RESENC_L_BLOCKS[:stages], n_conv_per_stage_decoder=[1] * (stages - 1))
        architecture['network_class_name'] = 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
        plans['configurations'] = {CONFIGURATION: plans['configurations'][CONFIGURATION]}
        path.write_text(json.dumps(plans, indent=2))
    return json.loads(path.read_text())


def pretrained_resenc(plans: dict, channels: int, seed: int) -> torch.nn.Module:
    """nnU-Net's ResidualEncoderUNet of ``plans`` as an nnssl MAE pre-training has it: ``channels`` in and out, no deep
    supervision, its tensors moved off any initialisation."""
    architecture = plans['configurations'][CONFIGURATION]['architecture']
    torch.manual_seed(seed)
    network = get_network_from_plans(architecture['network_class_name'], architecture['arch_kwargs'],
                                     architecture['_kw_requires_import'], channels, channels, deep_supervision=False)
    with torch.no_grad():
        for tensor in network.state_dict().values():
            tensor.add_(torch.rand_like(tensor) + 0.5)  # no initialisation draws these values
    return network


def nnssl_plan(channels: int, architecture: str = 'ResEncL', **changes) -> dict:
    """A serialised nnssl AdaptationPlan as nnssl's ResEnc-L MAE trainer writes it (ArchitecturePlans without
    arch_kwargs; the pre-training plan of OpenMind's 1 mm isotropic configuration; tuples stay tuples)."""
    configuration = {
        'data_identifier': 'nnsslPlans_onemmiso', 'preprocessor_name': 'DefaultPreprocessor',
        'spacing_style': 'onemmiso', 'normalization_schemes': ['ZScoreNormalization'] * channels,
        'use_mask_for_norm': [False] * channels, 'resampling_fn_data': 'resample_data_or_seg_to_shape',
        'resampling_fn_data_kwargs': {'is_seg': False, 'order': 3, 'order_z': 0, 'force_separate_z': None},
        'resampling_fn_mask': 'resample_data_or_seg_to_shape',
        'resampling_fn_mask_kwargs': {'is_seg': True, 'order': 1, 'order_z': 0, 'force_separate_z': None},
        'spacing': [1.0, 1.0, 1.0], 'patch_size': [160, 160, 160]}
    plan = {
        'architecture_plans': {'arch_class_name': architecture, 'arch_kwargs': None,
                               'arch_kwargs_requiring_import': None},
        'pretrain_plan': {'dataset_name': 'Dataset745_OpenMind', 'plans_name': 'nnsslPlans',
                          'original_median_spacing_after_transp': [1.0, 1.0, 1.0],
                          'image_reader_writer': 'SimpleITKIO', 'transpose_forward': [0, 1, 2],
                          'transpose_backward': [0, 1, 2], 'configurations': {'onemmiso': configuration},
                          'experiment_planner_used': 'ExperimentPlanner'},
        'pretrain_num_input_channels': channels,
        'recommended_downstream_patchsize': (160, 160, 160),
        'key_to_encoder': 'encoder.stages', 'key_to_stem': 'encoder.stem',
        'keys_to_in_proj': ('encoder.stem.convs.0.conv', 'encoder.stem.convs.0.all_modules.0'),
        'key_to_lpe': None,
    }
    plan.update(changes)
    return plan


def save_nnssl(path, network: torch.nn.Module, plan: dict) -> None:
    """The checkpoint as nnssl's save_checkpoint writes it (the entries a fine-tuning does not read included)."""
    torch.save({'network_weights': network.state_dict(), 'optimizer_state': {}, 'grad_scaler_state': None,
                'logging': {}, '_best_ema': None, 'current_epoch': 1000, 'init_args': {},
                'trainer_name': 'BaseMAETrainer', ADAPTATION_PLAN_KEY: plan}, path)


def assert_every_tensor_from(loaded: dict, source: dict, names) -> None:
    for name in names:
        assert torch.equal(loaded[name], source[name]), name


def fine_tuning_trainer(plans: dict, workspace) -> nnUNetTrainer_Finetune:
    dataset_json = json.loads((workspace.preprocessed / 'dataset.json').read_text())
    return nnUNetTrainer_Finetune({**plans, 'continue_training': False}, CONFIGURATION, 0, dataset_json,
                                  torch.device('cpu'))


def test_resenc_checkpoint_fine_tunes_through_adapt_weights_and_stock_pretrained_weights(resenc_plans, workspace,
                                                                                          tmp_path, monkeypatch):
    source = pretrained_resenc(resenc_plans, 1, seed=1)
    path = tmp_path / 'checkpoint_final.pth'
    save_nnssl(path, source, nnssl_plan(1))
    out = tmp_path / 'adapted.pth'
    report = adapt_weights(path, str(DATASET_ID), CONFIGURATION, FINETUNE, RESENC_PLANS, out)
    assert report.source_format == 'nnssl' and report.nnssl['architecture'] == 'ResEncL'
    assert report.fresh == [] and report.channel_adapted == [] and report.fresh_share == 0
    expected = {name for name in source.state_dict() if '.seg_layers.' not in name}
    assert set(report.loaded) == expected  # stem (both aliases), encoder, decoder and its alias of the encoder
    assert all('.seg_layers.' in name for name in report.unused)  # the reconstruction head alone stays behind
    assert ("  nnssl adaptation plan: ResEncL, 1 input channel(s), pre-trained at spacing [1.0, 1.0, 1.0] on patches "
            "[160, 160, 160], recommended patch [160, 160, 160]; stem encoder.stem, encoder encoder.stages") \
        in report.lines()
    notes = '\n'.join(report.notes)
    assert 'pre-trained at spacing 1 x 1 x 1 mm' in notes and 'recommends 160 x 160 x 160' in notes
    assert (f'nnunet-plugins plans {DATASET_ID} --preset mednext -p {RESENC_PLANS} -c 3d_fullres_nnssl --spacing 1 1 1 '
            f'--patch 160 160 160') in notes
    # what nnUNetv2_train -pretrained_weights does: the trainer initialised, then nnU-Net's loader on its network
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'results'))
    trainer = fine_tuning_trainer(resenc_plans, workspace)
    trainer.initialize()
    assert type(trainer.network).__name__ == 'ResidualEncoderUNet'
    load_pretrained_weights(trainer.network, str(out))
    assert_every_tensor_from(trainer.network.state_dict(), source.state_dict(), expected)
    trainer.lr_scheduler.step(0)  # nnU-Net's first epoch (training itself: the command-line test below)
    assert trainer.optimizer.param_groups[0]['lr'] == pytest.approx(trainer.initial_lr / 50)  # the warm-up
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults['nesterov']


def test_two_channel_checkpoint_averages_the_stem_and_one_channel_repeats_it_for_two(resenc_plans, tmp_path):
    two = pretrained_resenc(resenc_plans, 2, seed=2)
    path = tmp_path / 'two_channels.pth'
    save_nnssl(path, two, nnssl_plan(2))
    out = tmp_path / 'adapted.pth'
    report = adapt_weights(path, str(DATASET_ID), CONFIGURATION, FINETUNE, RESENC_PLANS, out)
    assert report.channel_rule == 'averaged'
    assert sorted(report.channel_adapted) == sorted(f'{name}: (32, 2, 1, 3, 3) -> (32, 1, 1, 3, 3)'
                                                    for name in ALL_STEM_NAMES)
    network, _, _ = target_network(str(DATASET_ID), CONFIGURATION, FINETUNE, RESENC_PLANS)
    load_pretrained_weights(network, str(out))
    loaded, source = network.state_dict(), two.state_dict()
    for name in ALL_STEM_NAMES:
        torch.testing.assert_close(loaded[name], source[name].sum(dim=1, keepdim=True), rtol=0, atol=0)
    assert_every_tensor_from(loaded, source, [name for name in source if '.seg_layers.' not in name
                                              and name not in ALL_STEM_NAMES])
    # one channel onto the network of a two-channel dataset of these plans: repeated and halved
    one = pretrained_resenc(resenc_plans, 1, seed=3)
    path = tmp_path / 'one_channel.pth'
    save_nnssl(path, one, nnssl_plan(1))
    plans = PlansManager(resenc_plans)
    wide = nnUNetTrainer_Finetune.build_network_architecture(plans, plans.get_configuration(CONFIGURATION), 2, 4, True)
    report = adapt_checkpoint(wide, path, 2, target='a two-channel ResidualEncoderUNet')
    assert report.channel_rule == 'repeated' and len(report.channel_adapted) == 4 and report.fresh == []
    saved = tmp_path / 'wide.pth'
    torch.save({'network_weights': wide.state_dict()}, saved)
    fresh = nnUNetTrainer_Finetune.build_network_architecture(plans, plans.get_configuration(CONFIGURATION), 2, 4, True)
    load_pretrained_weights(fresh, str(saved))
    for name in ALL_STEM_NAMES:
        assert torch.equal(fresh.state_dict()[name], one.state_dict()[name].repeat(1, 2, 1, 1, 1) / 2)
    assert_every_tensor_from(fresh.state_dict(), one.state_dict(), [name for name in one.state_dict()
                                                                    if '.seg_layers.' not in name
                                                                    and name not in ALL_STEM_NAMES])


def test_refusals_name_the_file_and_the_key(resenc_plans, tmp_path, capsys):
    source = pretrained_resenc(resenc_plans, 1, seed=4)
    args = ('-d', DATASET_ID, '-c', CONFIGURATION, '-tr', FINETUNE, '-p', RESENC_PLANS)

    def refused(plan: dict, name: str, plans: str = RESENC_PLANS) -> str:
        path = tmp_path / name
        save_nnssl(path, source, plan)
        out = tmp_path / f'{name}.out'
        result = run_cli(capsys, 'adapt-weights', path, *args[:-1], plans, '-o', out)
        assert result.returncode == 1 and not out.exists()
        assert str(path.resolve()) in result.stderr
        return result.stderr

    primus = refused(nnssl_plan(1, 'PrimusM'), 'primus.pth')
    assert "names the architecture 'PrimusM' (architecture_plans.arch_class_name)" in primus
    plain = refused(nnssl_plan(1), 'onto_plain.pth', 'nnUNetPlans')  # nnU-Net's default plans build PlainConvUNet
    assert "'ResEncL' (architecture_plans.arch_class_name), a ResidualEncoderUNet, but" in plain
    assert 'is a PlainConvUNet' in plain and '-p nnUNetResEncUNetLPlans' in plain
    moved = refused(nnssl_plan(1, key_to_encoder='network.encoder.stages'), 'moved.pth')
    assert "key_to_encoder 'network.encoder.stages' of its nnssl_adaptation_plan is the path of no tensor" in moved
    incomplete = nnssl_plan(1)
    del incomplete['key_to_stem']
    assert 'its nnssl_adaptation_plan lacks key_to_stem' in refused(incomplete, 'incomplete.pth')
    in_proj = refused(nnssl_plan(1, keys_to_in_proj=('encoder.stem.conv',)), 'in_proj.pth')
    assert "keys_to_in_proj 'encoder.stem.conv' of its nnssl_adaptation_plan has no tensor" in in_proj
    corrupt = tmp_path / 'corrupt.pth'
    save_nnssl(corrupt, source, nnssl_plan(1))
    corrupt.write_bytes(corrupt.read_bytes()[:4096])
    result = run_cli(capsys, 'adapt-weights', corrupt, *args, '-o', tmp_path / 'corrupt.out')
    assert result.returncode == 1 and f'{corrupt.resolve()} cannot be read as a checkpoint' in result.stderr


def test_our_pretraining_checkpoint_carries_an_adaptation_plan_nnssl_reads(resenc_plans, workspace, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'results'))
    dataset_json = json.loads((workspace.preprocessed / 'dataset.json').read_text())
    trainer = nnUNetTrainer_PretrainRCR({**resenc_plans, 'continue_training': False}, CONFIGURATION, 0, dataset_json,
                                        torch.device('cpu'))
    trainer.initialize()
    path = tmp_path / 'checkpoint_final.pth'
    trainer.save_checkpoint(str(path))
    # nnssl and nnU-Net master read checkpoints with weights_only=True
    plan = torch.load(path, map_location='cpu', weights_only=True)[ADAPTATION_PLAN_KEY]
    configuration = trainer.configuration_manager
    assert plan['architecture_plans']['arch_class_name'].endswith('.ResidualEncoderUNet')
    assert plan['architecture_plans']['arch_kwargs']['n_blocks_per_stage'] == RESENC_L_BLOCKS[:4]
    assert plan['pretrain_num_input_channels'] == 1
    assert plan['recommended_downstream_patchsize'] == list(configuration.patch_size)
    assert plan['pretrain_plan']['configurations'][CONFIGURATION]['spacing'] == list(configuration.spacing)
    assert (plan['key_to_stem'], plan['key_to_encoder']) == ('encoder.stem', 'encoder.stages')
    assert plan['keys_to_in_proj'] == tuple(name.removesuffix('.weight') for name in STEM_ALIASES)
    # the plan finds every tensor of the stem and encoder of the fine-tuning network of the same plans
    read = AdaptationPlan.from_checkpoint(plan, str(path))
    network, _, _ = target_network(str(DATASET_ID), CONFIGURATION, FINETUNE, RESENC_PLANS)
    weights = read_checkpoint(path)['network_weights']
    mapped = nnssl_source(weights, read, network, str(path)).tensors
    assert_every_tensor_from(mapped, weights, [name for name in network.state_dict()
                                               if name.startswith('encoder.')])
    assert plan == adaptation_plan(trainer.pretraining_model().network, trainer.plans_manager, configuration,
                                   CONFIGURATION, 1)


def test_nnssl_reader_errors_are_checkpoint_errors():
    """The CLI reports them as every unreadable file (a ValueError naming the file)."""
    assert issubclass(NnsslCheckpointError, CheckpointError) and issubclass(CheckpointError, ValueError)


def test_a_plugin_networks_plan_names_its_own_class_and_stem(make_trainer, tmp_path):
    """MedNeXt's pre-training: the plans name PlainConvUNet, the plan the network's class; our adapt-weights keeps
    reading our own checkpoints as nnU-Net checkpoints (encoder only, as before the plan)."""
    trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainRCR)
    trainer.initialize()
    path = tmp_path / 'checkpoint_final.pth'
    trainer.save_checkpoint(str(path))
    plan = torch.load(path, map_location='cpu', weights_only=True)[ADAPTATION_PLAN_KEY]
    assert plan['architecture_plans'] == {'arch_class_name': 'nnunet_plugins.networks.mednext.MedNeXt',
                                          'arch_kwargs': None, 'arch_kwargs_requiring_import': None}
    assert (plan['key_to_stem'], plan['key_to_encoder'], plan['keys_to_in_proj']) == ('encoder.stem', 'encoder',
                                                                                       ('encoder.stem',))
    read = AdaptationPlan.from_checkpoint(plan, str(path))
    network = trainer.pretraining_model().network
    mapped = nnssl_source(read_checkpoint(path)['network_weights'], read, network, str(path)).tensors
    assert_every_tensor_from(mapped, network.state_dict(), [f'encoder.{name}' for name in network.encoder.state_dict()])
    report = adapt_checkpoint(trainer.segmentation_network(trainer.plans_manager, trainer.configuration_manager, 1, 4),
                              path, 1)
    assert report.source_format == 'nnunet' and report.nnssl is None


@pytest.mark.e2e
def test_stock_nnunetv2_train_fine_tunes_nnunets_network_from_the_adapted_nnssl_file(resenc_plans, workspace,
                                                                                        tmp_path):
    """The one command-line run (a few seconds of training): nnUNetv2_train -pretrained_weights takes the adapted file
    into nnUNetTrainer_Finetune's ResidualEncoderUNet (nnU-Net asserts every name and shape) and trains from it;
    the loaded values are checked in process above."""
    source = pretrained_resenc(resenc_plans, 1, seed=5)
    path = tmp_path / 'checkpoint_final.pth'
    save_nnssl(path, source, nnssl_plan(1))
    out = tmp_path / 'adapted.pth'
    adapt_weights(path, str(DATASET_ID), CONFIGURATION, FINETUNE, RESENC_PLANS, out)
    trainer = 'nnUNetTrainer_Finetune_2epochs_2iterations'  # tests/stock_trainers
    result = workspace.run('nnUNetv2_train', DATASET_ID, CONFIGURATION, 0, '-tr', trainer, '-p', RESENC_PLANS,
                           '-device', 'cpu', '-pretrained_weights', out)
    assert f'Loading pretrained weights from file  {out}' in result.stdout
    fold = (workspace.root / 'nnUNet_results' / f'Dataset{DATASET_ID:03d}_Tiny' /
            f'{trainer}__{RESENC_PLANS}__{CONFIGURATION}' / 'fold_0')
    tuned = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert tuned['current_epoch'] == 2
    assert tuned['network_weights'].keys() == torch.load(out, weights_only=False)['network_weights'].keys()
    rates = [float(line.split(': ')[-1]) for line in next(fold.glob('training_log_*.txt')).read_text().splitlines()
             if 'Current learning rate' in line]
    assert rates == [pytest.approx(0.01), pytest.approx(0.01)]  # the 1-epoch warm-up reaches 0.01, poly starts there
