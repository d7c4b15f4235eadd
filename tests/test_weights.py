"""nnunet_plugins.weights: the one reader of weight files (every layout, its errors), the reports, and the legacy files
of tests/fixtures/legacy (written by the release before the reader) still loading, resuming, starting UpKern and
fine-tuning through nnU-Net's own -pretrained_weights loader."""
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_plugins import settings
from nnunet_plugins.training.mednext import (
    UPKERN_REPORT_FILE, nnUNetTrainerMedNeXtS, nnUNetTrainerMedNeXtS_Finetune, nnUNetTrainerMedNeXtS_k5_UpKern)
from nnunet_plugins.weights import (
    CheckpointError, UpKernReport, read_checkpoint, read_network_weights, sha256_of, strip_wrapper_prefixes)
from nnunet_plugins.weights.transfer import TransferReport
from nnunet_plugins.weights.upkern import ResizedTensor

LEGACY = Path(__file__).resolve().parent / 'fixtures' / 'legacy'
SUPERVISED = LEGACY / 'mednext_s_checkpoint_final.pth'  # nnUNetTrainerMedNeXtS, also UpKern's kernel-3 source
ADAPTED = LEGACY / 'mednext_s_adapted.pth'  # adapt-weights of SUPERVISED for nnUNetTrainerMedNeXtS_Finetune
LEGACY_CONFIGURATION = '2d'


def small_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.Conv2d(4, 2, 1)).state_dict()


# ---- the reader: every layout ----

@pytest.mark.parametrize('layout,wrap', [
    ('nnunet', lambda state: {'network_weights': state, 'trainer_name': 'nnUNetTrainerMedNeXtS',
                              'init_args': {'configuration': '3d_fullres'}, 'current_epoch': 3}),
    ('state_dict', lambda state: {'state_dict': state, 'epoch': 3}),
    ('tensors', lambda state: state),
    # DDP's and torch.compile's prefixes, in either order
    ('tensors', lambda state: {f'module._orig_mod.{key}': value for key, value in state.items()}),
    ('nnunet', lambda state: {'network_weights': {f'_orig_mod.module.{key}': value for key, value in state.items()}}),
])
def test_each_layout_gives_the_networks_tensors_under_its_names(tmp_path, layout, wrap):
    state = small_state_dict()
    path = tmp_path / 'weights.pth'
    torch.save(wrap(state), path)
    for source in (path, str(path), read_checkpoint(path)):  # a file, or its content already read
        weights = read_network_weights(source)
        assert weights.layout == layout
        assert list(weights.state_dict) == list(state)
        assert all(torch.equal(weights.state_dict[key], value) for key, value in state.items())
    nnunet = wrap(state).get('trainer_name') is not None
    assert (weights.trainer, weights.configuration) == (('nnUNetTrainerMedNeXtS', '3d_fullres') if nnunet else
                                                        (None, None))


def test_the_swin_unetr_authors_encoder_is_renamed_to_our_encoder_and_nnunets_axis_order():
    kernel, fc1 = torch.randn(12, 1, 2, 3, 4), torch.randn(48, 12)
    weights = read_network_weights({'state_dict': {'module.patch_embed.proj.weight': kernel,
                                                   'module.layers1.0.blocks.0.mlp.fc1.weight': fc1}})
    assert weights.layout == 'swinunetr-authors'
    assert list(weights.state_dict) == ['encoder.patch_embed.proj.weight',
                                        'encoder.layers1.0.blocks.0.mlp.linear1.weight']
    assert weights.state_dict['encoder.layers1.0.blocks.0.mlp.linear1.weight'] is fc1  # per token: no axes
    # the kernel's (x, y, z) axes as nnU-Net's (z, y, x) (tests/test_swin_axes.py checks the whole encoder)
    assert torch.equal(weights.state_dict['encoder.patch_embed.proj.weight'], kernel.permute(0, 1, 4, 3, 2))
    assert len(weights.notes) == 1 and 'to nnU-Net\'s (z, y, x)' in weights.notes[0]


def test_wrapper_prefixes_go_only_from_the_front():
    assert strip_wrapper_prefixes('module._orig_mod.module.encoder.stem.weight') == 'encoder.stem.weight'
    assert strip_wrapper_prefixes('encoder.module.weight') == 'encoder.module.weight'


def test_sha256_of_is_the_files_digest(tmp_path):
    path = tmp_path / 'bytes.bin'
    path.write_bytes(bytes(range(256)) * 9000)  # more than one 1 MiB chunk
    assert sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the reader: files it refuses, named, with why ----

def write_zip_that_is_not_torch(path: Path) -> None:
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('notes.txt', 'a zip archive, but not one torch.save wrote')


UNREADABLE = 'cannot be read as a checkpoint: it is'


@pytest.mark.parametrize('make,why', [
    (lambda path: None, 'does not exist'),
    (lambda path: path.write_bytes(b''), f'{UNREADABLE} empty'),
    (lambda path: path.write_bytes(SUPERVISED.read_bytes()[:100_000]), f'{UNREADABLE} truncated'),
    (lambda path: path.write_text('weights, honestly'), f'{UNREADABLE} not a PyTorch checkpoint'),
    (write_zip_that_is_not_torch, f'{UNREADABLE} corrupt'),
    (lambda path: torch.save({'epoch': 3, 'lr': 1e-3}, path),
     "holds no network weights (found ['epoch', 'lr']); expected an nnU-Net checkpoint"),
    (lambda path: torch.save([torch.zeros(1)], path), 'holds no network weights (found list)'),
    (lambda path: torch.save({'network_weights': {}}, path), 'holds no network weights'),
])
def test_a_file_without_weights_is_refused_naming_it_and_why(tmp_path, make, why):
    path = tmp_path / 'weights.pth'
    make(path)
    with pytest.raises(CheckpointError) as error:
        read_network_weights(path)
    assert str(error.value).startswith(f'{path} {why}')


def test_reports_save_their_fields_as_json(tmp_path):
    upkern = UpKernReport(source='/runs/k3.pth', source_sha256='ab' * 32, copied=['a'],
                          resized=[ResizedTensor('b', [8, 1, 3, 3], [8, 1, 5, 5])])
    transfer = TransferReport(source='/runs/encoder.pth', source_format='nnunet', loaded=['encoder.stem.weight'],
                              fresh=['encoder.stages.0.0.conv1.weight'], fresh_share=0.05,
                              fresh_by_module={'encoder.stages.0': [1, 64]},
                              pretraining={'report': '/runs/pretraining_report.json', 'fold': 0, 'training': ['a']},
                              notes=['WARNING: ...'])
    for report, expected in ((upkern, {'source': '/runs/k3.pth', 'source_sha256': 'ab' * 32, 'source_trainer': None,
                                       'source_configuration': None, 'copied': ['a'],
                                       'resized': [{'name': 'b', 'source_shape': [8, 1, 3, 3],
                                                    'target_shape': [8, 1, 5, 5]}]}),
                             (transfer, {'source': '/runs/encoder.pth', 'source_format': 'nnunet', 'source_sha256': '',
                                         'target': '', 'prefixes': [], 'loaded': ['encoder.stem.weight'],
                                         'channel_adapted': [], 'channel_rule': '',
                                         'fresh': ['encoder.stages.0.0.conv1.weight'],
                                         'unused': [], 'fresh_share': 0.05,
                                         'fresh_by_module': {'encoder.stages.0': [1, 64]},
                                         'pretraining': {'report': '/runs/pretraining_report.json', 'fold': 0,
                                                         'training': ['a']},
                                         'nnssl': None, 'notes': ['WARNING: ...']})):
        path = tmp_path / f'{type(report).__name__}.json'
        report.save(path)
        assert json.loads(path.read_text()) == expected


# ---- legacy files: what the release before this reader wrote still works ----

def legacy_network(trainer_class: type) -> nn.Module:
    """The network ``nnUNetv2_train`` builds for ``trainer_class`` on the legacy files' plans, at its initialisation."""
    plans = json.loads((LEGACY / 'plans.json').read_text())
    dataset_json = json.loads((LEGACY / 'dataset.json').read_text())
    manager = PlansManager(plans)
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    torch.manual_seed(2)
    return trainer_class.build_network_architecture(manager, manager.get_configuration(LEGACY_CONFIGURATION), 1, heads,
                                                    True)


@pytest.fixture
def legacy_trainer(tmp_path, monkeypatch):
    """Build a trainer on the legacy files' plans as nnUNetv2_train does, its fold folder under tmp_path. The dataset
    has no cases: initialize() needs its preprocessed folder (to infer the dataset class), not its data."""
    plans = json.loads((LEGACY / 'plans.json').read_text())
    dataset_json = json.loads((LEGACY / 'dataset.json').read_text())
    data = tmp_path / 'nnUNet_preprocessed' / plans['dataset_name'] / \
        plans['configurations'][LEGACY_CONFIGURATION]['data_identifier']
    data.mkdir(parents=True)
    (data / 'none.b2nd').touch()
    monkeypatch.setenv('nnUNet_preprocessed', str(tmp_path / 'nnUNet_preprocessed'))
    monkeypatch.setenv('nnUNet_results', str(tmp_path / 'nnUNet_results'))
    for variable in settings.VARIABLES:
        monkeypatch.delenv(variable, raising=False)

    def make(trainer_class: type):
        return trainer_class({**plans, 'continue_training': False}, LEGACY_CONFIGURATION, 0, dataset_json,
                             torch.device('cpu'))
    return make


def test_the_legacy_checkpoint_loads_strictly_through_the_reader():
    weights = read_network_weights(SUPERVISED)
    assert (weights.layout, weights.trainer, weights.configuration) == ('nnunet', 'nnUNetTrainerMedNeXtS',
                                                                        LEGACY_CONFIGURATION)
    network = legacy_network(nnUNetTrainerMedNeXtS)
    network.load_state_dict(weights.state_dict, strict=True)
    saved = torch.load(SUPERVISED, weights_only=False)['network_weights']
    assert len(saved) == len(network.state_dict()) > 0
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_the_legacy_checkpoint_resumes(legacy_trainer):
    """``--c``: the trainer base's load_checkpoint takes the legacy file whole (network, AdamW state, epoch, log)."""
    trainer = legacy_trainer(nnUNetTrainerMedNeXtS)
    trainer.initialize()
    trainer.load_checkpoint(str(SUPERVISED))
    saved = torch.load(SUPERVISED, weights_only=False)
    assert trainer.current_epoch == saved['current_epoch'] == 1
    for name, tensor in trainer.network.state_dict().items():
        assert torch.equal(tensor, saved['network_weights'][name]), name
    state = trainer.optimizer.state_dict()['state']
    assert len(state) == len(saved['optimizer_state']['state']) > 0
    for index, entry in saved['optimizer_state']['state'].items():
        assert torch.equal(state[index]['exp_avg'], entry['exp_avg']), index
    assert trainer.logger.get_checkpoint()['train_losses'] == saved['logging']['train_losses']


def test_upkern_starts_kernel_5_from_the_legacy_kernel_3_checkpoint(legacy_trainer, monkeypatch):
    monkeypatch.setenv(settings.UPKERN_SOURCE, str(SUPERVISED))
    trainer = legacy_trainer(nnUNetTrainerMedNeXtS_k5_UpKern)
    trainer.initialize()
    source = torch.load(SUPERVISED, weights_only=False)['network_weights']
    resized = 0
    for name, tensor in trainer.network.state_dict().items():
        if tensor.shape == source[name].shape:
            assert torch.equal(tensor, source[name]), name
        else:  # the 2d plan's kernels: bilinear from 3x3 to 5x5
            assert tensor.shape[2:] == (5, 5) and source[name].shape[2:] == (3, 3), name
            assert torch.equal(tensor, nn.functional.interpolate(source[name], size=[5, 5], mode='bilinear')), name
            resized += 1
    report = json.loads((Path(trainer.output_folder) / UPKERN_REPORT_FILE).read_text())
    assert resized == len(report['resized']) > 0
    assert (report['source'], report['source_trainer'], report['source_configuration']) == (
        str(SUPERVISED), 'nnUNetTrainerMedNeXtS', LEGACY_CONFIGURATION)
    assert report['source_sha256'] == hashlib.sha256(SUPERVISED.read_bytes()).hexdigest()


def test_the_legacy_adapt_weights_output_loads_through_nnunets_pretrained_weights():
    saved = torch.load(ADAPTED, weights_only=False)['network_weights']
    network = legacy_network(nnUNetTrainerMedNeXtS_Finetune)
    initial = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    load_pretrained_weights(network, str(ADAPTED))
    for name, tensor in network.state_dict().items():
        expected = initial[name] if '.seg_layers.' in name else saved[name]  # nnU-Net never loads the heads
        assert torch.equal(tensor, expected), name
    # the reader takes it whole, strictly, too
    network.load_state_dict(read_network_weights(ADAPTED).state_dict, strict=True)
    # its encoder is the legacy checkpoint's
    source = read_network_weights(SUPERVISED).state_dict
    encoder = [name for name in saved if name.startswith('encoder.')]
    assert encoder and all(torch.equal(saved[name], source[name]) for name in encoder)
