"""UTNetV2: the authors' size, cost and norms on their BCV setting, the conversion of their checkpoints, nnU-Net's
topology on other plans, and the trainer on the tiny dataset."""
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_plugins.commands.benchmark.worker import random_batch
from nnunet_plugins.macs import forward_macs
from nnunet_plugins.networks.topology import ShallowPlanError
from nnunet_plugins.networks.utnetv2 import VARIANTS, utnetv2_from_plan, utnetv2_levels
from nnunet_plugins.networks.utnetv2_blocks import BidirectionalAttention, PreActConv
from nnunet_plugins.networks.utnetv2_authors import convert_authors_state_dict, load_authors_checkpoint
from nnunet_plugins.training.utnetv2 import nnUNetTrainerUTNetV2

from helpers import (CONFIGURATION, TINY_KERNELS, TINY_STRIDES, assert_segments_a_heldout_case, parameter_count,
                     train_in_process, training_log)

TRAINER = nnUNetTrainerUTNetV2.__name__
# the paper's BCV setting (Supplementary): 32x128x128 patches at 3.0 x 0.75 x 0.75 mm
BCV_STRIDES = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
BCV_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
BCV_PATCH = (32, 128, 128)
# the authors' code (CBIM-Medical-Image-Segmentation 7c26979, model/dim3/medformer.py) with that setting, 1 input
# channel, 14 classes, auxiliary head, by semantic map size (3: their config/bcv/medformer_3d.yaml, 4: the paper's
# text); MACs counted by nnunet_plugins.macs.forward_macs as below
AUTHORS_PARAMETERS = {3: 36_669_180, 4: 37_372_476}
AUTHORS_STATE_DICT_ENTRIES = 300  # for either map size
AUTHORS_MACS = {3: 210_317_157_632, 4: 219_153_235_968}
# its instance norms: 1e-4 in its conv-norm-activation layers, PyTorch's default in the B-MHA input norms and
# patch merging
AUTHORS_NORM_EPS = {1e-4: 72, 1e-5: 40}
# ours: no map update and no feature-value projection in the last decoder B-MHA block (-128 x 128), and
# PyTorch's fusion transformer layers have an attention input bias (+3 x 320 per layer, two layers)
PARAMETER_DIFFERENCE = -128 * 128 + 2 * 3 * 320


def mac_difference(map_size: int) -> int:
    """The two computations left out: that projection at the 1/4 level (32^3 voxels) and the map update matmul."""
    return -(128 * 128 + map_size ** 3 * 128) * 32 ** 3


@pytest.fixture(scope='module')
def bcv_network():
    return utnetv2_from_plan(1, 14, BCV_STRIDES, BCV_KERNELS)


def test_the_default_is_the_authors_current_bcv_configuration(bcv_network):
    assert bcv_network.map_size == (3, 3, 3)
    assert parameter_count(bcv_network) == AUTHORS_PARAMETERS[3] + PARAMETER_DIFFERENCE


@pytest.mark.parametrize('map_size', sorted(AUTHORS_PARAMETERS))
def test_parameter_count_on_the_authors_bcv_setting(map_size):
    network = utnetv2_from_plan(1, 14, BCV_STRIDES, BCV_KERNELS, replace(VARIANTS['bcv'], map_size=map_size))
    assert parameter_count(network) == AUTHORS_PARAMETERS[map_size] + PARAMETER_DIFFERENCE
    assert abs(PARAMETER_DIFFERENCE) / AUTHORS_PARAMETERS[map_size] < 0.001


def test_forward_macs_on_the_authors_bcv_patch(bcv_network):
    macs = forward_macs(bcv_network, (1, 1, *BCV_PATCH))
    assert macs == AUTHORS_MACS[3] + mac_difference(3)
    assert abs(macs - AUTHORS_MACS[3]) / AUTHORS_MACS[3] < 0.005


def test_norm_eps_as_the_authors_set_it(bcv_network):
    """1e-4 in every norm-activation-conv layer (conv blocks and their shortcuts, the B-MHA shortcut, the three
    MBConv layers), 1e-5 in the B-MHA input norms and patch merging; as many of each as in the authors' code."""
    modules = dict(bcv_network.named_modules())
    norms = {name: module for name, module in modules.items() if isinstance(module, torch.nn.InstanceNorm3d)}
    in_preact = {f'{name}.0' for name, module in modules.items() if isinstance(module, PreActConv)}
    expected = {name: 1e-4 if name in in_preact else 1e-5 for name in norms}
    assert {name: module.eps for name, module in norms.items()} == expected
    assert all(re.search(r'\.(feat_norm|map_norm|merge\.norm|stem\.1\.0\.norm)$', name)
               for name, eps in expected.items() if eps == 1e-5)
    assert {eps: list(expected.values()).count(eps) for eps in set(expected.values())} == AUTHORS_NORM_EPS


def test_cost_is_linear_in_the_number_of_voxels(bcv_network):
    """MACs (attention matrix products included) are affine in the voxels: no voxels x voxels term."""
    macs = [forward_macs(bcv_network, (1, 1, 32 * n, 64, 64)) for n in (1, 2, 3)]
    assert macs[2] - macs[1] == macs[1] - macs[0]


def test_one_similarity_matrix_serves_both_attention_directions():
    """Eq. 5: X' = softmax over map tokens (A) v_M and M' = softmax over voxels (A)^T v_X, A = q_X q_M^T / sqrt(d),
    checked against two independent scaled-dot-product attentions."""
    torch.manual_seed(0)
    heads, head_dim = 2, 8
    attention = BidirectionalAttention(torch.nn.Conv3d, 16, 12, 16, heads, head_dim, [3, 3, 3]).eval()
    feat, semantic_map = torch.randn(2, 16, 4, 6, 5), torch.randn(2, 12, 2, 2, 2)
    feat_out, map_out = attention(feat, semantic_map)

    def split(x):
        return x.flatten(2).unflatten(1, (heads, head_dim)).transpose(-2, -1)

    def merge(x, like):
        return x.transpose(-2, -1).flatten(1, 2).reshape(like.shape[0], -1, *like.shape[2:])

    feat_q, feat_v = map(split, attention.feat_proj(feat).chunk(2, dim=1))
    map_q, map_v = map(split, attention.map_proj(semantic_map).chunk(2, dim=1))
    expected_feat = attention.feat_out(merge(F.scaled_dot_product_attention(feat_q, map_q, map_v), feat))
    expected_map = attention.map_out(merge(F.scaled_dot_product_attention(map_q, feat_q, feat_v), semantic_map))
    torch.testing.assert_close(feat_out, expected_feat)
    torch.testing.assert_close(map_out, expected_map)


@pytest.mark.parametrize('strides,kernels,patch', [
    ([[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, (32, 32, 32)),  # isotropic: the first five levels are used
    ([[1, 1], [2, 2], [2, 2], [2, 2]], [[3, 3]] * 4, (32, 32)),  # the tiny dataset's 2d plan
], ids=['isotropic-3d', '2d'])
def test_outputs_and_gradients_on_isotropic_and_2d_plans(strides, kernels, patch):
    torch.manual_seed(0)
    network = utnetv2_from_plan(1, 3, strides, kernels)
    assert len(network.strides) == min(5, len(strides))
    outputs = network(torch.randn(1, 1, *patch))
    assert [tuple(o.shape) for o in outputs] == [(1, 3, *patch)] * 2
    sum(o.mean() for o in outputs).backward()
    assert [name for name, p in network.named_parameters() if p.grad is None] == []
    network.decoder.deep_supervision = False
    assert network(torch.randn(1, 1, *patch)).shape == (1, 3, *patch)


def test_auxiliary_output_is_the_level_2_head_interpolated_to_full_resolution():
    """As the authors: trilinear with corners aligned, from the head on the last decoder B-MHA block's output."""
    torch.manual_seed(0)
    network = utnetv2_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS).eval()
    level_2 = []
    network.decoder.seg_layers[1].register_forward_hook(lambda module, args, output: level_2.append(output))
    with torch.no_grad():
        logits, auxiliary = network(torch.randn(1, 1, 14, 32, 32))
    assert level_2[0].shape == (1, 4, 7, 8, 8)
    torch.testing.assert_close(auxiliary, F.interpolate(level_2[0], size=(14, 32, 32), mode='trilinear',
                                                        align_corners=True), rtol=0, atol=0)
    torch.testing.assert_close(auxiliary[..., 0, 0, 0], level_2[0][..., 0, 0, 0], rtol=0, atol=0)
    torch.testing.assert_close(auxiliary[..., -1, -1, -1], level_2[0][..., -1, -1, -1], rtol=0, atol=0)


def test_anisotropic_plan_with_four_levels_drops_the_deepest_bmha_level():
    network = utnetv2_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS)
    assert network.strides == [tuple(s) for s in TINY_STRIDES]
    assert network.kernel_sizes == [tuple(k) for k in TINY_KERNELS]
    assert network.transformer_blocks == [2, 4]
    assert [len(stage.blocks) for stage in network.encoder.bmha_stages] == [2, 4]
    assert [len(stage.blocks) for stage in network.decoder.bmha_stages] == [2]


@pytest.mark.parametrize('plan_strides,plan_kernels', [
    ([[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6),
    (BCV_STRIDES, BCV_KERNELS),
    ([[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]], [[3, 3]] * 6),
    (TINY_STRIDES, TINY_KERNELS),
], ids=['isotropic', 'anisotropic', '2d', 'four-levels'])
def test_levels_are_those_the_factory_builds(plan_strides, plan_kernels):
    """utnetv2_levels, which the trainer's patch check and deep-supervision scales read, states the built topology."""
    levels = utnetv2_levels(plan_strides, plan_kernels)
    with torch.device('meta'):
        network = utnetv2_from_plan(1, 2, plan_strides, plan_kernels)
    assert [list(s) for s in levels.strides] == plan_strides[:5]
    assert list(levels.strides) == network.strides
    assert [tuple(k) for k in levels.kernels(3)] == network.kernel_sizes


def test_a_plan_of_three_stages_is_too_shallow():
    with pytest.raises(ShallowPlanError, match=r'at least 4 resolution levels.*has 3'):
        utnetv2_levels(TINY_STRIDES[:3], TINY_KERNELS[:3])


def test_block_counts_and_map_size_are_arguments():
    network = utnetv2_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS,
                                replace(VARIANTS['bcv'], transformer_blocks=(1, 3), map_size=(2, 3, 3)))
    assert [len(stage.blocks) for stage in network.encoder.bmha_stages] == [1, 3]
    assert [len(stage.blocks) for stage in network.decoder.bmha_stages] == [1]
    with torch.no_grad():
        skips, maps = network.encoder(torch.randn(1, 1, 14, 32, 32))
    assert [tuple(s.shape) for s in skips] == [(1, 32, 14, 32, 32), (1, 64, 14, 16, 16), (1, 128, 7, 8, 8),
                                               (1, 256, 7, 4, 4)]
    assert [tuple(m.shape) for m in maps] == [(1, 128, 2, 3, 3), (1, 256, 2, 3, 3)]


# ---- the authors' checkpoints ----

# our state-dict keys -> the authors' (model/dim3/medformer.py), rewritten in turn; written from their module
# names, independently of convert_authors_state_dict
AUTHORS_NAMES = [
    (r'^encoder\.stem\.0\.0\.', 'inc.conv1.'),
    (r'^encoder\.stem\.0\.1\.', 'inc.conv2.'),
    (r'^encoder\.stem\.1\.0\.', 'down1.patch_merging.'),
    (r'^encoder\.stem\.1\.(\d+)\.', lambda m: f'down1.conv_blocks.{int(m[1]) - 1}.'),
    (r'^encoder\.bmha_stages\.(\d+)\.', lambda m: f'down{int(m[1]) + 2}.'),
    (r'^decoder\.bmha_stages\.(\d+)\.', lambda m: f'up{int(m[1]) + 1}.'),
    (r'^decoder\.conv_stages\.(\d+)\.blocks\.', lambda m: f'up{int(m[1]) + 3}.conv_blocks.'),
    (r'^decoder\.seg_layers\.0\.', 'outc.'),
    (r'^decoder\.seg_layers\.1\.', 'aux_out.'),
    (r'^map_fusion\.transformer\.layers\.(\d+)\.', r'map_fusion.fusion.layers.\1.'),
    (r'\.merge\.', '.patch_merging.'),
    (r'\.map_generation\.base\.', '.map_gen.base_proj.'),
    (r'\.map_generation\.weights\.', '.map_gen.semantic_proj.'),
    (r'\.blocks\.(\d+)\.attention\.', r'.trans_blocks.blocks.\1.attn.'),
    (r'\.blocks\.(\d+)\.(shortcut|feedforward)\.', r'.trans_blocks.blocks.\1.\2.'),
    (r'attn\.feat_proj\.0\.', 'attn.feat_qv.depthwise.'),
    (r'attn\.feat_proj\.1\.', 'attn.feat_qv.pointwise.'),
    (r'attn\.map_proj\.', 'attn.map_qv.'),
    (r'attn\.feat_out\.0\.', 'attn.feat_out.depthwise.'),
    (r'attn\.feat_out\.1\.', 'attn.feat_out.pointwise.'),
    (r'reduction\.0\.', 'reduction.depthwise.'),
    (r'reduction\.1\.', 'reduction.pointwise.'),
    (r'feedforward\.residual\.0\.2\.', 'feedforward.expand_proj.conv.'),
    (r'feedforward\.residual\.1\.2\.', 'feedforward.depthwise.conv.'),
    (r'feedforward\.residual\.2\.gate\.', 'feedforward.se.excitation.'),
    (r'feedforward\.residual\.3\.2\.', 'feedforward.pointwise.conv.'),
    (r'residual\.0\.2\.', 'conv1.conv.'),
    (r'residual\.1\.2\.', 'conv2.conv.'),
    (r'shortcut\.2\.', 'shortcut.conv.'),
    (r'\.norm1\.', '.0.norm.'),
    (r'\.self_attn\.in_proj_weight$', '.0.fn.to_qkv.weight'),
    (r'\.self_attn\.out_proj\.', '.0.fn.to_out.'),
    (r'\.norm2\.', '.1.norm.'),
    (r'\.linear1\.', '.1.fn.fc1.'),
    (r'\.linear2\.', '.1.fn.fc2.'),
]
# B-MHA tensors whose channels are grouped by head: which axis, and whether it is a query-value pair
HEAD_AXES = {'attention.feat_proj.1.weight': (0, True), 'attention.map_proj.weight': (0, True),
             'attention.feat_out.0.weight': (0, False), 'attention.feat_out.1.weight': (1, False),
             'attention.map_out.weight': (1, False)}
SMALL = replace(VARIANTS['bcv'], features_per_level=(8, 8, 32, 32, 32), transformer_blocks=(2, 1, 1), map_size=2,
                stem_blocks=1, head_dim=8, fusion_dim=16, fusion_heads=2, fusion_depth=1)


def to_authors_head_order(tensor, heads, axis):
    """Our channel ``h * head_dim + d`` -> the authors' ``d * heads + h``."""
    return tensor.unflatten(axis, (heads, -1)).transpose(axis, axis + 1).flatten(axis, axis + 1)


def authors_state_dict(network):
    """A state dict in the authors' layout for ``network``: their names, their head order, a zero value projection
    where ours has none, no fusion attention input bias (the same function where ``network``'s is zero)."""
    authors = {}
    for key, tensor in network.state_dict().items():
        if key.endswith('in_proj_bias'):
            continue
        name = key
        for pattern, replacement in AUTHORS_NAMES:
            name = re.sub(pattern, replacement, name)
        module, _, suffix = key.partition('.attention.')
        if suffix and f'attention.{suffix}' in HEAD_AXES:
            attention = network.get_submodule(f'{module}.attention')
            axis, query_value = HEAD_AXES[f'attention.{suffix}']
            if query_value:
                pair = len(tensor) == 2 * attention.heads * attention.head_dim  # else queries alone
                halves = tensor.chunk(2) if pair else [tensor, torch.zeros_like(tensor)]
                tensor = torch.cat([to_authors_head_order(half, attention.heads, axis) for half in halves])
            else:
                tensor = to_authors_head_order(tensor, attention.heads, axis)
        authors[name] = tensor.clone()
    return authors


def small_network():
    torch.manual_seed(0)
    network = utnetv2_from_plan(1, 3, BCV_STRIDES, BCV_KERNELS, SMALL)
    for layer in network.map_fusion.transformer.layers:
        torch.nn.init.zeros_(layer.self_attn.in_proj_bias)
    return network


def test_the_synthetic_authors_layout_has_the_authors_size():
    """What the converter tests below feed it matches the authors' state dict in entries and size."""
    for map_size, parameters in AUTHORS_PARAMETERS.items():
        with torch.device('meta'):
            network = utnetv2_from_plan(1, 14, BCV_STRIDES, BCV_KERNELS, replace(VARIANTS['bcv'], map_size=map_size))
        authors = authors_state_dict(network)
        assert len(authors) == AUTHORS_STATE_DICT_ENTRIES
        assert sum(t.numel() for t in authors.values()) == parameters
        converted = convert_authors_state_dict(authors, network)
        assert {k: tuple(t.shape) for k, t in converted.items()} == {
            k: tuple(t.shape) for k, t in network.state_dict().items()}


def test_converting_the_authors_layout_gives_back_our_state_dict():
    network = small_network()
    converted = convert_authors_state_dict(authors_state_dict(network), network)
    expected = network.state_dict()
    assert converted.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(converted[key], tensor, rtol=0, atol=0, msg=key)
    network.load_state_dict(converted, strict=True)


def test_an_authors_checkpoint_file_loads_through_the_weights_reader(tmp_path):
    """Their file as DDP saves it (``module.`` keys, here under ``state_dict``) loads strictly into a network of their
    setting; one of another setting is refused naming the file."""
    source = small_network()
    path = tmp_path / 'fold_0_best.pth'
    torch.save({'state_dict': {f'module.{key}': tensor for key, tensor in authors_state_dict(source).items()}}, path)
    torch.manual_seed(1)
    network = utnetv2_from_plan(1, 3, BCV_STRIDES, BCV_KERNELS, SMALL)
    load_authors_checkpoint(network, path)
    for key, tensor in source.state_dict().items():
        assert torch.equal(network.state_dict()[key], tensor), key
    wider = utnetv2_from_plan(1, 3, BCV_STRIDES, BCV_KERNELS, replace(SMALL, features_per_level=(8, 16, 32, 32, 32)))
    with pytest.raises(ValueError, match=f"{path} is not a checkpoint of this network's setting: .* does not fit"):
        load_authors_checkpoint(wider, path)


def test_every_authors_tensor_element_is_used_once():
    """Elements numbered 1..N in the authors' layout: each lands in our state dict at most once, and only the value
    projection our last decoder B-MHA block does without is left out."""
    network = small_network()
    authors, first = {}, 1
    for key, tensor in authors_state_dict(network).items():
        authors[key] = torch.arange(first, first + tensor.numel(), dtype=torch.float64).reshape(tensor.shape)
        first += tensor.numel()
    converted = convert_authors_state_dict(authors, network)
    used = torch.cat([t.flatten() for k, t in converted.items() if not k.endswith('in_proj_bias')])
    assert used.unique().numel() == used.numel()
    everything = torch.cat([t.flatten() for t in authors.values()])
    last_block = f'up{len(network.decoder.bmha_stages)}.trans_blocks.blocks.{SMALL.transformer_blocks[0] - 1}'
    left_out = everything[~torch.isin(everything, used)]
    torch.testing.assert_close(left_out, authors[f'{last_block}.attn.feat_qv.pointwise.weight'].chunk(2)[1].flatten())
    assert all(not t.any() for k, t in converted.items() if k.endswith('in_proj_bias'))


def authors_bmha(authors, prefix, feat, semantic_map, heads):
    """The authors' B-MHA written out head by head: head ``h`` owns channels ``h, h + heads, h + 2 heads, ...`` of
    every projection. ``(1, C, *S)`` and ``(1, C_map, *T)`` -> the feature output and (if the block has ``map_out``)
    the map output."""
    def separable(x, name):
        depthwise = authors[f'{prefix}.{name}.depthwise.weight']
        x = F.conv3d(x, depthwise, padding=[k // 2 for k in depthwise.shape[2:]], groups=x.shape[1])
        return F.conv3d(x, authors[f'{prefix}.{name}.pointwise.weight'])

    feat_q, feat_v = separable(feat, 'feat_qv').chunk(2, dim=1)
    map_q, map_v = F.conv3d(semantic_map, authors[f'{prefix}.map_qv.weight']).chunk(2, dim=1)
    head_dim = feat_q.shape[1] // heads
    feat_heads, map_heads = torch.zeros_like(feat_q), torch.zeros_like(map_q)
    for h in range(heads):
        channels = torch.arange(head_dim) * heads + h
        q_x, v_x = feat_q[0, channels].flatten(1).T, feat_v[0, channels].flatten(1).T  # N, head_dim
        q_m, v_m = map_q[0, channels].flatten(1).T, map_v[0, channels].flatten(1).T  # T, head_dim
        similarity = q_x @ q_m.T / math.sqrt(head_dim)  # N, T
        feat_heads[0, channels] = (similarity.softmax(dim=1) @ v_m).T.reshape(head_dim, *feat.shape[2:])
        map_heads[0, channels] = (similarity.softmax(dim=0).T @ v_x).T.reshape(head_dim, *semantic_map.shape[2:])
    map_out = authors.get(f'{prefix}.map_out.weight')
    return separable(feat_heads, 'feat_out'), None if map_out is None else F.conv3d(map_heads, map_out)


@pytest.mark.parametrize('block,authors_block,updates_map', [
    ('encoder.bmha_stages.1.blocks.0', 'down3.trans_blocks.blocks.0', True),
    ('decoder.bmha_stages.1.blocks.1', 'up2.trans_blocks.blocks.1', False),
], ids=['encoder', 'last-decoder-block'])
def test_head_order_against_the_authors_attention_head_by_head(block, authors_block, updates_map):
    """Random authors' weights, converted: our B-MHA computes what theirs computes head by head (in the last decoder
    block, which skips the map update, the feature output only). In float64: with weights of unit variance,
    float32 rounding exceeds the default tolerance."""
    network = small_network().double()
    authors = {key: torch.randn_like(tensor) for key, tensor in authors_state_dict(network).items()}
    network.load_state_dict(convert_authors_state_dict(authors, network), strict=True)
    attention = network.get_submodule(f'{block}.attention')
    assert attention.heads == 4
    feat = torch.randn(1, attention.feat_proj[0].in_channels, 2, 4, 6, dtype=torch.float64)
    semantic_map = torch.randn(1, attention.map_proj.in_channels, 2, 2, 2, dtype=torch.float64)
    expected_feat, expected_map = authors_bmha(authors, f'{authors_block}.attn', feat, semantic_map, attention.heads)
    with torch.no_grad():
        feat_out, map_out = attention(feat, semantic_map)
    torch.testing.assert_close(feat_out, expected_feat)
    if updates_map:
        torch.testing.assert_close(map_out, expected_map)
    else:
        assert map_out is None and expected_map is None


def test_a_checkpoint_without_the_auxiliary_head_keeps_ours():
    """The authors train some datasets without ``aux_loss``; their network then has no ``aux_out``."""
    network = small_network()
    authors = {k: v for k, v in authors_state_dict(network).items() if not k.startswith('aux_out.')}
    converted = convert_authors_state_dict(authors, network)
    for key in ('decoder.seg_layers.1.weight', 'decoder.seg_layers.1.bias'):
        torch.testing.assert_close(converted[key], network.state_dict()[key], rtol=0, atol=0)


def test_a_state_dict_of_another_setting_is_refused_naming_what_does_not_fit():
    network = small_network()
    authors = authors_state_dict(network)
    with pytest.raises(ValueError, match=r"1 not used \['extra.weight'\]"):
        convert_authors_state_dict({**authors, 'extra.weight': torch.zeros(1)}, network)
    with pytest.raises(ValueError, match=r"1 tensors missing \['outc.bias'\]"):
        convert_authors_state_dict({k: v for k, v in authors.items() if k != 'outc.bias'}, network)
    map_3 = authors_state_dict(utnetv2_from_plan(1, 3, BCV_STRIDES, BCV_KERNELS, replace(SMALL, map_size=3)))
    with pytest.raises(ValueError, match=r'down2\.map_gen\.semantic_proj\.weight of shape \(27, 32, 3, 3, 3\) '
                                         r'does not fit .*map_generation\.weights\.weight of shape \(8, 32, 3, 3, 3\)'):
        convert_authors_state_dict(map_3, network)
    four_levels = utnetv2_from_plan(1, 3, TINY_STRIDES, TINY_KERNELS, SMALL)
    with pytest.raises(ValueError, match='has 5 levels in 3d; this network has 4 levels in 3d'):
        convert_authors_state_dict(authors, four_levels)


# ---- the trainer, in-process on the tiny dataset's plan ----

def test_deep_supervision_scales_match_outputs_and_losses_weigh_equally(make_trainer):
    trainer = make_trainer(nnUNetTrainerUTNetV2)
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    np.testing.assert_allclose(scales, [[1, 1, 1], [1, 1, 1]])
    outputs = trainer.network(torch.randn(1, 1, *patch))
    assert [list(o.shape[2:]) for o in outputs] == [[round(p * s) for p, s in zip(patch, scale)] for scale in scales]
    assert trainer.loss.weight_factors == (0.5, 0.5)
    assert 'UTNetV2: 4 levels' in training_log(trainer.output_folder)


def test_every_parameter_gets_a_gradient_in_one_training_step(make_trainer):
    trainer = make_trainer(nnUNetTrainerUTNetV2)
    trainer.initialize()
    result = trainer.train_step(random_batch(trainer))
    assert np.isfinite(result['loss'])
    assert [name for name, p in trainer.network.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in trainer.network.parameters())


def test_optimiser_and_schedule(make_trainer):
    trainer = make_trainer(nnUNetTrainerUTNetV2)
    trainer.initialize()
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert (group['lr'], group['weight_decay'], group['eps']) == (6e-4, 0.05, 1e-5)
    trainer.lr_scheduler.step(500)
    assert group['lr'] == pytest.approx(6e-4 * 0.5 ** 0.9)


def test_strict_reload_with_deep_supervision_off(make_trainer):
    """What nnUNetv2_predict does: rebuild without deep supervision and load the training weights strictly."""
    trainer = make_trainer(nnUNetTrainerUTNetV2)
    trainer.initialize()
    trained = trainer.network.eval()
    rebuilt = nnUNetTrainerUTNetV2.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, trainer.label_manager.num_segmentation_heads,
        enable_deep_supervision=False).eval()
    rebuilt.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(1, 1, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained(x)[0])


def _three_level_plan(workspace) -> dict:
    architecture = json.loads((workspace.preprocessed / 'nnUNetPlans.json').read_text())[
        'configurations'][CONFIGURATION]['architecture']
    architecture['arch_kwargs'].update(strides=TINY_STRIDES[:3], kernel_sizes=TINY_KERNELS[:3], n_stages=3)
    return {'architecture': architecture}


@pytest.mark.parametrize('override,message', [
    (lambda _: {'patch_size': [14, 32, 30]}, r'axis 2 \(30\) must be divisible by 8.*such as \[14, 32, 32\]: '
                                              r'`nnunet-plugins plans DATASET --preset utnetv2-bcv --patch 14 32 32 '
                                              r'--spacing 3\.033 1\.18 1\.189`'),
    (lambda _: {'patch_size': [2, 8, 8]}, r'its bottleneck would be \[1, 1, 1\], a single voxel.*such as \[2, 16, 8\]'),
    (_three_level_plan, r'needs at least 4 resolution levels.*has 3.*--patch 28 64 64'),
], ids=['not-divisible', 'one-voxel-bottleneck', 'three-levels'])
def test_unusable_patch_or_plan_is_refused_before_training(make_trainer, workspace, override, message):
    trainer = make_trainer(nnUNetTrainerUTNetV2, override(workspace))
    with pytest.raises(ValueError, match=message):
        trainer.initialize()


# ---- as nnUNetv2_train and nnUNetv2_predict run it, in this process ----

def test_trains_on_the_datasets_batches_and_nnunets_predictor_segments_with_its_checkpoint(workspace, make_trainer):
    """As test_uxnet.py's test of the same name: built as nnUNetv2_train builds it, two steps on the tiny dataset's
    batches, its checkpoint segmenting a held-out case through nnU-Net's predictor."""
    fold = train_in_process(make_trainer(nnUNetTrainerUTNetV2))
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False, mmap=True)
    assert checkpoint['trainer_name'] == TRAINER and checkpoint['init_args']['configuration'] == CONFIGURATION
    assert 'UTNetV2: 4 levels' in training_log(fold)
    assert_segments_a_heldout_case(workspace.raw, fold.parent)
