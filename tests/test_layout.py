"""The memory layout on a CPU: every network family follows its input's device (channels-last where that was measured
faster on a CPU, PyTorch's default elsewhere), in training and in nnU-Net's prediction, and is as exact in
channels-last as in the default layout where it is used."""
import dataclasses

import numpy as np
import pytest
import torch

from nnunet_plugins.networks.layout import follow_device_layout, memory_layout
from nnunet_plugins.networks.mednext import ChannelNorm, mednext_from_plan
from nnunet_plugins.networks.swinunetr import VARIANTS as SWINUNETR_VARIANTS, swinunetr_from_plan
from nnunet_plugins.networks.utnetv2 import utnetv2_from_plan
from nnunet_plugins.networks.uxnet import uxnet_from_plan
from nnunet_plugins.registry import plugin_trainers
from nnunet_plugins.training.base import Role, nnUNetTrainerPlugin
from nnunet_plugins.training.mednext import nnUNetTrainerMedNeXtS

from helpers import TINY_KERNELS, TINY_STRIDES, read_labels, segment, train_in_process, trained_predictor

PATCH = (14, 32, 32)
SWINUNETR_PATCH = (16, 32, 64)  # a multiple of its 1x2x2 embedding times 16, bottleneck 1x1x2 (more than one voxel)
FAMILIES = {  # a network per family on the tiny plan, as its trainer lays it out on a CPU, and its input patch
    'MedNeXt-L': (lambda: mednext_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS, 'L', 3, deep_supervision=False), PATCH),
    'MedNeXt-S': (lambda: mednext_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS, 'S', 3, deep_supervision=False), PATCH),
    '3D UX-Net': (lambda: uxnet_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS), PATCH),
    'UTNetV2': (lambda: utnetv2_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS, deep_supervision=False), PATCH),
    # the paper's layers at a quarter of the widths, to keep the float64 reference run small
    'Swin UNETR': (lambda: swinunetr_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS, dataclasses.replace(
        SWINUNETR_VARIANTS['paper'], feature_size=12)), SWINUNETR_PATCH),
}


def ct_like(shape, seed: int = 0) -> torch.Tensor:
    """Input with a large mean against its spread, as CT intensities after nnU-Net's normalisation can have."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3 + 20


def test_channel_norm_is_exact_channels_last_where_pytorchs_group_norm_is_not():
    torch.manual_seed(0)
    norm = ChannelNorm(64)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = ct_like((1, 64, 16, 48, 48))
    exact = torch.nn.functional.group_norm(x.double(), 64, norm.weight.double(), norm.bias.double(), norm.eps)
    channels_last = x.contiguous(memory_format=torch.channels_last_3d)
    ours = norm(channels_last)
    assert ours.is_contiguous(memory_format=torch.channels_last_3d)
    error_default = (norm(x).double() - exact).abs().max().item()
    error_ours = (ours.double() - exact).abs().max().item()
    error_pytorch = (torch.nn.GroupNorm.forward(norm, channels_last).double() - exact).abs().max().item()
    print(f'max error vs float64: default layout {error_default:.2e}, channels-last {error_ours:.2e}, PyTorch\'s '
          f'channels-last GroupNorm {error_pytorch:.2e}')
    assert error_ours <= 2 * error_default
    assert error_pytorch > 50 * error_default  # what ChannelNorm avoids (measured: 7e-4 vs 1e-6)


@pytest.mark.parametrize('family', ['MedNeXt-L', 'MedNeXt-S'])
def test_the_families_laid_out_channels_last_are_as_exact_as_in_the_default_layout(family):
    """Forward and gradients in each layout against a float64 run of the same weights: channels-last no more
    than twice the default layout's error, for the families whose trainers run channels-last on a CPU. (The others
    keep the default layout: UTNetV2's gradients were 500 times less exact in channels-last on an AMD EPYC CPU.)"""
    torch.manual_seed(0)
    build, patch = FAMILIES[family]
    network = build()
    exact_network = build().double()
    exact_network.load_state_dict(network.state_dict())
    x = ct_like((1, 1, *patch))
    exact_output = exact_network(x.double())
    exact_output.square().mean().backward()
    exact_gradients = [p.grad for p in exact_network.parameters()]
    errors = {}
    for layout in ('contiguous', 'channels-last'):
        network.zero_grad()
        follow_device_layout(network, layout)
        output = network(x)
        output.square().mean().backward()
        pairs = [(p.grad, g) for p, g in zip(network.parameters(), exact_gradients)]
        assert all((a is None) == (b is None) for a, b in pairs)  # the deep-supervision heads get none
        # relative to the network's largest gradient: a tensor whose exact gradient is zero (a bias before a
        # normalisation) holds rounding noise only, which a per-tensor ratio would blow up to any size
        scale = max(b.abs().max().item() for _, b in pairs if b is not None)
        gradient_error = max((a.double() - b).abs().max().item() for a, b in pairs if b is not None) / scale
        errors[layout] = ((output.double() - exact_output).abs().max().item(), gradient_error)
        assert torch.equal(output.argmax(1), exact_output.argmax(1)), layout
    print(family, {k: f'output {v[0]:.1e}, gradient {v[1]:.1e}' for k, v in errors.items()})
    assert errors['channels-last'][0] <= 2 * errors['contiguous'][0]
    assert errors['channels-last'][1] <= 2 * errors['contiguous'][1]


def test_a_network_follows_its_inputs_device_and_the_layout_asked_for():
    network = follow_device_layout(mednext_from_plan(1, 4, TINY_STRIDES, TINY_KERNELS, 'S', 3), 'channels-last')
    assert memory_layout(network) == 'contiguous'  # nothing is converted before the first forward
    network(torch.randn(1, 1, *PATCH))
    assert memory_layout(network) == 'channels-last'
    network.cpu_layout = 'contiguous'
    network(torch.randn(1, 1, *PATCH))
    assert memory_layout(network) == 'contiguous'


def test_every_trainer_builds_its_3d_network_to_follow_the_device(make_trainer):
    for trainer_class in plugin_trainers(Role.SUPERVISED, Role.UPKERN, Role.FINETUNE):
        if not issubclass(trainer_class, nnUNetTrainerPlugin):
            continue  # nnUNetTrainer_Finetune: nnU-Net's network, nnU-Net's layout
        trainer = make_trainer(trainer_class, {'patch_size': list(SWINUNETR_PATCH)})  # one patch every family takes
        network = trainer_class.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 4,
                                                           enable_deep_supervision=False)
        # channels-last only where it was measured faster (docs/benchmarks.md): MedNeXt's depthwise convolutions
        expected = 'channels-last' if trainer_class.__name__.startswith('nnUNetTrainerMedNeXt') else 'contiguous'
        assert network.cpu_layout == trainer_class.cpu_layout == expected, trainer_class.__name__


def test_nnunets_predictor_runs_channels_last_and_segments_as_the_default_layout(workspace, make_trainer):
    """nnUNetPredictor (what nnUNetv2_predict runs) on a MedNeXt-S checkpoint (two steps, saved in-process):
    channels-last without being asked, and the same segmentation of every held-out case as in PyTorch's default
    layout."""
    fold = train_in_process(make_trainer(nnUNetTrainerMedNeXtS))
    predictor = trained_predictor(fold.parent)
    images = sorted((workspace.raw / 'imagesTs').glob('*.nii.gz'))
    segmentations = {}
    for layout in ('contiguous', 'channels-last'):
        predictor.network.cpu_layout = layout
        segmentations[layout] = segment(predictor, images)
        assert memory_layout(predictor.network) == layout
    assert len(segmentations['contiguous']) == len(images)
    for contiguous, channels_last, image in zip(segmentations['contiguous'], segmentations['channels-last'], images):
        np.testing.assert_array_equal(channels_last, contiguous)
        assert channels_last.shape == read_labels(image).shape
