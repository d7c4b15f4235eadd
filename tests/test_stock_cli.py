"""Every code path of the trainer base, once, through nnU-Net's own command-line tools in subprocesses, on the tiny
dataset: a MedNeXt trainer (train with validation export, five folds and find_best, predicting held-out cases), and
predict + ensemble with nnU-Net's own trainer. The refusals to train over a fold run in-process what nnUNetv2_train
runs. The other MedNeXt sizes and kernels
differ only in the network, which is tested in-process (test_trainers.py); so do UX-Net, UTNetV2 and Swin UNETR, whose
trainers train and save checkpoints that nnU-Net's predictor segments with, in-process in their own files. UpKern's
path and ``--c`` are in test_upkern.py, the presets' in test_presets.py and test_swinunetr.py. The check that a
plugin trainer learns is the demo's (test_package_and_cli.py).
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nnunetv2.run.run_training import maybe_load_checkpoint

from nnunet_plugins import settings
from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS
from nnunet_plugins.weights import CheckpointError

from helpers import CONFIGURATION, DATASET_ID, MEDNEXT, STOCK_TRAINER, train_in_process, training_log

REPOSITORY = Path(__file__).resolve().parents[1]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.e2e
def test_nnunetv2_train_runs_a_mednext_trainer_and_validates(workspace):
    fold = workspace.train(MEDNEXT, 0)
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert checkpoint['trainer_name'] == MEDNEXT
    assert checkpoint['current_epoch'] == 1
    log = training_log(fold)
    assert '!!!!! SHORT SCHEDULE' in log
    assert 'MedNeXt-S k3: 4 levels' in log
    summary = json.loads((fold / 'validation' / 'summary.json').read_text())
    assert set(summary['mean']) == {'1', '2', '3'}


# The three refusals below run in-process what `nnUNetv2_train` (with or without `--c`) runs after building the
# trainer: nnU-Net's maybe_load_checkpoint, then the trainer's on_train_start. The CLI's own `--c` continues a MedNeXt
# (UpKern) run in test_upkern.py.

def _stopped_run(make_trainer, checkpoint: str):
    """A fresh MedNeXt-S trainer whose fold folder holds a final checkpoint saved after one epoch (of one step, in
    this process) as ``checkpoint``."""
    fold = train_in_process(make_trainer(nnUNetTrainerMedNeXtS), steps=1)
    (fold / 'checkpoint_final.pth').rename(fold / checkpoint)
    return make_trainer(nnUNetTrainerMedNeXtS), fold


def test_fresh_run_refuses_to_overwrite_a_trained_fold(make_trainer):
    trainer, fold = _stopped_run(make_trainer, 'checkpoint_final.pth')
    before = sha256(fold / 'checkpoint_final.pth')
    maybe_load_checkpoint(trainer, continue_training=False, validation_only=False)
    with pytest.raises(RuntimeError) as error:
        trainer.on_train_start()
    message = str(error.value)
    assert f'{fold} already holds a training run (checkpoint_final.pth)' in message
    assert 'Continue that run with `nnUNetv2_train ... --c`' in message
    assert sha256(fold / 'checkpoint_final.pth') == before


def test_continue_with_a_shorter_schedule_is_refused_before_training(make_trainer, monkeypatch):
    monkeypatch.setenv(settings.EPOCHS, '1')
    trainer, fold = _stopped_run(make_trainer, 'checkpoint_latest.pth')  # a run stopped after epoch 1
    before = sha256(fold / 'checkpoint_latest.pth')
    maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)
    with pytest.raises(RuntimeError) as error:
        trainer.on_train_start()
    message = str(error.value)
    assert (f'checkpoint_latest.pth in {fold} is at epoch 1, but nnUNet_plugins_epochs=1 asks for 1 epochs, so `--c` '
            f'would end the run without training the epochs left') in message
    assert f'Unset nnUNet_plugins_epochs to continue {MEDNEXT}\'s own schedule, or set it to more than 1.' in message
    assert sha256(fold / 'checkpoint_latest.pth') == before
    assert not (fold / 'checkpoint_final.pth').exists()


def test_continue_from_a_truncated_checkpoint_names_it(make_trainer):
    trainer, fold = _stopped_run(make_trainer, 'checkpoint_final.pth')
    damaged = fold / 'checkpoint_final.pth'
    damaged.write_bytes(damaged.read_bytes()[:100_000])
    with pytest.raises(CheckpointError) as error:
        maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)
    message = str(error.value)
    assert f'{MEDNEXT}: {damaged} cannot be read as a checkpoint: it is truncated' in message
    assert f'Move it out of {fold}' in message and 'PytorchStreamReader' not in message


@pytest.mark.e2e
def test_nnunetv2_predict_and_ensemble_with_nnunets_own_trainer(workspace, tmp_path):
    """nnUNetv2_predict loads MedNeXt-S's checkpoint and predicts every held-out case with probabilities;
    nnUNetv2_ensemble averages it with nnU-Net's own trainer (nnUNetTrainer_1epoch with the plugin trainers' test
    schedule of 2 iterations instead of its 250: helpers.STOCK_TRAINER). The other families' checkpoints are loaded
    by nnU-Net's predictor in their own files, in-process."""
    workspace.train(MEDNEXT, 0)
    workspace.train(STOCK_TRAINER, 0)
    # mirroring off to save time: it is no trainer's business
    workspace.predict_and_ensemble((MEDNEXT, STOCK_TRAINER), tmp_path, '--disable_tta')


def readme_recipe() -> list[str]:
    """The commands of the README's "Using it with your own data" block, one per line."""
    text = (REPOSITORY / 'README.md').read_text()
    section = text[text.index('## Using it with your own data'):]
    block = section[section.index('```bash\n') + len('```bash\n'):section.index('```\n', section.index('```bash'))]
    return [line.split('  #')[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.e2e
def test_the_readmes_own_data_recipe_runs_as_written(workspace, tmp_path):
    """Five folds with --npz, find_best and a five-fold prediction, as the README says, in a results folder of its
    own (its fresh runs would otherwise meet the folds other tests trained). Substituted: the tiny dataset for 4,
    MedNeXt-S for -L, a short schedule, the CPU, a folder of one held-out image for imagesTs (the ensemble test
    predicts every held-out case), and ``--disable_tta`` for the final prediction: mirrored prediction with the
    trainer's mirror axes runs in every fold's validation, and five folds' would add 10 to 20 s per case here."""
    recipe = readme_recipe()
    assert recipe[:3] == ['pip install /path/to/nnunet-plugins', 'export nnUNet_extTrainer=$(nnunet-plugins trainers '
                          '--path)', 'nnunet-plugins doctor']  # installation: test_package_and_cli.py
    assert recipe[3] == 'nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres'  # what the workspace fixture ran
    results = tmp_path / 'nnUNet_results'
    # the user's shell finds nnU-Net's commands on PATH, as in an activated environment
    env = {**workspace.env, 'nnUNet_results': str(results), 'nnUNet_plugins_epochs': '1',
           'nnUNet_plugins_iterations': '2',
           'PATH': os.pathsep.join([str(Path(sys.executable).parent), workspace.env.get('PATH', '')])}
    results.mkdir()
    images = tmp_path / 'imagesTs'
    images.mkdir()
    case = 'Tiny_010_0000.nii.gz'
    (images / case).symlink_to(workspace.raw / 'imagesTs' / case)
    workspace.run('nnunet-plugins', 'doctor', env=env)
    for line in recipe[4:]:
        command = f' {line} '
        for dataset in (' -d 4 ', 'nnUNetv2_train 4 ', 'nnUNetv2_find_best_configuration 4 '):  # not "-f ... 3 4"
            command = command.replace(dataset, dataset.replace(' 4 ', f' {DATASET_ID} '))
        command = (command.replace('MedNeXtL', 'MedNeXtS')
                   .replace(' imagesTs ', f' {images} ')
                   .replace(' pred ', f' {tmp_path / "pred"} '))
        for tool in ('nnUNetv2_train ', 'nnUNetv2_predict '):  # the README's are for a GPU
            command = command.replace(tool, f'{tool}-device cpu ')
        command = command.replace('nnUNetv2_predict ', 'nnUNetv2_predict --disable_tta ')
        command = command.strip()
        completed = subprocess.run(['bash', '-c', f'set -e; {command}'], env=env, capture_output=True, text=True,
                                   stdin=subprocess.DEVNULL)
        assert completed.returncode == 0, f'{command}\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}'
    identifier = f'{MEDNEXT}__nnUNetPlans__{CONFIGURATION}'
    information = json.loads((results / workspace.results(MEDNEXT).parent.name / 'inference_information.json')
                             .read_text())
    assert information['best_model_or_ensemble']['selected_model_or_models'] == [
        {'configuration': CONFIGURATION, 'trainer': MEDNEXT, 'plans_identifier': 'nnUNetPlans'}]
    assert (results / workspace.results(MEDNEXT).parent.name / identifier / 'crossval_results_folds_0_1_2_3_4' /
            'summary.json').is_file()
    assert [p.name for p in (tmp_path / 'pred').glob('*.nii.gz')] == ['Tiny_010.nii.gz']
