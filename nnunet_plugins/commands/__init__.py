"""The ``nnunet-plugins`` subcommands' work: ``plans`` (paper presets), ``benchmark``, ``demo`` and ``doctor``.

Commands use the trainers and networks; nothing under :mod:`nnunet_plugins.training` or
:mod:`nnunet_plugins.networks` imports a command.
"""
