"""The evaluation's files: ``evaluation.json``, ``.csv`` and ``.md``, and the figures that :mod:`.figures` draws,
written together and atomically."""
import csv
import io
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from nnunet_plugins.commands.evaluate.discovery import Model
from nnunet_plugins.commands.evaluate.metrics import HIGHER_IS_BETTER, METRICS, LabelSet

HEADINGS = {'dice': 'Dice', 'nsd': 'NSD', 'hd95': 'HD95 (mm)'}
MANY_LABELS = 8  # beyond this, a table column per label and a box plot per label no longer read well
LABELS_PER_FIGURE = 40
CSV_COLUMNS = ('model', 'trainer', 'plans', 'configuration', 'fold', 'case', 'label', 'dice', 'nsd', 'hd95_mm',
               'reference_voxels', 'predicted_voxels')


def display_names(models: Sequence[Model]) -> dict[str, str]:
    """Model -> its name in the table: the trainer alone where every model is a different trainer on the same
    plans and configuration, else the full ``TRAINER__PLANS__CONFIG`` (or folder) name."""
    trainers = [m.trainer for m in models]
    if None not in trainers and len(set(trainers)) == len(trainers) and \
            len({(m.plans, m.configuration) for m in models}) == 1:
        return {m.name: m.trainer for m in models}
    return {m.name: m.name for m in models}


def json_ready(value):
    """``value`` with every NaN replaced by None, so that the file is standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def csv_text(records: Sequence[dict], models: Sequence[Model], labels: LabelSet) -> str:
    """One row per model, case and label (:data:`CSV_COLUMNS`); an undefined value is an empty field."""
    by_name = {m.name: m for m in models}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(CSV_COLUMNS)
    for r in records:
        model = by_name[r['model']]
        for label in labels.names:
            values = r['metrics'][label]
            writer.writerow([model.name, model.trainer or '', model.plans or '', model.configuration or '',
                             '' if r['fold'] is None else r['fold'], r['case'], label,
                             *('' if math.isnan(values[m]) else repr(values[m]) for m in METRICS),
                             values['reference_voxels'], values['predicted_voxels']])
    return buffer.getvalue()


def label_order(summaries: dict[str, dict], label_names: Sequence[str]) -> list[str]:
    """``label_names`` by the lowest mean Dice of any model, ascending, so that the worst labels come first; labels
    that no model has a Dice for come last; ties keep ``dataset.json``'s order."""
    def key(label: str) -> tuple[bool, float]:
        means = [s['mean'][label]['dice']['mean'] for s in summaries.values()]
        defined = [m for m in means if m is not None]
        return not defined, min(defined, default=0.0)
    return sorted(label_names, key=key)


def figure_pages(summaries: dict[str, dict], labels: LabelSet) -> list[tuple[str, int, list[str]]]:
    """The figure files, each with the rank (from 1) of its first label and the labels it shows: ``evaluation.png``
    with every label (box plots) for up to :data:`MANY_LABELS` labels; beyond, ``evaluation_1.png``,
    ``evaluation_2.png``, ... (heat maps) with :data:`LABELS_PER_FIGURE` labels each, in :func:`label_order`."""
    if len(labels.names) <= MANY_LABELS:
        return [('evaluation.png', 1, list(labels.names))]
    order = label_order(summaries, labels.names)
    return [(f'evaluation_{start // LABELS_PER_FIGURE + 1}.png', start + 1, order[start:start + LABELS_PER_FIGURE])
            for start in range(0, len(order), LABELS_PER_FIGURE)]


def markdown(title: str, summaries: dict[str, dict], tests: Sequence[dict], labels: LabelSet, names: dict[str, str],
             baseline: str | None, cases: int, notes: Sequence[str]) -> str:
    """The report: one table per metric, each cell the mean and standard deviation over the cases (``summaries``:
    model -> ``{'mean': label -> metric -> summary}``), the best model's in bold, and with a baseline the p-value of
    each model's paired test against it (``tests``) beside its mean.

    Up to :data:`MANY_LABELS` labels a table has a row per model and a column per label. Beyond, it has a row per
    label, in :func:`label_order`, and a column per model, so that no line grows with the labels, and the report
    lists the figure pages (:func:`figure_pages`)."""
    p_values = {(t['model'], t['label'], t['metric']): t['p_value'] for t in tests}
    many = len(labels.names) > MANY_LABELS
    tolerances = set(labels.tolerances_mm)
    nsd = f'NSD at {labels.tolerances_mm[0]:g} mm' if len(tolerances) == 1 else \
        "NSD at each label's tolerance (column mm)" if many else \
        'NSD at ' + ', '.join(f'{t:g} mm ({n})' for n, t in zip(labels.names, labels.tolerances_mm))
    sentences = [f'{cases} cases per model.', 'Mean ± standard deviation over the cases in which a label is in the '
                 'reference or the prediction;', '**bold**: the best ' + ('model for each label.' if many else
                                                                          'of each column.'), f'{nsd}; HD95 in mm.']
    if baseline:
        sentences.append(f'p: two-sided Wilcoxon signed-rank test against {names[baseline]} on the same cases.')
    lines = [f'# Evaluation: {title}', '', '\n'.join(sentences) if many else ' '.join(sentences)]
    if many:
        lines += ['', f'{len(labels.names)} labels, a row each, in the same order in every table: by the lowest mean '
                      'Dice of any model,', 'ascending, so the worst labels come first (labels without a Dice last).',
                  '', 'Figures: the mean of each metric per label, a heat map with a row per model, in this order:']
        lines += [f'- `{name}`: labels {first}-{first + len(page) - 1}'
                  for name, first, page in figure_pages(summaries, labels)]
    for metric in METRICS:
        heading = nsd if metric == 'nsd' else HEADINGS[metric]
        table = _labels_as_rows if many else _models_as_rows
        lines += ['', f'### {heading}', '', *table(summaries, p_values, labels, names, baseline, metric)]
    if notes:
        lines += ['', 'Notes:', *(f'- {note}' for note in notes)]
    return '\n'.join(lines) + '\n'


def _models_as_rows(summaries: dict[str, dict], p_values: dict, labels: LabelSet, names: dict[str, str],
                    baseline: str | None, metric: str) -> list[str]:
    lines = ['| model | ' + ' | '.join(labels.names) + ' |', '|---|' + '---:|' * len(labels.names)]
    best = {label: _best([s['mean'][label][metric]['mean'] for s in summaries.values()], metric)
            for label in labels.names}
    for model, summary in summaries.items():
        cells = [_cell(summary['mean'][label][metric], best[label], metric) + _p(p_values, (model, label, metric))
                 for label in labels.names]
        lines.append(f'| {_heading(model, names, baseline)} | ' + ' | '.join(cells) + ' |')
    return lines


def _labels_as_rows(summaries: dict[str, dict], p_values: dict, labels: LabelSet, names: dict[str, str],
                    baseline: str | None, metric: str) -> list[str]:
    tolerance = dict(zip(labels.names, labels.tolerances_mm)) if metric == 'nsd' and \
        len(set(labels.tolerances_mm)) > 1 else None
    lines = ['| # | label | ' + ('mm | ' if tolerance else '') + ' | '.join(_heading(m, names, baseline)
                                                                            for m in summaries) + ' |',
             '|---:|---|' + ('---:|' if tolerance else '') + '---:|' * len(summaries)]
    for rank, label in enumerate(label_order(summaries, labels.names), start=1):
        best = _best([s['mean'][label][metric]['mean'] for s in summaries.values()], metric)
        cells = ([f'{tolerance[label]:g}'] if tolerance else []) + \
            [_cell(summary['mean'][label][metric], best, metric) + _p(p_values, (model, label, metric))
             for model, summary in summaries.items()]
        lines.append(f'| {rank} | {label} | ' + ' | '.join(cells) + ' |')
    return lines


def _heading(model: str, names: dict[str, str], baseline: str | None) -> str:
    return names[model] + (' (baseline)' if model == baseline else '')


def _cell(value: dict, best: float | None, metric: str) -> str:
    cell = _mean_and_std(value, metric)
    return f'**{cell}**' if value['mean'] is not None and value['mean'] == best else cell


def _p(p_values: dict, key: tuple[str, str, str]) -> str:
    """', p = ...' for a model tested against the baseline (— where the test gives no p), '' for one not tested."""
    if key not in p_values:
        return ''
    p = p_values[key]
    return ', p ' + ('—' if p is None else f'= {p:.2g}' if p >= 0.001 else '< 0.001')


def _best(means: list[float | None], metric: str) -> float | None:
    defined = [m for m in means if m is not None]
    if not defined:
        return None
    return max(defined) if HIGHER_IS_BETTER[metric] else min(defined)


def _mean_and_std(value: dict, metric: str) -> str:
    if value['mean'] is None:
        return '—'
    digits = 2 if metric == 'hd95' else 3
    spread = '' if value['std'] is None else f' ± {value["std"]:.{digits}f}'
    return f'{value["mean"]:.{digits}f}{spread}'


def write_files(out: Path, texts: dict[str, str], figures: dict[str, Callable[[Path], None]]) -> list[Path]:
    """Write ``texts`` (file name -> content) and the PNGs that ``figures`` (file name -> a function that draws it
    into the path it is given) draw into ``out``, all or none: each goes to a temporary file in ``out`` first, and
    only when every one is complete do they replace their targets (``os.replace``), so an error leaves earlier
    results as they were. Figure pages of an earlier run that this one does not write (``evaluation.png`` or
    ``evaluation_N.png``) are then removed, so that every figure in ``out`` is of this run. Returns the paths
    written."""
    out.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    temporary = {}
    try:
        for name, text in texts.items():
            descriptor, temporary[name] = tempfile.mkstemp(dir=out, prefix=f'.{name}.', suffix='.tmp')
            with os.fdopen(descriptor, 'w') as file:
                file.write(text)
        for name, draw in figures.items():
            descriptor, temporary[name] = tempfile.mkstemp(dir=out, prefix=f'.{name}.', suffix='.tmp')
            os.close(descriptor)
            draw(Path(temporary[name]))
        for name, path in temporary.items():
            os.chmod(path, 0o666 & ~umask)  # as a plain open() would create it (mkstemp makes it private)
            os.replace(path, out / name)
    finally:
        for path in temporary.values():
            if os.path.exists(path):
                os.unlink(path)
    for stale in out.glob('evaluation*.png'):
        if stale.name not in figures and re.fullmatch(r'evaluation(_\d+)?\.png', stale.name):
            stale.unlink()
    return [out / name for name in temporary]
