"""Trainer classes by name, for every command: what ``nnUNetv2_train -tr NAME`` would use.

The plugin's own trainers come from :mod:`nnunet_plugins.registry` without a search; any other name goes through
nnU-Net's own search (nnU-Net's trainers, then the folders on ``nnUNet_extTrainer``).
"""
import contextlib
import io
import os

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_plugins import ext_trainer_folder
from nnunet_plugins.registry import plugin_trainer
from nnunet_plugins.workspace import environment


def nnunet_search(name: str) -> type[nnUNetTrainer]:
    """nnU-Net's own trainer search for ``name`` with ``nnUNet_extTrainer`` as this process's environment sets it
    (its narration of every module it imports swallowed); RuntimeError (nnU-Net's) if it finds none."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    with contextlib.redirect_stdout(io.StringIO()):
        return recursive_find_trainer_class_by_name(name)


def find_trainer(name: str) -> type[nnUNetTrainer] | None:
    """The trainer class called ``name`` that ``nnUNetv2_train -tr NAME`` would use with the plugin's folder on
    ``nnUNet_extTrainer``: a plugin trainer, one of nnU-Net's, or one of the user's folders; None if there is none."""
    if name == nnUNetTrainer.__name__:  # what the search finds first, after importing all of nnU-Net's trainers
        return nnUNetTrainer
    plugin = plugin_trainer(name)
    if plugin is not None:
        return plugin
    search_path = os.pathsep.join([ext_trainer_folder(), os.environ.get('nnUNet_extTrainer', '')]).rstrip(os.pathsep)
    with environment({'nnUNet_extTrainer': search_path}):
        try:
            return nnunet_search(name)
        except RuntimeError:
            return None


def trainer_named(name: str, option: str) -> type[nnUNetTrainer]:
    """:func:`find_trainer`, for a name the user gave with ``option`` (e.g. ``--trainer``); ValueError saying where
    trainer names come from if there is none."""
    found = find_trainer(name)
    if found is None:
        raise ValueError(f'{option} {name}: nnU-Net finds no trainer of that name; `nnunet-plugins trainers` lists '
                         f'the plugin\'s, and nnU-Net\'s own (e.g. nnUNetTrainer) work too')
    return found
