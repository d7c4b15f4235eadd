"""The evaluation's figures, each no side over :data:`MAX_PIXELS`: box plots for a few labels, and for many labels
heat maps of the per-label means, a row per model and a column per label, paged over several files."""
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_plugins.commands.evaluate.metrics import HIGHER_IS_BETTER, METRICS, LabelSet
from nnunet_plugins.commands.evaluate.report import HEADINGS

DPI = 110
MAX_PIXELS = 4000
MAX_INCHES = (MAX_PIXELS - 40) / DPI  # what a figure of at most MAX_PIXELS can be, with room for rounding


def box_plots(records: Sequence[dict], labels: LabelSet, names: dict[str, str], title: str, path: Path) -> None:
    """Box plots per metric (rows) and label (columns), the models side by side; undefined values left out."""
    plt = _pyplot()
    models = list(names)
    figure, axes = plt.subplots(len(METRICS), len(labels.names), squeeze=False,
                                figsize=(min(MAX_INCHES, 1.2 + len(labels.names) * (1.2 + 0.7 * len(models))),
                                         3.2 * len(METRICS)))
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
    figure.savefig(path, dpi=DPI, format='png')
    plt.close(figure)


def heat_maps(summaries: dict[str, dict], page: Sequence[str], first: int, total: int, names: dict[str, str],
              title: str, path: Path) -> None:
    """One page of the many-label figure: a heat map per metric (rows of panels), a row per model and a column per
    label of ``page`` (in the report's order; ``first`` is the 1-based rank of its first label among ``total``),
    each cell the mean over the cases with its value written in it, grey where there is none.

    ``summaries``: model -> ``{'mean': label -> metric -> {'mean': float | None, ...}}`` over all labels, so that
    the HD95 colour scale is the same on every page (Dice and NSD span 0 to 1). The panels are placed in inches from
    the lengths of the names (tick labels at 7 pt are under 0.06 inches a character) rather than by matplotlib's
    tight layout, which measures every text and took most of the time; cells shrink if the page would be wider or
    taller than :data:`MAX_INCHES`.
    """
    plt = _pyplot()
    models = list(names)
    left, right = 0.3 + 0.06 * max(map(len, names.values())), 1.0  # right: the colour bar and its ticks
    top, gap, bottom = 0.5, 0.35, 0.3 + 0.06 * max(map(len, page))
    cell_width = min(0.36, (MAX_INCHES - left - right) / len(page))
    cell_height = min(0.3, (MAX_INCHES - top - bottom - len(METRICS) * gap) / len(METRICS) / len(models))
    width = left + cell_width * len(page) + right
    height = top + len(METRICS) * (gap + cell_height * len(models)) - gap + bottom
    figure = plt.figure(figsize=(width, height))
    for index, metric in enumerate(METRICS):
        panel_top = height - top - index * (gap + cell_height * len(models))
        box = (left / width, (panel_top - cell_height * len(models)) / height, cell_width * len(page) / width,
               cell_height * len(models) / height)
        axis = figure.add_axes(box)
        values = np.array([[_value(summaries[m]['mean'][label][metric]) for label in page] for m in models])
        every = [_value(s['mean'][label][metric]) for s in summaries.values() for label in s['mean']]
        peak = 1.0 if metric != 'hd95' else max([v for v in every if not math.isnan(v)], default=1.0) or 1.0
        colours = plt.get_cmap('viridis' if HIGHER_IS_BETTER[metric] else 'viridis_r').with_extremes(bad='0.85')
        image = axis.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=0.0, vmax=peak, aspect='auto',
                            interpolation='nearest')
        for (row, column), value in np.ndenumerate(values):
            if not math.isnan(value):
                red, green, blue, _ = colours(image.norm(value))
                axis.text(column, row, f'{value:.2f}' if metric != 'hd95' else f'{value:.3g}', ha='center',
                          va='center', fontsize=5.5,
                          color='black' if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else 'white')
        axis.set_yticks(range(len(models)), [names[m] for m in models], fontsize=7)
        axis.set_xticks(range(len(page)), page if index == len(METRICS) - 1 else [], rotation=90, fontsize=7)
        axis.set_title(HEADINGS[metric], fontsize=9, loc='left')
        figure.colorbar(image, cax=figure.add_axes((box[0] + box[2] + 0.15 / width, box[1], 0.12 / width, box[3])))
    figure.suptitle(f'{title}: mean per label, labels {first}-{first + len(page) - 1} of {total} (lowest Dice '
                    'first)', fontsize=9, y=1 - 0.15 / height)
    figure.savefig(path, dpi=DPI, format='png')
    plt.close(figure)


def _value(summary: dict) -> float:
    return math.nan if summary['mean'] is None else summary['mean']


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt
