"""Reading weight files: the one place this package opens them (``torch.load``), with errors that name the file.

A weight file is read whole by :func:`read_checkpoint`, or for a network's tensors by :func:`read_network_weights`,
which takes every layout the package accepts (:data:`LAYOUTS`): an nnU-Net checkpoint (``network_weights``; nnssl's
have an adaptation plan beside them, kept for :mod:`nnunet_plugins.weights.nnssl`), a ``state_dict`` entry (the Swin
UNETR authors' released encoder among them, renamed to our ``encoder.*`` names and converted to nnU-Net's axis order
by :func:`~nnunet_plugins.weights.swin_axes.to_nnunet_axes`), or a bare state dict; prefixes that DDP (``module.``)
and torch.compile (``_orig_mod.``) add are removed.
"""
import hashlib
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nnunet_plugins.weights.swin_axes import AXES_NOTE, to_nnunet_axes

_ZIP_MAGIC = b'PK\x03\x04'  # torch.save writes zip archives (since torch 1.6, and so every nnU-Net v2 checkpoint)
# prefixes of state-dict keys saved from a wrapped network: torch.compile's OptimizedModule, DDP
_WRAPPER_PREFIXES = ('_orig_mod.', 'module.')
_NAMED = 5  # how many keys an error shows
ADAPTATION_PLAN_KEY = 'nnssl_adaptation_plan'  # beside network_weights in nnssl's checkpoints (weights.nnssl)
# this package's pre-training checkpoints hold their heads under this key (pretraining.checkpoint) and an nnssl
# adaptation plan for nnssl's tools; they are read as the nnU-Net checkpoints they are, as before the plan
PRETRAINING_HEADS_KEY = 'pretraining_heads'
SEG_HEADS = 'seg_layers'  # the module name of every segmentation head, nnU-Net's networks' and this package's

LAYOUTS = {
    'nnunet': 'nnU-Net checkpoint (network_weights)',
    'nnssl': 'nnssl checkpoint (network_weights, nnssl_adaptation_plan)',
    'swinunetr-authors': "Swin UNETR authors' released encoder (state_dict, module.* keys)",
    'state_dict': 'checkpoint with a state_dict entry',
    'tensors': 'bare state dict',
}

# The Swin UNETR authors' released self-supervised encoder (MONAI's SwinUNETR.load_from format): {'state_dict': {...}}
# with keys 'module.patch_embed.proj.weight', 'module.layers1.0.blocks.0.mlp.fc1.weight', ...; MONAI's SwinTransformer,
# our SwinUNETR's ``encoder``, names the MLP's layers linear1/linear2
_SWIN_AUTHORS_PREFIX = 'module.'
_SWIN_AUTHORS_RENAMES = (('.mlp.fc1.', '.mlp.linear1.'), ('.mlp.fc2.', '.mlp.linear2.'))
ENCODER_PREFIX = 'encoder.'  # by this package's convention every network's encoder, stem included, is network.encoder


def is_seg_head(name: str) -> bool:
    """Whether the state-dict key or module name ``name`` is a segmentation head's (deep-supervision heads
    included): what nnU-Net's ``-pretrained_weights`` leaves out ('.seg_layers.' in the key), as the heads depend on
    the labels."""
    return SEG_HEADS in name.split('.')


class CheckpointError(ValueError):
    """A weight file that cannot be read, or holds no network weights; the message names it and says why."""


def check_readable(path: Path | str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a whole torch checkpoint archive (a cheap check that reads
    the archive's directory, not the tensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path} does not exist')
    if path.stat().st_size == 0:
        raise CheckpointError(f'{path} cannot be read as a checkpoint: it is empty (0 bytes)')
    if not zipfile.is_zipfile(path):
        with open(path, 'rb') as file:
            truncated = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
        why = ('it is truncated (the archive ends before its directory; was the copy or the run that wrote it cut '
               'short?)' if truncated else 'it is not a PyTorch checkpoint file')
        raise CheckpointError(f'{path} cannot be read as a checkpoint: {why}')


def read_checkpoint(path: Path | str, map_location: str | torch.device = 'cpu') -> Any:
    """The whole content of a weight file (nnU-Net's checkpoints are pickled dicts, hence ``weights_only=False``),
    its tensors on ``map_location``.

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt; the message names it.
    """
    check_readable(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f'{path} cannot be read as a checkpoint: it is corrupt ({type(error).__name__}: '
                              f'{error})') from None


def sha256_of(path: Path | str) -> str:
    """The SHA-256 of the file's bytes, as 64 hex digits."""
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for chunk in iter(lambda: file.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def strip_wrapper_prefixes(key: str) -> str:
    """``key`` without the prefixes torch.compile and DDP add to a wrapped network's state-dict keys."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _is_swin_authors_layout(state: Mapping[str, object]) -> bool:
    """Whether a state dict's keys are those of the Swin UNETR authors' released encoder (``module.patch_embed...``,
    ``module.layers1...``)."""
    return any(key.startswith((f'{_SWIN_AUTHORS_PREFIX}patch_embed.', f'{_SWIN_AUTHORS_PREFIX}layers1.'))
               for key in state)


def swin_authors_name_to_ours(key: str) -> str:
    """The name in our Swin UNETR's ``network.encoder`` of a tensor of the authors' released encoder, e.g.
    ``module.layers1.0.blocks.0.mlp.fc1.weight`` -> ``layers1.0.blocks.0.mlp.linear1.weight``."""
    name = key.removeprefix(_SWIN_AUTHORS_PREFIX)
    for old, new in _SWIN_AUTHORS_RENAMES:
        name = name.replace(old, new)
    return name


@dataclass(frozen=True)
class NetworkWeights:
    """A network's tensors read from a weight file, under the names this package's networks use."""

    state_dict: dict[str, torch.Tensor]
    layout: str  # a key of LAYOUTS
    trainer: str | None = None  # what an nnU-Net checkpoint says wrote it
    configuration: str | None = None
    notes: tuple[str, ...] = ()  # what the reader changed beyond names, for the user (a line each)
    adaptation_plan: Any = None  # an nnssl checkpoint's nnssl_adaptation_plan entry, as read (weights.nnssl parses it)


def read_network_weights(source: Path | str | Mapping[str, Any], name: str | None = None) -> NetworkWeights:
    """The network tensors of a weight file (or of its content, already read), on the CPU for a file.

    ``name`` is what messages call a ``source`` that is not a file (default: 'the given checkpoint').

    Raises:
        CheckpointError: the file cannot be read (:func:`read_checkpoint`), or it holds no network weights.
    """
    is_file = isinstance(source, (str, Path))
    name = str(source) if is_file else name or 'the given checkpoint'
    content = read_checkpoint(source) if is_file else source
    trainer = configuration = None
    if isinstance(content, Mapping) and isinstance(content.get('network_weights'), Mapping):
        state, layout = content['network_weights'], 'nnunet'
        trainer, configuration = content.get('trainer_name'), (content.get('init_args') or {}).get('configuration')
        if ADAPTATION_PLAN_KEY in content and PRETRAINING_HEADS_KEY not in content:
            layout = 'nnssl'
    elif isinstance(content, Mapping) and isinstance(content.get('state_dict'), Mapping):
        state, layout = content['state_dict'], 'state_dict'
    elif isinstance(content, Mapping):
        state, layout = content, 'tensors'
    else:
        state, layout = {}, ''
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        found = list(content)[:_NAMED] if isinstance(content, Mapping) else type(content).__name__
        raise CheckpointError(
            f'{name} holds no network weights (found {found}); expected an nnU-Net checkpoint (a "network_weights" '
            f'entry), a "state_dict" of tensors, or a state dict of tensors.')
    if layout == 'state_dict' and _is_swin_authors_layout(state):
        try:
            converted = to_nnunet_axes(state)
        except ValueError as error:
            raise CheckpointError(f'{name} has the keys of the Swin UNETR authors\' encoder but not its shapes: '
                                  f'{error}') from None
        renamed = {ENCODER_PREFIX + swin_authors_name_to_ours(key): value for key, value in converted.items()}
        return NetworkWeights(renamed, 'swinunetr-authors', notes=(AXES_NOTE,))
    return NetworkWeights({strip_wrapper_prefixes(key): value for key, value in state.items()}, layout, trainer,
                          configuration, adaptation_plan=content.get(ADAPTATION_PLAN_KEY) if layout == 'nnssl' else None)
