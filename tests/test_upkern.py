"""UpKern: the weight transfer itself, and the UpKern trainers through nnUNetv2_train."""
import hashlib
import json
import random
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_plugins import settings
from nnunet_plugins.networks.mednext import VARIANTS, mednext_from_plan
from nnunet_plugins.training.mednext import UPKERN_REPORT_FILE, nnUNetTrainerMedNeXtS_k5_UpKern
from nnunet_plugins.weights import CheckpointError, UpKernError, upkern_from_checkpoint, upkern_state_dict

from helpers import (ANISOTROPIC_KERNELS, ANISOTROPIC_STRIDES, CONFIGURATION, DATASET_ID, ISOTROPIC_KERNELS,
                     ISOTROPIC_STRIDES, PLANS_2D_KERNELS, PLANS_2D_STRIDES, TINY_KERNELS, TINY_STRIDES, training_log)

SOURCE_TRAINER, UPKERN_TRAINER = 'nnUNetTrainerMedNeXtS', 'nnUNetTrainerMedNeXtS_k5_UpKern'


def mednext(variant: str = 'S', kernel: int = 3, strides=ISOTROPIC_STRIDES, kernels=ISOTROPIC_KERNELS,
            in_channels: int = 1, classes: int = 14) -> nn.Module:
    torch.manual_seed(0)
    return mednext_from_plan(in_channels, classes, strides, kernels, variant, kernel)


def assert_upkern_result(source: dict, result: dict, report, mode: str) -> None:
    """Resized tensors equal torch's interpolation of the source; every other tensor is bit-identical."""
    resized = {r.name: r for r in report.resized}
    assert sorted(report.copied + list(resized)) == sorted(result)
    for name, tensor in result.items():
        if name in resized:
            expected = nn.functional.interpolate(source[name], size=list(tensor.shape[2:]), mode=mode)
            assert torch.equal(tensor, expected), name
            assert resized[name].source_shape == list(source[name].shape)
        else:
            assert torch.equal(tensor, source[name]), name


@pytest.mark.parametrize('variant', ['S', 'B', 'M', 'L'])
def test_k3_to_k5_resizes_every_depthwise_kernel_and_copies_the_rest(variant):
    source = mednext(variant, 3).state_dict()
    result, report = upkern_state_dict(source, mednext(variant, 5).state_dict())
    assert_upkern_result(source, result, report, 'trilinear')
    # one depthwise kernel per block, plus the 4 down and 4 up blocks (the reference: 26 for S)
    table = VARIANTS[variant]
    assert len(report.resized) == sum(table.encoder_blocks) + sum(table.decoder_blocks) + 8
    assert all(r.target_shape[1:] == [1, 5, 5, 5] for r in report.resized)
    print(f'{variant} k3->k5: {len(report.copied)} copied, {len(report.resized)} resized')
    if variant == 'S':
        assert len(report.resized) == 26


def test_anisotropic_kernels_keep_their_ones():
    source = mednext('S', 3, ANISOTROPIC_STRIDES, ANISOTROPIC_KERNELS).state_dict()
    target = mednext('S', 5, ANISOTROPIC_STRIDES, ANISOTROPIC_KERNELS).state_dict()
    result, report = upkern_state_dict(source, target)
    assert_upkern_result(source, result, report, 'trilinear')
    shapes = {tuple(r.source_shape[2:]): tuple(r.target_shape[2:]) for r in report.resized}
    assert shapes == {(1, 3, 3): (1, 5, 5), (3, 3, 3): (5, 5, 5)}


def test_2d_uses_bilinear_and_kernel_5_goes_on_to_7():
    source = mednext('B', 3, PLANS_2D_STRIDES, PLANS_2D_KERNELS).state_dict()
    result, report = upkern_state_dict(source, mednext('B', 5, PLANS_2D_STRIDES, PLANS_2D_KERNELS).state_dict())
    assert_upkern_result(source, result, report, 'bilinear')
    assert len(report.resized) == 26

    k7, report = upkern_state_dict(result, mednext('B', 7, PLANS_2D_STRIDES, PLANS_2D_KERNELS).state_dict())
    assert_upkern_result(result, k7, report, 'bilinear')
    assert {tuple(r.target_shape[2:]) for r in report.resized} == {(7, 7)}


def test_compiled_and_ddp_prefixes_are_removed():
    plain = mednext('S', 3).state_dict()
    wrapped = {f'module._orig_mod.{k}': v for k, v in plain.items()}
    result, report = upkern_state_dict(wrapped, mednext('S', 5).state_dict())
    assert_upkern_result(plain, result, report, 'trilinear')


@pytest.mark.parametrize('source_kwargs,target_kwargs,expected', [
    ({'variant': 'S'}, {'variant': 'B'}, 'tensor shapes do not fit'),
    ({'in_channels': 2}, {}, "encoder.stem.weight: source (32, 2, 1, 1, 1), target (32, 1, 1, 1, 1)"),
    ({'classes': 3}, {}, 'source (3, 32, 1, 1, 1), target (14, 32, 1, 1, 1)'),
    ({'strides': ANISOTROPIC_STRIDES[:4], 'kernels': ANISOTROPIC_KERNELS[:4]}, {}, 'missing in the source'),
    # an axis whose source kernel is 1 cannot grow: another plans topology
    ({'kernels': ANISOTROPIC_KERNELS[:1] + ISOTROPIC_KERNELS[1:]}, {}, '(32, 1, 1, 3, 3), target (32, 1, 5, 5, 5)'),
    ({'kernel': 5}, {'kernel': 3}, 'a kernel that would shrink'),
    ({'kernel': 5}, {'kernel': 5}, 'nothing to upsample'),
])
def test_a_mismatched_source_is_refused_with_the_offending_tensors(source_kwargs, target_kwargs, expected):
    source = mednext(**{'kernel': 3, **source_kwargs}).state_dict()
    target = mednext(**{'kernel': 5, **target_kwargs}).state_dict()
    with pytest.raises(UpKernError) as error:
        upkern_state_dict(source, target)
    assert expected in str(error.value)


def test_another_network_is_refused():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    other = PlainConvUNet(1, 6, (32, 64, 128, 256, 320, 320), nn.Conv3d, 3, ISOTROPIC_STRIDES, 2, 14, 2,
                          conv_bias=True, norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU)
    with pytest.raises(UpKernError) as error:
        upkern_state_dict(other.state_dict(), mednext('S', 5).state_dict())
    assert 'not the same kind of network' in str(error.value)
    assert 'missing in the source: encoder.stem.weight; encoder.stem.bias' in str(error.value)


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    source = mednext('S', 3)
    path = tmp_path / 'checkpoint_final.pth'
    # record the tensors as CUDA storage, as torch.save does on a GPU machine
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
        torch.save({'network_weights': source.state_dict(), 'trainer_name': SOURCE_TRAINER,
                    'init_args': {'configuration': CONFIGURATION}}, path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA'):
            torch.load(path, weights_only=False)
    target = mednext('S', 5)
    report = upkern_from_checkpoint(target, path)
    assert report.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (report.source_trainer, report.source_configuration) == (SOURCE_TRAINER, CONFIGURATION)
    assert_upkern_result(source.state_dict(), target.state_dict(), report, 'trilinear')


# ---- the trainers ----

@pytest.mark.e2e
def test_initialize_returns_with_the_upkern_weights(workspace, make_trainer, monkeypatch):
    source = workspace.train(SOURCE_TRAINER, 0) / 'checkpoint_final.pth'
    monkeypatch.setenv(settings.UPKERN_SOURCE, str(source))
    trainer = make_trainer(nnUNetTrainerMedNeXtS_k5_UpKern)
    trainer.initialize()
    source_weights = torch.load(source, map_location='cpu', weights_only=False)['network_weights']
    expected, _ = upkern_state_dict(source_weights, trainer.network.state_dict())
    for name, tensor in trainer.network.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    report = json.loads((Path(trainer.output_folder) / UPKERN_REPORT_FILE).read_text())
    assert report['source'] == str(source.resolve())


@pytest.mark.e2e
def test_nnunetv2_train_starts_from_the_kernel_3_run_and_continues_from_its_own(workspace):
    source = workspace.train(SOURCE_TRAINER, 0) / 'checkpoint_final.pth'
    fold = workspace.train(UPKERN_TRAINER, 0)

    report = json.loads((fold / UPKERN_REPORT_FILE).read_text())
    assert report['source'] == str(source.resolve())
    assert report['source_sha256'] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert report['source_trainer'] == SOURCE_TRAINER
    # the tiny plan has 4 levels: 3 encoder + 3 decoder stages and the bottleneck of 2 blocks, 3 down, 3 up blocks
    assert len(report['resized']) == 7 * 2 + 6
    assert {tuple(r['target_shape'][2:]) for r in report['resized']} == {(1, 5, 5), (5, 5, 5)}
    network_weights = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert len(report['copied']) + len(report['resized']) == len(network_weights['network_weights'])
    log = training_log(fold)
    assert f'UpKern from {source.resolve()}' in log
    assert f'{len(report["copied"])} tensors copied, 20 kernels resized' in log

    # `--c` (the trainer base's, the one stock-CLI continuation in the suite): nnU-Net loads the fold's own checkpoint
    # and trains the second epoch, its learning rate decayed from where the first run stopped
    env = {**workspace.env, settings.EPOCHS: '2', settings.ITERATIONS: '2'}
    workspace.run('nnUNetv2_train', DATASET_ID, CONFIGURATION, 0, '-tr', UPKERN_TRAINER, '-device', 'cpu', '--c',
                  env=env)
    log = training_log(fold)
    assert 'UpKern skipped: this fold already holds checkpoint_final.pth' in log
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert checkpoint['current_epoch'] == 2
    assert len(checkpoint['logging']['train_losses']) == 2
    assert 'Epoch 1' in log
    # poly decay: lr(epoch 1 of 2) = 1e-3 * (1 - 1/2) ** 0.9
    assert f'Current learning rate: {np.round(1e-3 * 0.5 ** 0.9, 5)}' in log


# Refusals before training, in-process (nnUNetv2_train builds the trainer and initialises it first); the stock CLI
# stopping on a bad source is the truncated-source test at the end.

def test_a_missing_source_names_the_path_and_the_variable(make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS_k5_UpKern)
    expected = trainer.conventional_source()  # the kernel-3 trainer's fold 0 beside it: not trained here
    with pytest.raises(FileNotFoundError) as error:
        trainer.initialize()
    message = str(error.value)
    assert f'but {expected} does not exist' in message
    assert settings.UPKERN_SOURCE in message
    assert not list(Path(trainer.output_folder).glob('checkpoint_*.pth'))


def test_a_source_of_another_size_is_refused_before_training(make_trainer, monkeypatch, tmp_path):
    # a MedNeXt-B checkpoint as nnUNetv2_train writes it, on the tiny plan
    other = tmp_path / 'checkpoint_final.pth'
    torch.save({'network_weights': mednext('B', 3, TINY_STRIDES, TINY_KERNELS, classes=4).state_dict(),
                'trainer_name': 'nnUNetTrainerMedNeXtB', 'init_args': {'configuration': CONFIGURATION}}, other)
    monkeypatch.setenv(settings.UPKERN_SOURCE, str(other))
    trainer = make_trainer(nnUNetTrainerMedNeXtS_k5_UpKern)
    with pytest.raises(UpKernError) as error:
        trainer.initialize()
    message = str(error.value)
    assert f'cannot start from {other}' in message
    assert 'tensor shapes do not fit' in message
    assert 'encoder.stages.1.0.expand.weight: source (96, 32, 1, 1, 1), target (64, 32, 1, 1, 1)' in message
    assert not list(Path(trainer.output_folder).glob('checkpoint_*.pth'))


# ---- unreadable sources: the file named, why, and what to do ----

CORRUPTIONS = {  # how the file is damaged -> the word the error uses for it
    'truncated': (lambda data: data[:200_000], 'truncated'),
    'empty': (lambda data: b'', 'empty'),
    'random bytes': (lambda data: random.Random(0).randbytes(50_000), 'not a PyTorch checkpoint'),
}


@pytest.mark.parametrize('damage', list(CORRUPTIONS))
@pytest.mark.e2e
def test_a_corrupt_source_named_by_the_variable_is_refused_naming_it(workspace, make_trainer, monkeypatch, tmp_path,
                                                                     damage):
    corrupt, word = CORRUPTIONS[damage]
    source = tmp_path / 'damaged.pth'
    source.write_bytes(corrupt((workspace.train(SOURCE_TRAINER, 0) / 'checkpoint_final.pth').read_bytes()))
    monkeypatch.setenv(settings.UPKERN_SOURCE, str(source))
    trainer = make_trainer(nnUNetTrainerMedNeXtS_k5_UpKern)
    with pytest.raises(CheckpointError) as error:
        trainer.initialize()
    message = str(error.value)
    assert f'{UPKERN_TRAINER} starts from {SOURCE_TRAINER}\'s weights, but {source.resolve()} cannot be read as a ' \
           f'checkpoint: it is {word}' in message
    assert f'Set {settings.UPKERN_SOURCE} to a checkpoint file that is whole, or unset it' in message
    # what nnUNetv2_train prints when it stops: this error alone, not torch's reader error it replaces
    printed = ''.join(traceback.format_exception(error.value))
    assert 'CheckpointError' in printed and 'PytorchStreamReader' not in printed and 'UnpicklingError' not in printed
    assert not (Path(trainer.output_folder) / UPKERN_REPORT_FILE).exists()


@pytest.mark.e2e
def test_a_corrupt_source_found_by_convention_says_to_retrain_it(workspace, make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS_k5_UpKern)
    source = trainer.conventional_source()
    source.parent.mkdir(parents=True)
    source.write_bytes((workspace.train(SOURCE_TRAINER, 0) / 'checkpoint_final.pth').read_bytes()[:100_000])
    with pytest.raises(CheckpointError) as error:
        trainer.initialize()
    message = str(error.value)
    assert f'{source.resolve()} cannot be read as a checkpoint: it is truncated' in message
    assert f'Train {SOURCE_TRAINER} on this fold again' in message and settings.UPKERN_SOURCE in message
