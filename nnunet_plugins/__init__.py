"""Modern 3D segmentation networks as nnU-Net v2 trainers, without a fork."""
import os

__version__ = '0.1.0'


def trainers_folder() -> str:
    """The folder of trainer shim modules that belongs in ``nnUNet_extTrainer``.

    A regular install puts the repository's ``trainers/`` inside the package; in a source checkout
    (editable install included) it stays beside the package.
    """
    package = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package, 'trainers')
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), 'trainers')
