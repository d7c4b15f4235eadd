"""Moved to :mod:`nnunet_plugins.weights`; kept only while ``training/base.py`` and ``training/pretraining.py``, which
other branches of issue 24 rewrite, still import from here. Delete when they import from ``nnunet_plugins.weights``."""
from nnunet_plugins.weights.files import CheckpointError, check_readable

__all__ = ['CheckpointError', 'check_readable']
