"""Finding and reading a dataset's plans in ``nnUNet_preprocessed``, for the commands that read plans."""
import json
from dataclasses import dataclass
from pathlib import Path

from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id, maybe_convert_to_dataset_name


class PlansFileError(ValueError):
    """A dataset's plans cannot be found or read; the message names the file and what to do."""


@dataclass(frozen=True)
class DatasetPlans:
    """One plans file of a dataset: ``nnUNet_preprocessed/<dataset_name>/<plans_identifier>.json``, parsed."""

    dataset_name: str
    plans_identifier: str
    plans_file: Path
    plans: dict

    @property
    def folder(self) -> Path:
        """The dataset's folder in ``nnUNet_preprocessed`` (``dataset.json`` and the other plans files are there)."""
        return self.plans_file.parent

    def dataset_json(self) -> dict:
        return read_json(self.folder / 'dataset.json', 'the dataset.json that nnUNetv2_plan_and_preprocess copied')


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; a missing, unreadable or truncated file is a :class:`PlansFileError` naming it."""
    try:
        content = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlansFileError(f'{path} does not exist ({what}).') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlansFileError(f'{path} cannot be read as JSON ({type(error).__name__}: {error}); it is {what}. '
                             f'Restore it, or re-create it with the nnU-Net command that wrote it.') from None
    if not isinstance(content, dict):
        raise PlansFileError(f'{path} holds a JSON {type(content).__name__}, not an object; it is {what}.')
    return content


def dataset_name(dataset: str | int) -> str:
    """nnU-Net's folder name of ``dataset`` (an id such as ``4`` or a name such as ``Dataset004_Hippocampus``)."""
    try:
        return maybe_convert_to_dataset_name(str(dataset))
    except (RuntimeError, ValueError) as error:
        raise PlansFileError(f'dataset {dataset!r} not found: {error}') from None


def plans_files(dataset_folder: Path) -> dict[Path, dict]:
    """Every plans file of a dataset's preprocessed folder (a JSON file with ``configurations``), parsed.

    Files that are not plans (``dataset.json``, the fingerprint) or cannot be parsed are left out.
    """
    found = {}
    for path in sorted(Path(dataset_folder).glob('*.json')):
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(content, dict) and isinstance(content.get('configurations'), dict):
            found[path] = content
    return found


def read_dataset_plans(dataset: str | int, plans_identifier: str) -> DatasetPlans:
    """The plans ``plans_identifier`` of ``dataset`` in ``nnUNet_preprocessed``.

    Raises:
        PlansFileError: ``nnUNet_preprocessed`` is unset, the dataset is unknown, or the plans file is
            missing or not a readable plans file; the message says which and what to do.
    """
    if not nnUNet_preprocessed.is_set():
        raise PlansFileError('nnUNet_preprocessed is not set; set nnU-Net\'s folder variables as for '
                             'nnUNetv2_preprocess (`nnunet-plugins doctor` checks them).')
    name = dataset_name(dataset)
    plans_file = Path(nnUNet_preprocessed.get()) / name / f'{plans_identifier}.json'
    if not plans_file.is_file():
        folder = plans_file.parent
        available = [path.stem for path in plans_files(folder)] if folder.is_dir() else []
        raise PlansFileError(f'no plans file {plans_file}. Plan the dataset first (nnUNetv2_plan_experiment -d '
                             f'{convert_dataset_name_to_id(name)}), or pick one of its plans with -p: '
                             f'{", ".join(available) or "none yet"}.')
    plans = read_json(plans_file, f'the plans {plans_identifier} of {name}')
    if not isinstance(plans.get('configurations'), dict):
        raise PlansFileError(f'{plans_file} has no "configurations", so it is not an nnU-Net plans file.')
    return DatasetPlans(name, plans_identifier, plans_file, plans)
