"""``nnunet-plugins evaluate``: the metrics against MONAI called directly and against values known by hand, the
crop against the whole volume, the Wilcoxon test against scipy, every refused input (in-process, on small
hand-made files), the report for a few and for 120 labels (from seeded records, no images), and one stock-CLI run
on the tiny dataset's cross-validation of two trainers.
"""
import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy.stats import wilcoxon

from nnunet_plugins import synthetic
from nnunet_plugins.cli import main
from nnunet_plugins.commands.evaluate.command import write_report
from nnunet_plugins.commands.evaluate.discovery import Inputs, Model
from nnunet_plugins.commands.evaluate.metrics import bounding_box, case_metrics, label_set, read_segmentation, \
    region_metrics
from nnunet_plugins.commands.evaluate.report import markdown
from nnunet_plugins.commands.evaluate.statistics import model_summaries, paired_test, summary

from helpers import CONFIGURATION, DATASET_ID, DATASET_NAME, MEDNEXT, UPKERN

COMMAND = str(Path(sys.executable).parent / 'nnunet-plugins')
LABELS = {'background': 0, 'organ': 1, 'lesion': 2}
SHAPE = (8, 16, 16)
# MONAI 1.5+ passes a deprecated argument to its own get_mask_edges when called directly, as some tests do
pytestmark = pytest.mark.filterwarnings('ignore:.*always_return_as_numpy:FutureWarning')


def monai_values(prediction: np.ndarray, reference: np.ndarray, spacing, tolerance: float = 1.0) -> dict:
    """Dice, NSD and HD95 of two boolean masks by MONAI's functions on the whole arrays."""
    y_pred, y = torch.from_numpy(prediction[None, None]), torch.from_numpy(reference[None, None])
    return {'dice': float(compute_dice(y_pred.float(), y.float(), include_background=True)),
            'nsd': float(compute_surface_dice(y_pred, y, [tolerance], include_background=True, spacing=list(spacing),
                                              use_subvoxels=True)),
            'hd95': float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                     spacing=list(spacing)))}


def box(shape, start, stop) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return mask


# ---- metrics ----

def test_shifted_sphere_matches_monai_and_the_values_by_hand():
    radius, shift = 8, 2
    grid = np.indices((28, 28, 28)) - 13.5
    reference = (grid ** 2).sum(0) <= radius ** 2
    prediction = np.roll(reference, shift, axis=0)
    ours = region_metrics(reference, prediction, (1.0, 1.0, 1.0), 1.0)
    assert {k: ours[k] for k in ('dice', 'nsd', 'hd95')} == pytest.approx(monai_values(prediction, reference, [1] * 3),
                                                                          abs=1e-6)
    # Dice by counting voxels, and close to two continuous spheres' overlap pi (4R + d) (2R - d)^2 / 12
    assert ours['dice'] == 2 * (reference & prediction).sum() / (2 * reference.sum())
    overlap = math.pi * (4 * radius + shift) * (2 * radius - shift) ** 2 / 12
    assert ours['dice'] == pytest.approx(overlap / (4 / 3 * math.pi * radius ** 3), rel=0.01)
    # HD95 of two continuous spheres: a surface point at cos(theta) = c (uniform on the sphere) lies
    # |sqrt(R^2 - 2Rdc + d^2) - R| from the other sphere; its 95th percentile is 1.90, voxels give 2.0
    c = np.linspace(-1, 1, 100001)
    continuous = np.quantile(np.abs(np.sqrt(radius ** 2 - 2 * radius * shift * c + shift ** 2) - radius), 0.95)
    assert continuous == pytest.approx(1.90, abs=0.01)
    assert ours['hd95'] == pytest.approx(continuous, abs=0.5)
    assert 0.5 < ours['nsd'] < 1
    assert (ours['reference_voxels'], ours['predicted_voxels']) == (reference.sum(), prediction.sum())


@pytest.mark.parametrize('shape, spacing', [((12, 14, 16), (2.0, 0.8, 0.8)), ((20, 24), (0.7, 0.7))])
def test_identical_masks_score_dice_1_nsd_1_hd95_0(shape, spacing):
    mask = box(shape, [3] * len(shape), [9] * len(shape))
    ours = region_metrics(mask, mask.copy(), spacing, 1.0)
    assert (ours['dice'], ours['nsd'], ours['hd95']) == (1.0, 1.0, 0.0)
    assert monai_values(mask, mask, spacing) == {'dice': 1.0, 'nsd': 1.0, 'hd95': 0.0}


def test_empty_masks_follow_the_documented_policy():
    spacing, empty = (3.0, 1.0, 1.0), np.zeros(SHAPE, dtype=bool)
    mask = box(SHAPE, (2, 2, 2), (5, 6, 6))
    both = region_metrics(empty, empty, spacing, 1.0)
    assert all(math.isnan(both[m]) for m in ('dice', 'nsd', 'hd95'))
    diagonal = math.sqrt((8 * 3) ** 2 + 16 ** 2 + 16 ** 2)
    for reference, prediction in ((mask, empty), (empty, mask)):
        one = region_metrics(reference, prediction, spacing, 1.0)
        assert (one['dice'], one['nsd'], one['hd95']) == (0.0, 0.0, pytest.approx(diagonal))
    with pytest.warns(UserWarning, match='is all 0'):  # what MONAI itself answers: NSD 0 and NaN, no finite HD95
        direct = monai_values(empty, mask, spacing)
        assert direct['nsd'] == 0.0 and not math.isfinite(direct['hd95'])
        assert math.isnan(monai_values(empty, empty, spacing)['nsd'])


def test_anisotropic_spacing_is_honoured():
    """The same one-voxel shift of a box costs 3 mm along the 3 mm axis and 1 mm along a 1 mm axis: every
    boundary voxel is 0 or one voxel step from the other box, so HD95 is exactly that step."""
    spacing = (3.0, 1.0, 1.0)
    reference = box((20, 30, 30), (5, 8, 8), (13, 20, 20))
    along_z, along_y = np.roll(reference, 1, axis=0), np.roll(reference, 1, axis=1)
    coarse = region_metrics(reference, along_z, spacing, 1.0)
    fine = region_metrics(reference, along_y, spacing, 1.0)
    assert (coarse['dice'], fine['dice']) == (7 / 8, 11 / 12)  # the box is 8 voxels deep and 12 wide
    assert (coarse['hd95'], fine['hd95']) == (3.0, 1.0)
    assert fine['nsd'] == 1.0  # every distance within the 1 mm tolerance
    assert 0.7 < coarse['nsd'] < 0.9  # 3 mm distances are not
    for ours, prediction in ((coarse, along_z), (fine, along_y)):
        assert {k: ours[k] for k in ('dice', 'nsd', 'hd95')} == pytest.approx(
            monai_values(prediction, reference, spacing), abs=1e-6)


def test_crop_gives_the_numbers_of_the_whole_volume():
    rng = np.random.default_rng(3)
    _, reference, spacing = synthetic.make_case(rng, synthetic.TINY)
    prediction = np.roll(reference, (1, 0, 2), axis=(0, 1, 2))
    prediction[:, :2, :] = 1  # an organ false positive along the image border
    labels = label_set({'labels': dict(synthetic.LABELS)}, [2.0, 1.0, 1.5])
    cropped = case_metrics(reference, prediction, spacing, labels)
    whole = case_metrics(reference, prediction, spacing, labels, crop=False)
    assert cropped == whole
    assert all(0 < cropped[label]['nsd'] < 1 for label in labels.names)
    # the crop really is smaller than the volume: the lesion's box
    lesion = (reference == 3) | (prediction == 3)
    crop = bounding_box(lesion)
    assert np.prod([s.stop - s.start for s in crop]) < lesion.size / 4
    assert lesion[crop].sum() == lesion.sum()


def test_regions_and_ignore_label_count_as_nnunet_counts_them():
    dataset_json = {'labels': {'background': 0, 'whole': [1, 2], 'core': 2, 'ignore': 3},
                    'regions_class_order': [1, 2]}
    labels = label_set(dataset_json, None)
    assert (labels.names, labels.regions, labels.ignore_label) == (('whole', 'core'), ((1, 2), 2), 3)
    assert labels.allowed_values == {0, 1, 2, 3}
    reference = np.zeros(SHAPE, dtype=np.uint8)
    reference[2:6, 4:12, 4:12] = 1
    reference[3:5, 6:10, 6:10] = 2
    reference[:, :, 14:] = 3  # not annotated
    prediction = reference.copy()
    prediction[:, :, 14:] = 1  # predicted where the reference has no annotation: not counted
    prediction[2, 4:12, 4:12] = 0  # one slice of the whole tumour missed
    values = case_metrics(reference, prediction, (1.0, 1.0, 1.0), labels)
    assert values['whole']['dice'] == 2 * 192 / (256 + 192)
    assert values['core']['dice'] == 1.0
    assert values['whole']['predicted_voxels'] == 192


def test_tolerance_per_label_and_wrong_counts():
    dataset_json = {'labels': LABELS}
    assert label_set(dataset_json, None).tolerances_mm == (1.0, 1.0)
    assert label_set(dataset_json, [2.0]).tolerances_mm == (2.0, 2.0)
    assert label_set(dataset_json, [2.0, 0.5]).tolerances_mm == (2.0, 0.5)
    with pytest.raises(ValueError, match=r'one per label .*organ, lesion: 2\), not 3'):
        label_set(dataset_json, [1.0, 2.0, 3.0])


# ---- statistics ----

def test_wilcoxon_p_value_matches_scipy_and_the_exact_value():
    # five cases all better: the exact two-sided p is 2 / 2^5
    assert paired_test([0.9, 0.8, 0.7, 0.85, 0.95], [0.5, 0.4, 0.3, 0.45, 0.35])['p_value'] == 2 / 32
    rng = np.random.default_rng(0)
    values, baseline = rng.uniform(0.6, 0.9, 12), rng.uniform(0.6, 0.9, 12)
    values[3], baseline[7] = math.nan, math.nan  # cases where a label is absent: left out of the pair
    test = paired_test(list(values), list(baseline))
    keep = ~(np.isnan(values) | np.isnan(baseline))
    expected = wilcoxon(values[keep], baseline[keep])
    assert test == {'n': 10, 'statistic': float(expected.statistic), 'p_value': float(expected.pvalue)}
    assert paired_test([math.nan], [0.5]) == {'n': 0, 'statistic': None, 'p_value': None}
    # no difference at all: scipy's permutations give p = 1 for a few pairs, its normal approximation none for many
    assert paired_test([0.5] * 5, [0.5] * 5)['p_value'] == 1.0
    assert paired_test([0.5] * 20, [0.5] * 20) == {'n': 20, 'statistic': 0.0, 'p_value': None}
    assert summary([1.0, math.nan, 3.0]) == {'mean': 2.0, 'std': pytest.approx(math.sqrt(2)), 'n': 2}


# ---- prediction folders, and every input that is refused ----

def write_labels(path: Path, array: np.ndarray, spacing=(3.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(tuple(reversed(spacing)))
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """A reference folder and a prediction folder (with the dataset.json nnUNetv2_predict writes) of three cases;
    case_001 is predicted one voxel off."""
    reference, prediction = tmp_path / 'labels', tmp_path / 'predictions'
    reference.mkdir()
    prediction.mkdir()
    (prediction / 'dataset.json').write_text(json.dumps({'labels': LABELS, 'file_ending': '.nii.gz'}))
    for number in range(3):
        labels = np.zeros(SHAPE, dtype=np.uint8)
        labels[2:6, 3:11, 3 + number:12] = 1
        labels[3:5, 12:15, 1:4] = 2
        write_labels(reference / f'case_{number:03d}.nii.gz', labels)
        write_labels(prediction / f'case_{number:03d}.nii.gz', np.roll(labels, number == 1, axis=2))
    return prediction, reference


def evaluate(*args: str) -> str:
    """Run ``nnunet-plugins evaluate`` in this process; the error message it exits with, or '' on success."""
    try:
        main(['evaluate', *args, '-np', '1'])
    except SystemExit as exit_:
        return str(exit_.code)
    return ''


def test_prediction_folder_evaluates_into_every_file(folders, capsys):
    prediction, reference = folders
    assert evaluate('--pred', str(prediction), '--ref', str(reference)) == ''
    out = prediction / 'evaluation'
    assert sorted(p.name for p in out.iterdir()) == ['evaluation.csv', 'evaluation.json', 'evaluation.md',
                                                     'evaluation.png']
    result = json.loads((out / 'evaluation.json').read_text())
    cases = result['models']['predictions']['cases']
    assert [c['case'] for c in cases] == ['case_000', 'case_001', 'case_002']
    assert [c['metrics']['organ']['dice'] for c in cases] == [1.0, pytest.approx(2 * 224 / (2 * 256)), 1.0]
    assert cases[1]['metrics']['organ']['hd95'] == 1.0
    organ = result['models']['predictions']['mean']['organ']['dice']
    assert organ == {'mean': pytest.approx((2 + 448 / 512) / 3), 'std': pytest.approx(np.std([1, 448 / 512, 1],
                                                                                            ddof=1)), 'n': 3}
    assert result['meta']['nsd_tolerance_mm'] == {'organ': 1.0, 'lesion': 1.0}
    rows = list(csv.DictReader((out / 'evaluation.csv').open()))
    assert len(rows) == 3 * 2 and rows[2] == {**rows[2], 'case': 'case_001', 'label': 'organ', 'hd95_mm': '1.0'}
    table = (out / 'evaluation.md').read_text()
    assert '| predictions | **0.958 ± 0.072** | **0.889 ± 0.192** |' in table
    assert (out / 'evaluation.png').read_bytes()[:4] == b'\x89PNG'
    assert '3/3' in capsys.readouterr().err  # the progress bar


@pytest.mark.parametrize('change, named', [
    ({'array': np.zeros((8, 16, 15))}, 'shape 8x16x15'),
    ({'spacing': (2.5, 1.0, 1.0)}, 'spacing (2.5, 1, 1) mm'),
    ({'origin': (0.0, 0.0, 10.0)}, 'origin (0, 0, 10)'),
])
def test_predictions_on_another_grid_are_refused_naming_case_and_geometries(folders, change, named):
    prediction, reference = folders
    arguments = {'array': np.zeros(SHAPE), **change}
    write_labels(prediction / 'case_002.nii.gz', arguments.pop('array'), **arguments)
    message = evaluate('--pred', str(prediction), '--ref', str(reference))
    assert message.startswith('nnunet-plugins evaluate: error: case case_002 (predictions): the prediction lies on '
                              'another grid than the reference')
    assert named in message and 'shape 8x16x16, spacing (3, 1, 1) mm (array axes), origin (0, 0, 0)' in message
    assert not (prediction / 'evaluation').exists()


def test_missing_cases_are_listed_or_left_out_with_allow_missing(folders):
    prediction, reference = folders
    (prediction / 'case_001.nii.gz').unlink()
    write_labels(prediction / 'case_009.nii.gz', np.zeros(SHAPE))
    message = evaluate('--pred', str(prediction), '--ref', str(reference))
    assert f'1 case(s) have no reference in {reference}: case_009' in message
    assert f'predictions has no prediction for 1 case(s) in {prediction}: case_001' in message
    assert '--allow-missing' in message and not (prediction / 'evaluation').exists()
    assert evaluate('--pred', str(prediction), '--ref', str(reference), '--allow-missing') == ''
    result = json.loads((prediction / 'evaluation' / 'evaluation.json').read_text())
    assert [c['case'] for c in result['models']['predictions']['cases']] == ['case_000', 'case_002']
    assert '2 of 4 cases evaluated' in result['meta']['notes'][0]
    assert '2 of 4 cases evaluated' in (prediction / 'evaluation' / 'evaluation.md').read_text()


def test_label_values_not_in_dataset_json_are_refused(folders):
    prediction, reference = folders
    write_labels(prediction / 'case_001.nii.gz', np.full(SHAPE, 5))
    message = evaluate('--pred', str(prediction), '--ref', str(reference))
    assert f'{prediction / "case_001.nii.gz"} holds values 5 that are not labels of dataset.json (labels: 0, 1, 2)' \
        in message


def test_an_unreadable_file_is_named(folders):
    prediction, reference = folders
    (reference / 'case_002.nii.gz').write_bytes(b'not an image')
    message = evaluate('--pred', str(prediction), '--ref', str(reference))
    assert f'{reference / "case_002.nii.gz"} cannot be read as a segmentation' in message


def test_a_failure_leaves_earlier_results_as_they_were(folders):
    prediction, reference = folders
    out = prediction.parent / 'out'
    assert evaluate('--pred', str(prediction), '--ref', str(reference), '--out', str(out)) == ''
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (prediction / 'case_002.nii.gz').write_bytes(b'damaged')  # the last case: the others are measured first
    assert 'cannot be read' in evaluate('--pred', str(prediction), '--ref', str(reference), '--out', str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_dataset_json_is_required_where_the_folder_has_none(folders):
    prediction, reference = folders
    (prediction / 'dataset.json').unlink()
    message = evaluate('--pred', str(prediction), '--ref', str(reference))
    assert f'{prediction / "dataset.json"} does not exist; pass --dataset-json' in message
    dataset_json = prediction.parent / 'dataset.json'
    dataset_json.write_text(json.dumps({'labels': LABELS, 'file_ending': '.nii.gz'}))
    assert evaluate('--pred', str(prediction), '--ref', str(reference), '--dataset-json', str(dataset_json)) == ''


def test_conflicting_arguments_and_unknown_baseline_are_refused(folders):
    prediction, reference = folders
    assert 'give either a DATASET' in evaluate('991', '--pred', str(prediction), '--ref', str(reference))
    assert 'give either a DATASET' in evaluate()
    assert '--pred needs --ref' in evaluate('--pred', str(prediction))
    assert '-tr choose among a DATASET' in evaluate('--pred', str(prediction), '--ref', str(reference), '-tr', 'X')
    message = evaluate('--pred', str(prediction), '--ref', str(reference), '--baseline', 'nnUNetTrainer')
    assert message.endswith('--baseline nnUNetTrainer names no model of predictions; give one of these names')


@pytest.fixture
def results(folders, tmp_path, monkeypatch) -> Path:
    """nnU-Net's folders for a dataset 995 whose references are the three cases of ``folders``: splits with
    case_000 and case_001 in fold 0 and case_002 in fold 1; validation output of trainer A for both folds, of B for
    fold 0 only, and a folder of trainer C without any. Returns the dataset's results folder."""
    prediction, reference = folders
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    preprocessed = tmp_path / 'nnUNet_preprocessed' / 'Dataset995_Three'
    preprocessed.mkdir(parents=True)
    shutil.copy(prediction / 'dataset.json', preprocessed / 'dataset.json')
    shutil.copytree(reference, preprocessed / 'gt_segmentations')
    splits = [{'train': [], 'val': ['case_000', 'case_001']}, {'train': [], 'val': ['case_002']}]
    (preprocessed / 'splits_final.json').write_text(json.dumps(splits))
    dataset = tmp_path / 'nnUNet_results' / 'Dataset995_Three'
    for trainer, cases_per_fold in (('A', (['case_000', 'case_001'], ['case_002'])), ('B', (['case_000', 'case_001'],)),
                                    ('C', ([],))):
        for fold, cases in enumerate(cases_per_fold):
            validation = dataset / f'{trainer}__nnUNetPlans__3d_fullres' / f'fold_{fold}' / 'validation'
            validation.mkdir(parents=True)
            for case in cases:
                shutil.copy(prediction / f'{case}.nii.gz', validation)
    return dataset


def test_cross_validation_folders_are_found_and_checked(results):
    message = evaluate('995')
    assert f'{results / "B__nnUNetPlans__3d_fullres"} has no validation output for fold 1: `nnUNetv2_train 995 ' \
           f'3d_fullres 1 -tr B -p nnUNetPlans` writes fold_1/validation/ when training ends (add --val' in message
    assert evaluate('995', '-f', '0', '--baseline', 'B') == ''
    evaluation = json.loads((results / 'evaluation' / 'evaluation.json').read_text())
    assert list(evaluation['models']) == ['A__nnUNetPlans__3d_fullres', 'B__nnUNetPlans__3d_fullres']
    assert evaluation['meta']['notes'] == ['C__nnUNetPlans__3d_fullres has no validation output; left out']
    assert '| B (baseline) |' in (results / 'evaluation' / 'evaluation.md').read_text()
    assert evaluate('995', '--allow-missing', '-tr', 'A', 'B') == ''
    evaluation = json.loads((results / 'evaluation' / 'evaluation.json').read_text())
    assert [c['case'] for c in evaluation['models']['A__nnUNetPlans__3d_fullres']['cases']] == ['case_000', 'case_001']
    assert 'B__nnUNetPlans__3d_fullres has no prediction for 1 case(s)' in evaluation['meta']['notes'][1]
    (results / 'A__nnUNetPlans__3d_fullres' / 'fold_0' / 'validation' / 'case_001.nii.gz').unlink()
    assert 'A__nnUNetPlans__3d_fullres has no prediction for 1 case(s) in ' in evaluate('995', '-f', '0')
    assert 'no results folder in ' in evaluate('995', '-tr', 'nnUNetTrainer')
    message = evaluate('995', '-tr', 'C')
    assert 'C__nnUNetPlans__3d_fullres has no validation output for fold 0: `nnUNetv2_train 995 3d_fullres 0 ' \
           '-tr C -p nnUNetPlans`' in message


def test_2d_images_are_read_as_2d(tmp_path):
    path = tmp_path / 'case.nii.gz'
    image = sitk.GetImageFromArray(box((20, 24), (4, 4), (10, 12)).astype(np.uint8))
    image.SetSpacing((0.5, 0.7))
    sitk.WriteImage(image, str(path))
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    array, geometry = read_segmentation(path, SimpleITKIO, label_set({'labels': LABELS}, None))
    assert array.shape == (20, 24) and geometry.spacing == pytest.approx((0.7, 0.5))  # NIfTI stores float32


# ---- the report: today's layout for a few labels, rows and paged heat maps for many ----

def synthetic_inputs(label_names: list[str], trainers: list[str], root: Path) -> Inputs:
    """What discovery would find for ``trainers`` on the same plans (the folders need not exist)."""
    models = [Model(f'{t}__nnUNetPlans__3d_fullres', root / f'{t}__nnUNetPlans__3d_fullres', {}, t, 'nnUNetPlans',
                    '3d_fullres') for t in trainers]
    labels = {'background': 0, **{name: value for value, name in enumerate(label_names, start=1)}}
    return Inputs('Dataset999_Synthetic, cross-validation folds 0, 1', {'labels': labels}, root, {}, models, {}, root,
                  ['a note'])


def synthetic_records(label_names: list[str], models: list[str], cases: int) -> list[dict]:
    """Records as ``evaluate_case`` returns them, with seeded values: each label has its own quality, each further
    model is a little better; label 2 is in no case (no value anywhere), every third label is absent from some."""
    rng = np.random.default_rng(0)
    quality = rng.uniform(0.3, 0.95, len(label_names))
    records = []
    for rank, model in enumerate(models):
        for case in range(cases):
            metrics = {}
            for index, label in enumerate(label_names):
                if index == 1 or (index % 3 == 0 and (index + case) % 5 == 0):
                    values = {'dice': math.nan, 'nsd': math.nan, 'hd95': math.nan}
                else:
                    dice = float(np.clip(quality[index] + 0.05 * rank + rng.normal(0, 0.05), 0, 1))
                    values = {'dice': dice, 'nsd': float(np.clip(dice + rng.normal(0, 0.05), 0, 1)),
                              'hd95': float(rng.uniform(0.5, 30) * (1.2 - dice))}
                metrics[label] = {**values, 'reference_voxels': 10 * index, 'predicted_voxels': 10 * index + case}
            records.append({'model': model, 'fold': case % 2, 'case': f'case_{case:03d}',
                            'prediction': f'{model}/case_{case:03d}.nii.gz', 'reference': f'case_{case:03d}.nii.gz',
                            'metrics': metrics})
    return records


def test_a_few_labels_keep_the_layout_of_models_as_rows_and_box_plots(tmp_path):
    """Three labels: the Markdown is byte for byte what the report wrote before it learnt many labels (the fixture
    was written by that code), and the one figure has the box plots' size."""
    names = ['organ', 'vessel', 'lesion']
    inputs = synthetic_inputs(names, ['nnUNetTrainer', 'nnUNetTrainerMedNeXtL'], tmp_path)
    records = synthetic_records(names, [m.name for m in inputs.models], 6)
    report, written = write_report(tmp_path / 'out', inputs, label_set(inputs.dataset_json, None), records,
                                   inputs.models[0].name)
    assert report == (Path(__file__).parent / 'fixtures' / 'evaluation_3_labels.md').read_text()
    assert sorted(p.name for p in written) == ['evaluation.csv', 'evaluation.json', 'evaluation.md', 'evaluation.png']
    assert Image.open(tmp_path / 'out' / 'evaluation.png').size == (990, 1056)


CELL = re.compile(r'(\*\*)?(—|[\d.]+)(?: ± ([\d.]+))?(?:\*\*)?(?:, p (—|< 0\.001|= [\d.e-]+))?')


def markdown_tables(text: str) -> dict[str, list[list[str]]]:
    """Each ``### heading`` of the report -> the cells of its table's rows (header and rule left out)."""
    tables = {}
    for section in text.split('\n### ')[1:]:
        heading, *lines = section.split('\n')
        tables[heading] = [line[2:-2].split(' | ') for line in lines if line.startswith('| ')][1:]
    return tables


def test_many_labels_are_rows_worst_first_with_bounded_lines_and_paged_figures(tmp_path):
    """120 labels (different NSD tolerances, names up to 30 characters) and two models with full names: every
    table has a row per label, ordered by the lowest mean Dice, with the JSON's numbers; no line is over 400
    characters; the figures are pages of 40 labels, no side over 4,000 pixels; earlier figures are removed."""
    names = [f'Left-Cerebral-White-Matter-{i:03d}' if i % 2 else f'region_{i:03d}' for i in range(120)]
    inputs = synthetic_inputs(names, ['nnUNetTrainer', 'nnUNetTrainerMedNeXtL'], tmp_path)
    inputs.models[1] = Model('nnUNetTrainerMedNeXtL__nnUNetResEncUNetLPlans__3d_fullres', tmp_path, {},
                             'nnUNetTrainerMedNeXtL', 'nnUNetResEncUNetLPlans', '3d_fullres')  # full names shown
    models = [m.name for m in inputs.models]
    labels = label_set(inputs.dataset_json, [1.0 + i % 3 for i in range(120)])
    out = tmp_path / 'out'
    out.mkdir()
    for earlier in ('evaluation.png', 'evaluation_4.png', 'mine.png'):
        (out / earlier).write_bytes(b'\x89PNG')
    report, written = write_report(out, inputs, labels, synthetic_records(names, models, 6), models[0])
    figures = [f'evaluation_{page}.png' for page in (1, 2, 3)]
    assert sorted(p.name for p in out.iterdir()) == sorted(['evaluation.csv', 'evaluation.json', 'evaluation.md',
                                                           'mine.png', *figures])
    assert sorted(p.name for p in written if p.suffix == '.png') == figures
    assert (out / 'evaluation.md').read_text() == report
    assert max(len(line) for line in report.splitlines()) <= 400
    assert all(max(Image.open(out / name).size) <= 4000 for name in figures)
    assert '- `evaluation_1.png`: labels 1-40\n- `evaluation_2.png`: labels 41-80\n- `evaluation_3.png`: labels ' \
           '81-120\n' in report
    result = json.loads((out / 'evaluation.json').read_text())
    means = {m: result['models'][m]['mean'] for m in models}
    p_values = {(t['label'], t['metric']): t['p_value'] for t in result['tests']}
    worst = {label: min((means[m][label]['dice']['mean'] for m in models
                         if means[m][label]['dice']['mean'] is not None), default=math.inf) for label in names}
    tables = markdown_tables(report)
    assert list(tables) == ['Dice', "NSD at each label's tolerance (column mm)", 'HD95 (mm)']
    for (heading, rows), metric in zip(tables.items(), ('dice', 'nsd', 'hd95')):
        assert [int(row[0]) for row in rows] == list(range(1, 121))
        order = [row[1] for row in rows]
        assert sorted(order) == sorted(names) and [worst[label] for label in order] == sorted(worst.values())
        digits = 2 if metric == 'hd95' else 3
        for row in rows:
            label, cells = row[1], row[3:] if metric == 'nsd' else row[2:]
            if metric == 'nsd':
                assert float(row[2]) == labels.tolerances_mm[names.index(label)]
            summaries = [means[m][label][metric] for m in models]
            defined = [s['mean'] for s in summaries if s['mean'] is not None]
            for model, summary, cell in zip(models, summaries, cells, strict=True):
                bold, mean, std, p = CELL.fullmatch(cell).groups()
                if summary['mean'] is None:
                    assert mean == '—' and not bold
                else:
                    assert float(mean) == pytest.approx(summary['mean'], abs=0.51 * 10 ** -digits)
                    assert float(std) == pytest.approx(summary['std'], abs=0.51 * 10 ** -digits)
                    assert bool(bold) == (summary['mean'] == (max if metric != 'hd95' else min)(defined))
                expected = p_values[label, metric]  # of the one model tested against the baseline
                if model == models[0]:
                    assert p is None
                elif expected is None or expected < 0.001:
                    assert p == ('—' if expected is None else '< 0.001')
                else:
                    assert float(p.removeprefix('= ')) == pytest.approx(expected, rel=0.05)
    rows = list(csv.DictReader((out / 'evaluation.csv').open()))
    assert len(rows) == 2 * 6 * 120


def test_the_layout_changes_above_eight_labels():
    """Up to eight labels a table has a column per label; from nine, a row per label."""
    for count, header in ((8, '| model | '), (9, '| # | label | ')):
        names = [f'label_{i}' for i in range(count)]
        records = synthetic_records(names, ['a', 'b'], 4)
        labels = label_set({'labels': {'background': 0, **{n: i + 1 for i, n in enumerate(names)}}}, None)
        text = markdown('t', model_summaries(records, names), [], labels, {'a': 'a', 'b': 'b'}, None, 4, [])
        assert text.count(header) == 3 and len(markdown_tables(text)['Dice']) == (2 if count == 8 else count)


# ---- the stock CLI on the tiny dataset's cross-validation ----

@pytest.mark.e2e
@pytest.mark.filterwarnings('ignore:invalid value encountered:RuntimeWarning')  # scipy on all-zero differences
def test_cross_validation_of_two_trainers_through_the_stock_cli(workspace):
    """MedNeXt-S and its UpKern run, the two plugin trainers whose folds nnUNetv2_train trains and validates in the
    suite (test_stock_cli.py, test_upkern.py; memoised, so the same runs)."""
    folds = {MEDNEXT: workspace.train(MEDNEXT, 0), UPKERN: workspace.train(UPKERN, 0)}
    result = subprocess.run([COMMAND, 'evaluate', str(DATASET_ID), '-tr', MEDNEXT, UPKERN, '-c', CONFIGURATION,
                             '-f', '0', '--baseline', MEDNEXT, '-np', '2'],
                            env=workspace.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    out = workspace.root / 'nnUNet_results' / f'Dataset{DATASET_ID:03d}_{DATASET_NAME}' / 'evaluation'
    evaluation = json.loads((out / 'evaluation.json').read_text())
    split = json.loads((workspace.preprocessed / 'splits_final.json').read_text())[0]['val']
    names = [name for name, value in synthetic.LABELS.items() if value]
    for trainer, fold in folds.items():
        model = evaluation['models'][f'{trainer}__nnUNetPlans__{CONFIGURATION}']
        assert sorted(c['case'] for c in model['cases']) == sorted(split)
        nnunet = json.loads((fold / 'validation' / 'summary.json').read_text())['mean']
        for name in names:  # the Dice of nnU-Net's own summary.json, label by label
            ours, theirs = model['folds']['0'][name]['dice']['mean'], nnunet[str(synthetic.LABELS[name])]['Dice']
            assert (ours is None and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-12)
            assert model['mean'][name] == model['folds']['0'][name]
    rows = list(csv.DictReader((out / 'evaluation.csv').open()))
    assert len(rows) == 2 * len(split) * len(names)
    for test in evaluation['tests']:  # p-values against scipy on the CSV's numbers
        assert test['model'].startswith(UPKERN) and test['baseline'].startswith(MEDNEXT)
        column = test['metric'] if test['metric'] != 'hd95' else 'hd95_mm'
        values = {trainer: [float(r[column] or 'nan') for r in rows if r['label'] == test['label']
                                 and r['trainer'] == trainer] for trainer in (MEDNEXT, UPKERN)}
        keep = [not (math.isnan(a) or math.isnan(b)) for a, b in zip(values[UPKERN], values[MEDNEXT])]
        if any(keep):
            pairs = np.array([values[UPKERN], values[MEDNEXT]])[:, keep]
            assert test['p_value'] == pytest.approx(float(wilcoxon(pairs[0], pairs[1]).pvalue))
    assert len(evaluation['tests']) == len(names) * 3
    table = (out / 'evaluation.md').read_text()
    assert f'| {MEDNEXT} (baseline) |' in table and f'| {UPKERN} |' in table and ', p ' in table
    assert table.count('| model | organ | vessel | lesion |') == 3 and '**' in table
    assert table in result.stdout
    assert (out / 'evaluation.png').read_bytes()[:4] == b'\x89PNG'
    assert f'{2 * len(split)}/{2 * len(split)}' in result.stderr
