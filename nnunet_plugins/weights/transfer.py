"""Starting a network from an encoder-only or foreign checkpoint: what fits is copied, the rest keeps the network's
own initialisation, and a report says which is which.

nnU-Net's ``-pretrained_weights`` needs every tensor of the network under the same name and shape; this module
makes such a file (:func:`transfer_weights` on the target network, then save its whole state dict). The rules:

- Only tensors whose names start with one of ``prefixes`` take part (default ``encoder.``: by this package's
  convention every network's encoder, stem included, is ``network.encoder``); ``.seg_layers.`` never does.
- A tensor of the source with the target's name and shape is copied.
- An input layer's kernel (a convolution taking the image) whose source has fewer input channels, the target's
  count being a multiple of it, is repeated along the input channels and scaled by old / new count, as the nnU-Net
  team adapts a 1-channel stem to more channels: an image whose channels are copies of one channel then gives the
  source's activations.
- A tensor the source lacks keeps the target's initialisation and is reported as such.
- Any other shape difference, and a source of which nothing fits, is a :class:`WeightTransferError` naming the
  file and the first offending tensors: never a silent random start.
"""
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nnunet_plugins.weights.files import ENCODER_PREFIX, LAYOUTS, read_network_weights, sha256_of
from nnunet_plugins.weights.report import WeightsReport

SKIPPED = '.seg_layers.'  # nnU-Net's segmentation heads, which depend on the labels; -pretrained_weights skips them too
NAMED = 5  # how many tensor names an error or report line shows


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
    fresh: list[str] = field(default_factory=list)  # left at the target network's initialisation
    unused: list[str] = field(default_factory=list)  # source tensors that initialised nothing

    def lines(self) -> list[str]:
        """A summary and, per group, the count and the first names."""
        lines = [f'weights for {self.target} from {self.source} ({LAYOUTS[self.source_format]}, sha256 '
                 f'{self.source_sha256[:12]}...), tensors under {" or ".join(p or "(all)" for p in self.prefixes)}:']
        for title, names in (('loaded', self.loaded), ('adapted to the input channels', self.channel_adapted),
                             ('freshly initialised (the target network\'s own initialisation)', self.fresh),
                             ('of the source unused', self.unused)):
            more = f', ... ({len(names) - NAMED} more)' if len(names) > NAMED else ''
            lines.append(f'  {len(names)} {title}' + (f': {", ".join(names[:NAMED])}{more}' if names else ''))
        return lines


def input_layers(network: nn.Module, input_channels: int) -> set[str]:
    """State-dict names of the kernels of the convolutions that can take the image (``input_channels`` in).

    Every name of a shared module counts: nnU-Net's ``ConvDropoutNormReLU`` holds its convolution both as ``conv``
    and in ``all_modules``, and the state dict has it under both."""
    return {f'{name}.weight' for name, module in network.named_modules(remove_duplicate=False)
            if isinstance(module, nn.modules.conv._ConvNd) and module.in_channels == input_channels}


def _adaptable(source: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``source`` becomes ``target`` by repeating its input channels (axis 1), all else equal."""
    return (source.dim() == target.dim() >= 2 and source.shape[0] == target.shape[0]
            and source.shape[2:] == target.shape[2:] and target.shape[1] % source.shape[1] == 0
            and source.shape[1] < target.shape[1])


def repeat_input_channels(kernel: torch.Tensor, channels: int) -> torch.Tensor:
    """``kernel`` (out, in, *k) repeated along ``in`` to ``channels`` and scaled by in / channels."""
    return kernel.repeat(1, channels // kernel.shape[1], *([1] * (kernel.dim() - 2))) * (kernel.shape[1] / channels)


def transfer_weights(network: nn.Module, source: Mapping[str, torch.Tensor], input_channels: int,
                     prefixes: tuple[str, ...] = (ENCODER_PREFIX,), source_name: str = 'the source',
                     source_format: str = 'tensors') -> TransferReport:
    """Copy the tensors of ``source`` that fit into ``network`` (in place) by the rules of this module.

    Args:
        network: the target network, at its own initialisation; it takes ``input_channels`` image channels.
        source: tensors by target-network name (:func:`~nnunet_plugins.weights.files.read_network_weights`).
        prefixes: names of the target's tensors that take part ('' for all but the segmentation heads).
        source_name: what messages and the report call the source (its file).

    Raises:
        WeightTransferError: a tensor present in both has a shape that cannot be adapted, or nothing would load.
    """
    target = network.state_dict()
    wanted = [name for name in target if name.startswith(prefixes) and SKIPPED not in name]
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
            state[name] = repeat_input_channels(source[name].to(target[name].dtype), input_channels)
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
    with torch.no_grad():
        for name, tensor in state.items():
            target[name].copy_(tensor)
    used = set(state)
    report.unused = [name for name in source if name not in used]
    return report


def adapt_checkpoint(network: nn.Module, path: Path | str, input_channels: int,
                     prefixes: tuple[str, ...] = (ENCODER_PREFIX,)) -> TransferReport:
    """:func:`transfer_weights` from the weight file ``path``; the report records the file and its SHA-256.

    Raises:
        CheckpointError: the file cannot be read or holds no network weights (:func:`read_network_weights`).
        WeightTransferError: as :func:`transfer_weights`.
    """
    path = Path(path).resolve()
    weights = read_network_weights(path)
    report = transfer_weights(network, weights.state_dict, input_channels, prefixes, str(path), weights.layout)
    report.source_sha256 = sha256_of(path)
    return report
