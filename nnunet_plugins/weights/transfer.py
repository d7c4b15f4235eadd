"""Starting a network from an encoder-only or foreign checkpoint: what fits is copied, the rest keeps the network's
own initialisation, and a report says which is which.

nnU-Net's ``-pretrained_weights`` needs every tensor of the network under the same name and shape; this module
makes such a file (:func:`transfer_weights` on the target network, then save its whole state dict). The rules:

- Only tensors whose names start with one of ``prefixes`` take part (default ``encoder.``: by this package's
  convention every network's encoder, stem included, is ``network.encoder``); ``.seg_layers.`` never does.
- A tensor of the source with the target's name and shape is copied.
- An input layer's kernel (a convolution taking the image) of another number of input channels is adapted so that
  an image whose channels are copies of one channel gives the source's activations: *repeated* along the input
  channels and scaled by old / new count when the target's count is a multiple of the source's (as the nnU-Net team
  adapts a 1-channel stem to more channels), else *averaged*: the source's channels summed, spread evenly over the
  target's (each gets the sum / new count).
- A tensor the source lacks keeps the target's initialisation and is reported as such, grouped by module. When
  more than :data:`MAX_FRESH_SHARE` of the encoder's values would stay fresh, the load is refused unless
  ``allow_partial`` (``--allow-partial``): a mostly random encoder is rarely what a user who asked for pre-trained
  weights meant.
- Any other shape difference, and a source of which nothing fits, is a :class:`WeightTransferError` naming the
  file and the first offending tensors: never a silent random start.
"""
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nnunet_plugins.weights.files import (
    ENCODER_PREFIX, LAYOUTS, NetworkWeights, is_seg_head, read_network_weights, sha256_of)
from nnunet_plugins.weights.nnssl import AdaptationPlan, nnssl_source
from nnunet_plugins.weights.report import WeightsReport

NAMED = 5  # how many tensor names an error or report line shows
MAX_FRESH_SHARE = 0.10  # the share of the encoder's values (parameters and buffers) a load may leave fresh
MODULE_DEPTH = 3  # fresh tensors are grouped by the first 3 parts of their module's name (encoder.stages.3)


class WeightTransferError(ValueError):
    """The source cannot initialise the target network; the message names the file, the tensors and the fix."""


@dataclass
class TransferReport(WeightsReport):
    """What :func:`transfer_weights` did, by state-dict name of the target network."""

    source: str
    source_format: str  # a key of LAYOUTS
    source_sha256: str = ''
    target: str = ''
    prefixes: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)  # copied unchanged
    channel_adapted: list[str] = field(default_factory=list)  # 'name: (shape) -> (shape)'
    channel_rule: str = ''  # how channel_adapted were adapted: 'repeated' or 'averaged' (module docstring)
    fresh: list[str] = field(default_factory=list)  # left at the target network's initialisation
    unused: list[str] = field(default_factory=list)  # source tensors that initialised nothing
    fresh_share: float = 0.0  # of the encoder's values, those left fresh
    fresh_by_module: dict[str, list[int]] = field(default_factory=dict)  # module -> [tensors, values] left fresh
    pretraining: dict | None = None  # the pre-training's cases, when its report is beside the source (provenance)
    nnssl: dict | None = None  # an nnssl source's adaptation plan (AdaptationPlan.summary)
    notes: list[str] = field(default_factory=list)  # warnings and notes for the user, printed after the counts

    def fresh_modules(self) -> str:
        """The fresh tensors by module: ``encoder.stages.3 (8 tensors, 1,234 values), ...``."""
        return ', '.join(f'{module} ({tensors} tensors, {values:,} values)'
                         for module, (tensors, values) in self.fresh_by_module.items())

    def lines(self) -> list[str]:
        """A summary and, per group, the count and the first names (the fresh ones by module)."""
        def named(title: str, names: list[str]) -> str:
            more = f', ... ({len(names) - NAMED} more)' if len(names) > NAMED else ''
            return f'  {len(names)} {title}' + (f': {", ".join(names[:NAMED])}{more}' if names else '')
        fresh = (f'  {len(self.fresh)} freshly initialised (the target network\'s own initialisation), '
                 f'{self.fresh_share:.1%} of the encoder\'s values'
                 + (f': {self.fresh_modules()}' if self.fresh else ''))
        lines = [f'weights for {self.target} from {self.source} ({LAYOUTS[self.source_format]}, sha256 '
                 f'{self.source_sha256[:12]}...), tensors under {" or ".join(p or "(all)" for p in self.prefixes)}:',
                 named('loaded', self.loaded),
                 named('adapted to the input channels' + (f' ({self.channel_rule})' if self.channel_rule else ''),
                       self.channel_adapted), fresh,
                 named('of the source unused', self.unused)]
        if self.nnssl:
            plan = self.nnssl
            lines.append(f'  nnssl adaptation plan: {plan["architecture"]}, {plan["input_channels"]} input channel(s), '
                         f'pre-trained at spacing {plan["spacing"]} on patches {plan["patch_size"]}, recommended '
                         f'patch {plan["recommended_patch_size"]}; stem {plan["key_to_stem"]}, encoder '
                         f'{plan["key_to_encoder"]}')
        return lines + self.notes


def input_layers(network: nn.Module, input_channels: int) -> set[str]:
    """State-dict names of the kernels of the convolutions that can take the image (``input_channels`` in).

    Every name of a shared module counts: nnU-Net's ``ConvDropoutNormReLU`` holds its convolution both as ``conv``
    and in ``all_modules``, and the state dict has it under both."""
    return {f'{name}.weight' for name, module in network.named_modules(remove_duplicate=False)
            if isinstance(module, nn.modules.conv._ConvNd) and module.in_channels == input_channels}


def _adaptable(source: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``source`` differs from ``target`` in its input channels (axis 1) alone."""
    return (source.dim() == target.dim() >= 2 and source.shape[0] == target.shape[0]
            and source.shape[2:] == target.shape[2:] and source.shape[1] != target.shape[1])


def repeat_input_channels(kernel: torch.Tensor, channels: int) -> torch.Tensor:
    """``kernel`` (out, in, *k) repeated along ``in`` to ``channels`` (a multiple of in) and scaled by in / channels."""
    return kernel.repeat(1, channels // kernel.shape[1], *([1] * (kernel.dim() - 2))) * (kernel.shape[1] / channels)


def adapt_input_channels(kernel: torch.Tensor, channels: int) -> tuple[torch.Tensor, str]:
    """``kernel`` (out, in, *k) for ``channels`` input channels, and the rule: 'repeated'
    (:func:`repeat_input_channels`, ``channels`` a multiple of in) or 'averaged' (the sum over ``in``, divided by
    ``channels``, in every channel). Either way, ``channels`` copies of one image give the activations that ``in``
    copies gave."""
    if channels % kernel.shape[1] == 0:
        return repeat_input_channels(kernel, channels), 'repeated'
    summed = kernel.sum(dim=1, keepdim=True)
    return summed.repeat(1, channels, *([1] * (kernel.dim() - 2))) / channels, 'averaged'


def fresh_by_module(state: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, list[int]]:
    """``names`` of ``state`` grouped by the first :data:`MODULE_DEPTH` parts of their module's name: module ->
    [tensors, values], in the network's order."""
    groups: dict[str, list[int]] = {}
    for name in names:
        group = groups.setdefault('.'.join(name.split('.')[:-1][:MODULE_DEPTH]), [0, 0])
        group[0] += 1
        group[1] += state[name].numel()
    return groups


def share_of_values(state: Mapping[str, torch.Tensor], part: list[str], whole: list[str]) -> float:
    """The share of the values of ``whole`` (names of ``state``) that ``part`` holds, each tensor counted once
    (nnU-Net's networks hold some modules under two names)."""
    def values(names: list[str]) -> int:
        return sum({state[name].data_ptr(): state[name].numel() for name in names}.values())
    total = values(whole)
    return values(part) / total if total else 0.0


def transfer_weights(network: nn.Module, source: Mapping[str, torch.Tensor], input_channels: int,
                     prefixes: tuple[str, ...] = (ENCODER_PREFIX,), source_name: str = 'the source',
                     source_format: str = 'tensors', allow_partial: bool = False) -> TransferReport:
    """Copy the tensors of ``source`` that fit into ``network`` (in place) by the rules of this module.

    Args:
        network: the target network, at its own initialisation; it takes ``input_channels`` image channels.
        source: tensors by target-network name (:func:`~nnunet_plugins.weights.files.read_network_weights`).
        prefixes: names of the target's tensors that take part ('' for all but the segmentation heads).
        source_name: what messages and the report call the source (its file).
        allow_partial: accept a load that leaves more than :data:`MAX_FRESH_SHARE` of the encoder's values fresh.

    Raises:
        WeightTransferError: a tensor present in both has a shape that cannot be adapted, nothing would load, or
            (unless ``allow_partial``) more than :data:`MAX_FRESH_SHARE` of the encoder would stay fresh.
    """
    target = network.state_dict()
    wanted = [name for name in target if name.startswith(prefixes) and not is_seg_head(name)]
    adaptable = input_layers(network, input_channels)
    report = TransferReport(source=source_name, source_format=source_format, prefixes=list(prefixes))
    state, wrong = {}, []
    for name in wanted:
        if name not in source:
            report.fresh.append(name)
        elif source[name].shape == target[name].shape:
            state[name] = source[name]
            report.loaded.append(name)
        elif name in adaptable and _adaptable(source[name], target[name]):
            state[name], report.channel_rule = adapt_input_channels(source[name].to(target[name].dtype),
                                                                    input_channels)
            report.channel_adapted.append(f'{name}: {tuple(source[name].shape)} -> {tuple(target[name].shape)}')
        else:
            wrong.append(f'{name} {tuple(source[name].shape)} in the file, {tuple(target[name].shape)} in the network')
    if wrong:
        raise WeightTransferError(
            f'{len(wrong)} tensors of {source_name} do not fit the network: {"; ".join(wrong[:NAMED])}'
            f'{f" and {len(wrong) - NAMED} more" if len(wrong) > NAMED else ""}. The file comes from another network, '
            f'size or topology (plans); use the trainer and plans it was trained with, or a configuration whose '
            f'plans match it.')
    if not state:
        where = ' or '.join(f'"{p}"' for p in prefixes if p) or 'any name'
        raise WeightTransferError(
            f'none of the {len(source)} tensors of {source_name} matches a tensor of the network under {where}, so '
            f'nothing would be loaded (the file\'s first keys: {list(source)[:3]}; the network\'s: {wanted[:3]}). Is '
            f'it for another network? Choose the matching -tr TRAINER; a whole network of the same plans loads with '
            f'nnUNetv2_train -pretrained_weights as it is.')
    # the share is the encoder's (a network without network.encoder: of every tensor that takes part)
    measured, fresh = [name for name in wanted if name.startswith(ENCODER_PREFIX)] or wanted, set(report.fresh)
    report.fresh_share = share_of_values(target, [name for name in measured if name in fresh], measured)
    report.fresh_by_module = fresh_by_module(target, report.fresh)
    if report.fresh_share > MAX_FRESH_SHARE and not allow_partial:
        raise WeightTransferError(
            f'{source_name} leaves {report.fresh_share:.1%} of the encoder\'s values at the network\'s own '
            f'initialisation, more than the {MAX_FRESH_SHARE:.0%} a load may leave: {len(report.fresh)} tensors '
            f'are missing from the file, by module {report.fresh_modules()}. Is it for a shallower or another '
            f'network? To fine-tune with the rest of the encoder trained from scratch anyway, give --allow-partial '
            f'(allow_partial=True in Python).')
    with torch.no_grad():
        for name, tensor in state.items():
            target[name].copy_(tensor)
    used = set(state)
    report.unused = [name for name in source if name not in used]
    return report


def adapt_checkpoint(network: nn.Module, path: Path | str, input_channels: int,
                     prefixes: tuple[str, ...] = (ENCODER_PREFIX,), allow_partial: bool = False,
                     target: str = '') -> TransferReport:
    """:func:`transfer_weights` from the weight file ``path``; the report records the file, its SHA-256 and, in its
    notes, what the reader converted (:attr:`~nnunet_plugins.weights.files.NetworkWeights.notes`).

    An nnssl checkpoint (an ``nnssl_adaptation_plan`` beside ``network_weights``) is mapped by its plan instead of
    ``prefixes``: the stem and encoder by the plan's keys, the decoder where it fits; ``target`` (what the network
    is, e.g. the trainer and plans) is for its messages.

    Raises:
        CheckpointError: the file cannot be read or holds no network weights (:func:`read_network_weights`); an
            nnssl checkpoint's plan is incomplete, misses its tensors or names another network (NnsslCheckpointError).
        WeightTransferError: as :func:`transfer_weights`.
    """
    path = Path(path).resolve()
    weights = read_network_weights(path)
    if weights.layout == 'nnssl':
        report = _transfer_nnssl(network, weights, input_channels, str(path), target, allow_partial)
    else:
        report = transfer_weights(network, weights.state_dict, input_channels, prefixes, str(path), weights.layout,
                                  allow_partial)
    report.source_sha256 = sha256_of(path)
    report.notes.extend(weights.notes)
    return report


def _transfer_nnssl(network: nn.Module, weights: NetworkWeights, input_channels: int, name: str, target: str,
                    allow_partial: bool) -> TransferReport:
    """:func:`transfer_weights` of an nnssl checkpoint: its stem and encoder found by the adaptation plan's keys, the
    decoder's tensors where they fit (:func:`~nnunet_plugins.weights.nnssl.nnssl_source`)."""
    plan = AdaptationPlan.from_checkpoint(weights.adaptation_plan, name)
    source = nnssl_source(weights.state_dict, plan, network, name, target)
    prefixes = ('',) if source.decoder_taken else (ENCODER_PREFIX,)
    report = transfer_weights(network, source.tensors, input_channels, prefixes, name, 'nnssl', allow_partial)
    report.nnssl = plan.summary()
    if source.decoder_skipped:
        report.notes.append(f'{len(source.decoder_skipped)} decoder tensors of the file not taken (the network has '
                            f'not that name, or not that shape): {", ".join(source.decoder_skipped[:NAMED])}'
                            + (' ...' if len(source.decoder_skipped) > NAMED else ''))
    elif not source.decoder_taken:
        report.notes.append('the file has no decoder tensor the network can take: the decoder starts fresh')
    return report
