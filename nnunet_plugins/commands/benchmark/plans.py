"""The plans a benchmark runs on: the user's, or what nnU-Net's planners make of a patch without a dataset."""
import copy
import json
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
    nnUNetPlannerResEncL
from nnunetv2.utilities.json_export import recursive_fix_for_json_export
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_plugins.commands.dataset_plans import read_dataset_plans, read_json
from nnunet_plugins.workspace import environment

RESENC_L_PLANS = 'nnUNetResEncUNetLPlans'
STAND_IN_DATASET = 'Dataset000_BenchmarkPatch'
# nnU-Net's planners shrink the patch until their GPU-memory estimate fits this budget; the benchmark
# measures the patch it is given, so the budget is set out of reach
_UNLIMITED_GPU_MEMORY_GB = 1e6


def synthetic_dataset_json(in_channels: int, num_classes: int) -> dict:
    """A dataset.json with ``in_channels`` image channels and ``num_classes`` labels, background included."""
    return {'channel_names': {str(c): f'channel{c}' for c in range(in_channels)},
            'labels': {'background': 0, **{f'class{c}': c for c in range(1, num_classes)}},
            'numTraining': 0, 'file_ending': '.nii.gz'}


def plan_configuration(planner_class: type[ExperimentPlanner], patch_size: Sequence[int], spacing: Sequence[float],
                       dataset_json: dict) -> dict:
    """The plans configuration ``planner_class`` gives a dataset whose median image is one ``patch_size`` patch.

    nnU-Net's own planner derives the topology (``get_pool_and_conv_props``) and the architecture block;
    it runs on a stand-in dataset in a temporary folder (a dataset.json and a fingerprint, no images).
    Raises ValueError when nnU-Net would not plan exactly this patch (e.g. an axis not divisible by
    2 to the power of its number of poolings).
    """
    patch_size, spacing = [int(p) for p in patch_size], [float(s) for s in spacing]
    with tempfile.TemporaryDirectory() as root:
        raw, preprocessed = Path(root, 'raw', STAND_IN_DATASET), Path(root, 'preprocessed', STAND_IN_DATASET)
        raw.mkdir(parents=True)
        preprocessed.mkdir(parents=True)
        (raw / 'dataset.json').write_text(json.dumps({**dataset_json, 'dataset': {}}))
        (preprocessed / 'dataset_fingerprint.json').write_text(json.dumps({'median_relative_size_after_cropping': 1}))
        with environment({'nnUNet_raw': str(raw.parent), 'nnUNet_preprocessed': str(preprocessed.parent)}), \
                warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the ResEnc planners warn about a non-standard memory budget
            planner = planner_class(STAND_IN_DATASET, gpu_memory_target_in_gb=_UNLIMITED_GPU_MEMORY_GB)
            name = '3d_fullres' if len(patch_size) == 3 else '2d'
            plan = planner.get_plans_for_configuration(spacing, patch_size, planner.generate_data_identifier(name),
                                                       float(np.prod(patch_size)), {})
    recursive_fix_for_json_export(plan)
    if list(plan['patch_size']) != patch_size:
        raise ValueError(f'nnU-Net\'s {planner_class.__name__} would train patch {list(plan["patch_size"])} rather '
                         f'than {patch_size} at spacing {spacing} (every axis must be divisible by 2 to the power '
                         f'of its number of poolings); benchmark that patch instead.')
    return plan


def synthetic_plans(patch_size: Sequence[int], spacing: Sequence[float], batch_size: int,
                    dataset_json: dict) -> tuple[dict, str]:
    """Plans as nnU-Net's default planner makes them for ``patch_size`` at ``spacing``.

    Returns (plans, configuration name): ``3d_fullres``, or ``2d`` for a 2d patch.
    """
    configuration = '3d_fullres' if len(patch_size) == 3 else '2d'
    plan = plan_configuration(ExperimentPlanner, patch_size, spacing, dataset_json)
    plan.update(batch_size=batch_size, batch_dice=configuration == '2d')  # nnU-Net's choice without a lowres stage
    plans = {'dataset_name': STAND_IN_DATASET, 'plans_name': 'nnUNetPlans',
             'original_median_spacing_after_transp': list(spacing),
             'original_median_shape_after_transp': list(patch_size),
             'image_reader_writer': 'SimpleITKIO', 'transpose_forward': [0, 1, 2], 'transpose_backward': [0, 1, 2],
             'configurations': {configuration: plan}, 'experiment_planner_used': ExperimentPlanner.__name__,
             'label_manager': 'LabelManager', 'foreground_intensity_properties_per_channel': {}}
    return plans, configuration


def dataset_plans(dataset: str, configuration: str, plans_name: str) -> tuple[dict, dict, Path]:
    """The user's plans and dataset.json from ``nnUNet_preprocessed``; returns (plans, dataset_json, folder)."""
    found = read_dataset_plans(dataset, plans_name)
    if configuration not in found.plans['configurations']:
        raise ValueError(f'{found.plans_file} has no configuration {configuration!r}; it has '
                         f'{", ".join(found.plans["configurations"])}.')
    return found.plans, found.dataset_json(), found.folder


def resenc_l_plans(plans: dict, configuration: str, dataset_json: dict, folder: Path | None) -> tuple[dict, str]:
    """ResEnc L plans for the benchmark: the user's ``nnUNetResEncUNetLPlans.json`` when ``folder`` has it with
    this configuration, otherwise ``plans`` with the architecture nnU-Net's ResEnc L planner builds for the same
    patch and spacing. Returns (plans, where they came from)."""
    if folder is not None and (folder / f'{RESENC_L_PLANS}.json').is_file():
        user_plans = read_json(folder / f'{RESENC_L_PLANS}.json', 'the ResEnc L plans of the dataset')
        if configuration in user_plans['configurations']:
            return user_plans, f'{RESENC_L_PLANS}.json (patch and batch as planned there)'
    configuration_manager = PlansManager(plans).get_configuration(configuration)
    plan = plan_configuration(nnUNetPlannerResEncL, configuration_manager.patch_size, configuration_manager.spacing,
                              dataset_json)
    derived = copy.deepcopy(plans)
    derived['plans_name'] = RESENC_L_PLANS
    derived['configurations'][configuration]['architecture'] = plan['architecture']
    return derived, f'{nnUNetPlannerResEncL.__name__} architecture for the same patch and spacing'


