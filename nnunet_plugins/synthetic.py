"""A deterministic, CT-like synthetic dataset in nnU-Net's raw format.

Each case is a body cross-section with three labels of very different size: a large organ (1), a
thin tubular vessel (2) running through all slices, and a small hypodense lesion (3) inside the organ.
Anatomy is drawn in millimetres and then sampled on an anisotropic voxel grid whose spacing and
shape vary from case to case, so nnU-Net's planning and resampling have real work to do. The same
seed always gives the same files.

``VARIED`` makes a harder set, for label-efficiency studies (``scripts/pretraining_label_efficiency.py``): an
MR-like image in arbitrary units whose structures change the sign of their contrast from case to case, under a bias
field and a noise level of its own; the organ lies on either side, with a wider range of sizes and shapes, and the
lesion is absent from some cases. Two labeled cases cannot show all of that; many unlabeled ones can.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from scipy.ndimage import gaussian_filter

LABELS = {'background': 0, 'organ': 1, 'vessel': 2, 'lesion': 3}
FILE_ENDING = '.nii.gz'

# Hounsfield-like intensities
_AIR, _TISSUE, _ORGAN, _VESSEL, _LESION = -1000.0, 20.0, 110.0, 260.0, 45.0
_NOISE_HU = 18.0


@dataclass(frozen=True)
class SyntheticSize:
    """Mean voxel grid (z, y, x) and spacing in mm (z, y, x); each case varies around them."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


TINY = SyntheticSize(shape=(14, 32, 32), spacing=(3.0, 1.2, 1.2))    # CLI tests: seconds per step on a CPU
DEMO = SyntheticSize(shape=(24, 56, 56), spacing=(2.5, 0.9, 0.9))    # the demo: minutes on a 2-core CPU


@dataclass(frozen=True)
class Variation:
    """How much more ``VARIED`` cases differ than the default ones (the default has none of this)."""

    contrast_flip: float            # probability that a structure is darker, not brighter, than its surroundings
    contrast: tuple[float, float]   # structure-to-surroundings contrast, as a fraction of the tissue intensity
    bias: float                     # largest deviation of the multiplicative bias field from 1
    noise: tuple[float, float]      # noise standard deviation, as a fraction of the tissue intensity
    size: tuple[float, float]       # factor on the organ's radii
    bumps: tuple[float, float]      # amplitude of the organ surface's bumps (the default's is 0.12)
    lesion_absent: float            # probability that a case has no lesion


VARIED = Variation(contrast_flip=0.5, contrast=(0.3, 0.8), bias=0.3, noise=(0.05, 0.3), size=(0.75, 1.25),
                   bumps=(0.0, 0.25), lesion_absent=0.3)
MR_TISSUE = 100.0  # arbitrary units; nnU-Net z-scores each MR-like image


@dataclass(frozen=True)
class _CaseDraw:
    """What a ``Variation`` drew for one case; ``_DEFAULT`` is a default case's."""

    levels: dict[str, float]        # intensity of air, tissue, organ, vessel and lesion before blur, bias and noise
    noise: float                    # noise standard deviation
    bias: np.ndarray | None         # polynomial coefficients of the bias field, or None for no bias field
    side: float                     # +1: the organ on the -x side, the vessel on the +x side; -1: mirrored
    size: float
    bumps: float
    lesion: bool


_DEFAULT = _CaseDraw(levels={'air': _AIR, 'tissue': _TISSUE, 'organ': _ORGAN, 'vessel': _VESSEL, 'lesion': _LESION},
                     noise=_NOISE_HU, bias=None, side=1.0, size=1.0, bumps=0.12, lesion=True)


def _draw(rng: np.random.Generator, variation: Variation) -> _CaseDraw:
    def contrast() -> float:
        sign = -1.0 if rng.random() < variation.contrast_flip else 1.0
        return 1 + sign * rng.uniform(*variation.contrast)
    organ = MR_TISSUE * contrast()
    levels = {'air': 0.0, 'tissue': MR_TISSUE, 'organ': organ, 'vessel': MR_TISSUE * contrast(),
              'lesion': organ * contrast()}
    bias = rng.normal(size=6) * rng.uniform(0, variation.bias)
    return _CaseDraw(levels=levels, noise=MR_TISSUE * rng.uniform(*variation.noise), bias=bias,
                     side=float(rng.choice([-1.0, 1.0])), size=rng.uniform(*variation.size),
                     bumps=rng.uniform(*variation.bumps), lesion=bool(rng.random() >= variation.lesion_absent))


def _bias_field(coefficients: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """1 plus a smooth second-order polynomial whose largest deviation from 1 is the coefficients' largest size."""
    z, y, x = (a / np.abs(a).max() for a in (z, y, x))
    terms = np.stack([z, y, x, y * x, y ** 2 - 0.5, x ** 2 - 0.5])
    field = np.tensordot(coefficients, terms, axes=1)
    return 1 + field / max(np.abs(field).max(), 1e-8) * np.abs(coefficients).max()


def make_case(rng: np.random.Generator, size: SyntheticSize,
              variation: Variation | None = None) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One case: image (float32) and labels (uint8), both (z, y, x), and the spacing (z, y, x) in mm.

    Without ``variation`` the image is CT-like (HU) and the same generator state gives the same case as it always
    has; with one (e.g. ``VARIED``) the case is MR-like and varies as the variation says.
    """
    draw = _draw(rng, variation) if variation is not None else _DEFAULT
    spacing = tuple(s * rng.uniform(0.9, 1.1) for s in size.spacing)
    shape = tuple(int(round(n * rng.uniform(0.85, 1.15))) for n in size.shape)
    extent = [n * s for n, s in zip(shape, size.spacing)]  # the field of view is fixed in mm, not in voxels
    shape = tuple(max(8, int(round(e / s))) for e, s in zip(extent, spacing))
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing='ij')
    half_y, half_x = extent[1] / 2, extent[2] / 2

    body = (y / (0.92 * half_y)) ** 2 + (x / (0.95 * half_x)) ** 2 <= 1
    labels = np.zeros(shape, dtype=np.uint8)

    # organ: an ellipsoid whose surface is perturbed by a few low-frequency bumps, on one side of the body
    centre = np.array([rng.uniform(-0.1, 0.1) * extent[0], rng.uniform(-0.15, 0.1) * half_y,
                       draw.side * rng.uniform(-0.45, -0.25) * half_x])
    radii = draw.size * np.array([rng.uniform(0.3, 0.4) * extent[0], rng.uniform(0.4, 0.5) * half_y,
                                  rng.uniform(0.35, 0.45) * half_x])
    dz, dy, dx = z - centre[0], y - centre[1], x - centre[2]
    angle = np.arctan2(dy, dx)
    bumps = 1 + draw.bumps * np.sin(3 * angle + rng.uniform(0, 2 * np.pi)) * np.cos(dz / radii[0] * rng.uniform(1, 2))
    organ = ((dz / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dx / radii[2]) ** 2 <= bumps ** 2) & body
    labels[organ] = LABELS['organ']

    # vessel: a thin tube through every slice, meandering on the other side of the body
    radius = rng.uniform(1.2, 1.8)
    phase, wavelength = rng.uniform(0, 2 * np.pi), extent[0] * rng.uniform(0.8, 1.6)
    vessel_y = rng.uniform(-0.2, 0.2) * half_y + 0.12 * half_y * np.sin(2 * np.pi * z / wavelength + phase)
    vessel_x = draw.side * (rng.uniform(0.25, 0.45) * half_x + 0.1 * half_x * np.cos(2 * np.pi * z / wavelength +
                                                                                      phase))
    vessel = ((y - vessel_y) ** 2 + (x - vessel_x) ** 2 <= radius ** 2) & body
    labels[vessel] = LABELS['vessel']

    # lesion: a small sphere well inside the organ
    if draw.lesion:
        inside = np.argwhere(organ & (((dz / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dx / radii[2]) ** 2) <= 0.35))
        lesion_centre = inside[rng.integers(len(inside))] if len(inside) else np.argwhere(organ)[0]
        lesion_centre = [(c - (n - 1) / 2) * s for c, n, s in zip(lesion_centre, shape, spacing)]
        lesion_radius = rng.uniform(3.0, 4.5)
        lesion = ((z - lesion_centre[0]) ** 2 + (y - lesion_centre[1]) ** 2 + (x - lesion_centre[2]) ** 2
                  <= lesion_radius ** 2) & organ
        labels[lesion] = LABELS['lesion']

    levels = np.array([draw.levels[name] for name in LABELS if name != 'background'])
    image = np.where(labels > 0, levels[np.maximum(labels, 1) - 1],
                     np.where(body, draw.levels['tissue'], draw.levels['air']))
    # partial-volume blur along the coarse axis mostly, then the bias field, then scanner noise
    image = gaussian_filter(image, sigma=(0.4, 0.7, 0.7))
    if draw.bias is not None:
        image = image * _bias_field(draw.bias, z, y, x)
    image = image + rng.normal(0, draw.noise, shape)
    return image.astype(np.float32), labels, spacing


def write_dataset(raw_folder: str | Path, dataset_id: int, name: str, num_training: int, num_test: int,
                  seed: int = 0, size: SyntheticSize = DEMO, variation: Variation | None = None) -> Path:
    """Write ``Dataset{id}_{name}`` into ``raw_folder`` (``$nnUNet_raw``) and return its folder.

    With ``variation`` the images are MR-like (channel ``MR``: nnU-Net z-scores each image); see ``make_case``.
    Training cases go to ``imagesTr``/``labelsTr``; held-out cases to ``imagesTs`` with their
    reference labels in ``labelsTs`` (nnU-Net ignores that folder; it is for evaluating predictions).
    """
    folder = Path(raw_folder) / f'Dataset{dataset_id:03d}_{name}'
    rng = np.random.default_rng(seed)
    cases = [('Tr', f'{name}_{i:03d}') for i in range(num_training)]
    cases += [('Ts', f'{name}_{num_training + i:03d}') for i in range(num_test)]
    for part, case in cases:
        image, labels, spacing = make_case(rng, size, variation)
        (folder / f'images{part}').mkdir(parents=True, exist_ok=True)
        (folder / f'labels{part}').mkdir(parents=True, exist_ok=True)
        _write_nifti(image, spacing, folder / f'images{part}' / f'{case}_0000{FILE_ENDING}')
        _write_nifti(labels, spacing, folder / f'labels{part}' / f'{case}{FILE_ENDING}')
    kind = 'CT' if variation is None else 'MR'
    generate_dataset_json(str(folder), channel_names={0: kind}, labels=dict(LABELS), num_training_cases=num_training,
                          file_ending=FILE_ENDING, dataset_name=name,
                          description=f'nnunet-plugins synthetic {kind}-like dataset (seed {seed}'
                                      f'{", varied" if variation else ""})')
    return folder


def _write_nifti(array: np.ndarray, spacing_zyx: tuple[float, ...], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path))
