"""Fine-tuning: the warm-up schedule and encoder freezing of the plugin base, ``adapt-weights`` (encoder-only,
other-plans, other-channel and the Swin UNETR authors' files, and its refusals), and one path through the stock
console command: adapt an encoder-only file that nnU-Net's ``-pretrained_weights`` loader then takes (the
``_Finetune`` trainer's run through nnUNetv2_train is in test_pretraining.py)."""
import json

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from torch import nn

from nnunet_plugins import settings
from nnunet_plugins.cli import MAX_FRESH_SHARE_SHOWN, main
from nnunet_plugins.commands.adapt_weights import adapt_weights, target_network
from nnunet_plugins.commands.benchmark.worker import random_batch
from nnunet_plugins.networks.mednext import mednext_from_plan
from nnunet_plugins.networks.swinunetr import swinunetr_from_plan
from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS_Finetune
from nnunet_plugins.training.schedule import WarmupPolyLRScheduler, warmup_poly_lr
from nnunet_plugins.weights import CheckpointError, WeightTransferError, adapt_checkpoint, transfer_weights
from nnunet_plugins.weights.transfer import MAX_FRESH_SHARE

from helpers import (CONFIGURATION, DATASET_ID, ISOTROPIC_KERNELS, ISOTROPIC_STRIDES, SMALL, TINY_KERNELS, TINY_STRIDES,
                     released_format, run_cli, small_monai, training_log)

FINETUNE = 'nnUNetTrainerMedNeXtS_Finetune'


# ---- the schedule ----

def test_warmup_then_poly_values():
    lr, epochs, warmup = 1e-3, 1000, 50
    assert warmup_poly_lr(0, lr, epochs, warmup) == pytest.approx(lr / 50)
    assert warmup_poly_lr(24, lr, epochs, warmup) == pytest.approx(lr / 2)
    assert warmup_poly_lr(49, lr, epochs, warmup) == pytest.approx(lr)  # the last warm-up epoch reaches it
    assert warmup_poly_lr(50, lr, epochs, warmup) == pytest.approx(lr)  # poly starts from the top
    assert warmup_poly_lr(525, lr, epochs, warmup) == pytest.approx(lr * 0.5 ** 0.9)
    assert warmup_poly_lr(999, lr, epochs, warmup) == pytest.approx(lr * (1 / 950) ** 0.9)
    # without warm-up it is nnU-Net's poly schedule
    assert [warmup_poly_lr(e, lr, 10) for e in range(10)] == \
        pytest.approx([lr * (1 - e / 10) ** 0.9 for e in range(10)])


def test_scheduler_is_a_function_of_the_epoch_so_a_resume_is_exact():
    def run(epochs):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = WarmupPolyLRScheduler(optimizer, 1e-3, 100, 10)
        values = []
        for epoch in epochs:
            scheduler.step(epoch)
            values.append(optimizer.param_groups[0]['lr'])
        return values
    whole = run(range(30))
    assert run(range(17, 30)) == whole[17:]  # what nnUNetv2_train --c does: a new scheduler, step(current_epoch)
    with pytest.raises(ValueError, match='warmup_epochs=100 must be at least 0 and less than num_epochs=100'):
        WarmupPolyLRScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), 1e-3, 100, 100)


def test_finetune_trainer_warms_up_and_a_short_schedule_keeps_the_warmups_share(make_trainer, monkeypatch):
    trainer = make_trainer(nnUNetTrainerMedNeXtS_Finetune)
    assert (trainer.num_epochs, trainer.warmup_epochs) == (1000, 50)
    trainer.initialize()
    trainer.lr_scheduler.step(0)
    assert trainer.optimizer.param_groups[0]['lr'] == pytest.approx(1e-3 / 50)
    assert 'linear warm-up to 0.001 over the first 50 epochs, then poly decay over 950' in \
        training_log(trainer.output_folder)
    monkeypatch.setenv(settings.EPOCHS, '100')
    assert make_trainer(nnUNetTrainerMedNeXtS_Finetune).warmup_epochs == 5
    monkeypatch.setenv(settings.EPOCHS, '3')
    assert make_trainer(nnUNetTrainerMedNeXtS_Finetune).warmup_epochs == 1
    monkeypatch.setenv(settings.WARMUP_EPOCHS, '2')
    trainer = make_trainer(nnUNetTrainerMedNeXtS_Finetune)
    assert (trainer.num_epochs, trainer.warmup_epochs) == (3, 2)
    assert "nnUNet_plugins_warmup_epochs='2'): 3 epochs x 250 iterations (50 validation), warm-up 2, instead of " \
           "1000 x 250, warm-up 50" in training_log(trainer.output_folder)
    monkeypatch.setenv(settings.WARMUP_EPOCHS, '3')
    with pytest.raises(ValueError, match='warmup_epochs=3 must be at least 0 and less than num_epochs=3'):
        make_trainer(nnUNetTrainerMedNeXtS_Finetune)


# ---- freezing ----

class FrozenEncoderMedNeXtS(nnUNetTrainerMedNeXtS_Finetune):
    """The README's two-line subclass."""
    freeze_encoder_epochs = 2


def test_frozen_encoder_is_unchanged_for_its_epochs_then_trains(make_trainer):
    trainer = make_trainer(FrozenEncoderMedNeXtS)
    trainer.initialize()
    network = trainer.plain_network()
    assert 'held fixed in epochs 0-1, trained from epoch 2' in training_log(trainer.output_folder)

    def step_at(epoch: int) -> tuple[bool, bool]:
        trainer.current_epoch = epoch  # as after `--c` from a checkpoint of that epoch
        encoder = {k: v.clone() for k, v in network.encoder.state_dict().items()}
        decoder = {k: v.clone() for k, v in network.decoder.state_dict().items()}
        trainer.train_step(random_batch(trainer, seed=epoch))
        return (any(not torch.equal(v, encoder[k]) for k, v in network.encoder.state_dict().items()),
                any(not torch.equal(v, decoder[k]) for k, v in network.decoder.state_dict().items()))

    assert step_at(0) == (False, True)
    assert step_at(1) == (False, True)
    assert step_at(2) == (True, True)
    assert all(p.requires_grad for p in network.parameters())  # DDP sees every parameter in every epoch


# ---- adapt-weights ----

def mednext_s(input_channels: int = 1, strides=TINY_STRIDES, kernels=TINY_KERNELS, seed: int = 0):
    torch.manual_seed(seed)
    return mednext_from_plan(input_channels, 4, strides, kernels, 'S')


def encoder_only(network) -> dict:
    return {name: tensor for name, tensor in network.state_dict().items() if name.startswith('encoder.')}


@pytest.fixture
def dataset_folders(workspace, monkeypatch):
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results', 'nnUNet_extTrainer'):
        monkeypatch.setenv(variable, workspace.env[variable])


def test_encoder_only_file_loads_the_encoder_and_stock_pretrained_weights_takes_the_result(dataset_folders,
                                                                                           tmp_path):
    source = mednext_s(seed=1)
    path = tmp_path / 'encoder.pth'
    torch.save({'network_weights': encoder_only(source)}, path)
    out = tmp_path / 'adapted.pth'
    report = adapt_weights(path, str(DATASET_ID), CONFIGURATION, FINETUNE, 'nnUNetPlans', out)
    assert len(report.loaded) == len(encoder_only(source)) and not report.channel_adapted and not report.unused
    assert report.fresh == [] and report.source_format == 'nnunet'
    assert report.target.startswith(f'{FINETUNE}__nnUNetPlans__{CONFIGURATION} of Dataset{DATASET_ID:03d}_Tiny')
    saved = json.loads(out.with_suffix('.json').read_text())
    assert saved['loaded'] == report.loaded and len(saved['source_sha256']) == 64
    # stock nnU-Net loads the file into the network the trainer builds (every key, equal shapes)
    network, _, _ = target_network(str(DATASET_ID), CONFIGURATION, FINETUNE, 'nnUNetPlans')
    load_pretrained_weights(network, str(out))
    for name, tensor in encoder_only(source).items():
        assert torch.equal(network.state_dict()[name], tensor), name
    # the decoder is the target network's own initialisation (another draw of it), not the source's
    written = torch.load(out, weights_only=False)['network_weights']
    name = 'decoder.upsamplers.0.expand.weight'
    assert torch.equal(network.state_dict()[name], written[name])
    assert not torch.equal(written[name], source.state_dict()[name])


def test_other_plans_checkpoint_gives_its_encoder_and_reports_the_rest(tmp_path):
    deeper = mednext_s(strides=TINY_STRIDES + [[2, 2, 2]], kernels=TINY_KERNELS + [[3, 3, 3]], seed=1)
    target = mednext_s(seed=2)
    path = tmp_path / 'compiled.pth'  # saved from a torch.compile'd network
    torch.save({'network_weights': {'_orig_mod.' + k: v for k, v in deeper.state_dict().items()}}, path)
    report = adapt_checkpoint(target, path, 1)
    assert len(report.loaded) == len(encoder_only(target)) and report.fresh == []
    assert any(name.startswith('encoder.') for name in report.unused)  # its deepest stage
    assert any(name.startswith('decoder.') for name in report.unused)
    assert torch.equal(target.encoder.stem.weight, deeper.encoder.stem.weight)


def test_a_load_leaving_more_than_a_tenth_of_the_encoder_fresh_is_refused_unless_allowed(tmp_path):
    """A shallower network's encoder leaves the deeper one's last stage (three quarters of its values) fresh: refused
    by default, naming the file, the share, the module and the fix; loaded with allow_partial, reported by module."""
    deeper = mednext_s(strides=TINY_STRIDES + [[2, 2, 2]], kernels=TINY_KERNELS + [[3, 3, 3]], seed=1)
    shallow = encoder_only(mednext_s(seed=2))
    path = tmp_path / 'shallow.pth'
    torch.save({'network_weights': shallow}, path)
    state = {name: tensor.clone() for name, tensor in deeper.state_dict().items()}
    encoder = [name for name in state if name.startswith('encoder.')]
    fresh = [name for name in encoder if name not in shallow]
    assert fresh and all(name.startswith('encoder.stages.4.') for name in fresh)
    values = sum(state[name].numel() for name in fresh)
    share = values / sum(state[name].numel() for name in encoder)
    assert 0.7 < share < 0.8
    with pytest.raises(WeightTransferError, match=(
            rf"{path.resolve()} leaves {share:.1%} of the encoder's values at the network's own initialisation, "
            rf"more than the 10% a load may leave: {len(fresh)} tensors are missing from the file, by module "
            rf"encoder\.stages\.4 \({len(fresh)} tensors, {values:,} values\)\. .*give --allow-partial")):
        adapt_checkpoint(deeper, path, 1)
    assert all(torch.equal(tensor, state[name]) for name, tensor in deeper.state_dict().items())  # nothing loaded
    report = adapt_checkpoint(deeper, path, 1, allow_partial=True)
    assert report.fresh == fresh and report.fresh_share == pytest.approx(share)
    assert report.fresh_by_module == {'encoder.stages.4': [len(fresh), values]}
    assert report.lines()[3] == (f"  {len(fresh)} freshly initialised (the target network's own initialisation), "
                                 f"{share:.1%} of the encoder's values: encoder.stages.4 ({len(fresh)} tensors, "
                                 f"{values:,} values)")
    assert torch.equal(deeper.encoder.stem.weight, shallow['encoder.stem.weight'])


def test_a_small_fresh_share_loads_and_is_listed_by_module():
    """Under the 10%: the stem missing from the file (64 of the encoder's values) loads without being asked."""
    target = mednext_s(seed=2)
    source = {name: tensor for name, tensor in encoder_only(mednext_s(seed=1)).items()
              if not name.startswith('encoder.stem.')}
    report = transfer_weights(target, source, 1)
    total = sum(tensor.numel() for tensor in encoder_only(target).values())
    assert report.fresh == ['encoder.stem.weight', 'encoder.stem.bias']
    assert report.fresh_by_module == {'encoder.stem': [2, 64]} and report.fresh_share == pytest.approx(64 / total)
    assert report.lines()[3].endswith('of the encoder\'s values: encoder.stem (2 tensors, 64 values)')
    assert all(torch.equal(target.state_dict()[name], tensor) for name, tensor in source.items())


def test_more_input_channels_repeat_and_scale_the_stem():
    source, target = mednext_s(1, seed=1), mednext_s(2, seed=2)
    report = transfer_weights(target, source.state_dict(), 2, prefixes=('',))
    assert report.channel_adapted == ['encoder.stem.weight: (32, 1, 1, 1, 1) -> (32, 2, 1, 1, 1)']
    assert torch.equal(target.encoder.stem.weight, source.encoder.stem.weight.repeat(1, 2, 1, 1, 1) / 2)
    assert not any('seg_layers' in name for name in report.loaded)  # the labels' heads are never copied
    image = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        ours = target.encoder(image.repeat(1, 2, 1, 1, 1))
        theirs = source.encoder(image)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_more_input_channels_for_nnunets_own_network():
    """PlainConvUNet holds its first convolution twice in the state dict (conv and all_modules.0): both adapt."""
    def plain(channels: int) -> PlainConvUNet:
        return PlainConvUNet(channels, n_stages=4, features_per_stage=[8, 16, 32, 64], conv_op=nn.Conv3d,
                             kernel_sizes=TINY_KERNELS, strides=TINY_STRIDES, n_conv_per_stage=2, num_classes=4,
                             n_conv_per_stage_decoder=1, conv_bias=True, norm_op=nn.InstanceNorm3d,
                             norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU)
    source, target = plain(1), plain(2)
    report = transfer_weights(target, source.state_dict(), 2)
    first = 'encoder.stages.0.0.convs.0'
    assert sorted(report.channel_adapted) == [f'{first}.{alias}.weight: (8, 1, 1, 3, 3) -> (8, 2, 1, 3, 3)'
                                              for alias in ('all_modules.0', 'conv')]
    torch.testing.assert_close(target.state_dict()[f'{first}.conv.weight'],
                               source.state_dict()[f'{first}.conv.weight'].repeat(1, 2, 1, 1, 1) / 2)


def test_swin_unetr_authors_encoder_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / 'model_swinvit.pt'
    torch.save(released_format(small_monai()), path)
    ours = swinunetr_from_plan(1, 14, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, SMALL)
    report = adapt_checkpoint(ours, path, 1)
    assert report.source_format == 'swinunetr-authors'
    assert len(report.loaded) == len(ours.encoder.state_dict()) and report.fresh == []
    assert report.unused == ['encoder.rotation_head.weight']
    released = torch.load(path, weights_only=True)['state_dict']
    assert torch.equal(ours.encoder.layers1[0].blocks[0].mlp.linear1.weight,
                       released['module.layers1.0.blocks.0.mlp.fc1.weight'])


def test_files_that_cannot_start_the_network_are_refused_naming_file_and_keys(tmp_path):
    target = mednext_s()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    unrelated = tmp_path / 'unrelated.pth'
    torch.save({'state_dict': {'backbone.conv.weight': torch.zeros(3)}}, unrelated)
    with pytest.raises(WeightTransferError, match=rf"none of the 1 tensors of {unrelated} matches a tensor of the "
                                                  rf"network under \"encoder.\".*\['backbone.conv.weight'\].*"
                                                  rf"'encoder.stem.weight'"):
        adapt_checkpoint(target, unrelated, 1)
    bigger = tmp_path / 'mednext_b.pth'
    torch.save({'network_weights': mednext_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS, 'B').state_dict()}, bigger)
    with pytest.raises(WeightTransferError, match=rf'27 tensors of {bigger} do not fit the network: encoder\.stages\.1'
                                                  rf'\.0\.expand\.weight \(96, 32, 1, 1, 1\) in the file, \(64, 32, 1, '
                                                  rf'1, 1\) in the network; .* and 22 more\. The file comes from '):
        adapt_checkpoint(target, bigger, 1)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(bigger.read_bytes()[:50_000])
    with pytest.raises(CheckpointError, match=f'{truncated} cannot be read as a checkpoint: it is truncated'):
        adapt_checkpoint(target, truncated, 1)
    text = tmp_path / 'notes.pth'
    text.write_text('not weights')
    with pytest.raises(CheckpointError, match=f'{text} cannot be read as a checkpoint: it is not a PyTorch checkpoint'):
        adapt_checkpoint(target, text, 1)
    no_weights = tmp_path / 'epoch.pth'
    torch.save({'epoch': 3}, no_weights)
    with pytest.raises(CheckpointError, match=rf"{no_weights} holds no network weights \(found \['epoch'\]\)"):
        adapt_checkpoint(target, no_weights, 1)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing half-loaded


def test_cli_refuses_to_overwrite_and_reports_errors_by_file(dataset_folders, tmp_path, capsys):
    source = tmp_path / 'encoder.pth'
    torch.save({'network_weights': encoder_only(mednext_s())}, source)
    out = tmp_path / 'out.pth'
    out.write_bytes(b'keep me')
    args = ['adapt-weights', str(source), '-d', str(DATASET_ID), '-c', CONFIGURATION, '-tr', FINETUNE, '-o', str(out)]
    with pytest.raises(SystemExit, match=f'{out} exists; give --overwrite'):
        main(args)
    assert out.read_bytes() == b'keep me'
    with pytest.raises(SystemExit, match=f'nnunet-plugins adapt-weights: error: .*tensors of {source.resolve()} '):
        main(args[:7] + ['nnUNetTrainerUXNet', '-o', str(tmp_path / 'uxnet.pth')])  # another family's encoder
    assert not (tmp_path / 'uxnet.pth').exists()
    assert main(args + ['--overwrite']) == 0
    printed = capsys.readouterr().out
    assert f'{len(encoder_only(mednext_s()))} loaded' in printed and '-pretrained_weights' in printed


def test_cli_refuses_a_partial_load_naming_file_share_and_fix_and_takes_it_with_allow_partial(dataset_folders,
                                                                                             tmp_path, capsys):
    source = tmp_path / 'three_stages.pth'  # the dataset's MedNeXt-S without its deepest encoder stage
    torch.save({'network_weights': {name: tensor for name, tensor in encoder_only(mednext_s()).items()
                                    if not name.startswith('encoder.stages.3.')}}, source)
    out = tmp_path / 'out.pth'
    args = ['adapt-weights', source, '-d', DATASET_ID, '-c', CONFIGURATION, '-tr', FINETUNE, '-o', out]
    refused = run_cli(capsys, *args)
    assert refused.returncode == 1 and not out.exists()
    assert f'{source.resolve()} leaves 74.6% of the encoder\'s values at the network\'s own initialisation, more ' \
           f'than the 10% a load may leave: 26 tensors are missing from the file, by module encoder.stages.3 (26 ' \
           f'tensors, 676,864 values).' in refused.stderr
    assert 'give --allow-partial' in refused.stderr
    taken = run_cli(capsys, *args, '--allow-partial')
    assert taken.returncode == 0, taken.stderr
    assert '26 freshly initialised (the target network\'s own initialisation), 74.6% of the encoder\'s values: ' \
           'encoder.stages.3 (26 tensors, 676,864 values)' in taken.stdout
    assert json.loads(out.with_suffix('.json').read_text())['fresh_by_module'] == {'encoder.stages.3': [26, 676864]}
    help_text = ' '.join(run_cli(capsys, 'adapt-weights', '--help').stdout.split())
    assert MAX_FRESH_SHARE_SHOWN == f'{MAX_FRESH_SHARE:.0%}'  # the help's figure is the rule's
    assert f'more than {MAX_FRESH_SHARE_SHOWN} of the encoder\'s values' in help_text


# ---- the console command ----

@pytest.mark.e2e
def test_adapt_weights_command_writes_what_stock_pretrained_weights_loads(workspace, dataset_folders, tmp_path):
    """``nnunet-plugins adapt-weights`` as a user runs it; nnU-Net's own -pretrained_weights loader then takes its file
    into the network the trainer builds, the marked encoder unchanged. Fine-tuning through nnUNetv2_train with a
    ``_Finetune`` trainer and its warm-up runs end to end from an RCR pre-training checkpoint in test_pretraining.py."""
    source = mednext_s(seed=7)
    with torch.no_grad():
        source.encoder.stem.weight.add_(1.0)  # unmistakable: no initialisation draws such values
    encoder_file = tmp_path / 'encoder.pth'
    torch.save({'network_weights': encoder_only(source)}, encoder_file)
    out = tmp_path / 'adapted.pth'
    workspace.run('nnunet-plugins', 'adapt-weights', encoder_file, '-d', DATASET_ID, '-c', CONFIGURATION, '-tr',
                  FINETUNE, '-o', out)
    network, _, _ = target_network(str(DATASET_ID), CONFIGURATION, FINETUNE, 'nnUNetPlans')
    load_pretrained_weights(network, str(out))
    for name, tensor in encoder_only(source).items():
        assert torch.equal(network.state_dict()[name], tensor), name
