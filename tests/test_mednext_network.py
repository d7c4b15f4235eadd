"""The MedNeXt network: the paper's network on isotropic plans, nnU-Net's topology on the others."""
import pytest
import torch
from monai.networks.nets.mednext import create_mednext
from torch import nn

from nnunet_plugins.networks import mednext as mednext_module
from nnunet_plugins.networks.mednext import MedNeXt, mednext_from_plan, mednext_levels
from nnunet_plugins.networks.topology import ShallowPlanError

from helpers import (ANISOTROPIC_KERNELS, ANISOTROPIC_STRIDES, ISOTROPIC_KERNELS, ISOTROPIC_STRIDES, PLANS_2D_KERNELS,
                     PLANS_2D_STRIDES, parameter_count)

# nnU-Net's plan for the synthetic CT-like data: in-plane pooling first, kernel 1 along z at full resolution

# authors' implementation, 1 input channel, 14 classes, all heads; it also counts one dummy scalar
REFERENCE_PARAMETERS = {
    ('S', 3): 5_564_807, ('S', 5): 5_994_439, ('B', 3): 10_540_199, ('B', 5): 10_969_831,
    ('M', 3): 17_562_855, ('M', 5): 18_274_727, ('L', 3): 61_793_159, ('L', 5): 63_006_791,
}


@pytest.mark.parametrize('variant,kernel', sorted(REFERENCE_PARAMETERS))
def test_parameter_count_equals_reference(variant, kernel):
    network = mednext_from_plan(1, 14, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, variant, kernel)
    assert parameter_count(network) == REFERENCE_PARAMETERS[variant, kernel] - 1


def test_each_extra_input_channel_adds_32_parameters():
    one = mednext_from_plan(1, 14, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, 'S', 3)
    four = mednext_from_plan(4, 14, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, 'S', 3)
    assert parameter_count(four) - parameter_count(one) == 3 * 32


def _copy_monai_weights(monai_net: nn.Module, ours: MedNeXt) -> None:
    """Load MONAI's MedNeXt (a port of the authors' code) weights into ours, module by module."""
    def block(src, dst):
        pairs = [('conv1', 'depthwise'), ('norm', 'norm'), ('conv2', 'expand'), ('conv3', 'project')]
        if hasattr(dst, 'shortcut'):
            pairs.append(('res_conv', 'shortcut'))
        for s, d in pairs:
            getattr(dst, d).load_state_dict(getattr(src, s).state_dict())

    def blocks(src_seq, dst_seq):
        assert len(src_seq) == len(dst_seq)
        for s, d in zip(src_seq, dst_seq):
            block(s, d)

    def head(src, dst):  # MONAI (like the reference) uses a 1x1 transposed conv, we use a 1x1 conv
        dst.weight.data.copy_(src.conv_out.weight.data.transpose(0, 1))
        dst.bias.data.copy_(src.conv_out.bias.data)

    ours.encoder.stem.load_state_dict(monai_net.stem.state_dict())
    stages = ours.encoder.stages
    for level in range(4):
        blocks(monai_net.enc_stages[level], stages[level] if level == 0 else stages[level][1:])
        block(monai_net.down_blocks[level], stages[level + 1][0])
    blocks(monai_net.bottleneck, stages[4][1:])
    for i, level in enumerate(reversed(range(4))):
        block(monai_net.up_blocks[i], ours.decoder.upsamplers[level])
        blocks(monai_net.dec_stages[i], ours.decoder.stages[level])
        head(monai_net.out_blocks[i], ours.decoder.seg_layers[4 - i])
    head(monai_net.out_0, ours.decoder.seg_layers[0])


@pytest.mark.parametrize('kernel', [3, 5])
def test_layer_for_layer_equal_to_monai_port_of_reference(kernel):
    """Same weights, same outputs. Only S can be compared: for B, M and L MONAI's down blocks take the expansion
    ratio of the level they leave, the authors' code that of the level they enter (so MONAI's B has 15,456
    parameters fewer than the reference counts, which ours match)."""
    torch.manual_seed(0)
    variant = 'S'
    reference = create_mednext(variant, spatial_dims=3, in_channels=1, out_channels=3, kernel_size=kernel,
                               deep_supervision=True).train()
    ours = mednext_from_plan(1, 3, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, variant, kernel, gradient_checkpointing=False)
    assert parameter_count(ours) == parameter_count(reference)
    _copy_monai_weights(reference, ours)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert len(got) == len(expected) == 5
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('strides,kernels,patch,dims', [
    (ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, (32, 32, 32), 3),
    (ANISOTROPIC_STRIDES, ANISOTROPIC_KERNELS, (16, 48, 32), 3),
    (PLANS_2D_STRIDES, PLANS_2D_KERNELS, (64, 48), 2),
], ids=['isotropic', 'anisotropic', '2d'])
def test_outputs_follow_the_plan(strides, kernels, patch, dims):
    network = mednext_from_plan(2, 4, strides, kernels, 'S', 5)
    outputs = network(torch.randn(2, 2, *patch))
    assert len(outputs) == 5  # four downsamplings, as in the paper, whatever the plan's depth
    scale = torch.ones(dims)
    for level, output in enumerate(outputs):
        scale = scale * torch.tensor(strides[level], dtype=torch.float)
        assert output.shape == (2, 4, *[int(p / s) for p, s in zip(patch, scale)])
    # kernel anisotropy: nnU-Net kernel 1 stays 1, 3 becomes the MedNeXt kernel
    first_depthwise = network.encoder.stages[0][0].depthwise
    assert list(first_depthwise.kernel_size) == [1 if k == 1 else 5 for k in kernels[0]]
    assert network.decoder.upsamplers[0].depthwise.stride == tuple(strides[1])
    assert isinstance(first_depthwise, nn.Conv2d if dims == 2 else nn.Conv3d)


def test_shallow_plan_uses_all_its_levels():
    network = mednext_from_plan(1, 3, [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], 'B')
    outputs = network(torch.randn(1, 1, 8, 16, 16))
    assert [tuple(o.shape[2:]) for o in outputs] == [(8, 16, 16), (8, 8, 8), (4, 4, 4)]
    assert [m.out_channels for m in network.decoder.seg_layers] == [3, 3, 3]


SHALLOW_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
SHALLOW_KERNELS = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]


@pytest.mark.parametrize('strides,kernels,expected', [
    (ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, ISOTROPIC_STRIDES[:5]),
    (ANISOTROPIC_STRIDES, ANISOTROPIC_KERNELS, ANISOTROPIC_STRIDES[:5]),
    (PLANS_2D_STRIDES, PLANS_2D_KERNELS, PLANS_2D_STRIDES[:5]),
    (SHALLOW_STRIDES, SHALLOW_KERNELS, SHALLOW_STRIDES),
], ids=['isotropic', 'anisotropic', '2d', 'shallow'])
def test_levels_are_those_the_factory_builds(strides, kernels, expected):
    """mednext_levels, which the trainer's patch check and deep-supervision scales read, states the built topology."""
    levels = mednext_levels(strides, kernels)
    with torch.device('meta'):
        network = mednext_from_plan(1, 2, strides, kernels, 'S', 5)
    assert [list(s) for s in levels.strides] == expected
    assert list(levels.strides) == network.strides
    assert [tuple(k) for k in levels.kernels(5)] == network.kernel_sizes


def test_a_plan_without_downsampling_is_too_shallow():
    with pytest.raises(ShallowPlanError, match=r'at least two resolution levels.*has 1 \(strides \[\[1, 1, 1\]\]\)'):
        mednext_from_plan(1, 2, [[1, 1, 1]], [[3, 3, 3]])


def test_without_deep_supervision_same_parameters_and_one_output():
    with_ds = mednext_from_plan(1, 3, ANISOTROPIC_STRIDES, ANISOTROPIC_KERNELS, 'S', 3, deep_supervision=True)
    without = mednext_from_plan(1, 3, ANISOTROPIC_STRIDES, ANISOTROPIC_KERNELS, 'S', 3, deep_supervision=False)
    without.load_state_dict(with_ds.state_dict(), strict=True)
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        single = without(x)
        assert torch.equal(single, with_ds(x)[0])
    assert single.shape == (1, 3, 16, 32, 32)


@pytest.mark.parametrize('variant', ['S', 'M'])
def test_gradient_checkpointing_changes_nothing_but_memory(variant):
    torch.manual_seed(0)
    plain = mednext_from_plan(1, 3, ANISOTROPIC_STRIDES, ANISOTROPIC_KERNELS, variant, 3, gradient_checkpointing=False)
    checkpointed = mednext_from_plan(1, 3, ANISOTROPIC_STRIDES, ANISOTROPIC_KERNELS, variant, 3,
                                     gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 16, 32, 32)
    results = []
    for network in (plain, checkpointed):
        outputs = network(x)
        sum(o.square().mean() for o in outputs).backward()
        results.append(([o.detach() for o in outputs], [p.grad for p in network.parameters()]))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def test_checkpointing_switched_after_construction_reaches_every_block(monkeypatch):
    network = mednext_from_plan(1, 3, ANISOTROPIC_STRIDES, ANISOTROPIC_KERNELS, 'S', 3)
    network.gradient_checkpointing = True
    assert network.encoder.gradient_checkpointing and network.decoder.gradient_checkpointing
    calls = []
    real = mednext_module.checkpoint
    monkeypatch.setattr(mednext_module, 'checkpoint', lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    sum(o.mean() for o in network(torch.randn(1, 1, 16, 32, 32))).backward()
    blocks = sum(len(stage) for stage in network.encoder.stages) + sum(len(stage) for stage in network.decoder.stages)
    assert len(calls) == blocks + len(network.decoder.upsamplers)
    network.gradient_checkpointing = False
    calls.clear()
    network(torch.randn(1, 1, 16, 32, 32))
    assert calls == []


def test_variant_default_checkpointing():
    assert not mednext_from_plan(1, 2, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, 'S', 3).gradient_checkpointing
    assert mednext_from_plan(1, 2, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, 'L', 3).gradient_checkpointing


@pytest.mark.parametrize('strides,kernels,message', [
    ([[2, 2, 2], [2, 2, 2]], [[3, 3, 3], [3, 3, 3]], 'first level cannot be strided'),
    ([[1, 1, 1], [2, 2, 2]], [[4, 4, 4], [4, 4, 4]], 'odd'),
    ([[1, 1, 1]], [[3, 3, 3]], 'at least two'),
])
def test_invalid_topology_is_refused(strides, kernels, message):
    with pytest.raises(ValueError, match=message):
        n = len(strides)
        MedNeXt(1, 2, nn.Conv3d, [32 * 2 ** i for i in range(n)], strides, kernels, [2] * n, [2] * (n - 1),
                [1] * n, [1] * (n - 1))


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match='unknown MedNeXt variant'):
        mednext_from_plan(1, 2, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, 'XL', 3)
