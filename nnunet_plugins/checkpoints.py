"""Reading checkpoint files a user names or trained, with an error that names the file instead of torch's."""
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

_ZIP_MAGIC = b'PK\x03\x04'  # torch.save writes zip archives (since torch 1.6, and so every nnU-Net v2 checkpoint)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names it and says why."""


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


def load_checkpoint_file(path: Path | str, map_location: str | torch.device = 'cpu') -> Any:
    """``torch.load`` of a checkpoint file (nnU-Net's format, pickled), raising :class:`CheckpointError` naming
    the file when it is missing, empty, truncated or corrupt."""
    check_readable(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f'{path} cannot be read as a checkpoint: it is corrupt ({type(error).__name__}: '
                              f'{error})') from None
