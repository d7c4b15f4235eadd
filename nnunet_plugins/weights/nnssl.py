"""nnssl's checkpoints: their adaptation plan read, and their tensors put under the names of the network a trainer
builds.

Format facts relied on (read in MIC-DKFZ/nnssl at commit 7044864404315536e92e670ef2f0ca24f11e6175, 2025-10-07:
``AbstractBaseTrainer.save_checkpoint``, ``adaptation_planning/adaptation_plan.py``, the ResEnc-L MAE trainer):

- the ``.pth`` is a dict with the network's state dict under ``network_weights`` and the serialised
  ``AdaptationPlan`` (plain dicts, lists and numbers) under :data:`ADAPTATION_PLAN_KEY`;
- the plan's ``architecture_plans.arch_class_name`` names the network (``ResEncL``, ``NoSkipResEncL``, ``PrimusM``,
  ... or a dynamic one, ``ResidualEncoderUNet`` / ``PlainConvUNet``, then with its ``arch_kwargs``);
  ``pretrain_num_input_channels``; ``recommended_downstream_patchsize``; ``pretrain_plan.configurations`` with one
  configuration whose ``spacing`` and ``patch_size`` pre-training used;
- ``key_to_encoder`` and ``key_to_stem`` are module paths: every tensor of the stem (or encoder) is a key that
  starts with the path and a dot (ResEnc-L: ``encoder.stem``, ``encoder.stages``); ``keys_to_in_proj`` are the
  module paths of the input convolution, several when one module has two names (ResEnc-L:
  ``encoder.stem.convs.0.conv`` and ``encoder.stem.convs.0.all_modules.0``, one tensor saved twice);
  ``key_to_lpe`` is a transformer's positional embedding (None for CNNs);
- ResEnc-L's ``network_weights`` are those of dynamic_network_architectures' ``ResidualEncoderUNet`` (nnU-Net's
  network on ResEnc plans), decoder included, with the encoder saved a second time under ``decoder.encoder.``.
"""
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nnunet_plugins.weights.files import ADAPTATION_PLAN_KEY, CheckpointError, is_seg_head

# nnssl's architecture names -> the class nnU-Net's plans build for it (dynamic_network_architectures)
NETWORK_OF_ARCHITECTURE = {
    'ResEncL': 'ResidualEncoderUNet',
    'NoSkipResEncL': 'ResidualEncoderUNet',  # nnssl's ResEnc-L without skips: the same encoder
    'ResidualEncoderUNet': 'ResidualEncoderUNet',
    'PlainConvUNet': 'PlainConvUNet',
}
_PLAN_KEYS = ('architecture_plans', 'pretrain_plan', 'pretrain_num_input_channels', 'key_to_encoder', 'key_to_stem',
              'keys_to_in_proj')
_DECODER, _DECODER_ALIAS = 'decoder.', 'decoder.encoder.'  # the decoder holds the encoder again under the alias
_NAMED = 3


class NnsslCheckpointError(CheckpointError):
    """An nnssl checkpoint whose adaptation plan is incomplete, does not match its tensors, or names a network the
    target is not; the message names the file and the key."""


@dataclass(frozen=True)
class AdaptationPlan:
    """What this package reads of an nnssl adaptation plan (patch and spacing in the plans' axis order)."""

    architecture: str
    input_channels: int
    key_to_encoder: str
    key_to_stem: str
    keys_to_in_proj: tuple[str, ...]
    key_to_lpe: str | None = None
    configuration: str | None = None  # the pre-training plan's configuration
    spacing: list[float] | None = None
    patch_size: list[int] | None = None
    recommended_patch_size: list[int] | None = None

    @classmethod
    def from_checkpoint(cls, plan: Any, name: str) -> 'AdaptationPlan':
        """The plan of a checkpoint's :data:`ADAPTATION_PLAN_KEY` entry; ``name`` (the file) is for messages.

        Raises:
            NnsslCheckpointError: the entry is not a dict or lacks a key nnssl writes (the message names it).
        """
        if not isinstance(plan, Mapping):
            raise NnsslCheckpointError(f'{name}: its {ADAPTATION_PLAN_KEY} is a {type(plan).__name__}, not the dict '
                                       f'nnssl writes')
        missing = [key for key in _PLAN_KEYS if key not in plan]
        architecture = (plan.get('architecture_plans') or {}).get('arch_class_name') \
            if isinstance(plan.get('architecture_plans'), Mapping) else None
        if architecture is None and 'architecture_plans' not in missing:
            missing.append('architecture_plans.arch_class_name')
        if missing:
            raise NnsslCheckpointError(f'{name}: its {ADAPTATION_PLAN_KEY} lacks {", ".join(missing)} (it has '
                                       f'{", ".join(map(str, plan))}); it is not a complete nnssl checkpoint')
        configurations = (plan['pretrain_plan'] or {}).get('configurations') or {}
        configuration, settings = next(iter(configurations.items()), (None, {}))
        recommended = plan.get('recommended_downstream_patchsize')
        in_proj = plan['keys_to_in_proj']
        return cls(architecture=str(architecture), input_channels=int(plan['pretrain_num_input_channels']),
                   key_to_encoder=str(plan['key_to_encoder']), key_to_stem=str(plan['key_to_stem']),
                   keys_to_in_proj=(in_proj,) if isinstance(in_proj, str) else tuple(map(str, in_proj)),
                   key_to_lpe=plan.get('key_to_lpe'), configuration=configuration,
                   spacing=_numbers(settings.get('spacing'), float),
                   patch_size=_numbers(settings.get('patch_size'), int),
                   recommended_patch_size=_numbers(recommended, int))

    def summary(self) -> dict:
        """The plan's facts, as the adapt-weights report writes them."""
        return {'architecture': self.architecture, 'input_channels': self.input_channels,
                'configuration': self.configuration, 'spacing': self.spacing, 'patch_size': self.patch_size,
                'recommended_patch_size': self.recommended_patch_size, 'key_to_stem': self.key_to_stem,
                'key_to_encoder': self.key_to_encoder, 'keys_to_in_proj': list(self.keys_to_in_proj),
                'key_to_lpe': self.key_to_lpe}


def _numbers(values: Any, kind: type) -> list | None:
    return None if values is None else [kind(value) for value in values]


def _under(key: str, module: str) -> bool:
    return key.startswith(module + '.')


@dataclass
class NnsslSource:
    """An nnssl checkpoint's tensors under the target network's names, and what was left out."""

    plan: AdaptationPlan
    tensors: dict[str, torch.Tensor]  # stem, encoder (also under the decoder's alias) and the decoder's that fit
    decoder_taken: bool  # some decoder tensor fits the target
    decoder_skipped: list[str]  # the file's decoder tensors the target has not, or not in that shape


def _check_network(plan: AdaptationPlan, network: nn.Module, name: str, target: str) -> None:
    named, built = plan.architecture.rsplit('.', 1)[-1], type(network).__name__
    # nnssl's names, or the network's own class (this package's pre-training checkpoints name theirs)
    wanted = NETWORK_OF_ARCHITECTURE.get(named, named if named == built else None)
    if wanted is None:
        raise NnsslCheckpointError(
            f'{name}: its {ADAPTATION_PLAN_KEY} names the architecture {plan.architecture!r} '
            f'(architecture_plans.arch_class_name); adapt-weights maps nnssl checkpoints of '
            f'{", ".join(NETWORK_OF_ARCHITECTURE)} onto the network nnU-Net builds from your plans, and checkpoints '
            f'naming the target\'s own class ({built}), not this one.')
    if built != wanted:
        resenc = wanted == 'ResidualEncoderUNet'
        advice = (' Plan the dataset with nnU-Net\'s ResEnc planner (nnUNetv2_plan_experiment -d D -pl '
                  'nnUNetPlannerResEncL) and give -p nnUNetResEncUNetLPlans.' if resenc else '')
        raise NnsslCheckpointError(
            f'{name}: its {ADAPTATION_PLAN_KEY} names the architecture {plan.architecture!r} '
            f'(architecture_plans.arch_class_name), a {wanted}, but {target or "the target"} is a {built}.{advice}')


def _prefixed(state: Mapping[str, torch.Tensor], module: str, role: str, name: str) -> dict[str, torch.Tensor]:
    found = {key: value for key, value in state.items() if _under(key, module)}
    if not found:
        raise NnsslCheckpointError(
            f'{name}: {role} {module!r} of its {ADAPTATION_PLAN_KEY} is the path of no tensor of network_weights '
            f'(its first keys: {", ".join(list(state)[:_NAMED])}); the plan does not describe these weights.')
    return found


def nnssl_source(state: Mapping[str, torch.Tensor], plan: AdaptationPlan, network: nn.Module, name: str,
                 target: str = '') -> NnsslSource:
    """The tensors of an nnssl checkpoint's ``state`` (its ``network_weights``) under ``network``'s names.

    The stem's and the encoder's tensors are found by the plan's ``key_to_stem`` and ``key_to_encoder`` and moved to
    the network's own paths (its ``key_to_stem`` / ``key_to_encoder`` attributes, as dynamic_network_architectures
    declares them, or the plan's); every alias of a tensor comes along. Decoder tensors (``decoder.*`` but the
    encoder's alias and the segmentation heads) are taken where the network has the name in the same shape.

    Raises:
        NnsslCheckpointError: the plan's architecture is not the network's class (the message says which plans
            build it), or its stem, encoder or input-projection key names no tensor of ``state``.
    """
    _check_network(plan, network, name, target)
    stem = _prefixed(state, plan.key_to_stem, 'key_to_stem', name)
    encoder = _prefixed(state, plan.key_to_encoder, 'key_to_encoder', name)
    for key in plan.keys_to_in_proj:
        if f'{key}.weight' not in state:
            raise NnsslCheckpointError(
                f'{name}: keys_to_in_proj {key!r} of its {ADAPTATION_PLAN_KEY} has no tensor {key}.weight in '
                f'network_weights; the plan does not describe these weights.')
    own_stem = getattr(network, 'key_to_stem', plan.key_to_stem)
    own_encoder = getattr(network, 'key_to_encoder', plan.key_to_encoder)
    tensors = {}
    # the stem may lie inside the encoder's path (PlainConvUNet): its own mapping, the longer prefix, wins
    for key, value in encoder.items():
        tensors[own_encoder + key[len(plan.key_to_encoder):]] = value
    for key, value in stem.items():
        tensors[own_stem + key[len(plan.key_to_stem):]] = value
    target_state = network.state_dict()
    for key in target_state:
        if key.startswith(_DECODER_ALIAS) and key[len(_DECODER):] in tensors:
            tensors[key] = tensors[key[len(_DECODER):]]
    taken, skipped = False, []
    for key, value in state.items():
        if not key.startswith(_DECODER) or key.startswith(_DECODER_ALIAS) or is_seg_head(key) or key in stem \
                or key in encoder:
            continue
        if key in target_state and target_state[key].shape == value.shape:
            tensors[key], taken = value, True
        else:
            skipped.append(key)
    return NnsslSource(plan, tensors, taken, skipped)


def spacing_and_patch_notes(plan: Mapping[str, Any], spacing: list[float], patch_size: list[int], dataset: str,
                            plans: str) -> list[str]:
    """Notes for the report where the target configuration's ``spacing`` or ``patch_size`` differs from the
    pre-training's (``plan``: :meth:`AdaptationPlan.summary`), with the ``nnunet-plugins plans`` command that adds a
    configuration at the pre-training's spacing and the plan's recommended downstream patch."""
    notes = []
    pretrain_spacing, pretrain_patch = plan['spacing'], plan['patch_size']
    recommended = plan['recommended_patch_size'] or pretrain_patch
    if pretrain_spacing is not None and len(pretrain_spacing) == len(spacing) and \
            any(abs(a - b) > 1e-3 * max(a, b) for a, b in zip(pretrain_spacing, spacing)):
        notes.append(f'the checkpoint was pre-trained at spacing {_shown(pretrain_spacing)} mm, the configuration '
                     f'trains at {_shown(spacing)} mm: features learned at one scale meet images at another')
    if recommended is not None and list(recommended) != list(patch_size):
        notes.append(f'the configuration\'s patch is {_shown(patch_size)}; the checkpoint was pre-trained on '
                     f'{_shown(pretrain_patch or [])} patches and its adaptation plan recommends '
                     f'{_shown(recommended)} for fine-tuning')
    if notes and pretrain_spacing is not None and recommended is not None:
        notes.append(f'to add a configuration at the pre-training\'s spacing and the recommended patch: '
                     f'nnunet-plugins plans {dataset} --preset mednext -p {plans} -c 3d_fullres_nnssl --spacing '
                     f'{" ".join(f"{s:g}" for s in pretrain_spacing)} --patch {" ".join(map(str, recommended))} (the '
                     f'preset then only sets the batch size, 2; the command prints how to preprocess and train it)')
    return notes


def _shown(values: list) -> str:
    return ' x '.join(f'{value:g}' for value in values)
