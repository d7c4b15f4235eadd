"""What is evaluated: the prediction folders ("models"), their cases, and the reference of every case.

Two sources: a dataset's cross-validation in ``nnUNet_results`` (each ``TRAINER__PLANS__CONFIG`` folder's
``fold_N/validation/``, references in ``nnUNet_preprocessed/<dataset>/gt_segmentations/``, the folds' cases
from ``splits_final.json``), or prediction folders named on the command line with a reference folder (a test
set, an ``nnUNetv2_ensemble`` output).
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

from nnunet_plugins.commands.dataset_plans import dataset_name, read_json
from nnunet_plugins.commands.evaluate.metrics import CaseTask, EvaluationError

_FOLD = re.compile(r'fold_(\d+)')


@dataclass(frozen=True)
class Model:
    """One set of predictions: a ``TRAINER__PLANS__CONFIG`` folder's cross-validation, or a prediction folder.
    ``predictions`` maps each case to its fold (None outside a cross-validation) and file."""

    name: str
    folder: Path
    predictions: dict[str, tuple[int | None, Path]]
    trainer: str | None = None
    plans: str | None = None
    configuration: str | None = None


@dataclass
class Inputs:
    """Everything an evaluation reads: ``expected`` maps each case that should have been predicted to its fold."""

    title: str
    dataset_json: dict
    reference_folder: Path
    references: dict[str, Path]
    models: list[Model]
    expected: dict[str, int | None]
    default_out: Path
    notes: list[str] = field(default_factory=list)


def cross_validation_inputs(dataset: str, trainers: list[str] | None, plans: list[str] | None,
                            configurations: list[str] | None, folds: list[int] | None,
                            allow_missing: bool) -> Inputs:
    """The validation predictions of every ``TRAINER__PLANS__CONFIG`` folder of ``dataset`` that the filters
    admit (None: any), for ``folds`` (None: every fold any of them has).

    Raises :class:`EvaluationError` when a folder variable is unset, the dataset has no results, a named
    trainer has no folder, or a chosen folder has no validation output for a fold (unless ``allow_missing``);
    the message says which command writes what is missing.
    """
    for variable in (nnUNet_results, nnUNet_preprocessed):
        if not variable.is_set():
            raise EvaluationError(f'{variable.env_var_name} is not set; set nnU-Net\'s folder variables as for '
                                  f'nnUNetv2_train (`nnunet-plugins doctor` checks them).')
    name = dataset_name(dataset)
    dataset_id = convert_dataset_name_to_id(name)
    results = Path(nnUNet_results.get()) / name
    chosen = _model_folders(results, dataset_id, trainers, plans, configurations)
    preprocessed = Path(nnUNet_preprocessed.get()) / name
    dataset_json = read_json(preprocessed / 'dataset.json', 'the dataset.json that nnUNetv2_plan_and_preprocess copied')
    ending = _file_ending(dataset_json)
    outputs = {folder: _validation_files(folder, ending) for folder in chosen}
    notes = []
    if not trainers:  # every folder was asked for: those without validation output are left out
        notes += [f'{folder.name} has no validation output; left out' for folder in chosen if not outputs[folder]]
        chosen = [folder for folder in chosen if outputs[folder]] or chosen
    folds = sorted(folds or {fold for folder in chosen for fold in outputs[folder]} or {0})
    for folder in chosen:
        for fold in folds:
            if fold not in outputs[folder]:
                message = (f'{folder} has no validation output for fold {fold}: '
                           f'`{_train_command(dataset_id, folder.name, fold)}` writes fold_{fold}/validation/ when '
                           f'training ends (add --val to predict only the validation cases of a trained fold)')
                if not allow_missing or not any(fold in outputs[f] for f in chosen):
                    raise EvaluationError(message + ', or choose folds with -f')
                notes.append(message)
    models = []
    for folder in chosen:
        trainer, plans_name, configuration = folder.name.split('__')
        predictions = {case: (fold, path) for fold in folds for case, path in outputs[folder].get(fold, {}).items()}
        models.append(Model(folder.name, folder, predictions, trainer, plans_name, configuration))
    references = _files(preprocessed / 'gt_segmentations', ending,
                        f'the references, written by `nnUNetv2_plan_and_preprocess -d {dataset_id}`')
    return Inputs(f'{name}, cross-validation fold{"s" if len(folds) > 1 else ""} {", ".join(map(str, folds))}',
                  dataset_json, preprocessed / 'gt_segmentations', references, models,
                  _expected_cases(preprocessed / 'splits_final.json', folds, models), results / 'evaluation', notes)


def folder_inputs(prediction_folders: list[Path], reference_folder: Path, dataset_json_file: Path | None) -> Inputs:
    """Prediction folders (one model each, named after the folder) against a folder of references.

    ``dataset_json_file`` defaults to the ``dataset.json`` that nnUNetv2_predict and nnUNetv2_ensemble write
    into the first prediction folder. Every case of the reference folder is expected.
    """
    prediction_folders = [Path(p) for p in prediction_folders]
    names = [folder.name for folder in prediction_folders]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EvaluationError(f'two prediction folders are named {", ".join(twice)}; the table names each model '
                              f'after its folder, so rename or link one')
    dataset_json_file = Path(dataset_json_file or prediction_folders[0] / 'dataset.json')
    if not dataset_json_file.is_file():
        raise EvaluationError(f'{dataset_json_file} does not exist; pass --dataset-json with the dataset\'s '
                              f'dataset.json (e.g. $nnUNet_preprocessed/DatasetXXX/dataset.json)')
    dataset_json = read_json(dataset_json_file, 'the dataset.json of --dataset-json')
    ending = _file_ending(dataset_json)
    references = _files(Path(reference_folder), ending, 'the --ref folder')
    models = []
    for folder in prediction_folders:
        files = _files(folder, ending, 'a --pred folder')
        models.append(Model(folder.name, folder, {case: (None, path) for case, path in files.items()}))
    expected = dict.fromkeys(sorted({*references, *(c for m in models for c in m.predictions)}))
    title = f'{", ".join(names)} against {reference_folder}'
    return Inputs(title, dataset_json, Path(reference_folder), references, models, expected,
                  prediction_folders[0] / 'evaluation')


def case_tasks(inputs: Inputs, allow_missing: bool) -> list[CaseTask]:
    """One task per model and expected case. A case without a reference or without a prediction of every model
    is an :class:`EvaluationError` listing them, or with ``allow_missing`` is left out with a note."""
    problems = []
    no_reference = [case for case in inputs.expected if case not in inputs.references]
    if no_reference:
        problems.append(f'{len(no_reference)} case(s) have no reference in {inputs.reference_folder}: '
                        f'{_listed(no_reference)}')
    for model in inputs.models:
        missing = [case for case in inputs.expected if case not in model.predictions]
        if missing:
            problems.append(f'{model.name} has no prediction for {len(missing)} case(s) in {model.folder}: '
                            f'{_listed(missing)}')
        ignored = [case for case in model.predictions if case not in inputs.expected]
        if ignored:
            inputs.notes.append(f'{model.name}: {len(ignored)} prediction(s) of cases outside the folds\' splits '
                                f'left out: {_listed(ignored)}')
    if problems and not allow_missing:
        raise EvaluationError('\n'.join(problems) + '\nAdd the missing files, or pass --allow-missing to evaluate '
                                                    'only the cases that have a reference and every prediction.')
    cases = [case for case in inputs.expected
             if case in inputs.references and all(case in model.predictions for model in inputs.models)]
    if not cases:
        raise EvaluationError('no case has both a reference and a prediction of every model:\n' + '\n'.join(problems))
    if problems:
        inputs.notes.append(f'--allow-missing: {len(cases)} of {len(inputs.expected)} cases evaluated; left out:\n'
                            + '\n'.join(problems))
    return [CaseTask(model.name, model.predictions[case][0], case, model.predictions[case][1],
                     inputs.references[case]) for model in inputs.models for case in cases]


def _model_folders(results: Path, dataset_id: int, trainers: list[str] | None, plans: list[str] | None,
                   configurations: list[str] | None) -> list[Path]:
    """The ``TRAINER__PLANS__CONFIG`` folders of ``results`` that the filters admit; an error where there are none
    or a named trainer has none."""
    folders = sorted(p for p in results.glob('*__*__*') if p.is_dir()) if results.is_dir() else []
    if not folders:
        raise EvaluationError(f'{results} holds no TRAINER__PLANS__CONFIG folder: train first, e.g. '
                              f'`nnUNetv2_train {dataset_id} 3d_fullres 0 -tr nnUNetTrainerMedNeXtL`.')
    chosen = [folder for folder in folders if _admitted(folder.name, trainers, plans, configurations)]
    unknown = [t for t in trainers or [] if not any(f.name.split('__')[0] == t for f in chosen)]
    if unknown or not chosen:
        raise EvaluationError(f'no results folder in {results} for {", ".join(unknown) or "these -tr/-p/-c"}; '
                              f'it holds {", ".join(f.name for f in folders)}')
    return chosen


def _admitted(folder_name: str, trainers: list[str] | None, plans: list[str] | None,
              configurations: list[str] | None) -> bool:
    parts = folder_name.split('__')
    return len(parts) == 3 and all(wanted is None or part in wanted
                                   for part, wanted in zip(parts, (trainers, plans, configurations)))


def _validation_files(folder: Path, ending: str) -> dict[int, dict[str, Path]]:
    """Fold number -> case -> prediction file of ``fold_N/validation``, for every fold that has any (``fold_all``
    is left out: its validation cases are its training cases)."""
    found = {}
    for fold_folder in folder.glob('fold_*'):
        match = _FOLD.fullmatch(fold_folder.name)
        files = _files(fold_folder / 'validation', ending) if match and (fold_folder / 'validation').is_dir() else {}
        if files:
            found[int(match.group(1))] = files
    return found


def _train_command(dataset_id: int, folder_name: str, fold: int) -> str:
    trainer, plans, configuration = folder_name.split('__')
    return f'nnUNetv2_train {dataset_id} {configuration} {fold} -tr {trainer} -p {plans}'


def _expected_cases(splits_file: Path, folds: list[int], models: list[Model]) -> dict[str, int]:
    """Case -> fold for the validation cases of ``folds``: from nnU-Net's splits file, or for a fold it does not
    have (or without the file) the cases any model predicted in that fold."""
    splits = _read_splits(splits_file)
    expected = {}
    for fold in folds:
        if fold < len(splits):
            expected.update(dict.fromkeys(splits[fold], fold))
        else:
            expected.update({case: fold for model in models for case, (f, _) in model.predictions.items()
                             if f == fold})
    return expected


def _read_splits(splits_file: Path) -> list[list[str]]:
    """The validation cases of each fold in nnU-Net's ``splits_final.json`` (none without the file)."""
    if not splits_file.is_file():
        return []
    try:
        return [list(split['val']) for split in json.loads(splits_file.read_text())]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as error:
        raise EvaluationError(f'{splits_file} cannot be read as nnU-Net\'s splits ({type(error).__name__}: '
                              f'{error}); delete it and nnUNetv2_train writes it anew') from None


def _file_ending(dataset_json: dict) -> str:
    ending = dataset_json.get('file_ending')
    if not isinstance(ending, str) or not ending:
        raise EvaluationError('dataset.json has no "file_ending"; it is not an nnU-Net dataset.json')
    return ending


def _files(folder: Path, ending: str, what: str = 'predictions') -> dict[str, Path]:
    """Case -> file for the files of ``folder`` that end with ``ending``."""
    if not folder.is_dir():
        raise EvaluationError(f'{folder} is not a folder ({what})')
    return {path.name[:-len(ending)]: path for path in sorted(folder.iterdir()) if path.name.endswith(ending)}


def _listed(cases: list[str], shown: int = 20) -> str:
    more = f' and {len(cases) - shown} more' if len(cases) > shown else ''
    return ', '.join(cases[:shown]) + more
