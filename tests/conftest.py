"""Shared fixtures: a tiny synthetic dataset, planned and preprocessed once per session with the stock CLI.

Trained folds are memoised per session (``Workspace.train`` in helpers.py), so tests that need the same
trained model share one training run instead of each paying for it.
"""
import json
import os

import pytest
import torch

from nnunet_plugins import settings, synthetic, ext_trainer_folder
from nnunet_plugins.workspace import nnunet_environment

from helpers import CONFIGURATION, DATASET_ID, DATASET_NAME, NUM_HELDOUT, NUM_TRAINING, STOCK_TRAINERS, Workspace


@pytest.fixture(scope='session')
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp('nnunet')
    raw = synthetic.write_dataset(root / 'nnUNet_raw', DATASET_ID, DATASET_NAME, NUM_TRAINING, NUM_HELDOUT,
                                  seed=1, size=synthetic.TINY)
    env = nnunet_environment(root, processes=1)
    for variable in settings.VARIABLES:
        env.pop(variable, None)
    # a folder of the user's own after the plugin's, as the README shows: nnU-Net's trainer with a test schedule
    env['nnUNet_extTrainer'] = os.pathsep.join([env['nnUNet_extTrainer'], str(STOCK_TRAINERS)])
    ws = Workspace(root, raw, env)
    # -npfp: the integrity check and the fingerprint take 8 processes unless told, as many as -np takes for the rest
    ws.run('nnUNetv2_plan_and_preprocess', '-d', DATASET_ID, '-c', CONFIGURATION, '-np', 1, '-npfp', 1,
           '--verify_dataset_integrity')
    return ws


@pytest.fixture
def make_trainer(workspace, tmp_path, monkeypatch):
    """Build a trainer the way nnUNetv2_train does, writing its fold folder under tmp_path."""
    monkeypatch.setenv('nnUNet_preprocessed', workspace.env['nnUNet_preprocessed'])
    monkeypatch.setenv('nnUNet_results', str(tmp_path))
    monkeypatch.setenv('nnUNet_extTrainer', ext_trainer_folder())
    monkeypatch.setenv('nnUNet_n_proc_DA', '0')  # data loading in this process: no augmentation workers to start
    for variable in settings.VARIABLES:
        monkeypatch.delenv(variable, raising=False)

    def make(trainer_class, configuration: dict | None = None, device: str = 'cpu', name: str = CONFIGURATION):
        """``trainer_class`` on fold 0 of plans configuration ``name``, updated with ``configuration``."""
        plans = json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text())
        plans['configurations'][name].update(configuration or {})
        plans['continue_training'] = False
        dataset_json = json.loads((workspace.preprocessed / 'dataset.json').read_text())
        return trainer_class(plans, name, 0, dataset_json, torch.device(device))
    return make
