"""Every trainer class the plugin declares, found in the classes themselves and selected by what it is for
(:class:`~nnunet_plugins.training.base.Role`).

A trainer is a class named ``nnUNetTrainer...`` with a ``role``, defined in a module of
:mod:`nnunet_plugins.training`; a new module there is found without being listed anywhere. ``nnunet-plugins
trainers``, the benchmark, the ``nnUNet_extTrainer`` shim and the tests take their trainer lists from here.
"""
import functools
import importlib
import pkgutil

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_plugins import training
from nnunet_plugins.training.base import Role, nnUNetTrainerPlugin


@functools.cache
def _declared() -> tuple[type[nnUNetTrainerPlugin], ...]:
    """The trainer classes of every module of the training package (their shared base ``nnUNetTrainerPlugin`` is
    none): modules in pkgutil's (name) order, classes in the order their module declares them."""
    found = []
    for module_info in pkgutil.walk_packages(training.__path__, f'{training.__name__}.'):
        module = importlib.import_module(module_info.name)
        found += [value for name, value in vars(module).items()
                  if isinstance(value, type) and name.startswith(nnUNetTrainer.__name__) and hasattr(value, 'role')
                  and value.__module__ == module.__name__ and value is not nnUNetTrainerPlugin]
    return tuple(found)


def plugin_trainers(*roles: Role) -> tuple[type[nnUNetTrainerPlugin], ...]:
    """The plugin's trainer classes of ``roles`` (default: every role), role by role in the order given (Role's
    own order by default), each role's in declaration order."""
    return tuple(trainer for role in roles or tuple(Role) for trainer in _declared() if trainer.role is role)


def plugin_trainer(name: str) -> type[nnUNetTrainerPlugin] | None:
    """The plugin's trainer class called ``name``, or None."""
    return next((trainer for trainer in _declared() if trainer.__name__ == name), None)


def pretrained_trainer(pretraining: type[nnUNetTrainerPlugin]) -> type[nnUNetTrainer]:
    """The trainer whose network the pre-training trainer ``pretraining`` pre-trains (and which fine-tunes from its
    ``checkpoint_final.pth``): a plugin trainer of role SUPERVISED, or nnU-Net's own ``nnUNetTrainer``."""
    return pretraining.network_trainer


def pretraining_trainers_of(trainer: type[nnUNetTrainer]) -> tuple[type[nnUNetTrainerPlugin], ...]:
    """The pre-training trainers of ``trainer``'s network (:func:`pretrained_trainer` is ``trainer``), in declaration
    order; none for a trainer that is not a plugin's supervised trainer or ``nnUNetTrainer``."""
    return tuple(p for p in plugin_trainers(Role.PRETRAINING) if pretrained_trainer(p) is trainer)
