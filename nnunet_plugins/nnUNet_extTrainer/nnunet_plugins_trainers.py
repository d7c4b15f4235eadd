"""Re-exports the plugin's trainer classes under their names for nnU-Net's trainer search (see __init__.py)."""
from nnunet_plugins.registry import plugin_trainers

globals().update({trainer.__name__: trainer for trainer in plugin_trainers()})
