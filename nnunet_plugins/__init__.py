"""Modern 3D segmentation networks as nnU-Net v2 trainers, without a fork."""
import os

__version__ = '0.1.0'


def ext_trainer_folder() -> str:
    """The folder that belongs in ``nnUNet_extTrainer``: the package's ``nnUNet_extTrainer/``, whose shim module
    lets nnU-Net's trainer search find the plugin trainers by name."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nnUNet_extTrainer')
