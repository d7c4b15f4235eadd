"""The nnU-Net 2.8 methods the plugin overrides still have the signatures its overrides were written against: the
supervised trainers' base (training/base.py, UpKern's start in training/mednext.py) and pre-training
(pretraining/nnunet_overrides.py, the only pre-training module that overrides nnU-Net). A minor nnU-Net release that
changes one fails here, naming the method and the module to adapt."""
import inspect

from nnunetv2.training.logging.nnunet_logger import LocalLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_plugins.pretraining.nnunet_overrides import PretrainingLogger, PretrainingOverrides
from nnunet_plugins.training.base import nnUNetTrainerPlugin
from nnunet_plugins.training.mednext import MedNeXtUpKernTrainer

# nnU-Net 2.8.1's methods as their parameters read there (annotations left out)
RECORDED = {
    (nnUNetTrainer, '__init__'): "self, plans, configuration, fold, dataset_json, device=device(type='cuda')",
    (nnUNetTrainer, 'build_network_architecture'): 'plans_manager, configuration_manager, num_input_channels, '
                                                   'num_output_channels, enable_deep_supervision=True',
    (nnUNetTrainer, 'initialize'): 'self',
    (nnUNetTrainer, 'do_split'): 'self',
    (nnUNetTrainer, '_get_deep_supervision_scales'): 'self',
    (nnUNetTrainer, 'set_deep_supervision_enabled'): 'self, enabled',
    (nnUNetTrainer, '_build_loss'): 'self',
    (nnUNetTrainer, 'configure_optimizers'): 'self',
    (nnUNetTrainer, 'configure_rotation_dummyDA_mirroring_and_inital_patch_size'): 'self',
    (nnUNetTrainer, 'on_train_start'): 'self',
    (nnUNetTrainer, 'train_step'): 'self, batch',
    (nnUNetTrainer, 'validation_step'): 'self, batch',
    (nnUNetTrainer, 'on_train_epoch_end'): 'self, train_outputs',
    (nnUNetTrainer, 'on_validation_epoch_end'): 'self, val_outputs',
    (nnUNetTrainer, 'on_epoch_end'): 'self',
    (nnUNetTrainer, 'perform_actual_validation'): 'self, save_probabilities=False',
    (nnUNetTrainer, 'save_checkpoint'): 'self, filename',
    (nnUNetTrainer, 'load_checkpoint'): 'self, filename_or_checkpoint',
    (nnUNetTrainer, 'on_train_end'): 'self',
    (LocalLogger, '__init__'): 'self, verbose=False',
    (LocalLogger, 'plot_progress_png'): 'self, output_folder',
}
# which of our classes override nnU-Net's, and where they are
OVERRIDING = {
    nnUNetTrainerPlugin: (nnUNetTrainer, 'nnunet_plugins/training/base.py'),
    MedNeXtUpKernTrainer: (nnUNetTrainer, 'nnunet_plugins/training/mednext.py'),
    PretrainingOverrides: (nnUNetTrainer, 'nnunet_plugins/pretraining/nnunet_overrides.py'),
    PretrainingLogger: (LocalLogger, 'nnunet_plugins/pretraining/nnunet_overrides.py'),
}


def parameters(function) -> str:
    """``function``'s parameters with their defaults, without annotations."""
    return ', '.join(str(p.replace(annotation=inspect.Parameter.empty))
                     for p in inspect.signature(function).parameters.values())


def test_every_override_of_nnunet_is_recorded_and_nnunet_still_has_its_signature():
    for ours, (base, module) in OVERRIDING.items():
        overridden = {name for name in vars(ours) if callable(getattr(base, name, None))}
        unrecorded = sorted(name for name in overridden if (base, name) not in RECORDED)
        assert not unrecorded, f'{ours.__name__} overrides {base.__name__}.{unrecorded}: record their signatures'
        for name in sorted(overridden):
            expected, now = RECORDED[base, name], parameters(getattr(base, name))
            assert now == expected, (f'nnU-Net changed {base.__name__}.{name}: now ({now}), {ours.__name__} in '
                                     f'{module} overrides it as ({expected})')


def test_a_changed_signature_is_caught(monkeypatch):
    monkeypatch.setattr(nnUNetTrainer, 'train_step', lambda self, batch, scaler: None)
    try:
        test_every_override_of_nnunet_is_recorded_and_nnunet_still_has_its_signature()
    except AssertionError as error:
        assert 'nnU-Net changed nnUNetTrainer.train_step' in str(error)
    else:
        raise AssertionError('a changed signature of train_step went unnoticed')
