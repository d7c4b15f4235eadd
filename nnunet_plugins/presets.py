"""The preset catalogue: each paper's training setting, as read from the repository's ``plans/`` folder.

A preset (a small JSON file, installed as ``nnunet_plugins/plans``) names a spacing, a patch size, a batch
size and the trainers it is meant for. This module only reads and describes them, so that anyone may
import it (the trainers name a preset in their patch-size errors); turning a preset into a configuration
of a dataset's plans is the ``plans`` command's work (:mod:`nnunet_plugins.commands.plans`).
"""
import json
from dataclasses import dataclass
from pathlib import Path

_PRESET_FIELDS = ('description', 'source', 'configuration', 'inherits_from', 'spacing', 'patch_size',
                  'batch_size', 'trainers')


class PresetError(ValueError):
    """A preset request that cannot be fulfilled; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Preset:
    """One paper setting, as read from ``plans/NAME.json``.

    Attributes:
        name: the file name without ``.json``, e.g. ``mednext``.
        description: one line saying what the setting is.
        source: paper and section the numbers come from.
        configuration: name of the configuration to add, e.g. ``3d_fullres_mednext``.
        inherits_from: the planner's configuration it extends (``3d_fullres`` or ``2d``).
        spacing: target spacing in mm in the plans' axis order (the coarsest axis first), or None to keep
            the spacing of ``inherits_from``.
        patch_size: patch size in voxels, same axis order; 3 entries for 3d, 2 for 2d.
        batch_size: patches per training step.
        trainers: names of the trainers the setting is meant for; the first is the one suggested.
    """
    name: str
    description: str
    source: str
    configuration: str
    inherits_from: str
    spacing: tuple[float, ...] | None
    patch_size: tuple[int, ...]
    batch_size: int
    trainers: tuple[str, ...]


def presets_folder() -> Path:
    """The folder of preset files: inside the package when installed, the repository's ``plans/`` in a checkout."""
    package = Path(__file__).resolve().parent
    installed = package / 'plans'
    return installed if installed.is_dir() else package.parent / 'plans'


def load_presets(folder: str | Path | None = None) -> dict[str, Preset]:
    """Every preset in ``folder`` (default :func:`presets_folder`), by name, sorted by name."""
    folder = Path(folder) if folder is not None else presets_folder()
    presets = {}
    for path in sorted(folder.glob('*.json'), key=lambda path: path.stem):
        presets[path.stem] = _read_preset(path)
    if not presets:
        raise PresetError(f'no preset files (*.json) in {folder}; the installation is incomplete, reinstall '
                          f'nnunet-plugins')
    return presets


def _read_preset(path: Path) -> Preset:
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PresetError(f'preset file {path} is not valid JSON: {error}') from None
    missing = [key for key in _PRESET_FIELDS if key not in fields]
    unknown = [key for key in fields if key not in _PRESET_FIELDS]
    if missing or unknown:
        raise PresetError(f'preset file {path}: ' + '; '.join(
            part for part in (f'missing {", ".join(missing)}' if missing else '',
                              f'unknown {", ".join(unknown)}' if unknown else '') if part))
    spacing = fields['spacing']
    return Preset(name=path.stem, description=fields['description'], source=fields['source'],
                  configuration=fields['configuration'], inherits_from=fields['inherits_from'],
                  spacing=None if spacing is None else tuple(float(s) for s in spacing),
                  patch_size=tuple(int(p) for p in fields['patch_size']), batch_size=int(fields['batch_size']),
                  trainers=tuple(fields['trainers']))


def load_preset(name: str) -> Preset:
    """The preset called ``name``; the error lists the available ones."""
    presets = load_presets()
    if name not in presets:
        raise PresetError(f'unknown preset {name!r}; the presets are {", ".join(presets)} '
                          f'(`nnunet-plugins plans --list` describes them)')
    return presets[name]


def preset_for(trainer_name: str, dimensions: int) -> Preset | None:
    """The first preset (by name) meant for ``trainer_name`` with a ``dimensions``-axis patch, or None."""
    return next((preset for preset in load_presets().values()
                 if trainer_name in preset.trainers and len(preset.patch_size) == dimensions), None)


def describe_presets(presets: dict[str, Preset] | None = None) -> str:
    """The text of ``nnunet-plugins plans --list``: every preset with its setting, trainers and source."""
    presets = presets if presets is not None else load_presets()
    lines = []
    for preset in presets.values():
        spacing = 'spacing of ' + preset.inherits_from if preset.spacing is None else \
            'spacing ' + ' x '.join(f'{s:g}' for s in preset.spacing) + ' mm'
        lines += [f'{preset.name}: adds {preset.configuration} (inherits_from {preset.inherits_from})',
                  f'    {spacing}, patch {" x ".join(map(str, preset.patch_size))}, batch {preset.batch_size}',
                  f'    trainers: {", ".join(preset.trainers)}',
                  f'    {preset.description}',
                  f'    source: {preset.source}']
    return '\n'.join(lines)
