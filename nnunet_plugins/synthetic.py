"""A deterministic, CT-like synthetic dataset in nnU-Net's raw format.

Each case is a body cross-section with three labels of very different size: a large organ (1), a
thin tubular vessel (2) running through all slices, and a small hypodense lesion (3) inside the organ.
Anatomy is drawn in millimetres and then sampled on an anisotropic voxel grid whose spacing and
shape vary from case to case, so nnU-Net's planning and resampling have real work to do. The same
seed always gives the same files.
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


def make_case(rng: np.random.Generator, size: SyntheticSize) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One case: image (float32, HU-like) and labels (uint8), both (z, y, x), and the spacing (z, y, x) in mm."""
    spacing = tuple(s * rng.uniform(0.9, 1.1) for s in size.spacing)
    shape = tuple(int(round(n * rng.uniform(0.85, 1.15))) for n in size.shape)
    extent = [n * s for n, s in zip(shape, size.spacing)]  # the field of view is fixed in mm, not in voxels
    shape = tuple(max(8, int(round(e / s))) for e, s in zip(extent, spacing))
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing='ij')
    half_y, half_x = extent[1] / 2, extent[2] / 2

    body = (y / (0.92 * half_y)) ** 2 + (x / (0.95 * half_x)) ** 2 <= 1
    image = np.where(body, _TISSUE, _AIR)
    labels = np.zeros(shape, dtype=np.uint8)

    # organ: an ellipsoid whose surface is perturbed by a few low-frequency bumps, on one side of the body
    centre = np.array([rng.uniform(-0.1, 0.1) * extent[0], rng.uniform(-0.15, 0.1) * half_y,
                       rng.uniform(-0.45, -0.25) * half_x])
    radii = np.array([rng.uniform(0.3, 0.4) * extent[0], rng.uniform(0.4, 0.5) * half_y,
                      rng.uniform(0.35, 0.45) * half_x])
    dz, dy, dx = z - centre[0], y - centre[1], x - centre[2]
    angle = np.arctan2(dy, dx)
    bumps = 1 + 0.12 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi)) * np.cos(dz / radii[0] * rng.uniform(1, 2))
    organ = ((dz / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dx / radii[2]) ** 2 <= bumps ** 2) & body
    image[organ] = _ORGAN
    labels[organ] = LABELS['organ']

    # vessel: a thin tube through every slice, meandering on the other side of the body
    radius = rng.uniform(1.2, 1.8)
    phase, wavelength = rng.uniform(0, 2 * np.pi), extent[0] * rng.uniform(0.8, 1.6)
    vessel_y = rng.uniform(-0.2, 0.2) * half_y + 0.12 * half_y * np.sin(2 * np.pi * z / wavelength + phase)
    vessel_x = rng.uniform(0.25, 0.45) * half_x + 0.1 * half_x * np.cos(2 * np.pi * z / wavelength + phase)
    vessel = ((y - vessel_y) ** 2 + (x - vessel_x) ** 2 <= radius ** 2) & body
    image[vessel] = _VESSEL
    labels[vessel] = LABELS['vessel']

    # lesion: a small sphere well inside the organ
    inside = np.argwhere(organ & (((dz / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dx / radii[2]) ** 2) <= 0.35))
    lesion_centre = inside[rng.integers(len(inside))] if len(inside) else np.argwhere(organ)[0]
    lesion_centre = [(c - (n - 1) / 2) * s for c, n, s in zip(lesion_centre, shape, spacing)]
    lesion_radius = rng.uniform(3.0, 4.5)
    lesion = ((z - lesion_centre[0]) ** 2 + (y - lesion_centre[1]) ** 2 + (x - lesion_centre[2]) ** 2
              <= lesion_radius ** 2) & organ
    image[lesion] = _LESION
    labels[lesion] = LABELS['lesion']

    # partial-volume blur along the coarse axis mostly, then scanner noise
    image = gaussian_filter(image, sigma=(0.4, 0.7, 0.7)) + rng.normal(0, _NOISE_HU, shape)
    return image.astype(np.float32), labels, spacing


def write_dataset(raw_folder: str | Path, dataset_id: int, name: str, num_training: int, num_test: int,
                  seed: int = 0, size: SyntheticSize = DEMO) -> Path:
    """Write ``Dataset{id}_{name}`` into ``raw_folder`` (``$nnUNet_raw``) and return its folder.

    Training cases go to ``imagesTr``/``labelsTr``; held-out cases to ``imagesTs`` with their
    reference labels in ``labelsTs`` (nnU-Net ignores that folder; it is for evaluating predictions).
    """
    folder = Path(raw_folder) / f'Dataset{dataset_id:03d}_{name}'
    rng = np.random.default_rng(seed)
    cases = [('Tr', f'{name}_{i:03d}') for i in range(num_training)]
    cases += [('Ts', f'{name}_{num_training + i:03d}') for i in range(num_test)]
    for part, case in cases:
        image, labels, spacing = make_case(rng, size)
        (folder / f'images{part}').mkdir(parents=True, exist_ok=True)
        (folder / f'labels{part}').mkdir(parents=True, exist_ok=True)
        _write_nifti(image, spacing, folder / f'images{part}' / f'{case}_0000{FILE_ENDING}')
        _write_nifti(labels, spacing, folder / f'labels{part}' / f'{case}{FILE_ENDING}')
    generate_dataset_json(str(folder), channel_names={0: 'CT'}, labels=dict(LABELS), num_training_cases=num_training,
                          file_ending=FILE_ENDING, dataset_name=name,
                          description=f'nnunet-plugins synthetic CT-like dataset (seed {seed})')
    return folder


def _write_nifti(array: np.ndarray, spacing_zyx: tuple[float, ...], path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path))
