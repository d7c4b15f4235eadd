"""The folder to put on ``nnUNet_extTrainer`` (``nnunet-plugins trainers --path`` prints it): no trainers of its own,
only a shim module that nnU-Net's trainer search imports.

nnU-Net imports every module of this folder under its file name and drops it from ``sys.modules`` afterwards, so the
module here only re-exports the classes :mod:`nnunet_plugins.registry` finds in :mod:`nnunet_plugins.training` (a
class defined in such a module could not be pickled), and its name is unique.
"""
