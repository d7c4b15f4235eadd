"""Modern 3D segmentation networks as nnU-Net v2 trainers, without a fork."""
import os

__version__ = '0.1.0'


def trainers_folder() -> str:
    """The folder of trainer shim modules that belongs in ``nnUNet_extTrainer``."""
    import nnunet_plugins.trainers
    return os.path.dirname(os.path.abspath(nnunet_plugins.trainers.__file__))
