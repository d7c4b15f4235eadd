"""Pre-training against what main wrote before the ``nnunet_plugins.pretraining`` package (tests/fixtures/legacy_pretraining/, made
by its script on the commit ``steps.json`` names): each method's checkpoint resumes with ``--c`` and its steps give
the same losses, and nnU-Net's trainer fine-tunes from it; and nnU-Net's methods are overridden in one module of
pre-training (their signatures: test_nnunet_contract.py).

The fixtures are never regenerated: where a default has changed since, the methods here are pinned to the settings
that give the old behaviour, so "the same losses" keeps its meaning. Since issue 25 that is, for the token methods,
the old eq. 3 weight (old w = new w + 1: ``same_position_weight=6`` for the old default 5), the token-region masking
(``mask_granularity='token'``) and the old fill, 0 (``mask_noise_std=0``); RCR's cutout and every method's optimiser
are pinned to what the fixtures were made with (the paper's text's cutout, AdamW), which are still the defaults."""
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import pytest
import torch
from nnunetv2.run.run_training import maybe_load_checkpoint
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_plugins import settings
from nnunet_plugins.pretraining import RCR, OptimiserSettings, PretrainingTrainer, TokenBYOL, TokenCL
from nnunet_plugins.pretraining.checkpoint import HEADS_KEY
from nnunet_plugins.registry import plugin_trainers
from nnunet_plugins.training.base import Role

LEGACY = Path(__file__).resolve().parent / 'fixtures' / 'legacy_pretraining'
STEPS = json.loads((LEGACY / 'steps.json').read_text())
# the legacy token heads were made smaller than the defaults, to keep the files small (see the fixtures' script).
# The fixtures are not regenerated when a default changes: the methods are pinned to the settings that reproduce
# the old code's behaviour (issue 25). Eq. 3: the old code added w times the same-position terms on top of eq. 1's
# denominator, which already held them once, so its default w = 5 is same_position_weight = 6 now. Masking: the old
# code masked the regions of the tokens and set them to 0, not the paper's input blocks filled with noise.
# Issue 25 also made RCR's cutout and the optimiser settings; the fixtures' are pinned, should a default change.
LEGACY_OPTIMISER = {'optimiser': OptimiserSettings(initial_lr=4e-4, weight_decay=1e-5, adam_eps=1e-4, warmup_epochs=2,
                                                   algorithm='AdamW', warmup_from_zero=False)}
LEGACY_MASKING = {'mask_granularity': 'token', 'mask_noise_std': 0.0, **LEGACY_OPTIMISER}
LEGACY_TOKEN_CL = {'same_position_weight': 6.0, **LEGACY_MASKING}
METHODS = {'RCR': RCR(cutout='text', **LEGACY_OPTIMISER), 'TokenCL': TokenCL(**STEPS['token_heads'], **LEGACY_TOKEN_CL),
           'TokenBYOL': TokenBYOL(**STEPS['token_heads'], **LEGACY_MASKING)}


def test_nnunets_methods_are_overridden_in_nnunet_overrides_only():
    for trainer in (PretrainingTrainer, *plugin_trainers(Role.PRETRAINING)):
        assert not [name for name in vars(trainer) if name != '__init_subclass__'
                    and callable(getattr(nnUNetTrainer, name, None))], trainer.__name__


def legacy_trainer(method: str, results: Path) -> PretrainingTrainer:
    """The refactored trainer of the legacy checkpoint ``method`` (its class name and the fixtures' tiny plan), built
    as nnUNetv2_train builds it, its fold folder holding that checkpoint as ``checkpoint_latest.pth``."""
    cls = type(STEPS['methods'][method]['trainer'], (PretrainingTrainer,),
               {'network_trainer': nnUNetTrainer, 'method': METHODS[method]})
    plans = json.loads((LEGACY / 'plans.json').read_text())
    trainer = cls({**plans, 'continue_training': True}, '3d_fullres', 0,
                  json.loads((LEGACY / 'dataset.json').read_text()), torch.device('cpu'))
    shutil.copy(LEGACY / f'{method}.pth', Path(trainer.output_folder) / 'checkpoint_latest.pth')
    return trainer


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv('nnUNet_results', str(tmp_path))
    monkeypatch.delenv('nnUNet_preprocessed', raising=False)
    for variable in settings.VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


@pytest.mark.parametrize('method', METHODS)
def test_a_legacy_checkpoint_resumes_with_continue_and_its_steps_give_the_same_losses(results, method):
    trainer = legacy_trainer(method, results)
    # nothing preprocessed: the fixture's plan has no dataset, and the steps load none
    with mock.patch.object(nnunet_trainer_module, 'infer_dataset_class', return_value=None):
        maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)
    legacy = torch.load(LEGACY / f'{method}.pth', map_location='cpu', weights_only=False)
    assert trainer.current_epoch == legacy['current_epoch'] == 1
    model = trainer.pretraining_model()
    for ours, theirs in ((model.network, legacy['network_weights']), (model.heads, legacy[HEADS_KEY])):
        assert ours.state_dict().keys() == theirs.keys()
        assert all(torch.equal(tensor, theirs[key]) for key, tensor in ours.state_dict().items())
    assert trainer.optimizer.state_dict()['state'].keys() == legacy['optimizer_state']['state'].keys()
    trainer.rng = np.random.default_rng(STEPS['step_views'])
    torch.manual_seed(STEPS['step_views'])
    for seed, expected in zip(STEPS['step_batches'], STEPS['methods'][method]['steps'], strict=True):
        data = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(seed))
        losses = {key: float(value) for key, value in trainer.train_step({'data': data, 'target': None}).items()}
        assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize('method', METHODS)
def test_nnunets_trainer_fine_tunes_from_a_legacy_checkpoint(results, method):
    plans = json.loads((LEGACY / 'plans.json').read_text())
    trainer = nnUNetTrainer({**plans, 'continue_training': False}, '3d_fullres', 0,
                            json.loads((LEGACY / 'dataset.json').read_text()), torch.device('cpu'))
    with mock.patch.object(nnunet_trainer_module, 'infer_dataset_class', return_value=None):
        maybe_load_checkpoint(trainer, continue_training=False, validation_only=False,
                              pretrained_weights_file=str(LEGACY / f'{method}.pth'))
    pretrained = torch.load(LEGACY / f'{method}.pth', map_location='cpu', weights_only=False)['network_weights']
    encoder = [key for key in pretrained if key.startswith('encoder.')]
    assert encoder and all(torch.equal(trainer.network.state_dict()[key], pretrained[key]) for key in encoder)
