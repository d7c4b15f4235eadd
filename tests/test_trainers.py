"""The plugin trainers in-process, on the tiny dataset planned by the stock CLI (see conftest.py)."""
import dataclasses
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_plugins import ext_trainer_folder, registry, settings, training
from nnunet_plugins.commands.benchmark.worker import random_batch
from nnunet_plugins.registry import plugin_trainer, plugin_trainers, pretrained_trainer, pretraining_trainers_of
from nnunet_plugins.settings import PluginSettings
from nnunet_plugins.training.base import MAX_NONFINITE_STEPS, Role
from nnunet_plugins.training.mednext import (MedNeXtTrainer, nnUNetTrainerMedNeXtL,
                                             nnUNetTrainerMedNeXtS)
from nnunet_plugins.training.utnetv2 import nnUNetTrainerUTNetV2
from nnunet_plugins.training.uxnet import nnUNetTrainerUXNet

from helpers import CONFIGURATION, training_log


SUPERVISED = ['nnUNetTrainerMedNeXtS', 'nnUNetTrainerMedNeXtB', 'nnUNetTrainerMedNeXtM', 'nnUNetTrainerMedNeXtL',
              'nnUNetTrainerMedNeXtS_k5', 'nnUNetTrainerMedNeXtB_k5', 'nnUNetTrainerMedNeXtM_k5',
              'nnUNetTrainerMedNeXtL_k5', 'nnUNetTrainerSwinUNETR', 'nnUNetTrainerUTNetV2', 'nnUNetTrainerUXNet']
PRETRAINING_METHODS = ('RCR', 'TokenCL', 'TokenBYOL', 'MAE')


def test_the_registry_finds_every_trainer_with_its_role():
    """Roles as the names promise them (the names are the stock CLI's; the registry reads only the roles)."""
    assert [t.__name__ for t in plugin_trainers(Role.SUPERVISED)] == SUPERVISED
    assert {t.__name__ for t in plugin_trainers(Role.UPKERN)} == {f'nnUNetTrainerMedNeXt{v}_k5_UpKern' for v in 'SBML'}
    assert {t.__name__ for t in plugin_trainers(Role.FINETUNE)} == {f'{name}_Finetune' for name in
                                                                    ('nnUNetTrainer', *SUPERVISED) if '_k5' not in name}
    pretraining = {f'{name}_Pretrain{method}' for name in ('nnUNetTrainer', *SUPERVISED) if '_k5' not in name
                   for method in PRETRAINING_METHODS}
    assert {t.__name__ for t in plugin_trainers(Role.PRETRAINING)} == pretraining
    everything = plugin_trainers()
    assert len(everything) == len(set(everything)) == 11 + 4 + 8 + 32
    assert [t.role for t in everything] == sorted((t.role for t in everything), key=list(Role).index)
    assert plugin_trainers(Role.FINETUNE, Role.UPKERN) == plugin_trainers(Role.FINETUNE) + plugin_trainers(Role.UPKERN)
    assert plugin_trainer('nnUNetTrainerUXNet').__name__ == 'nnUNetTrainerUXNet'
    assert plugin_trainer('nnUNetTrainer') is None and plugin_trainer('nnUNetTrainerPlugin') is None


def test_each_pretraining_trainer_names_the_trainer_it_pretrains_for():
    for pretraining in plugin_trainers(Role.PRETRAINING):
        supervised = pretrained_trainer(pretraining)
        assert supervised is nnUNetTrainer or supervised.role is Role.SUPERVISED
        assert pretraining.__name__ in {f'{supervised.__name__}_Pretrain{m}' for m in PRETRAINING_METHODS}
    assert [t.__name__ for t in pretraining_trainers_of(plugin_trainer('nnUNetTrainerMedNeXtS'))] == \
        [f'nnUNetTrainerMedNeXtS_Pretrain{method}' for method in PRETRAINING_METHODS]
    assert len(pretraining_trainers_of(nnUNetTrainer)) == 4
    assert pretraining_trainers_of(plugin_trainer('nnUNetTrainerMedNeXtS_k5')) == ()


def test_a_new_module_of_the_training_package_is_found_without_being_listed(tmp_path, monkeypatch):
    """Adding a family is a module: the registry and so the shim folder find its trainers."""
    (tmp_path / 'zz_family.py').write_text(
        'from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS\n'
        'class nnUNetTrainerZZ(nnUNetTrainerMedNeXtS):\n    """A family of its own."""\n'
        'class _Helper(nnUNetTrainerMedNeXtS):\n    pass\n')
    monkeypatch.setattr(training, '__path__', [*training.__path__, str(tmp_path)])
    monkeypatch.setenv('nnUNet_extTrainer', ext_trainer_folder())
    registry._declared.cache_clear()
    try:
        added = plugin_trainers(Role.SUPERVISED)[-1]
        assert (added.__name__, added.__module__) == ('nnUNetTrainerZZ', 'nnunet_plugins.training.zz_family')
        assert plugin_trainers(Role.SUPERVISED)[:-1] == tuple(plugin_trainer(n) for n in SUPERVISED)
        assert recursive_find_trainer_class_by_name('nnUNetTrainerZZ') is added
    finally:
        registry._declared.cache_clear()
        sys.modules.pop('nnunet_plugins.training.zz_family', None)


@pytest.mark.parametrize('trainer_class', plugin_trainers(Role.SUPERVISED, Role.UPKERN, Role.FINETUNE),
                         ids=lambda c: c.__name__)
def test_nnunet_finds_each_trainer_in_the_shim_folder(trainer_class, monkeypatch):
    monkeypatch.setenv('nnUNet_extTrainer', ext_trainer_folder())
    found = recursive_find_trainer_class_by_name(trainer_class.__name__)
    assert found is trainer_class
    assert found.__module__.startswith('nnunet_plugins.training.')
    assert pickle.loads(pickle.dumps(found)) is trainer_class  # lost if defined in nnU-Net's imported shims


def test_deep_supervision_scales_match_outputs_and_every_head_is_weighted(make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS)
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    outputs = trainer.network(torch.randn(1, 1, *patch))
    assert len(outputs) == len(scales) == len(trainer.configuration_manager.pool_op_kernel_sizes)
    for output, scale in zip(outputs, scales):
        assert list(output.shape[2:]) == [round(p * s) for p, s in zip(patch, scale)]
    weights = np.array(trainer.loss.weight_factors)
    assert np.all(weights > 0) and np.isclose(weights.sum(), 1)
    np.testing.assert_allclose(weights[1:] / weights[:-1], 0.5)


MEDNEXT_TRAINERS = [t for t in plugin_trainers(Role.SUPERVISED) if issubclass(t, MedNeXtTrainer)]


@pytest.mark.parametrize('trainer_class', MEDNEXT_TRAINERS, ids=lambda c: c.__name__)
def test_every_parameter_gets_a_gradient_in_one_training_step(make_trainer, trainer_class):
    """Each MedNeXt size and kernel, as nnUNetv2_train builds it (one of them runs through the CLI in
    test_stock_cli.py): the log names what was built, and one training step reaches every parameter."""
    trainer = make_trainer(trainer_class)
    trainer.initialize()
    network = trainer.network
    assert (network.gradient_checkpointing, network.kernel_sizes[-1]) == \
        (trainer_class.variant in 'ML', (trainer_class.kernel_size,) * 3)
    name = f'MedNeXt-{trainer_class.variant} k{trainer_class.kernel_size}'
    assert f'{name}: 4 levels' in training_log(trainer.output_folder)
    result = trainer.train_step(random_batch(trainer))
    assert np.isfinite(result['loss'])
    missing = [name for name, p in trainer.network.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in trainer.network.parameters())


def test_optimiser_and_schedule_follow_the_reference(make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS)
    trainer.initialize()
    optimiser = trainer.optimizer
    assert isinstance(optimiser, torch.optim.AdamW)
    group = optimiser.param_groups[0]
    assert (group['weight_decay'], group['eps'], trainer.num_epochs, trainer.num_iterations_per_epoch) == \
        (3e-5, 1e-4, 1000, 250)
    trainer.lr_scheduler.step(500)  # a function of the epoch alone, so --c resumes it exactly
    assert group['lr'] == pytest.approx(1e-3 * 0.5 ** 0.9)


def test_settings_declared_on_a_subclass_take_effect(make_trainer, monkeypatch):
    """nnUNetTrainer.__init__ assigns its own defaults as instance attributes; a two-line variant still works."""
    class MedNeXtS_short(nnUNetTrainerMedNeXtS):
        num_epochs = 3
        initial_lr = 5e-4
        num_iterations_per_epoch = 7

    trainer = make_trainer(MedNeXtS_short)
    assert (trainer.num_epochs, trainer.initial_lr, trainer.num_iterations_per_epoch) == (3, 5e-4, 7)
    trainer.initialize()
    assert trainer.optimizer.param_groups[0]['lr'] == 5e-4
    assert trainer.lr_scheduler.num_epochs == 3  # the poly decay's length
    # the environment's short schedule still wins over the class
    monkeypatch.setenv(settings.EPOCHS, '2')
    assert make_trainer(MedNeXtS_short).num_epochs == 2


def test_short_schedule_from_environment_is_announced(make_trainer, monkeypatch):
    monkeypatch.setenv(settings.EPOCHS, '3')
    monkeypatch.setenv(settings.ITERATIONS, '10')
    trainer = make_trainer(nnUNetTrainerMedNeXtS)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (3, 10, 2)
    log = training_log(trainer.output_folder)
    assert '!!!!! SHORT SCHEDULE' in log and '3 epochs x 10 iterations' in log


def test_bad_schedule_value_is_refused(make_trainer, monkeypatch):
    monkeypatch.setenv(settings.EPOCHS, 'ten')
    with pytest.raises(ValueError, match='nnUNet_plugins_epochs'):
        make_trainer(nnUNetTrainerMedNeXtS)


@pytest.mark.parametrize('value,trainer_class,expected', [
    (None, nnUNetTrainerMedNeXtS, False), (None, nnUNetTrainerMedNeXtL, True),
    ('0', nnUNetTrainerMedNeXtL, False), ('1', nnUNetTrainerMedNeXtS, True),
])
def test_checkpointing_switch(make_trainer, monkeypatch, value, trainer_class, expected):
    if value is not None:
        monkeypatch.setenv(settings.CHECKPOINTING, value)
    trainer = make_trainer(trainer_class)
    trainer.initialize()
    assert trainer.network.gradient_checkpointing is expected
    assert trainer.network.encoder.gradient_checkpointing is expected


def test_settings_are_read_once_when_the_trainer_is_made(make_trainer, monkeypatch, tmp_path):
    trainer = make_trainer(nnUNetTrainerMedNeXtS)
    monkeypatch.setenv(settings.EPOCHS, '2')
    monkeypatch.setenv(settings.CHECKPOINTING, '1')
    monkeypatch.setenv(settings.UPKERN_SOURCE, str(tmp_path / 'elsewhere.pth'))
    trainer.initialize()
    assert trainer.plugin_settings == PluginSettings()
    assert (trainer.num_epochs, trainer.lr_scheduler.num_epochs) == (1000, 1000)
    assert trainer.network.gradient_checkpointing is False
    # a trainer made now reads the new values
    assert make_trainer(nnUNetTrainerMedNeXtS).plugin_settings.checkpointing is True


def test_settings_from_an_environment():
    read = PluginSettings.from_environment({settings.EPOCHS: ' 3 ', settings.WARMUP_EPOCHS: '0',
                                            settings.CHECKPOINTING: 'off', settings.ITERATIONS: '',
                                            settings.UPKERN_SOURCE: '~/k5.pth', 'nnUNet_results': '/results'})
    assert (read.epochs, read.iterations, read.warmup_epochs, read.checkpointing) == (3, None, 0, False)
    assert read.upkern_source.name == 'k5.pth' and '~' not in str(read.upkern_source)
    assert read.as_set(settings.EPOCHS, settings.ITERATIONS) == "nnUNet_plugins_epochs='3'"
    assert read.value(settings.CHECKPOINTING) == 'off' and read.value(settings.ITERATIONS) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        read.epochs = 5


@pytest.mark.parametrize('variable,value,message', [
    (settings.ITERATIONS, '0', "nnUNet_plugins_iterations='0' is not a positive integer; set it to e.g. 5 or unset"),
    (settings.WARMUP_EPOCHS, '-1', "nnUNet_plugins_warmup_epochs='-1' is not an integer >= 0"),
    (settings.CHECKPOINTING, 'maybe', "nnUNet_plugins_checkpointing='maybe' is not a switch; set it to 0 or 1"),
])
def test_a_bad_value_is_refused_naming_the_variable_and_the_fix(variable, value, message):
    with pytest.raises(ValueError) as error:
        PluginSettings.from_environment({variable: value})
    assert message in str(error.value)


@pytest.mark.parametrize('trainer_class,name', [(nnUNetTrainerUXNet, '3D UX-Net'), (nnUNetTrainerUTNetV2, 'UTNetV2')])
def test_checkpointing_is_said_in_the_log_where_the_network_has_none(make_trainer, monkeypatch, trainer_class, name):
    monkeypatch.setenv(settings.CHECKPOINTING, '1')
    trainer = make_trainer(trainer_class)
    with torch.device('meta'):
        network = trainer_class.network_from_plan(trainer.configuration_manager, 1, 4, False)
    trainer.switch_gradient_checkpointing(network)
    assert not hasattr(network, 'gradient_checkpointing')
    assert (f"nnUNet_plugins_checkpointing='1' is not applied: {name} has no gradient checkpointing to switch"
            in training_log(trainer.output_folder))


def test_patch_check_and_scales_read_the_levels_without_building_the_network(make_trainer, monkeypatch):
    trainer = make_trainer(nnUNetTrainerMedNeXtS)

    def no_build(*args, **kwargs):
        raise AssertionError('the network was built')
    monkeypatch.setattr(MedNeXtTrainer, 'network_from_plan', classmethod(no_build))
    trainer.check_patch_size(trainer.configuration_manager)
    # the tiny plan's strides 1x1x1, 1x2x2, 2x2x2, 1x2x2
    assert trainer.deep_supervision_scales(trainer.configuration_manager) == \
        [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25], [0.5, 0.125, 0.125]]
    assert trainer.deep_supervision_weights() == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])


def test_training_stops_when_the_loss_stays_non_finite(make_trainer):
    # one small sample per step: the count of non-finite steps is the same at any size, and 50 steps at the
    # tiny plan's batch of two 14x32x32 patches take 20 s on a CPU
    trainer = make_trainer(nnUNetTrainerMedNeXtS, {'batch_size': 1, 'patch_size': [2, 16, 16]})
    trainer.initialize()
    batch = random_batch(trainer)
    finite_loss = trainer.loss

    def non_finite(value):  # a non-finite loss whose gradient is zero, so the weights stay finite
        return lambda output, target: output[0].sum() * 0 + value

    trainer.loss = non_finite(float('nan'))
    for _ in range(MAX_NONFINITE_STEPS - 1):
        trainer.train_step(batch)
    trainer.loss = finite_loss  # one finite step resets the count
    assert np.isfinite(trainer.train_step(batch)['loss'])
    trainer.loss = non_finite(float('inf'))
    for _ in range(MAX_NONFINITE_STEPS - 1):
        trainer.train_step(batch)
    with pytest.raises(FloatingPointError, match=f'{MAX_NONFINITE_STEPS} consecutive iterations'):
        trainer.train_step(batch)


def test_out_of_gpu_memory_says_what_ran_out_and_what_to_change(make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS, {'batch_size': 1, 'patch_size': [2, 16, 16]})
    trainer.initialize()

    def out_of_memory(output, target):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    trainer.loss = out_of_memory
    with pytest.raises(torch.OutOfMemoryError) as raised:
        trainer.train_step(random_batch(trainer))
    message = str(raised.value)
    assert message.startswith('nnUNetTrainerMedNeXtS ran out of GPU memory in a training step (patch [2, 16, 16], '
                              'batch 1, 4 outputs, gradient checkpointing off). To make it fit: set '
                              'nnUNet_plugins_checkpointing=1')
    assert '-tr nnUNetTrainerMedNeXtS --variants checkpointing' in message
    assert message.endswith('The error: CUDA out of memory. Tried to allocate 2.00 GiB')
    trainer.plain_network().gradient_checkpointing = True  # already on: nothing left to switch on
    assert 'gradient checkpointing on). To make it fit: a smaller batch' in trainer.out_of_memory_advice()


def test_incompatible_patch_size_is_refused_with_what_each_axis_needs(make_trainer):
    trainer = make_trainer(nnUNetTrainerMedNeXtS, {'patch_size': [14, 32, 30]})
    with pytest.raises(ValueError, match=r'axis 2 \(30\) must be divisible by 8.*such as \[14, 32, 32\]: '
                       r'`nnunet-plugins plans DATASET --preset mednext --patch 14 32 32 '
                       r'--spacing 3\.033 1\.18 1\.189`'):
        trainer.initialize()


def test_plans_without_topology_are_refused(workspace):
    plans = json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text())
    del plans['configurations'][CONFIGURATION]['architecture']['arch_kwargs']['strides']
    configuration = PlansManager(plans).get_configuration(CONFIGURATION)
    with pytest.raises(ValueError, match='architecture.arch_kwargs.strides'):
        nnUNetTrainerMedNeXtS.build_network_architecture(PlansManager(plans), configuration, 1, 4, False)
