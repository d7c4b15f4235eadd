"""The plugin's trainer classes: one module per network family (``mednext``, ``uxnet``, ``utnetv2``, ``swinunetr``),
each ending with its family's ``_Finetune`` and ``_Pretrain<METHOD>`` declarations, and ``nnunet_network`` for the
pre-training of nnU-Net's own network.

nnU-Net finds them by name through the shim module in ``nnunet_plugins/trainers`` (the folder that ``nnunet-plugins
trainers --path`` prints for ``nnUNet_extTrainer``). Importing this package loads no family module; the names below
load them on first use (PEP 562), so that ``nnunet_plugins.pretraining``, which the family modules declare their
pre-training trainers with, can itself build on ``training.base`` without an import cycle.
"""
import importlib

FAMILY_MODULES = ('mednext', 'uxnet', 'utnetv2', 'swinunetr', 'nnunet_network')
# trainers that build the same network as another one and differ only in how they start or schedule
VARIANT_SUFFIXES = ('_UpKern', '_Finetune')


def _declared() -> dict:
    """Every ``nnUNetTrainer...`` class the family modules declare, by name, in declaration order, with the lists
    ``TRAINERS`` (supervised, UpKern, fine-tuning), ``PRETRAINERS`` and ``__all__``."""
    from nnunet_plugins.training.base import Role
    classes = {}
    for family in FAMILY_MODULES:
        module = importlib.import_module(f'{__name__}.{family}')
        classes.update({name: value for name, value in vars(module).items() if isinstance(value, type)
                        and value.__module__ == module.__name__ and name.startswith('nnUNetTrainer')})
    return {**classes, '__all__': list(classes),
            'TRAINERS': tuple(c for c in classes.values() if c.role is not Role.PRETRAINING),
            'PRETRAINERS': tuple(c for c in classes.values() if c.role is Role.PRETRAINING)}


def __getattr__(name: str):
    if name in ('TRAINERS', 'PRETRAINERS', '__all__') or name.startswith('nnUNetTrainer'):
        declared = _declared()
        globals().update(declared)
        if name in declared:
            return declared[name]
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
