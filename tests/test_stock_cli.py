"""The plugin trainers through nnU-Net's own command-line tools, in subprocesses, on the tiny dataset."""
import hashlib
import json

import numpy as np
import pytest
import torch

from nnunet_plugins import synthetic
from nnunet_plugins.demo import heldout_dice
from nnunet_plugins.training import TRAINERS
from nnunet_plugins.training.mednext import MedNeXtTrainer, MedNeXtUpKernTrainer

from conftest import CONFIGURATION, DATASET_ID, NUM_HELDOUT, read_labels, training_log

FIVE_FOLD_TRAINER = 'nnUNetTrainerMedNeXtS'
FOLDS = ('0', '1', '2', '3', '4')


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# the UpKern trainers are tested in test_upkern.py, since they need a trained source run
MEDNEXT_TRAINERS = [t.__name__ for t in TRAINERS
                    if issubclass(t, MedNeXtTrainer) and not issubclass(t, MedNeXtUpKernTrainer)]


@pytest.mark.parametrize('trainer', MEDNEXT_TRAINERS)
def test_nnunetv2_train_runs_each_mednext_trainer(workspace, trainer):
    fold = workspace.train(trainer, 0)
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert checkpoint['trainer_name'] == trainer
    assert checkpoint['current_epoch'] == 1
    log = training_log(fold)
    assert '!!!!! SHORT SCHEDULE' in log
    assert f'MedNeXt-{trainer[len("nnUNetTrainerMedNeXt")]} k{5 if trainer.endswith("_k5") else 3}' in log
    summary = json.loads((fold / 'validation' / 'summary.json').read_text())
    assert set(summary['mean']) == {'1', '2', '3'}


def test_continue_with_c_resumes_epoch_and_learning_rate(workspace):
    trainer = 'nnUNetTrainerMedNeXtB'
    fold = workspace.train(trainer, 1, epochs=1)
    env = {**workspace.env, 'nnUNet_plugins_epochs': '2', 'nnUNet_plugins_iterations': '2'}
    workspace.run('nnUNetv2_train', DATASET_ID, CONFIGURATION, 1, '-tr', trainer, '-device', 'cpu', '--c', env=env)
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert checkpoint['current_epoch'] == 2
    assert len(checkpoint['logging']['train_losses']) == 2
    log = training_log(fold)
    assert 'Epoch 1' in log
    # poly decay continues where the first run stopped: lr(epoch 1 of 2) = 1e-3 * (1 - 1/2) ** 0.9
    assert f'Current learning rate: {np.round(1e-3 * 0.5 ** 0.9, 5)}' in log


def test_fresh_run_refuses_to_overwrite_a_trained_fold(workspace):
    fold = workspace.train(FIVE_FOLD_TRAINER, 0)
    before = sha256(fold / 'checkpoint_final.pth')
    with pytest.raises(RuntimeError) as error:
        workspace.run('nnUNetv2_train', DATASET_ID, CONFIGURATION, 0, '-tr', FIVE_FOLD_TRAINER, '-device', 'cpu')
    assert 'already holds a training run (checkpoint_final.pth' in str(error.value)
    assert '--c' in str(error.value)
    assert sha256(fold / 'checkpoint_final.pth') == before


def test_nnunetv2_predict_loads_strictly_and_segments_heldout_cases(workspace, tmp_path):
    workspace.train(FIVE_FOLD_TRAINER, 0)
    workspace.run('nnUNetv2_predict', '-i', workspace.raw / 'imagesTs', '-o', tmp_path, '-d', DATASET_ID,
                  '-c', CONFIGURATION, '-f', 0, '-tr', FIVE_FOLD_TRAINER, '-device', 'cpu', '-npp', 1, '-nps', 1)
    references = sorted((workspace.raw / 'labelsTs').glob('*.nii.gz'))
    assert len(references) == NUM_HELDOUT
    for reference in references:
        prediction = read_labels(tmp_path / reference.name)
        assert prediction.shape == read_labels(reference).shape
        assert set(np.unique(prediction)) <= set(synthetic.LABELS.values())


def test_five_folds_find_best_configuration_and_five_fold_predict(workspace, tmp_path):
    for fold in FOLDS:
        workspace.train(FIVE_FOLD_TRAINER, fold)
    result = workspace.run('nnUNetv2_find_best_configuration', DATASET_ID, '-c', CONFIGURATION,
                           '-tr', FIVE_FOLD_TRAINER, '-np', 1)
    assert f'{FIVE_FOLD_TRAINER}__nnUNetPlans__{CONFIGURATION}' in result.stdout
    results_root = workspace.results(FIVE_FOLD_TRAINER).parent
    information = json.loads((results_root / 'inference_information.json').read_text())
    selected = information['best_model_or_ensemble']['selected_model_or_models']
    assert selected == [{'configuration': CONFIGURATION, 'trainer': FIVE_FOLD_TRAINER,
                         'plans_identifier': 'nnUNetPlans'}]
    assert (workspace.results(FIVE_FOLD_TRAINER) / 'crossval_results_folds_0_1_2_3_4' / 'summary.json').is_file()

    workspace.run('nnUNetv2_predict', '-i', workspace.raw / 'imagesTs', '-o', tmp_path, '-d', DATASET_ID,
                  '-c', CONFIGURATION, '-f', *FOLDS, '-tr', FIVE_FOLD_TRAINER, '-device', 'cpu', '-npp', 1, '-nps', 1)
    assert len(list(tmp_path.glob('*.nii.gz'))) == NUM_HELDOUT


def test_nnunetv2_ensemble_of_plugin_and_stock_nnunet_trainer(workspace, tmp_path):
    # the stock nnUNetTrainer with nnU-Net's own shortest schedule (1 epoch of 250 iterations)
    members = {FIVE_FOLD_TRAINER: workspace.train(FIVE_FOLD_TRAINER, 0),
               'nnUNetTrainer_1epoch': workspace.train('nnUNetTrainer_1epoch', 0)}
    workspace.predict_and_ensemble(members, tmp_path)


def test_mednext_learns_the_organ_on_heldout_cases(workspace, tmp_path):
    """A real learning check: after 100 iterations the large organ is segmented on unseen cases."""
    workspace.train(FIVE_FOLD_TRAINER, 'all', epochs=5, iterations=20)
    workspace.run('nnUNetv2_predict', '-i', workspace.raw / 'imagesTs', '-o', tmp_path, '-d', DATASET_ID,
                  '-c', CONFIGURATION, '-f', 'all', '-tr', FIVE_FOLD_TRAINER, '-device', 'cpu', '-npp', 1, '-nps', 1)
    dice = heldout_dice(workspace.raw / 'labelsTs', tmp_path)
    print('held-out Dice after 100 iterations:', dice)
    assert dice['organ'] > 0.8
