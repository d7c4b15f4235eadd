"""The synthetic dataset: the default cases stay as they were; ``VARIED`` cases vary as its docstring says."""
import hashlib
import json

import numpy as np
import pytest

from nnunet_plugins import synthetic

ORGAN, VESSEL, LESION = (synthetic.LABELS[name] for name in ('organ', 'vessel', 'lesion'))


@pytest.mark.parametrize('size, digest', [
    (synthetic.TINY, 'd9cad6de5461f1aab5b84ab6a8c5b02f86ca661e607c893897b45b276baf6b2e'),
    (synthetic.DEMO, 'b13f074036f71060e64db46e5e94b2ee00f351a867e89f7dac035a6b7f51bb32'),
])
def test_default_cases_are_the_ones_drawn_before_variation_existed(size, digest):
    """Images, labels and spacings of three cases from seed 3, hashed before ``Variation`` was added: the demo, the
    tests' datasets and the README's earlier measurements keep their data."""
    rng, hashed = np.random.default_rng(3), hashlib.sha256()
    for _ in range(3):
        image, labels, spacing = synthetic.make_case(rng, size)
        hashed.update(image.tobytes())
        hashed.update(labels.tobytes())
        hashed.update(np.array(spacing).tobytes())
    assert hashed.hexdigest() == digest


def _cases(count: int):
    rng = np.random.default_rng(11)
    return [synthetic.make_case(rng, synthetic.TINY, synthetic.VARIED) for _ in range(count)]


def test_varied_cases_flip_contrast_mirror_the_anatomy_and_sometimes_lack_the_lesion():
    cases = _cases(40)
    organ_brighter, vessel_brighter, organ_left, lesion_present = [], [], [], []
    for image, labels, _ in cases:
        body = image > 0.5 * np.median(image[labels == 0])  # air is 0 plus noise; tissue is 100 before the bias
        tissue = image[body & (labels == 0)].mean()
        organ_brighter.append(image[labels == ORGAN].mean() > tissue)
        vessel_brighter.append(image[labels == VESSEL].mean() > tissue)
        organ_left.append(np.argwhere(labels == ORGAN)[:, 2].mean() < (labels.shape[2] - 1) / 2)
        lesion_present.append(bool((labels == LESION).any()))
        vessel_x = np.argwhere(labels == VESSEL)[:, 2].mean()
        assert (vessel_x > (labels.shape[2] - 1) / 2) == organ_left[-1]  # the vessel lies on the other side
    for name, values in [('organ brighter', organ_brighter), ('vessel brighter', vessel_brighter),
                         ('organ on the -x side', organ_left)]:
        assert 0.25 < np.mean(values) < 0.75, f'{name} in {np.mean(values):.0%} of the cases'
    assert 0.15 < 1 - np.mean(lesion_present) < 0.5  # VARIED.lesion_absent = 0.3


def test_varied_cases_differ_in_noise_and_organ_size():
    cases = _cases(30)
    noise = [np.std(np.concatenate([image[:, :3, :3], image[:, -3:, -3:]])) for image, _, _ in cases]  # air corners
    organ_mm3 = [np.count_nonzero(labels == ORGAN) * np.prod(spacing) for _, labels, spacing in cases]
    assert max(noise) / min(noise) > 3  # VARIED.noise spans 5% to 30% of the tissue intensity
    assert max(organ_mm3) / min(organ_mm3) > 2.5
    default_rng = np.random.default_rng(11)
    default_mm3 = [np.count_nonzero(labels == ORGAN) * np.prod(spacing)
                   for _, labels, spacing in (synthetic.make_case(default_rng, synthetic.TINY) for _ in range(30))]
    assert max(organ_mm3) / min(organ_mm3) > max(default_mm3) / min(default_mm3)


def test_bias_field_deviates_from_one_by_the_largest_coefficient():
    z, y, x = np.meshgrid(*[np.linspace(-5, 5, 9)] * 3, indexing='ij')
    coefficients = np.array([0.1, -0.25, 0.05, 0.0, 0.2, -0.1])
    field = synthetic._bias_field(coefficients, z, y, x)
    assert np.abs(field - 1).max() == pytest.approx(0.25)
    assert np.all(np.abs(np.diff(field, axis=2)) < 0.2)  # smooth: no jump between neighbouring voxels


def test_varied_dataset_is_mr_like_for_nnunet(tmp_path):
    """nnU-Net z-scores each image of a non-CT channel, so the flipped contrasts are not undone by a CT window."""
    varied = synthetic.write_dataset(tmp_path, 997, 'Varied', 2, 1, size=synthetic.TINY, variation=synthetic.VARIED)
    default = synthetic.write_dataset(tmp_path, 998, 'Default', 2, 1, size=synthetic.TINY)
    assert json.loads((varied / 'dataset.json').read_text())['channel_names'] == {'0': 'MR'}
    assert json.loads((default / 'dataset.json').read_text())['channel_names'] == {'0': 'CT'}
    assert len(list((varied / 'imagesTr').glob('*.nii.gz'))) == 2
    assert len(list((varied / 'labelsTs').glob('*.nii.gz'))) == 1
