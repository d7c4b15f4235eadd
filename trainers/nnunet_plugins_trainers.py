"""Re-exports the plugin trainers for nnU-Net's trainer search (see __init__.py)."""
from nnunet_plugins.training import *  # noqa: F401,F403  (the names in nnunet_plugins.training.__all__)
