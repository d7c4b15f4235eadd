"""Every trainer class the plugin declares, selected by what it is for (:class:`~nnunet_plugins.training.base.Role`).

``nnunet-plugins trainers``, the benchmark, the ``nnUNet_extTrainer`` shim and the tests take their trainer lists
from here.
"""
from nnunet_plugins.training import PRETRAINERS, TRAINERS
from nnunet_plugins.training.base import Role, nnUNetTrainerPlugin


def plugin_trainers(*roles: Role) -> tuple[type[nnUNetTrainerPlugin], ...]:
    """The plugin's trainer classes in declaration order; with ``roles``, only the classes of those roles."""
    return tuple(trainer for trainer in TRAINERS + PRETRAINERS if not roles or trainer.role in roles)
