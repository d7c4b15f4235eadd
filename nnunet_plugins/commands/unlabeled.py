"""``nnunet-plugins add-unlabeled``: preprocess a folder of unlabeled images with a dataset's plans, for pre-training.

The images are named as nnU-Net's ``imagesTr`` (``CASE_0000.nii.gz``, one file per channel of the dataset) and are
checked, names and headers, before any is preprocessed. Preprocessing is nnU-Net's own: the plans' preprocessor
class (``DefaultPreprocessor`` unless the plans name another) with the configuration's spacing, normalisation and
resampling, and the dataset's intensity statistics, exactly as ``nnUNetv2_preprocess`` treats a case, without a
label. The cases go to :func:`~nnunet_plugins.pretraining.unlabeled.unlabeled_folder`, where only pre-training trainers
look (see :mod:`nnunet_plugins.pretraining.unlabeled`).

With N processes, cases are preprocessed in parallel as ``nnUNetv2_preprocess`` does (spawned processes, one case per
task, nnU-Net's default counts). A case is preprocessed into the hidden folder :data:`PARTIAL` and then moved in,
its data file last, so that a case killed mid-write is never listed; a run started again keeps the cases finished
before from the same files and does the others.
"""
import multiprocessing
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_pickle, write_pickle
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from tqdm import tqdm

from nnunet_plugins.commands.dataset_plans import PlansFileError, read_dataset_plans

NAMED = 5  # how many offending files an error names
# nnUNetv2_preprocess's default -np by configuration, and for any other; nnU-Net 2.8.1 writes them inline in
# plan_and_preprocess_entrypoints.py (there is no constant to import; its default_num_processes is the fingerprint's)
DEFAULT_PROCESSES = {'2d': 8, '3d_fullres': 4, '3d_lowres': 8}
DEFAULT_PROCESSES_OTHER = 4
PARTIAL = '.partial'  # folder inside the unlabeled folder where a case is written before it is moved in
# the files nnU-Net's Blosc2 format writes for a case; the data file last: nnU-Net lists a case by its CASE.b2nd
CASE_FILES = ('_seg.b2nd', '.pkl', '.b2nd')
SOURCE = 'unlabeled_source'  # properties key: the (name, bytes, mtime in ns) of each image file a case was made from


class UnlabeledImagesError(ValueError):
    """The folder of unlabeled images cannot be added; the message names the files and the fix."""


class PreprocessingProcessDied(RuntimeError):
    """A worker process ended without finishing its case (killed, e.g. for memory); finished cases are kept."""


@dataclass(frozen=True)
class UnlabeledCase:
    identifier: str
    files: tuple[Path, ...]  # one per channel, channel 0 first

    def source(self) -> list[tuple[str, int, int]]:
        """What identifies the images this case is made from: (file name, bytes, mtime in ns) per channel."""
        stats = [(path.name, path.stat()) for path in self.files]
        return [(name, stat.st_size, stat.st_mtime_ns) for name, stat in stats]


@dataclass(frozen=True)
class AddedUnlabeled:
    folder: Path  # where the cases are
    preprocessed: list[str]  # identifiers preprocessed by this run
    kept: list[str]  # identifiers finished before from the same files, left as they were


def default_processes(configuration: str) -> int:
    """``nnUNetv2_preprocess``'s default number of processes for ``configuration``."""
    return DEFAULT_PROCESSES.get(configuration, DEFAULT_PROCESSES_OTHER)


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
                  overwrite: bool = False, processes: int | None = None) -> AddedUnlabeled:
    """Preprocess the unlabeled images in ``folder`` for ``configuration`` of ``dataset`` with ``processes``
    processes (default :func:`default_processes`; 1 runs in this process). Everything is checked before the first
    case is written. Cases finished before from the same files are kept, unless ``overwrite``.

    Raises:
        PlansFileError: the plans or configuration are missing, or the configuration is not preprocessed yet.
        UnlabeledImagesError: names, channels or headers are wrong, a case name is taken, or a case was added before
            from other files (without ``overwrite``).
        PreprocessingProcessDied: a worker process was killed; the cases finished until then are kept.
    """
    # here, not at the top: a worker process imports this module, and the pretraining package imports the trainers
    from nnunet_plugins.pretraining.unlabeled import unlabeled_folder, unlabeled_identifiers

    processes = default_processes(configuration) if processes is None else processes
    if processes < 1:
        raise ValueError(f'processes must be at least 1, not {processes}')
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
    out = unlabeled_folder(labeled)
    existing = set(unlabeled_identifiers(labeled))
    kept = [] if overwrite else [case for case in cases if case.identifier in existing and _finished(out, case)]
    others = [case.identifier for case in cases if case.identifier in existing and case not in kept]
    if others and not overwrite:
        raise UnlabeledImagesError(f'{out} already holds {_listing(others)}, preprocessed from other files (or by an '
                                   f'older version); give --overwrite to preprocess them again.')

    shutil.rmtree(out / PARTIAL, ignore_errors=True)  # what a killed run left half-written
    (out / PARTIAL).mkdir(parents=True)
    todo = [case for case in cases if case not in kept]
    work = partial(_preprocess_case, out=out, preprocessor=configuration_manager.preprocessor_class(verbose=False),
                   plans_manager=plans_manager, configuration_manager=configuration_manager,
                   dataset_json=dataset_json)
    with tqdm(desc=f'Preprocessing unlabeled cases into {out}', total=len(cases), initial=len(kept),
              unit='case') as progress:
        if processes == 1 or len(todo) <= 1:
            for case in todo:
                work(case)
                progress.update()
        else:
            _run_in_processes(work, todo, min(processes, len(todo)), progress)
    (out / PARTIAL).rmdir()
    return AddedUnlabeled(out, [case.identifier for case in todo], [case.identifier for case in kept])


def _finished(out: Path, case: UnlabeledCase) -> bool:
    """Whether ``out`` holds all of ``case``'s files, made from its current image files."""
    target = out / case.identifier
    if not all(Path(f'{target}{suffix}').is_file() for suffix in CASE_FILES):
        return False
    return load_pickle(f'{target}.pkl').get(SOURCE) == case.source()


def _preprocess_case(case: UnlabeledCase, out: Path, preprocessor, plans_manager: PlansManager,
                     configuration_manager: ConfigurationManager, dataset_json: dict) -> None:
    """Preprocess one case into ``out/PARTIAL``, then move its files into ``out``, the data file last (a process
    of its own may run this: every argument pickles)."""
    source = case.source()
    partial_target = str(out / PARTIAL / case.identifier)
    preprocessor.run_case_save(partial_target, [str(f) for f in case.files], None, plans_manager,
                               configuration_manager, dataset_json)
    properties = load_pickle(partial_target + '.pkl')
    # made here, not passed in: objects that crossed a process boundary pickle to other bytes (memo of shared dtypes)
    properties['class_locations'] = _empty_class_locations(plans_manager, dataset_json)  # patches sampled at random
    properties[SOURCE] = source
    write_pickle(properties, partial_target + '.pkl')
    target = str(out / case.identifier)
    Path(target + CASE_FILES[-1]).unlink(missing_ok=True)  # unlisted while its other files are replaced
    for suffix in CASE_FILES:
        os.replace(partial_target + suffix, target + suffix)


def _run_in_processes(work: partial, cases: list[UnlabeledCase], processes: int, progress: tqdm) -> None:
    """Run ``work`` on every case in ``processes`` spawned processes (as nnU-Net's preprocessing starts them),
    counting finished cases on ``progress``. On the first error no further case starts."""
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context('spawn'))
    try:
        for future in as_completed([pool.submit(work, case) for case in cases]):
            future.result()
            progress.update()
    except BrokenProcessPool:
        raise PreprocessingProcessDied(
            f'a preprocessing process died before its case was written (killed; often for memory: resampling takes '
            f'much of it, so lower -np). The {progress.n} cases finished are kept: run the same command again to '
            f'preprocess the others.') from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _empty_class_locations(plans_manager: PlansManager, dataset_json: dict) -> dict:
    """The ``class_locations`` nnU-Net's preprocessing would write for a case without any foreground."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    keys = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    keys = [tuple(k) if isinstance(k, (list, tuple)) else k for k in keys]
    if label_manager.has_ignore_label:
        keys.append(tuple([-1] + label_manager.all_labels))
    return {key: np.zeros((0, 4), dtype=np.int64) for key in keys}
