"""Running nnU-Net's stock command-line tools in a self-contained folder, as the demo and the tests do."""
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from nnunet_plugins import ext_trainer_folder

NNUNET_FOLDERS = ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')


def nnunet_environment(root: str | Path, processes: int = 1, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default: this process's environment) for nnU-Net commands working under ``root``.

    Sets ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` to folders of the same names
    in ``root``, puts the plugin's trainer folder first on ``nnUNet_extTrainer``, and limits nnU-Net's
    worker processes to ``processes`` (its defaults assume a large machine).
    """
    env = dict(os.environ if base is None else base)
    for variable in NNUNET_FOLDERS:
        env[variable] = str(Path(root).resolve() / variable)
    others = [p for p in env.get('nnUNet_extTrainer', '').split(os.pathsep) if p and p != ext_trainer_folder()]
    env['nnUNet_extTrainer'] = os.pathsep.join([ext_trainer_folder(), *others])
    env['nnUNet_n_proc_DA'] = str(processes)
    env['nnUNet_def_n_proc'] = str(processes)
    env['PYTHONUNBUFFERED'] = '1'
    return env


def stock_command(name: str) -> str:
    """Path of an nnU-Net console script installed beside this Python, falling back to ``PATH``."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def run_stock(args: Sequence[str], env: Mapping[str, str], capture: bool = False) -> subprocess.CompletedProcess:
    """Run an nnU-Net command (``args[0]`` is its name, e.g. ``nnUNetv2_train``); raise with its output if it fails."""
    command = [stock_command(args[0]), *map(str, args[1:])]
    result = subprocess.run(command, env=dict(env), text=True, capture_output=capture,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        output = f'\n{result.stdout}\n{result.stderr}' if capture else ''
        raise RuntimeError(f'`{" ".join(command)}` failed with exit code {result.returncode}{output}')
    return result


@contextmanager
def environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables of this process inside the block; restore them afterwards."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
