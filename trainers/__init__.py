"""Shim modules for nnU-Net's ``nnUNet_extTrainer`` search (installed as ``nnunet_plugins.trainers``).

nnU-Net imports every module of this folder under its file name and drops it from ``sys.modules``
afterwards, so the modules here only re-export classes defined in ``nnunet_plugins.training``
(a class defined in such a module could not be pickled), and their names are unique.
"""
