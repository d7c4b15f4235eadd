"""Which cases a pre-trained encoder was trained on, and whether fine-tuning a fold from it keeps cross-validation.

A pre-training trainer writes :data:`REPORT_FILE` beside its checkpoints, with the cases it trained on (``cases``:
``training``, unlabeled ones included, and ``validation``, which only gave validation losses). ``adapt-weights``
carries them into its own report (``OUT`` with ``.json``, entry :data:`ADAPTED_ENTRY`), so a fine-tuning run finds
them beside either file. Fine-tuning fold N is fair when the pre-training trained on none of fold N's validation
cases: pre-train on fold N (its training cases and unlabeled images), not on fold ``all``.
"""
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPORT_FILE = 'pretraining_report.json'
ADAPTED_ENTRY = 'pretraining'  # the entry of adapt-weights' report that carries the pre-training's cases on
PRETRAINED_WEIGHTS_OPTION = '-pretrained_weights'  # nnUNetv2_train's option
_NAMED = 3  # how many case names a warning shows


@dataclass(frozen=True)
class PretrainingCases:
    """The cases a pre-training run trained its encoder on, and the report that says so."""

    report: str  # the file read
    fold: int | str  # the pre-training's fold
    training: tuple[str, ...]
    # the pre-training run, for the command that pre-trains another fold
    trainer: str = 'TRAINER'
    dataset: str = 'DATASET'
    configuration: str = 'CONFIGURATION'
    plans: str = 'nnUNetPlans'

    def seen(self, cases: Sequence[str]) -> list[str]:
        """Those of ``cases`` the pre-training trained on, sorted."""
        return sorted(set(self.training) & set(cases))

    def command(self, fold: int | str) -> str:
        """The ``nnUNetv2_train`` command that runs this pre-training on ``fold``."""
        return f'nnUNetv2_train {self.dataset} {self.configuration} {fold} -tr {self.trainer} -p {self.plans}'

    def entry(self) -> dict:
        """What ``adapt-weights`` writes under :data:`ADAPTED_ENTRY`."""
        return {**asdict(self), 'training': list(self.training)}


def _from_report(path: Path, content: Mapping) -> PretrainingCases | None:
    cases = content.get('cases')
    if not isinstance(cases, Mapping) or not isinstance(cases.get('training'), list) or 'fold' not in content:
        return None
    run = {key: str(content[key]) for key in ('trainer', 'dataset', 'configuration', 'plans') if key in content}
    return PretrainingCases(str(path), content['fold'], tuple(cases['training']), **run)


def pretraining_cases(weights_file: Path | str) -> PretrainingCases | None:
    """The cases the pre-training behind ``weights_file`` trained on: from :data:`REPORT_FILE` in its folder, else
    from the ``adapt-weights`` report beside it (the file with ``.json``); None when neither says (a file from
    elsewhere, or a report without cases)."""
    weights_file = Path(weights_file)
    report = weights_file.parent / REPORT_FILE
    if report.is_file():
        return _from_report(report, json.loads(report.read_text()))
    adapted = weights_file.with_suffix('.json')
    if adapted.is_file():
        entry = json.loads(adapted.read_text()).get(ADAPTED_ENTRY)
        if isinstance(entry, Mapping):
            return PretrainingCases(**{**entry, 'training': tuple(entry['training'])})
    return None


def leaking_folds_warning(pretraining: PretrainingCases,
                          validation_of_fold: Mapping[int | str, Sequence[str]]) -> str | None:
    """A warning when the pre-training trained on validation cases of any fold of ``validation_of_fold`` (fold ->
    its validation cases), naming each such fold, how many of its cases, and the fix; None when it trained on none."""
    leaks = {fold: pretraining.seen(cases) for fold, cases in validation_of_fold.items()}
    leaks = {fold: seen for fold, seen in leaks.items() if seen}
    if not leaks:
        return None
    folds = '; '.join(f'fold {fold}: {len(seen)} of its {len(validation_of_fold[fold])} validation cases '
                      f'({", ".join(seen[:_NAMED])}{", ..." if len(seen) > _NAMED else ""})'
                      for fold, seen in leaks.items())
    safe = [fold for fold in validation_of_fold if fold not in leaks]
    command = pretraining.command(next(iter(leaks)) if len(leaks) == 1 else 'N')
    each = '' if len(leaks) == 1 else f' for N in {", ".join(str(fold) for fold in leaks)}'
    return (f'WARNING: the pre-training (fold {pretraining.fold}, {len(pretraining.training)} training cases, '
            f'{pretraining.report}) trained on validation cases of {folds}. Fine-tuned from it, '
            f'{"that fold gives" if len(leaks) == 1 else "those folds give"} validation figures that are not '
            f'cross-validation: the encoder has seen those images. Pre-train on the fold you fine-tune '
            f'(`{command}`{each}: its training cases, unlabeled images added); pre-train on fold all only when you '
            f'evaluate on a separate test set that the pre-training did not see.'
            + (f' Fine-tuning fold {", ".join(map(str, safe))} from it is fair.' if safe else ''))


def pretrained_weights_argument(argv: Sequence[str]) -> str | None:
    """The file given to ``nnUNetv2_train``'s ``-pretrained_weights`` in ``argv`` (its command line), or None."""
    for index, argument in enumerate(argv):
        if argument == PRETRAINED_WEIGHTS_OPTION and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith(PRETRAINED_WEIGHTS_OPTION + '='):
            return argument.split('=', 1)[1]
    return None
