"""The authors' UTNetV2 checkpoints (CBIM-Medical-Image-Segmentation, ``MedFormer``) in our network's layout.

Their state dict and ours hold the same function in another weight layout: attention heads interleaved
instead of consecutive, the fusion transformer's attention input projection without bias, and a value
projection in the last decoder B-MHA block that their code computes and discards (ours does not have it).
Their files are read by :mod:`nnunet_plugins.weights` (:func:`load_authors_checkpoint`).
"""
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

import torch
from torch import nn

from nnunet_plugins.networks.utnetv2 import MAX_LEVELS, UTNetV2
from nnunet_plugins.networks.utnetv2_blocks import BMHABlock, ResidualConvBlock, SemanticMapFusion
from nnunet_plugins.weights.files import read_network_weights


def _heads_first(tensor: torch.Tensor, heads: int, dim: int = 0) -> torch.Tensor:
    """Reorder the channels along ``dim`` from the authors' head layout (channel ``d * heads + h`` is channel ``d``
    of head ``h``) to ours (``h * head_dim + d``); other axes and the shape are unchanged."""
    return tensor.unflatten(dim, (-1, heads)).transpose(dim, dim + 1).flatten(dim, dim + 1)


def _query_value_heads_first(tensor: torch.Tensor, heads: int, halves: int) -> torch.Tensor:
    """The authors' ``(2 * inner, ...)`` query-value projection weight in our head layout, its first ``halves``
    halves only (1: the queries alone, for a block that skips the map update)."""
    return torch.cat([_heads_first(half, heads) for half in tensor.chunk(2)[:halves]])


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


_Rule = tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]  # authors' key, our key, how to convert the tensor


def _residual_rules(block: ResidualConvBlock, authors: str, ours: str) -> Iterator[_Rule]:
    yield f'{authors}.conv1.conv.weight', f'{ours}.residual.0.2.weight', _unchanged
    yield f'{authors}.conv2.conv.weight', f'{ours}.residual.1.2.weight', _unchanged
    if not isinstance(block.shortcut, nn.Identity):
        yield f'{authors}.shortcut.conv.weight', f'{ours}.shortcut.2.weight', _unchanged


def _merging_rules(authors: str, ours: str) -> Iterator[_Rule]:
    yield f'{authors}.reduction.depthwise.weight', f'{ours}.reduction.0.weight', _unchanged
    yield f'{authors}.reduction.pointwise.weight', f'{ours}.reduction.1.weight', _unchanged


def _bmha_rules(block: BMHABlock, authors: str, ours: str) -> Iterator[_Rule]:
    attention, heads = block.attention, block.attention.heads
    a, o = f'{authors}.attn', f'{ours}.attention'
    yield f'{a}.feat_qv.depthwise.weight', f'{o}.feat_proj.0.weight', _unchanged
    # without the map update our projection has the queries only; the authors' value half is dropped
    yield (f'{a}.feat_qv.pointwise.weight', f'{o}.feat_proj.1.weight',
           partial(_query_value_heads_first, heads=heads, halves=2 if attention.update_map else 1))
    yield f'{a}.map_qv.weight', f'{o}.map_proj.weight', partial(_query_value_heads_first, heads=heads, halves=2)
    yield f'{a}.feat_out.depthwise.weight', f'{o}.feat_out.0.weight', partial(_heads_first, heads=heads)
    yield f'{a}.feat_out.pointwise.weight', f'{o}.feat_out.1.weight', partial(_heads_first, heads=heads, dim=1)
    if attention.update_map:
        yield f'{a}.map_out.weight', f'{o}.map_out.weight', partial(_heads_first, heads=heads, dim=1)
    if not isinstance(block.shortcut, nn.Identity):
        yield f'{authors}.shortcut.conv.weight', f'{ours}.shortcut.2.weight', _unchanged
    for name, index in (('expand_proj', 0), ('depthwise', 1), ('pointwise', 3)):
        yield f'{authors}.feedforward.{name}.conv.weight', f'{ours}.feedforward.residual.{index}.2.weight', _unchanged
    for parameter in ('0.weight', '0.bias', '2.weight', '2.bias'):
        yield (f'{authors}.feedforward.se.excitation.{parameter}', f'{ours}.feedforward.residual.2.gate.{parameter}',
               _unchanged)


def _fusion_rules(fusion: SemanticMapFusion) -> Iterator[_Rule]:
    for i in range(len(fusion.in_proj)):
        for direction in ('in_proj', 'out_proj'):
            yield f'map_fusion.{direction}.{i}.weight', f'map_fusion.{direction}.{i}.weight', _unchanged
    for k in range(len(fusion.transformer.layers)):
        a, o = f'map_fusion.fusion.layers.{k}', f'map_fusion.transformer.layers.{k}'
        for authors, ours in (('0.norm', 'norm1'), ('0.fn.to_out', 'self_attn.out_proj'), ('1.norm', 'norm2'),
                              ('1.fn.fc1', 'linear1'), ('1.fn.fc2', 'linear2')):
            for parameter in ('weight', 'bias'):
                yield f'{a}.{authors}.{parameter}', f'{o}.{ours}.{parameter}', _unchanged
        # q, k, v stacked and heads in the same order in both
        yield f'{a}.0.fn.to_qkv.weight', f'{o}.self_attn.in_proj_weight', _unchanged


def _authors_rules(network: UTNetV2) -> Iterator[_Rule]:
    """Every tensor of the authors' ``MedFormer`` and where it goes in ``network`` (five levels, see
    :func:`convert_authors_state_dict`)."""
    encoder, decoder = network.encoder, network.decoder
    yield 'inc.conv1.weight', 'encoder.stem.0.0.weight', _unchanged
    yield from _residual_rules(encoder.stem[0][1], 'inc.conv2', 'encoder.stem.0.1')
    yield from _merging_rules('down1.patch_merging', 'encoder.stem.1.0')
    for i, block in enumerate(encoder.stem[1][1:]):
        yield from _residual_rules(block, f'down1.conv_blocks.{i}', f'encoder.stem.1.{i + 1}')
    for i, stage in enumerate(encoder.bmha_stages):
        authors, ours = f'down{i + 2}', f'encoder.bmha_stages.{i}'
        yield from _merging_rules(f'{authors}.patch_merging', f'{ours}.merge')
        yield f'{authors}.map_gen.base_proj.weight', f'{ours}.map_generation.base.weight', _unchanged
        yield f'{authors}.map_gen.semantic_proj.weight', f'{ours}.map_generation.weights.weight', _unchanged
        for j, block in enumerate(stage.blocks):
            yield from _bmha_rules(block, f'{authors}.trans_blocks.blocks.{j}', f'{ours}.blocks.{j}')
    yield from _fusion_rules(network.map_fusion)
    for i, stage in enumerate(decoder.bmha_stages):
        authors, ours = f'up{i + 1}', f'decoder.bmha_stages.{i}'
        yield f'{authors}.map_reduction.weight', f'{ours}.map_reduction.weight', _unchanged
        for j, block in enumerate(stage.blocks):
            yield from _bmha_rules(block, f'{authors}.trans_blocks.blocks.{j}', f'{ours}.blocks.{j}')
    for i, stage in enumerate(decoder.conv_stages):
        for j, block in enumerate(stage.blocks):
            yield from _residual_rules(block, f'up{len(decoder.bmha_stages) + i + 1}.conv_blocks.{j}',
                                       f'decoder.conv_stages.{i}.blocks.{j}')
    for authors, head in (('outc', 0), ('aux_out', 1)):
        for parameter in ('weight', 'bias'):
            yield f'{authors}.{parameter}', f'decoder.seg_layers.{head}.{parameter}', _unchanged


def convert_authors_state_dict(authors_state: Mapping[str, torch.Tensor], network: UTNetV2) -> dict[str, torch.Tensor]:
    """A state dict of the authors' UTNetV2 (``MedFormer`` in CBIM-Medical-Image-Segmentation,
    ``model/dim3/medformer.py``) rewritten for ``network``, which must have the same setting: five 3d levels
    and the same widths, blocks, heads and map size (``utnetv2_from_plan`` on the authors' plan, e.g. their BCV
    configuration with ``VARIANTS['bcv']``). ``network`` itself is not changed; load the result with
    ``network.load_state_dict(converted)``, strictly.

    Given the same weights both compute the same function. The layouts differ in:

    - the B-MHA channel order: the authors put channel ``d`` of head ``h`` at ``d * heads + h``, ours at
      ``h * head_dim + d``; the query-value and output projections are permuted accordingly;
    - the last decoder B-MHA block: ours has no value projection of the feature map (the authors' is used only
      for the discarded map update), so the value half of their projection is dropped;
    - the fusion transformer: the authors' query-key-value projection has no bias, PyTorch's gets zeros;
    - a network trained without ``aux_loss`` has no auxiliary head: ours keeps ``network``'s.

    Args:
        authors_state: the authors' ``model.state_dict()`` (without a ``module.`` prefix).
        network: the network to load it into.

    Raises:
        ValueError: ``network`` does not have five 3d levels, a tensor is missing or left over, or a tensor's
            shape does not fit ``network`` (another setting); the message names the tensors.
    """
    if len(network.strides) != MAX_LEVELS or len(network.map_size) != 3:
        raise ValueError(f'the authors\' MedFormer has {MAX_LEVELS} levels in 3d; this network has '
                         f'{len(network.strides)} levels in {len(network.map_size)}d')
    has_aux = any(key.startswith('aux_out.') for key in authors_state)
    rules = [rule for rule in _authors_rules(network) if has_aux or not rule[0].startswith('aux_out.')]
    ours = network.state_dict()
    missing = [authors for authors, _, _ in rules if authors not in authors_state]
    left_over = sorted(set(authors_state) - {authors for authors, _, _ in rules})
    if missing or left_over:
        raise ValueError(f'the state dict does not fit this network: {len(missing)} tensors missing '
                         f'{missing[:4]}, {len(left_over)} not used {left_over[:4]}')
    converted = {}
    for authors, key, convert in rules:
        try:
            tensor = convert(authors_state[authors])
        except RuntimeError:  # channels that do not split into this network's heads
            tensor = None
        if tensor is None or tensor.shape != ours[key].shape:
            raise ValueError(f'{authors} of shape {tuple(authors_state[authors].shape)} does not fit {key} of shape '
                             f'{tuple(ours[key].shape)}')
        converted[key] = tensor
    for k in range(len(network.map_fusion.transformer.layers)):
        prefix = f'map_fusion.transformer.layers.{k}.self_attn'
        converted[f'{prefix}.in_proj_bias'] = torch.zeros_like(converted[f'{prefix}.in_proj_weight'][:, 0])
    if not has_aux:
        converted.update({key: tensor.clone() for key, tensor in ours.items()
                          if key.startswith('decoder.seg_layers.1.')})
    return converted


def load_authors_checkpoint(network: UTNetV2, path: Path | str) -> None:
    """Load the authors' checkpoint file at ``path`` into ``network``, strictly (:func:`convert_authors_state_dict`).

    The file holds their ``model.state_dict()``, bare or under ``state_dict``, with or without DDP's ``module.``.

    Raises:
        CheckpointError: the file cannot be read or holds no network weights.
        ValueError: its tensors do not fit ``network``; the message names the file and the tensors.
    """
    authors_state = read_network_weights(path).state_dict
    try:
        converted = convert_authors_state_dict(authors_state, network)
    except ValueError as error:
        raise ValueError(f'{path} is not a checkpoint of this network\'s setting: {error}. Build the network with the '
                         f'setting the authors trained (utnetv2_from_plan on their plan and variant).') from None
    network.load_state_dict(converted)
