"""``nnunet-plugins plans``: a paper preset as one more configuration in a dataset's nnU-Net plans.

:func:`add_preset` turns a preset of the catalogue (:mod:`nnunet_plugins.presets`) into a configuration
that ``inherits_from`` one the planner wrote (``3d_fullres`` or ``2d``) and overrides, in nnU-Net's own
format:

- ``spacing``, ``patch_size``, ``batch_size`` and ``median_image_size_in_voxels`` (the base's median
  image size rescaled to the new spacing);
- ``data_identifier`` = ``PLANS_CONFIGURATION``, as nnU-Net names it, so ``nnUNetv2_preprocess`` writes
  a folder of its own instead of deleting the base configuration's data (ResEnc planners give their
  ``3d_fullres`` the default plans' folder, so a copied identifier would wipe that);
- ``architecture``: the base's block, same network class, with the topology recomputed for the new
  spacing and patch by nnU-Net's ``get_pool_and_conv_props`` and the per-stage lists (features, blocks
  or convolutions per stage) taken from the planner that wrote the plans, exactly as that planner
  builds them. So the stock ``nnUNetTrainer`` and the plugin networks read the same strides.

Before anything is written, the request is checked: the patch must be one nnU-Net's topology takes
unchanged and that every trainer of the preset accepts (``check_patch_size``), the batch size at least
2, the configuration name new (or made by a preset, with ``overwrite``), its ``data_identifier`` unused
by any plans file of the dataset. The plans file is then replaced atomically; no other configuration
and no preprocessed data are touched.
"""
import json
import os
import re
import stat
import tempfile
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nnunetv2
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.paths import nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_plugins.commands.dataset_plans import PlansFileError, plans_files, read_dataset_plans
from nnunet_plugins.presets import Preset, PresetError, load_preset, preset_for
from nnunet_plugins.registry import plugin_trainer

PRESET_KEY = 'nnunet_plugins_preset'  # marks configurations this module wrote; nnU-Net ignores the key
NNUNET_MAX_NUMPOOL = 999999  # what nnU-Net's planners pass to get_pool_and_conv_props: no limit
MIN_BATCH_SIZE = 2  # nnU-Net's planners never go below it either (ExperimentPlanner.UNet_min_batch_size)
_CONFIGURATION_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')


@dataclass(frozen=True)
class AddedConfiguration:
    """What :func:`add_preset` wrote: the configuration ``name`` (``configuration``, unresolved) to ``plans_file``."""
    dataset_name: str
    plans_identifier: str
    plans_file: Path
    name: str
    configuration: dict
    preset: Preset
    notes: tuple[str, ...]


# ---- the configuration ----

def nnunet_topology(spacing: Sequence[float], patch_size: Sequence[int],
                    featuremap_min_edge_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's strides and kernel sizes for ``spacing`` and ``patch_size``, one list per stage, stage 0 first.

    The planners' own call of ``get_pool_and_conv_props`` (no limit on the number of poolings). It
    pools an axis while its feature map is at least twice ``featuremap_min_edge_length`` and its
    spacing within a factor 2 of the finest; kernels stay 1 along an axis until then.

    Raises:
        PresetError: the patch is not a multiple of the strides' product along some axis (nnU-Net would
            pad it), or it is too small for a single downsampling.
    """
    _, strides, kernel_sizes, padded_patch, divisors = get_pool_and_conv_props(
        list(spacing), list(patch_size), featuremap_min_edge_length, NNUNET_MAX_NUMPOOL)
    padded_patch = [int(p) for p in padded_patch]
    if padded_patch != list(patch_size):
        bad = [axis for axis, (p, q) in enumerate(zip(patch_size, padded_patch)) if p != q]
        raise PresetError(
            f'patch size {list(patch_size)} does not fit nnU-Net\'s network topology at spacing {list(spacing)}: '
            + ', '.join(f'axis {a} ({patch_size[a]}) must be a multiple of {int(divisors[a])}' for a in bad)
            + f'. Use e.g. --patch {" ".join(map(str, padded_patch))}.')
    if len(strides) < 2:
        raise PresetError(f'patch size {list(patch_size)} is too small for any downsampling (nnU-Net downsamples an '
                          f'axis only while it is at least {2 * featuremap_min_edge_length} voxels); use a larger '
                          f'--patch.')
    return [[int(s) for s in stage] for stage in strides], [[int(k) for k in stage] for stage in kernel_sizes]


def find_planner(plans: dict, dataset_name: str) -> ExperimentPlanner:
    """An instance of the nnU-Net planner that wrote ``plans`` (``experiment_planner_used``), for its constants.

    Needs the dataset in ``nnUNet_raw`` and its fingerprint, as the planner (and preprocessing) does.
    """
    name = plans.get('experiment_planner_used')
    planner_class = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], 'experiment_planning'), name,
                                                current_module='nnunetv2.experiment_planning') if name else None
    if planner_class is None:
        raise PresetError(f'these plans were written by planner {name!r}, which nnunetv2 does not have, so the '
                          f'per-stage settings of a new topology are unknown. Use plans from one of nnU-Net\'s '
                          f'planners (nnUNetv2_plan_experiment -pl ExperimentPlanner, nnUNetPlannerResEncM/L/XL, ...).')
    try:
        return planner_class(dataset_name, plans_name=plans['plans_name'])
    except (OSError, RuntimeError) as error:
        raise PresetError(f'cannot set up {name} for {dataset_name} (the raw dataset and its fingerprint are needed, '
                          f'as for nnUNetv2_preprocess): {error}') from None


def base_configuration(plans: dict, name: str) -> ConfigurationManager:
    """Configuration ``name`` of ``plans`` as nnU-Net resolves it (``inherits_from``, old plans converted).

    Raises:
        PresetError: nnU-Net cannot read it (neither an ``architecture`` block nor the pre-2.4 keys it converts).
    """
    try:
        return PlansManager(plans).get_configuration(name)
    except (KeyError, RuntimeError) as error:
        raise PresetError(f'nnU-Net cannot read configuration {name!r} of these plans ({type(error).__name__}: '
                          f'{error}): it has neither an "architecture" block nor the keys of plans from before '
                          f'nnU-Net 2.4. Re-plan the dataset with nnUNetv2_plan_experiment.') from None


def build_configuration(plans: dict, plans_identifier: str, name: str, preset: Preset, planner: ExperimentPlanner,
                        spacing: Sequence[float] | None = None, patch_size: Sequence[int] | None = None,
                        batch_size: int | None = None) -> dict:
    """The plans entry for configuration ``name``: ``preset`` (with the given overrides) on top of its base.

    Args:
        plans: the plans the configuration goes into (not modified).
        plans_identifier: the plans file's name without ``.json``, e.g. ``nnUNetPlans``.
        name: the new configuration's name.
        preset: the setting; ``spacing``, ``patch_size`` and ``batch_size`` override its values.
        planner: the nnU-Net planner instance that wrote ``plans`` (see :func:`find_planner`); its
            ``UNet_*`` attributes give the per-stage lists.

    Returns:
        The configuration as it goes into ``plans['configurations'][name]``; it ``inherits_from`` the
        preset's base, so keys it does not set (normalisation, resampling, ...) are the base's.
    """
    if preset.inherits_from not in plans['configurations']:
        available = ', '.join(plans['configurations'])
        if preset.inherits_from.startswith('3d') and not any(c.startswith('3d') for c in plans['configurations']):
            two_d = preset_for(preset.trainers[0], 2)
            advice = (f'use the 2d preset, --preset {two_d.name}' if two_d else
                      f'no preset of {preset.trainers[0]} is 2d; add a 2d configuration to the plans by hand')
            raise PresetError(f'the dataset is 2d: nnU-Net planned no 3d configuration for it (its plans have '
                              f'{available}), so the 3d preset {preset.name} has no {preset.inherits_from} to inherit '
                              f'from; {advice}.')
        raise PresetError(f'the plans have no configuration {preset.inherits_from!r} for {name} to inherit from '
                          f'(they have {available}). Plan it first, e.g. nnUNetv2_plan_experiment -d DATASET.')
    base = base_configuration(plans, preset.inherits_from).configuration
    dim = len(base['patch_size'])
    spacing = [float(s) for s in (spacing or preset.spacing or base['spacing'])]
    patch_size = [int(p) for p in (patch_size or preset.patch_size)]
    batch_size = int(batch_size if batch_size is not None else preset.batch_size)
    for what, values in (('spacing', spacing), ('patch size', patch_size)):
        if len(values) != dim:
            raise PresetError(f'{what} {values} has {len(values)} axes, but {preset.inherits_from} is {dim}d; give '
                              f'{dim} values, in the plans\' axis order (that of its spacing {base["spacing"]}).')
        if min(values) <= 0:
            raise PresetError(f'{what} {values} must be positive along every axis.')
    if batch_size < MIN_BATCH_SIZE:
        raise PresetError(f'batch size {batch_size} is too small: nnU-Net trains with at least {MIN_BATCH_SIZE} '
                          f'patches per step.')

    strides, kernel_sizes = nnunet_topology(spacing, patch_size, planner.UNet_featuremap_min_edge_length)
    n_stages = len(strides)
    architecture = deepcopy(base['architecture'])
    arch_kwargs = architecture['arch_kwargs']
    # the planners' per-stage lists, as get_plans_for_configuration builds them for n_stages
    max_features = planner.UNet_max_features_2d if dim == 2 else planner.UNet_max_features_3d
    encoder_key = next((k for k in ('n_conv_per_stage', 'n_blocks_per_stage') if k in arch_kwargs), None)
    if encoder_key is None or 'n_conv_per_stage_decoder' not in arch_kwargs:
        raise PresetError(f'{preset.inherits_from} uses {architecture["network_class_name"]} without '
                          f'n_conv_per_stage/n_blocks_per_stage and n_conv_per_stage_decoder, so its per-stage '
                          f'settings cannot follow a new topology. Use plans from one of nnU-Net\'s planners.')
    if n_stages > len(planner.UNet_blocks_per_stage_encoder):
        raise PresetError(f'patch size {patch_size} gives {n_stages} stages, more than {type(planner).__name__} '
                          f'plans for ({len(planner.UNet_blocks_per_stage_encoder)}); use a smaller --patch.')
    arch_kwargs.update({
        'n_stages': n_stages,
        'features_per_stage': [min(max_features, planner.UNet_base_num_features * 2 ** i) for i in range(n_stages)],
        'kernel_sizes': kernel_sizes,
        'strides': strides,
        encoder_key: list(planner.UNet_blocks_per_stage_encoder[:n_stages]),
        'n_conv_per_stage_decoder': list(planner.UNet_blocks_per_stage_decoder[:n_stages - 1]),
    })
    median_size = [round(float(m) * b / s, 1) for m, b, s in
                   zip(base['median_image_size_in_voxels'], base['spacing'], spacing)]
    return {
        'inherits_from': preset.inherits_from,
        'data_identifier': f'{plans_identifier}_{name}',
        'spacing': spacing,
        'patch_size': patch_size,
        'batch_size': batch_size,
        'median_image_size_in_voxels': median_size,
        'architecture': architecture,
        PRESET_KEY: preset.name,
    }


def check_trainers(plans: dict, name: str, trainer_names: Sequence[str]) -> None:
    """Raise PresetError unless every named plugin trainer takes configuration ``name`` of ``plans``."""
    missing = [t for t in trainer_names if plugin_trainer(t) is None]
    if missing:
        raise PresetError(f'the preset is meant for {", ".join(missing)}, which this version of nnunet-plugins does '
                          f'not have (`nnunet-plugins trainers` lists those it has); update nnunet-plugins.')
    configuration_manager = base_configuration(plans, name)
    for trainer_name in trainer_names:
        try:
            plugin_trainer(trainer_name).check_patch_size(configuration_manager)
        except ValueError as error:
            raise PresetError(f'{error} (pass --patch to choose another patch size)') from None


# ---- the plans file ----

def write_plans_atomically(plans_file: Path, plans: dict) -> None:
    """Replace ``plans_file`` by ``plans`` (written as nnU-Net writes plans); a failure leaves the old file intact.

    The new text goes to a temporary file in the same folder, which then replaces the old one in a
    single ``os.replace``, keeping the old file's permissions.
    """
    plans_file = Path(plans_file)
    descriptor, temporary = tempfile.mkstemp(dir=plans_file.parent, prefix=f'.{plans_file.name}.', suffix='.tmp')
    try:
        with os.fdopen(descriptor, 'w') as file:
            json.dump(plans, file, indent=4, sort_keys=False)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, stat.S_IMODE(plans_file.stat().st_mode))
        os.replace(temporary, plans_file)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _check_configuration_name(name: str) -> None:
    if not _CONFIGURATION_NAME.fullmatch(name) or '__' in name:
        raise PresetError(f'configuration name {name!r} is not usable: use letters, digits, ".", "-" and single '
                          f'"_" (nnU-Net separates trainer, plans and configuration in folder names by "__").')


def _check_replaceable(plans: dict, name: str, overwrite: bool) -> None:
    configurations = plans['configurations']
    if name not in configurations:
        return
    if not overwrite:
        raise PresetError(f'the plans already have a configuration {name!r}; pass --overwrite to replace it, or '
                          f'name the new one with -c NAME.')
    if PRESET_KEY not in configurations[name]:
        raise PresetError(f'configuration {name!r} was not made by a preset; it stays as it is, even with '
                          f'--overwrite. Name the new one with -c NAME.')
    children = [other for other, config in configurations.items() if config.get('inherits_from') == name]
    if children:
        raise PresetError(f'configuration {name!r} cannot be replaced: {", ".join(children)} inherit(s) from it. '
                          f'Name the new one with -c NAME.')


def _check_data_identifier_unused(dataset_folder: Path, plans_file: Path, name: str, data_identifier: str) -> None:
    """No configuration of any plans file of the dataset but ``name`` of ``plans_file`` may use ``data_identifier``."""
    for other_file, other in plans_files(dataset_folder).items():
        for other_name, config in other['configurations'].items():
            if other_file == plans_file and other_name == name:
                continue
            if isinstance(config, dict) and config.get('data_identifier') == data_identifier:
                raise PresetError(f'configuration {other_name!r} of {other_file.name} already keeps its '
                                  f'preprocessed data in {data_identifier}; preprocessing the new configuration would '
                                  f'delete them. Name the new one with -c NAME.')


def add_preset(dataset: str | int, preset_name: str, plans_identifier: str = 'nnUNetPlans',
               configuration: str | None = None, spacing: Sequence[float] | None = None,
               patch_size: Sequence[int] | None = None, batch_size: int | None = None,
               overwrite: bool = False) -> AddedConfiguration:
    """Add preset ``preset_name`` to the plans ``plans_identifier`` of ``dataset`` as a new configuration.

    Args:
        dataset: dataset id or name, as nnU-Net's commands take it.
        preset_name: a preset of :func:`load_presets`.
        plans_identifier: the plans file in the dataset's ``nnUNet_preprocessed`` folder, without ``.json``.
        configuration: name of the new configuration (default: the preset's).
        spacing, patch_size, batch_size: override the preset's values (plans' axis order).
        overwrite: replace a configuration of that name made earlier by a preset.

    Raises:
        PresetError: the request is invalid; the plans file has not been touched.
    """
    preset = load_preset(preset_name)
    name = configuration or preset.configuration
    _check_configuration_name(name)
    if not nnUNet_raw.is_set():
        raise PresetError('nnUNet_raw is not set; set nnU-Net\'s folder variables as for nnUNetv2_preprocess '
                          '(`nnunet-plugins doctor` checks them).')
    try:
        found = read_dataset_plans(dataset, plans_identifier)
    except PlansFileError as error:
        raise PresetError(str(error)) from None
    dataset_name, plans_file, plans = found.dataset_name, found.plans_file, found.plans
    _check_replaceable(plans, name, overwrite)

    planner = find_planner(plans, dataset_name)
    new_configuration = build_configuration(plans, plans_identifier, name, preset, planner, spacing, patch_size,
                                            batch_size)
    _check_data_identifier_unused(found.folder, plans_file, name, new_configuration['data_identifier'])
    new_plans = deepcopy(plans)
    new_plans['configurations'][name] = new_configuration
    check_trainers(new_plans, name, preset.trainers)

    notes = []
    too_large = [axis for axis, (p, m) in enumerate(zip(new_configuration['patch_size'],
                                                         new_configuration['median_image_size_in_voxels'])) if p > m]
    if too_large:
        notes.append(f'the patch is larger than the median image at this spacing '
                     f'({new_configuration["median_image_size_in_voxels"]} voxels) along axis '
                     f'{", ".join(map(str, too_large))}; nnU-Net pads the images, which works but costs time.')
    write_plans_atomically(plans_file, new_plans)
    return AddedConfiguration(dataset_name, plans_identifier, plans_file, name, new_configuration, preset,
                              tuple(notes))


def describe_added(added: AddedConfiguration) -> str:
    """What ``nnunet-plugins plans`` prints after writing: the new configuration and the two stock commands to run."""
    config = added.configuration
    arch_kwargs = config['architecture']['arch_kwargs']
    dataset_id = convert_dataset_name_to_id(added.dataset_name)
    plans_option = '' if added.plans_identifier == 'nnUNetPlans' else f' -plans_name {added.plans_identifier}'
    train_plans_option = '' if added.plans_identifier == 'nnUNetPlans' else f' -p {added.plans_identifier}'
    lines = [
        f'Added configuration {added.name} (preset {added.preset.name}, inherits_from {config["inherits_from"]}) '
        f'to {added.plans_file}:',
        f'  spacing {config["spacing"]}, patch_size {config["patch_size"]}, batch_size {config["batch_size"]}',
        f'  strides {arch_kwargs["strides"]}',
        f'  kernel_sizes {arch_kwargs["kernel_sizes"]}',
        f'  data_identifier {config["data_identifier"]} (its own preprocessed folder; other configurations keep '
        f'theirs)',
        f'  checked for {", ".join(added.preset.trainers)}',
        *(f'  note: {note}' for note in added.notes),
        'Next:',
        f'  nnUNetv2_preprocess -d {dataset_id} -c {added.name}{plans_option}',
        f'  nnUNetv2_train {dataset_id} {added.name} 0 -tr {added.preset.trainers[0]}{train_plans_option}',
    ]
    return '\n'.join(lines)
