"""The evaluation's files: ``evaluation.json``, ``.csv``, ``.md`` and ``.png``, written together and atomically."""
import csv
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

from nnunet_plugins.commands.evaluate.discovery import Model
from nnunet_plugins.commands.evaluate.metrics import HIGHER_IS_BETTER, METRICS, LabelSet

HEADINGS = {'dice': 'Dice', 'nsd': 'NSD', 'hd95': 'HD95 (mm)'}
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


def markdown(title: str, summaries: dict[str, dict], tests: Sequence[dict], labels: LabelSet, names: dict[str, str],
             baseline: str | None, cases: int, notes: Sequence[str]) -> str:
    """The report: one table per metric, a row per model and a column per label, each cell the mean and standard
    deviation over the cases (``summaries``: model -> ``{'mean': label -> metric -> summary}``), the best of each
    column in bold, and with a baseline the p-value of each model's paired test against it."""
    p_values = {(t['model'], t['label'], t['metric']): t['p_value'] for t in tests}
    tolerances = set(labels.tolerances_mm)
    nsd = f'NSD at {labels.tolerances_mm[0]:g} mm' if len(tolerances) == 1 else \
        'NSD at ' + ', '.join(f'{t:g} mm ({n})' for n, t in zip(labels.names, labels.tolerances_mm))
    lines = [f'# Evaluation: {title}', '',
             f'{cases} cases per model. Mean ± standard deviation over the cases in which a label is in the reference '
             f'or the prediction; **bold**: the best of each column. {nsd}; HD95 in mm.'
             + (f' p: two-sided Wilcoxon signed-rank test against {names[baseline]} on the same cases.'
                if baseline else '')]
    for metric in METRICS:
        heading = nsd if metric == 'nsd' else HEADINGS[metric]
        lines += ['', f'### {heading}', '', '| model | ' + ' | '.join(labels.names) + ' |',
                  '|---|' + '---:|' * len(labels.names)]
        best = {label: _best([s['mean'][label][metric]['mean'] for s in summaries.values()], metric)
                for label in labels.names}
        for model, summary in summaries.items():
            cells = []
            for label in labels.names:
                value = summary['mean'][label][metric]
                cell = _mean_and_std(value, metric)
                if value['mean'] is not None and value['mean'] == best[label]:
                    cell = f'**{cell}**'
                if (model, label, metric) in p_values:
                    p = p_values[model, label, metric]
                    cell += ', p ' + ('—' if p is None else f'= {p:.2g}' if p >= 0.001 else '< 0.001')
                cells.append(cell)
            row_name = names[model] + (' (baseline)' if model == baseline else '')
            lines.append(f'| {row_name} | ' + ' | '.join(cells) + ' |')
    if notes:
        lines += ['', 'Notes:', *(f'- {note}' for note in notes)]
    return '\n'.join(lines) + '\n'


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


def box_plots(records: Sequence[dict], labels: LabelSet, names: dict[str, str], title: str, path: Path) -> None:
    """Box plots per metric (rows) and label (columns), the models side by side; undefined values left out."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    models = list(names)
    figure, axes = plt.subplots(len(METRICS), len(labels.names), squeeze=False,
                                figsize=(1.2 + len(labels.names) * (1.2 + 0.7 * len(models)), 3.2 * len(METRICS)))
    for row, metric in enumerate(METRICS):
        for column, label in enumerate(labels.names):
            axis = axes[row][column]
            data = [[r['metrics'][label][metric] for r in records
                     if r['model'] == model and not math.isnan(r['metrics'][label][metric])] for model in models]
            axis.boxplot(data, showmeans=True)
            axis.set_xticks(range(1, len(models) + 1), [names[m] for m in models], rotation=30, ha='right',
                            fontsize=7)
            axis.set_title(label if row == 0 else '', fontsize=10)
            axis.grid(True, axis='y', alpha=0.3)
        axes[row][0].set_ylabel(HEADINGS[metric])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format='png')
    plt.close(figure)


def write_files(out: Path, texts: dict[str, str], plot) -> list[Path]:
    """Write ``texts`` (file name -> content) and the PNG that ``plot(path)`` draws into ``out``, all or none:
    each goes to a temporary file in ``out`` first, and only when every one is complete do they replace their
    targets (``os.replace``), so an error leaves earlier results as they were. Returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    temporary = {}
    try:
        for name, text in texts.items():
            descriptor, temporary[name] = tempfile.mkstemp(dir=out, prefix=f'.{name}.', suffix='.tmp')
            with os.fdopen(descriptor, 'w') as file:
                file.write(text)
        descriptor, temporary['evaluation.png'] = tempfile.mkstemp(dir=out, prefix='.evaluation.png.', suffix='.tmp')
        os.close(descriptor)
        plot(Path(temporary['evaluation.png']))
        for name, path in temporary.items():
            os.chmod(path, 0o666 & ~umask)  # as a plain open() would create it (mkstemp makes it private)
            os.replace(path, out / name)
    finally:
        for path in temporary.values():
            if os.path.exists(path):
                os.unlink(path)
    return [out / name for name in temporary]
