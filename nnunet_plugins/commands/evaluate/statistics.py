"""Means over cases, per fold and over the cross-validation, and paired Wilcoxon signed-rank tests between models.

A value is missing (NaN) where a label is in neither reference nor prediction; means, standard deviations and
tests leave such values out, as nnU-Net's mean Dice does.
"""
import math
import warnings
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import wilcoxon

from nnunet_plugins.commands.evaluate.metrics import METRICS


def summary(values: Iterable[float]) -> dict:
    """``{'mean', 'std', 'n'}`` of the finite ``values``: ``std`` is the sample standard deviation (n - 1), None
    for fewer than two values; ``mean`` is None for none."""
    finite = np.array([v for v in values if not math.isnan(v)], dtype=float)
    return {'mean': float(finite.mean()) if finite.size else None,
            'std': float(finite.std(ddof=1)) if finite.size > 1 else None,
            'n': int(finite.size)}


def metric_summaries(records: Sequence[dict], label_names: Sequence[str]) -> dict[str, dict[str, dict]]:
    """Label -> metric -> :func:`summary` over ``records`` (results of ``evaluate_case``)."""
    return {label: {metric: summary(r['metrics'][label][metric] for r in records) for metric in METRICS}
            for label in label_names}


def model_summaries(records: Sequence[dict], label_names: Sequence[str]) -> dict[str, dict]:
    """Model -> ``{'mean': label -> metric -> summary over all its cases, 'folds': fold -> the same over that fold's
    cases}`` (``folds`` is empty outside a cross-validation)."""
    out = {}
    for model in dict.fromkeys(r['model'] for r in records):
        mine = [r for r in records if r['model'] == model]
        folds = sorted({r['fold'] for r in mine if r['fold'] is not None})
        out[model] = {'mean': metric_summaries(mine, label_names),
                      'folds': {str(fold): metric_summaries([r for r in mine if r['fold'] == fold], label_names)
                                for fold in folds}}
    return out


def paired_test(values: Sequence[float], baseline: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of ``values`` against ``baseline`` on the same cases, in the same order,
    over the cases where both are defined, with scipy's defaults (exact up to 50 pairs; with ties or zero
    differences, all sign permutations up to 13 pairs and the normal approximation beyond).

    Returns ``{'n', 'statistic', 'p_value'}``; statistic and p-value are None where there is no pair, or where scipy
    gives none (every difference zero among more than 13 pairs).
    """
    pairs = [(v, b) for v, b in zip(values, baseline, strict=True) if not (math.isnan(v) or math.isnan(b))]
    if not pairs:
        return {'n': 0, 'statistic': None, 'p_value': None}
    with warnings.catch_warnings():  # scipy warns when every difference is zero
        warnings.simplefilter('ignore', RuntimeWarning)
        result = wilcoxon([v for v, _ in pairs], [b for _, b in pairs])
    statistic, p_value = float(result.statistic), float(result.pvalue)
    return {'n': len(pairs), 'statistic': None if math.isnan(statistic) else statistic,
            'p_value': None if math.isnan(p_value) else p_value}


def comparisons(records: Sequence[dict], baseline: str, label_names: Sequence[str]) -> list[dict]:
    """:func:`paired_test` of every other model against ``baseline``, per label and metric, on their common cases
    (every model has the same cases by the time the records exist)."""
    by_model = {}
    for r in records:
        by_model.setdefault(r['model'], {})[r['case']] = r['metrics']
    cases = sorted(by_model[baseline])
    tests = []
    for model, metrics in by_model.items():
        if model == baseline:
            continue
        for label in label_names:
            for metric in METRICS:
                test = paired_test([metrics[c][label][metric] for c in cases],
                                   [by_model[baseline][c][label][metric] for c in cases])
                tests.append({'model': model, 'baseline': baseline, 'label': label, 'metric': metric, **test})
    return tests
