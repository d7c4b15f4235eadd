"""One case's metrics: Dice as nnU-Net counts it, NSD and HD95 by MONAI, each on a crop around the two masks.

:data:`DEFINITIONS` says what each number is and how empty masks count; ``evaluation.json`` repeats it.
"""
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.utilities.label_handling.label_handling import LabelManager

METRICS = ('dice', 'nsd', 'hd95')
DEFINITIONS = {
    'dice': "nnU-Net's: 2 TP / (2 TP + FP + FN) from nnunetv2's compute_tp_fp_fn_tn, voxels that the reference "
            'marks with the ignore label left out',
    'nsd': "normalised surface Dice at the tolerance, MONAI's compute_surface_dice(use_subvoxels=True): the share "
           'of both surfaces (by area) within the tolerance of the other surface, as DeepMind\'s surface-distance '
           'and the Medical Segmentation Decathlon define it',
    'hd95': "MONAI's compute_hausdorff_distance(percentile=95), in mm: the 95th percentile of the distances from "
            "each mask's boundary voxels to the other mask's, the larger of the two directions",
    'empty': 'a label in neither reference nor prediction has no value (null; left out of means and tests, as '
             "nnU-Net leaves it out of its mean Dice); a label in only one of them scores the worst: Dice 0 (as "
             "nnU-Net), NSD 0 (as MONAI), HD95 the length of the image's diagonal in mm (MONAI has no finite value)",
    'geometry': "distances in mm from the image files' spacing; the metrics are computed on the box around both "
                'masks widened by one voxel: every surface point, hence every distance, lies in it, so the numbers '
                'are those of the whole image',
}
HIGHER_IS_BETTER = {'dice': True, 'nsd': True, 'hd95': False}
Region = int | tuple[int, ...]


class EvaluationError(ValueError):
    """An input the evaluation cannot use; the message names the file, case or value and what to do."""


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels lie: array shape and spacing in nnU-Net's axis order (that of the array), and the
    origin and direction as SimpleITK reports them (None with readers that do not report them)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...] | None
    direction: tuple[float, ...] | None

    def differences(self, other: 'Geometry') -> list[str]:
        """The names of the properties in which ``other`` lies elsewhere (shape exactly, the rest to float
        precision as nnU-Net's dataset check compares them)."""
        found = ['shape'] if self.shape != other.shape else []
        for name in ('spacing', 'origin', 'direction'):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and (len(mine) != len(theirs) or not np.allclose(mine, theirs)):
                found.append(name)
        return found

    def __str__(self) -> str:
        def numbers(values: tuple[float, ...]) -> str:
            return '(' + ', '.join(f'{v:g}' for v in values) + ')'
        text = f'shape {"x".join(map(str, self.shape))}, spacing {numbers(self.spacing)} mm (array axes)'
        if self.origin is not None:
            text += f', origin {numbers(self.origin)}, direction {numbers(self.direction)} (as SimpleITK reads them)'
        return text


@dataclass(frozen=True)
class LabelSet:
    """What is measured: the foreground labels or regions of ``dataset.json`` with their names and NSD
    tolerances, the label values a segmentation may hold, and the ignore label (None if there is none)."""

    names: tuple[str, ...]
    regions: tuple[Region, ...]
    tolerances_mm: tuple[float, ...]
    allowed_values: frozenset[int]
    ignore_label: int | None


@dataclass(frozen=True)
class CaseTask:
    """One prediction file to compare with its reference file. ``fold`` is None outside a cross-validation."""

    model: str
    fold: int | None
    case: str
    prediction: Path
    reference: Path


def label_set(dataset_json: dict, tolerances_mm: list[float] | None) -> LabelSet:
    """The labels (or regions) of ``dataset_json`` that are evaluated, as nnU-Net's LabelManager reads them.

    ``tolerances_mm``: one NSD tolerance for every label, one per label in ``dataset.json``'s order, or None for
    1 mm (the MedNeXt paper's). A wrong count is an :class:`EvaluationError` naming the labels.
    """
    labels = dataset_json.get('labels')
    if not isinstance(labels, dict):
        raise EvaluationError('dataset.json has no "labels"; it is not an nnU-Net dataset.json')
    manager = LabelManager(labels, dataset_json.get('regions_class_order'))
    regions = [_normalised(r) for r in (manager.foreground_regions if manager.has_regions
                                        else manager.foreground_labels)]
    names_by_region = {_normalised(value): name for name, value in labels.items() if name != 'ignore'}
    names = [names_by_region[region] for region in regions]
    tolerances = tolerances_mm or [1.0]
    if len(tolerances) == 1:
        tolerances = tolerances * len(regions)
    if len(tolerances) != len(regions):
        raise EvaluationError(f'--tolerance takes one value, or one per label in dataset.json\'s order '
                              f'({", ".join(names)}: {len(names)}), not {len(tolerances_mm)}')
    allowed = set(manager.all_labels) | ({manager.ignore_label} if manager.has_ignore_label else set())
    return LabelSet(tuple(names), tuple(regions), tuple(float(t) for t in tolerances), frozenset(allowed),
                    manager.ignore_label)


def _normalised(value: int | list | tuple) -> Region:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if len(value) == 1 else tuple(int(v) for v in value)
    return int(value)


def read_segmentation(path: Path, reader_class: type[BaseReaderWriter],
                      labels: LabelSet) -> tuple[np.ndarray, Geometry]:
    """A segmentation file as an integer array (z, y, x) in nnU-Net's axis order, (y, x) for a 2d image, and its
    geometry. Raises :class:`EvaluationError` naming the file when it cannot be read or holds values that are
    not labels of ``dataset.json``."""
    try:
        segmentation, properties = reader_class().read_seg(str(path))
    except Exception as error:  # every reader raises its own kinds for a damaged or foreign file
        raise EvaluationError(f'{path} cannot be read as a segmentation ({type(error).__name__}: {error}); '
                              f'replace the file, or remove it and use --allow-missing') from None
    segmentation, spacing = segmentation[0], tuple(float(s) for s in properties['spacing'])
    if segmentation.ndim == 3 and segmentation.shape[0] == 1:  # nnU-Net's form of a 2d image
        segmentation, spacing = segmentation[0], spacing[1:]
    values = np.unique(segmentation)
    unknown = [v for v in values.tolist() if v != int(v) or int(v) not in labels.allowed_values]
    if unknown:
        raise EvaluationError(f'{path} holds values {", ".join(f"{v:g}" for v in unknown)} that are not labels of '
                              f'dataset.json (labels: {", ".join(map(str, sorted(labels.allowed_values)))}); is it '
                              f'a segmentation of this dataset?')
    sitk = properties.get('sitk_stuff', {})
    geometry = Geometry(segmentation.shape, spacing, sitk.get('origin'), sitk.get('direction'))
    return segmentation.astype(np.min_scalar_type(int(values.max()))), geometry


def evaluate_case(task: CaseTask, labels: LabelSet, reader_class: type[BaseReaderWriter]) -> dict:
    """Read a prediction and its reference, check that they lie on the same grid, and measure every label.

    Returns ``{'model', 'fold', 'case', 'prediction', 'reference', 'metrics': {label name: {'dice', 'nsd', 'hd95',
    'reference_voxels', 'predicted_voxels'}}}``. Raises :class:`EvaluationError` naming the case, the files and
    both geometries when the grids differ.
    """
    reference, reference_geometry = read_segmentation(task.reference, reader_class, labels)
    prediction, prediction_geometry = read_segmentation(task.prediction, reader_class, labels)
    differences = reference_geometry.differences(prediction_geometry)
    if differences:
        raise EvaluationError(
            f'case {task.case} ({task.model}): the prediction lies on another grid than the reference '
            f'({", ".join(differences)} differ).\n  prediction {task.prediction}: {prediction_geometry}\n  '
            f'reference  {task.reference}: {reference_geometry}\nPredict from the images the reference belongs '
            f'to (nnUNetv2_predict gives a prediction the geometry of its image), or resample it onto the '
            f'reference.')
    return {'model': task.model, 'fold': task.fold, 'case': task.case, 'prediction': str(task.prediction),
            'reference': str(task.reference),
            'metrics': case_metrics(reference, prediction, reference_geometry.spacing, labels)}


def case_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...], labels: LabelSet,
                 crop: bool = True) -> dict[str, dict[str, float]]:
    """Dice, NSD and HD95 (mm) of every label of ``labels`` between two label maps of the same shape, (z, y, x)
    or (y, x), with ``spacing`` in mm per array axis. Voxels the reference marks with the ignore label count
    for neither mask. ``crop=False`` hands MONAI the whole volumes (the same numbers; for comparison)."""
    ignored = reference == labels.ignore_label if labels.ignore_label is not None else None
    out = {}
    for name, region, tolerance in zip(labels.names, labels.regions, labels.tolerances_mm):
        reference_mask = region_or_label_to_mask(reference, region)
        prediction_mask = region_or_label_to_mask(prediction, region)
        if ignored is not None:
            prediction_mask &= ~ignored
        out[name] = region_metrics(reference_mask, prediction_mask, spacing, tolerance, crop)
    return out


def region_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float,
                   crop: bool = True) -> dict[str, float]:
    """Dice, NSD at ``tolerance_mm`` and HD95 (mm) of two boolean masks of the same shape, (z, y, x) or (y, x),
    with the empty-mask policy of ``DEFINITIONS["empty"]``. With ``crop``, MONAI sees only the box around both masks
    widened by one voxel of background (which the outer surface needs): every surface point lies in that box, so
    every distance is the same as in the whole volume."""
    counts = {'reference_voxels': int(np.count_nonzero(reference)),
              'predicted_voxels': int(np.count_nonzero(prediction))}
    if not counts['reference_voxels'] and not counts['predicted_voxels']:
        return {'dice': math.nan, 'nsd': math.nan, 'hd95': math.nan, **counts}
    if not counts['reference_voxels'] or not counts['predicted_voxels']:
        diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(reference.shape, spacing)))
        return {'dice': 0.0, 'nsd': 0.0, 'hd95': diagonal, **counts}
    if crop:
        box = bounding_box(reference | prediction)
        reference, prediction = reference[box], prediction[box]
    tp, fp, fn, _ = compute_tp_fp_fn_tn(reference, prediction)
    y, y_pred = torch.from_numpy(reference[None, None]), torch.from_numpy(prediction[None, None])
    with warnings.catch_warnings():  # MONAI 1.5+ passes a deprecated argument to its own get_mask_edges
        warnings.filterwarnings('ignore', '.*always_return_as_numpy', FutureWarning)
        nsd = compute_surface_dice(y_pred, y, [tolerance_mm], include_background=True, spacing=list(spacing),
                                   use_subvoxels=True)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
    return {'dice': float(2 * tp / (2 * tp + fp + fn)), 'nsd': float(nsd), 'hd95': float(hd95), **counts}


def bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """The smallest box around the True voxels of a non-empty ``mask``, widened by ``margin`` voxels on every side
    and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + margin + 1, mask.shape[axis])))
    return tuple(box)
