"""The ``nnunet-plugins`` subcommands' work: ``plans`` (paper presets), ``benchmark``, ``evaluate``, ``demo``,
``doctor``, ``adapt-weights`` and ``add-unlabeled``; and ``python -m nnunet_plugins.train`` (nnUNetv2_train in a
torchrun group, :mod:`~nnunet_plugins.commands.train`).

Commands use the registry, the trainers and the networks, and do not import each other: what several need (a trainer
class by name: :mod:`~nnunet_plugins.commands.lookup`, a dataset's plans: :mod:`~nnunet_plugins.commands.dataset_plans`)
is a module of its own. Nothing under :mod:`nnunet_plugins.training` or :mod:`nnunet_plugins.networks` imports a
command.
"""
