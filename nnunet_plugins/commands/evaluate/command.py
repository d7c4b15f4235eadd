"""``nnunet-plugins evaluate``: find the predictions, measure every case, compare the models, write the report."""
import argparse
import datetime
import json
import multiprocessing
import sys
from functools import partial
from pathlib import Path
from typing import Sequence

import monai
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from tqdm import tqdm

from nnunet_plugins import __version__
from nnunet_plugins.commands.evaluate.discovery import Inputs, Model, case_tasks, cross_validation_inputs, \
    folder_inputs
from nnunet_plugins.commands.evaluate.figures import box_plots, heat_maps
from nnunet_plugins.commands.evaluate.metrics import DEFINITIONS, CaseTask, EvaluationError, LabelSet, \
    evaluate_case, label_set
from nnunet_plugins.commands.evaluate.report import MANY_LABELS, csv_text, display_names, figure_pages, json_ready, \
    markdown, write_files
from nnunet_plugins.commands.evaluate.statistics import comparisons, model_summaries


def run(args: argparse.Namespace) -> int:
    """``nnunet-plugins evaluate`` with the parsed, checked command line (see :mod:`nnunet_plugins.cli`).

    Everything is read and measured before anything is written; an unusable input is an
    :class:`EvaluationError` (a ValueError) naming it, and leaves ``--out`` as it was.
    """
    if args.dataset is not None:
        inputs = cross_validation_inputs(args.dataset, args.trainers, args.plans, args.configurations, args.folds,
                                         args.allow_missing)
    else:
        inputs = folder_inputs(args.pred, args.ref, args.dataset_json)
    labels = label_set(inputs.dataset_json, args.tolerance)
    baseline = find_baseline(args.baseline, inputs.models) if args.baseline else None
    tasks = case_tasks(inputs, args.allow_missing)
    records = measure(tasks, labels, inputs.dataset_json, args.processes)
    out = Path(args.out) if args.out else inputs.default_out
    report, written = write_report(out, inputs, labels, records, baseline)
    print(report)
    print('Wrote ' + ', '.join(map(str, written)))
    return 0


def find_baseline(name: str, models: Sequence[Model]) -> str:
    """The model ``--baseline name`` means: one whose full name is ``name``, or the only one of that trainer."""
    chosen = [m.name for m in models if m.name == name] or [m.name for m in models if m.trainer == name]
    if len(chosen) != 1:
        which = 'several models' if chosen else 'no model'
        raise EvaluationError(f'--baseline {name} names {which} of {", ".join(m.name for m in models)}; give one '
                              f'of these names')
    return chosen[0]


def measure(tasks: Sequence[CaseTask], labels: LabelSet, dataset_json: dict, processes: int | None) -> list[dict]:
    """:func:`~nnunet_plugins.commands.evaluate.metrics.evaluate_case` for every task, in order, with a progress
    bar; ``processes`` worker processes (None: nnU-Net's default), or this process alone for 1."""
    reader = determine_reader_writer_from_dataset_json(dataset_json, verbose=False)  # by file ending, as nnU-Net
    work = partial(evaluate_case, labels=labels, reader_class=reader)
    processes = min(processes or default_num_processes, len(tasks))
    with tqdm(total=len(tasks), unit='case', desc='evaluate') as bar:
        if processes == 1:
            return [_counted(work(task), bar) for task in tasks]
        with multiprocessing.get_context('spawn').Pool(processes, initializer=torch.set_num_threads,
                                                       initargs=(1,)) as pool:
            return [_counted(record, bar) for record in pool.imap(work, tasks)]


def _counted(record: dict, bar: tqdm) -> dict:
    bar.update(1)
    return record


def write_report(out: Path, inputs: Inputs, labels: LabelSet, records: list[dict],
                 baseline: str | None) -> tuple[str, list[Path]]:
    """``evaluation.json``, ``.csv``, ``.md`` and the figures (``evaluation.png``, or pages ``evaluation_N.png`` for
    many labels: :func:`~nnunet_plugins.commands.evaluate.report.figure_pages`) in ``out``, written all together
    atomically; returns the Markdown report (its notes and the figure pages included) and the paths."""
    summaries = model_summaries(records, labels.names)
    tests = comparisons(records, baseline, labels.names) if baseline else []
    names = display_names(inputs.models)
    cases = len(records) // len(inputs.models)
    meta = {'title': inputs.title, 'date': datetime.datetime.now().isoformat(timespec='seconds'),
            'command': ' '.join(sys.argv), 'nnunet_plugins': __version__, 'monai': monai.__version__,
            'reference_folder': str(inputs.reference_folder), 'cases_per_model': cases,
            'labels': dict(zip(labels.names, labels.regions)),
            'nsd_tolerance_mm': dict(zip(labels.names, labels.tolerances_mm)), 'baseline': baseline,
            'definitions': DEFINITIONS, 'notes': inputs.notes}
    models = {m.name: {'folder': str(m.folder), 'trainer': m.trainer, 'plans': m.plans,
                       'configuration': m.configuration, **summaries[m.name],
                       'cases': [{k: r[k] for k in ('case', 'fold', 'prediction', 'reference', 'metrics')}
                                 for r in records if r['model'] == m.name]} for m in inputs.models}
    report = markdown(inputs.title, summaries, tests, labels, names, baseline, cases, inputs.notes)
    texts = {'evaluation.json': json.dumps(json_ready({'meta': meta, 'models': models, 'tests': tests}), indent=1),
             'evaluation.csv': csv_text(records, inputs.models, labels), 'evaluation.md': report}
    if len(labels.names) <= MANY_LABELS:
        figures = {'evaluation.png': partial(box_plots, records, labels, names, inputs.title)}
    else:
        figures = {name: partial(heat_maps, summaries, page, first, len(labels.names), names, inputs.title)
                   for name, first, page in figure_pages(summaries, labels)}
    return report, write_files(out, texts, figures)
