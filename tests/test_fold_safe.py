"""Fold-safe fine-tuning: the fine-tuning trainer and ``adapt-weights`` read the ``pretraining_report.json`` a
pre-training run wrote beside its checkpoint, and warn when the pre-training trained on validation cases of the fold
fine-tuned (cross-validation would no longer be one); a pre-training of the fold's own training cases passes quietly.
The reports are written by the real pre-training trainer on the test dataset's splits."""
import json
from pathlib import Path

import pytest
import torch

from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS_Finetune, nnUNetTrainerMedNeXtS_PretrainRCR
from nnunet_plugins.weights.provenance import REPORT_FILE, pretrained_weights_argument, pretraining_cases

from helpers import CONFIGURATION, DATASET_ID, PRETRAINING_PATCH, run_cli, training_log

PRETRAIN = 'nnUNetTrainerMedNeXtS_PretrainRCR'
FINETUNE = 'nnUNetTrainerMedNeXtS_Finetune'
FOLDS = 5


@pytest.fixture
def pretrained(make_trainer, tmp_path):
    """``pretrained(fold)``: the checkpoint of an RCR pre-training of MedNeXt-S on ``fold`` (0 or 'all'), its
    ``pretraining_report.json`` beside it as the trainer writes it; and the splits of the test dataset."""
    def make(fold: int | str) -> Path:
        trainer = make_trainer(nnUNetTrainerMedNeXtS_PretrainRCR, PRETRAINING_PATCH)
        trainer.fold = fold  # the trainer was made on fold 0; do_split follows this attribute
        trainer.initialize()
        folder = tmp_path / f'pretraining_fold_{fold}'
        folder.mkdir()
        trainer.output_folder = str(folder)
        trainer.write_report()
        checkpoint = folder / 'checkpoint_final.pth'
        torch.save({'network_weights': trainer.pretraining_model().network.state_dict()}, checkpoint)
        return checkpoint
    return make


def splits(trainer) -> list[dict]:
    """The dataset's five folds, from ``splits_final.json`` (which nnU-Net writes at the first split of a fold)."""
    trainer.do_split()
    return json.loads((Path(trainer.preprocessed_dataset_folder_base) / 'splits_final.json').read_text())


def test_the_weights_file_is_read_from_nnunets_command_line():
    command = ['nnUNetv2_train', '991', '3d_fullres', '0', '-tr', FINETUNE, '-p', 'nnUNetPlans']
    assert pretrained_weights_argument(command + ['-pretrained_weights', 'a/b.pth', '-device', 'cpu']) == 'a/b.pth'
    assert pretrained_weights_argument(command + ['-pretrained_weights=c.pth']) == 'c.pth'
    assert pretrained_weights_argument(command) is None  # -p is the plans, not an abbreviation
    assert pretrained_weights_argument(command + ['-pretrained_weights']) is None


def test_fine_tuning_fold_0_from_a_pretraining_on_all_warns_naming_the_cases_and_the_fix(make_trainer, pretrained):
    checkpoint = pretrained('all')
    report = json.loads((checkpoint.parent / REPORT_FILE).read_text())
    trainer = make_trainer(nnUNetTrainerMedNeXtS_Finetune)
    validation = sorted(splits(trainer)[0]['val'])
    assert len(report['cases']['training']) == 10 and set(validation) < set(report['cases']['training'])
    trainer.check_pretraining_fold(str(checkpoint))
    log = training_log(trainer.output_folder)
    assert (f'!!!!! WARNING: the pre-training (fold all, 10 training cases, {checkpoint.parent / REPORT_FILE}) '
            f'trained on validation cases of fold 0: 2 of its 2 validation cases ({", ".join(validation)})') in log
    assert (f'Pre-train on the fold you fine-tune (`nnUNetv2_train Dataset{DATASET_ID:03d}_Tiny {CONFIGURATION} 0 '
            f'-tr {PRETRAIN} -p nnUNetPlans`: its training cases, unlabeled images added)') in log
    assert 'pre-train on fold all only when you evaluate on a separate test set' in log


def test_a_pretraining_of_the_folds_own_training_cases_passes_and_no_report_is_said_once(make_trainer, pretrained,
                                                                                         tmp_path):
    checkpoint = pretrained(0)
    trainer = make_trainer(nnUNetTrainerMedNeXtS_Finetune)
    assert pretraining_cases(checkpoint).training == tuple(sorted(splits(trainer)[0]['train']))
    trainer.check_pretraining_fold(str(checkpoint))
    foreign = tmp_path / 'elsewhere' / 'encoder.pth'
    trainer.check_pretraining_fold(str(foreign))
    trainer.check_pretraining_fold(None)  # no -pretrained_weights: nothing to say
    log = training_log(trainer.output_folder)
    assert 'WARNING' not in log
    assert f'the pre-training (fold 0, {checkpoint.parent / REPORT_FILE}) trained on none of fold 0\'s 2 ' \
           f'validation cases' in log
    assert log.count(f'no {REPORT_FILE} beside {foreign}') == 1
    assert log.count('were not checked against them') == 1


def test_adapt_weights_warns_about_every_fold_the_pretraining_saw_and_carries_its_cases_on(make_trainer, pretrained,
                                                                                           tmp_path, capsys):
    checkpoint = pretrained(0)
    fold_splits = splits(make_trainer(nnUNetTrainerMedNeXtS_Finetune))
    out = tmp_path / 'adapted.pth'
    result = run_cli(capsys, 'adapt-weights', checkpoint, '-d', DATASET_ID, '-c', CONFIGURATION, '-tr', FINETUNE,
                     '-o', out)
    assert result.returncode == 0, result.stderr
    # fold 0's training cases are the validation cases of folds 1-4
    assert 'trained on validation cases of fold 1: 2 of its 2 validation cases' in result.stdout
    assert all(f'fold {fold}: 2 of its 2' in result.stdout for fold in range(2, FOLDS))
    assert 'fold 0:' not in result.stdout and 'Fine-tuning fold 0 from it is fair.' in result.stdout
    assert f'-tr {PRETRAIN} -p nnUNetPlans` for N in 1, 2, 3, 4' in result.stdout
    saved = json.loads(out.with_suffix('.json').read_text())
    assert saved['pretraining']['fold'] == 0 and saved['pretraining']['training'] == sorted(fold_splits[0]['train'])
    assert saved['notes'][0].startswith('WARNING: the pre-training (fold 0, 8 training cases')
    # the fine-tuning trainer finds the cases in adapt-weights' report beside the adapted file: fold 0 is fair, 1 not
    trainer = make_trainer(nnUNetTrainerMedNeXtS_Finetune)
    trainer.check_pretraining_fold(str(out))
    assert 'trained on none of fold 0\'s 2 validation cases' in training_log(trainer.output_folder)
    trainer.fold = 1
    trainer.check_pretraining_fold(str(out))
    assert 'trained on validation cases of fold 1: 2 of its 2' in training_log(trainer.output_folder)


def test_adapt_weights_of_a_file_without_report_says_the_folds_were_not_checked(make_trainer, pretrained, tmp_path,
                                                                                capsys):
    checkpoint = pretrained('all')
    splits(make_trainer(nnUNetTrainerMedNeXtS_Finetune))
    lone = tmp_path / 'lone.pth'
    lone.write_bytes(checkpoint.read_bytes())
    result = run_cli(capsys, 'adapt-weights', lone, '-d', DATASET_ID, '-c', CONFIGURATION, '-tr', FINETUNE,
                     '-o', tmp_path / 'out.pth')
    assert result.returncode == 0, result.stderr
    assert f'no {REPORT_FILE} beside {lone}: which cases it was pre-trained on is unknown, so the folds were not ' \
           f'checked' in result.stdout
    assert 'WARNING' not in result.stdout
    result = run_cli(capsys, 'adapt-weights', checkpoint, '-d', DATASET_ID, '-c', CONFIGURATION, '-tr', FINETUNE,
                     '-o', tmp_path / 'all.pth')
    assert all(f'fold {fold}: 2 of its 2 validation cases' in result.stdout for fold in range(FOLDS))
    assert 'is fair' not in result.stdout
