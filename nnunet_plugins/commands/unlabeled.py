"""``nnunet-plugins add-unlabeled``: preprocess a folder of unlabeled images with a dataset's plans, for pre-training.

The images are named as nnU-Net's ``imagesTr`` (``CASE_0000.nii.gz``, one file per channel of the dataset) and are
checked, names and headers, before any is preprocessed. Preprocessing is nnU-Net's own: the plans' preprocessor
class (``DefaultPreprocessor`` unless the plans name another) with the configuration's spacing, normalisation and
resampling, and the dataset's intensity statistics, exactly as ``nnUNetv2_preprocess`` treats a case, without a
label. The cases go to :func:`~nnunet_plugins.pretraining.unlabeled.unlabeled_folder`, where only pre-training trainers
look (see :mod:`nnunet_plugins.pretraining.unlabeled`).
"""
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_pickle, write_pickle
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from nnunet_plugins.commands.dataset_plans import PlansFileError, read_dataset_plans
from nnunet_plugins.pretraining.unlabeled import unlabeled_folder, unlabeled_identifiers

NAMED = 5  # how many offending files an error names


class UnlabeledImagesError(ValueError):
    """The folder of unlabeled images cannot be added; the message names the files and the fix."""


@dataclass(frozen=True)
class UnlabeledCase:
    identifier: str
    files: tuple[Path, ...]  # one per channel, channel 0 first


def _listing(items: list[str]) -> str:
    return ', '.join(items[:NAMED]) + (f' and {len(items) - NAMED} more' if len(items) > NAMED else '')


def find_cases(folder: Path, file_ending: str, channels: int) -> list[UnlabeledCase]:
    """The cases of ``folder``: files ``CASE_XXXX<file_ending>``, each case with channels 0 to ``channels - 1``.

    Raises :class:`UnlabeledImagesError` naming files of other names, and cases with a channel missing or extra.
    """
    pattern = re.compile(rf'^(.+)_(\d{{4}}){re.escape(file_ending)}$')
    by_case: dict[str, dict[int, Path]] = {}
    strangers = []
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith('.')):
        match = pattern.match(path.name)
        if match is None or not path.is_file():
            strangers.append(path.name)
        else:
            by_case.setdefault(match.group(1), {})[int(match.group(2))] = path
    if strangers:
        raise UnlabeledImagesError(
            f'{folder} holds files not named as nnU-Net images, CASE_XXXX{file_ending} (XXXX the channel, 0000 to '
            f'{channels - 1:04d}): {_listing(strangers)}. Rename or move them.')
    if not by_case:
        raise UnlabeledImagesError(f'{folder} holds no images (CASE_0000{file_ending}).')
    expected = set(range(channels))
    wrong = [f'{case} has channels {sorted(found)}' for case, found in by_case.items() if set(found) != expected]
    if wrong:
        raise UnlabeledImagesError(
            f'the dataset has {channels} channel(s), one file each (_0000 to _{channels - 1:04d}), but in {folder}: '
            f'{_listing(wrong)}.')
    return [UnlabeledCase(case, tuple(found[c] for c in range(channels))) for case, found in by_case.items()]


def check_headers(cases: list[UnlabeledCase]) -> None:
    """Raise :class:`UnlabeledImagesError` naming files that cannot be read or hold more than one channel (vector
    pixels, or a 4d volume), reading only their headers."""
    bad = []
    for case in cases:
        for path in case.files:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                bad.append(f'{path.name} (not readable as an image)')
                continue
            if reader.GetNumberOfComponents() != 1 or reader.GetDimension() > 3:
                bad.append(f'{path.name} ({reader.GetDimension()}d, {reader.GetNumberOfComponents()} components per '
                           f'voxel, size {list(reader.GetSize())})')
    if bad:
        raise UnlabeledImagesError(f'nnU-Net takes one 2d or 3d single-channel image per file; these are not: '
                                   f'{_listing(bad)}. Split other channels into files _0001, _0002, ...')


def add_unlabeled(dataset: str, folder: Path, configuration: str, plans: str = 'nnUNetPlans',
                  overwrite: bool = False) -> tuple[Path, list[str]]:
    """Preprocess the unlabeled images in ``folder`` for ``configuration`` of ``dataset``; return the folder they
    were written to and their identifiers. Everything is checked before the first case is preprocessed.

    Raises:
        PlansFileError: the plans or configuration are missing, or the configuration is not preprocessed yet.
        UnlabeledImagesError: names, channels or headers are wrong, or a case name is taken.
    """
    dataset_plans = read_dataset_plans(dataset, plans)
    if configuration not in dataset_plans.plans['configurations']:
        raise PlansFileError(f'{dataset_plans.plans_file} has no configuration {configuration!r}; it has '
                             f'{", ".join(dataset_plans.plans["configurations"])}.')
    plans_manager = PlansManager(dataset_plans.plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    dataset_json = dataset_plans.dataset_json()
    labeled = dataset_plans.folder / configuration_manager.data_identifier
    if not labeled.is_dir():
        raise PlansFileError(f'{labeled} does not exist: preprocess the dataset first (nnUNetv2_preprocess -d '
                             f'{dataset} -c {configuration} -p {plans}); its unlabeled cases go beside it.')
    channels = len(dataset_json.get('channel_names', dataset_json.get('modality', {})))
    cases = find_cases(folder, dataset_json['file_ending'], channels)
    check_headers(cases)
    taken = set(nnUNetDatasetBlosc2.get_identifiers(str(labeled)))
    clashes = [case.identifier for case in cases if case.identifier in taken]
    if clashes:
        raise UnlabeledImagesError(f'case names of {folder} are those of labeled cases of {dataset_plans.dataset_name}'
                                   f': {_listing(clashes)}. Rename them (e.g. with a prefix such as unlabeled_).')
    existing = set(unlabeled_identifiers(labeled)) & {case.identifier for case in cases}
    if existing and not overwrite:
        raise UnlabeledImagesError(f'{unlabeled_folder(labeled)} already holds {_listing(sorted(existing))}; give '
                                   f'--overwrite to preprocess them again.')

    out = unlabeled_folder(labeled)
    out.mkdir(exist_ok=True)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    no_locations = _empty_class_locations(plans_manager, dataset_json)
    for case in tqdm(cases, desc=f'Preprocessing unlabeled cases into {out}', unit='case'):
        target = str(out / case.identifier)
        preprocessor.run_case_save(target, [str(f) for f in case.files], None, plans_manager, configuration_manager,
                                   dataset_json)
        properties = load_pickle(target + '.pkl')
        properties['class_locations'] = dict(no_locations)  # nnU-Net's loader then samples patches at random
        write_pickle(properties, target + '.pkl')
    return out, [case.identifier for case in cases]


def _empty_class_locations(plans_manager: PlansManager, dataset_json: dict) -> dict:
    """The ``class_locations`` nnU-Net's preprocessing would write for a case without any foreground."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    keys = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    keys = [tuple(k) if isinstance(k, (list, tuple)) else k for k in keys]
    if label_manager.has_ignore_label:
        keys.append(tuple([-1] + label_manager.all_labels))
    return {key: np.zeros((0, 4), dtype=np.int64) for key in keys}
