"""The test helpers themselves, where a mistake would let a test pass on the wrong run."""
from pathlib import Path

import pytest

from nnunet_plugins import settings

from helpers import DATASET_ID, Workspace


def test_a_second_training_call_gets_the_first_run_only_when_it_asks_for_the_same_run(tmp_path, monkeypatch):
    runs = []
    workspace = Workspace(tmp_path, tmp_path / 'raw', {})
    monkeypatch.setattr(workspace, 'run', lambda *args, env: runs.append((args, env[settings.EPOCHS])))
    fold = workspace.train('nnUNetTrainerMedNeXtS', 0)
    assert workspace.train('nnUNetTrainerMedNeXtS', 0, epochs=1, iterations=2) == fold
    assert len(runs) == 1 and runs[0][0][:4] == ('nnUNetv2_train', DATASET_ID, '3d_fullres', 0)
    with pytest.raises(ValueError, match=r'with \(epochs, iterations, extra\) = \(1, 2, \(\)\), not \(3, 2, \(\)\)'):
        workspace.train('nnUNetTrainerMedNeXtS', 0, epochs=3)
    with pytest.raises(ValueError, match=r"not \(1, 2, \('--npz',\)\)"):
        workspace.train('nnUNetTrainerMedNeXtS', 0, extra=('--npz',))
    assert workspace.train('nnUNetTrainerMedNeXtS', 1, epochs=3) == fold.parent / 'fold_1'  # another fold: its own
    assert [epochs for _, epochs in runs] == ['1', '3'] and isinstance(fold, Path)
