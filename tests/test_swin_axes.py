"""The Swin UNETR authors' encoder in nnU-Net's axis order (nnunet_plugins.weights.swin_axes): each converted tensor
for every permutation of the axes, then the whole encoder read from a file in the authors' layout, which on the
(z, y, x) image gives the original's features on the (x, y, z) image at every stage; the reports say what is not
converted."""
import dataclasses
import itertools

import pytest
import torch
from monai.networks.nets.swin_unetr import PatchMerging
from torch.nn import functional

from nnunet_plugins.networks.swinunetr import load_pretrained_encoder, swinunetr_from_plan
from nnunet_plugins.weights import CheckpointError, adapt_checkpoint, read_network_weights
from nnunet_plugins.weights.files import ENCODER_PREFIX, swin_authors_name_to_ours
from nnunet_plugins.weights.swin_axes import (
    AXES_NOTE, AXES_ORDER, merging_chunk_order, permute_bias_table, permute_kernel, permute_merging)
from nnunet_plugins.weights.transfer import transfer_weights

from helpers import ISOTROPIC_KERNELS, ISOTROPIC_STRIDES, SMALL

ORDERS = list(itertools.permutations(range(3)))
# window 3 keeps the image small while every stage's token grid (24 x 32 x 40 down to 3 x 4 x 5) is at least the
# window along every axis, so MONAI shrinks none; the stages pad to the window, the last one shifts along y and x
# only (its x grid is the window) and patch merging pads 5 and 3
WINDOWED = dataclasses.replace(SMALL, window_size=3)
XYZ = (1, 1, 48, 64, 80)  # the authors' (x, y, z) image: every axis of another length, so a mix-up cannot match


def image_axes(tensor: torch.Tensor, order: tuple[int, ...] = AXES_ORDER) -> torch.Tensor:
    """``(B, C, a0, a1, a2)`` with its spatial axes permuted: axis k of the result is axis ``order[k]``."""
    return tensor.permute(0, 1, *(2 + axis for axis in order))


def authors_file(encoder: torch.nn.Module) -> dict:
    """A MONAI SwinTransformer's tensors in the layout of the authors' released file (as helpers.released_format)."""
    return {'state_dict': {'module.' + name.replace('.mlp.linear1.', '.mlp.fc1.').replace('.mlp.linear2.', '.mlp.fc2.'):
                           tensor for name, tensor in encoder.state_dict().items()}}


# ---- each converted tensor, for every order of the axes ----

@pytest.mark.parametrize('order', ORDERS)
def test_the_patch_embedding_kernel_convolves_the_permuted_image_alike(order):
    torch.manual_seed(0)
    image, kernel = torch.randn(1, 2, 6, 8, 10), torch.randn(4, 2, 2, 3, 1)
    expected = image_axes(functional.conv3d(image, kernel), order)
    torch.testing.assert_close(functional.conv3d(image_axes(image, order), permute_kernel(kernel, order)), expected)


@pytest.mark.parametrize('order', ORDERS)
def test_the_bias_table_gives_each_pair_of_tokens_its_bias_in_the_permuted_window(order):
    """MONAI's index for the paper's 7 x 7 x 7 window: the permuted table's bias matrix is the original's with the
    window's tokens taken in the permuted array's order."""
    from monai.networks.nets.swin_unetr import WindowAttention
    attention = WindowAttention(dim=6, num_heads=3, window_size=(7, 7, 7))
    table, index = torch.randn_like(attention.relative_position_bias_table), attention.relative_position_index
    tokens = torch.arange(7 ** 3).reshape(7, 7, 7).permute(order).reshape(-1)  # the original's token at each place
    original = table[index.reshape(-1)].reshape(7 ** 3, 7 ** 3, 3)
    permuted = permute_bias_table(table, order)[index.reshape(-1)].reshape(7 ** 3, 7 ** 3, 3)
    assert torch.equal(permuted, original[tokens][:, tokens])


def test_a_table_of_unequal_window_sides_is_refused():
    with pytest.raises(ValueError, match=r'table of 105 rows is not that of a window of the same size'):
        permute_bias_table(torch.zeros(3 * 5 * 7, 2))


@pytest.mark.parametrize('order', ORDERS)
def test_patch_merging_merges_the_permuted_tokens_alike(order):
    torch.manual_seed(0)
    original, permuted = PatchMerging(dim=4), PatchMerging(dim=4)
    for module in (original.norm, original.reduction):
        for tensor in module.parameters():
            torch.nn.init.normal_(tensor)
    permuted.norm.weight.data = permute_merging(original.norm.weight.data, 0, order)
    permuted.norm.bias.data = permute_merging(original.norm.bias.data, 0, order)
    permuted.reduction.weight.data = permute_merging(original.reduction.weight.data, 1, order)
    tokens = torch.randn(1, 4, 6, 8, 4)  # MONAI's (B, d, h, w, C)
    expected = original(tokens).permute(0, *(1 + axis for axis in order), 4)
    torch.testing.assert_close(permuted(tokens.permute(0, *(1 + axis for axis in order), 4)), expected)


def test_merging_chunks_for_nnunets_order():
    # MONAI's chunks hold the offsets 000, 100, 010, 001, 110, 101, 011, 111 along the array's axes; read backwards,
    # 100 is the original's 001 (chunk 3), 110 its 011 (chunk 6)
    assert merging_chunk_order((2, 1, 0)) == [0, 3, 2, 1, 6, 5, 4, 7]
    assert merging_chunk_order((0, 1, 2)) == list(range(8))


# ---- the encoder read from the authors' layout ----

def encoder_features(network: torch.nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return network.encoder(image, normalize=True)


def windowed_network() -> torch.nn.Module:
    return swinunetr_from_plan(1, 2, ISOTROPIC_STRIDES, ISOTROPIC_KERNELS, WINDOWED).eval()


@pytest.fixture(scope='module')
def authors() -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    """The authors' network (ours, which is MONAI's encoder), its bias tables drawn at the scale of the other weights
    (MONAI initialises them at std 0.02, which would hide a table in the wrong order); an (x, y, z) image; the
    network's features on it at each of the five stages, their axes permuted to (z, y, x)."""
    torch.manual_seed(0)
    original = windowed_network()
    for name, tensor in original.encoder.named_parameters():
        if name.endswith('relative_position_bias_table'):
            torch.nn.init.normal_(tensor)
    xyz = torch.randn(XYZ)
    assert original.windows(XYZ[2:])[-1] == ((3, 3, 3), (0, 1, 1))
    return original, xyz, [image_axes(features) for features in encoder_features(original, xyz)]


def test_the_authors_encoder_read_from_its_file_gives_the_originals_features_on_the_zyx_image(tmp_path, authors):
    original, xyz, expected = authors
    path = tmp_path / 'model_swinvit.pt'
    torch.save(authors_file(original.encoder), path)
    converted = windowed_network()
    report = adapt_checkpoint(converted, path, 1)
    assert report.fresh == [] and report.notes == [AXES_NOTE]
    zyx_features = encoder_features(converted, image_axes(xyz))
    assert [tuple(f.shape[2:]) for f in zyx_features] == [(40, 32, 24), (20, 16, 12), (10, 8, 6), (5, 4, 3), (3, 2, 2)]
    for stage, (features, wanted) in enumerate(zip(zyx_features, expected)):
        torch.testing.assert_close(features, wanted, atol=1e-5, rtol=1e-5, msg=lambda m: f'stage {stage}: {m}')
    # the same tensors copied as they are (the load before the conversion) give other features from the first stage
    released = torch.load(path, weights_only=True)['state_dict']
    transfer_weights(converted, {ENCODER_PREFIX + swin_authors_name_to_ours(name): tensor
                                 for name, tensor in released.items()}, 1)
    unconverted = encoder_features(converted, image_axes(xyz))
    assert all((features - wanted).abs().max() > 0.1 for features, wanted in zip(unconverted, expected))


@pytest.mark.parametrize('left_out', ['permute_kernel', 'permute_bias_table', 'permute_merging'])
def test_each_conversion_is_needed(monkeypatch, authors, left_out):
    """Leaving any one of the three out breaks the equality at the last stage (the test above can fail)."""
    original, xyz, expected = authors
    monkeypatch.setattr(f'nnunet_plugins.weights.swin_axes.{left_out}', lambda tensor, *_: tensor)
    converted = windowed_network()
    transfer_weights(converted, read_network_weights(authors_file(original.encoder)).state_dict, 1)
    assert (encoder_features(converted, image_axes(xyz))[-1] - expected[-1]).abs().max() > 0.1


def test_where_monai_shrinks_a_window_the_features_differ_from_that_stage_on(authors):
    """What the note and the README say: on a (16, 32, 48) image the third Swin stage (token grid 2 x 4 x 6) gets
    windows of 2 x 3 x 3, the fourth 1 x 2 x 3, and MONAI's bias lookup for a shrunk window does not follow the axes."""
    original, _, _ = authors
    converted = windowed_network()
    transfer_weights(converted, read_network_weights(authors_file(original.encoder)).state_dict, 1)
    xyz = torch.randn(1, 1, 16, 32, 48)
    assert [window for window, _ in original.windows(xyz.shape[2:])] == [(3, 3, 3), (3, 3, 3), (2, 3, 3), (1, 2, 3)]
    expected = [image_axes(features) for features in encoder_features(original, xyz)]
    differences = [(features - wanted).abs().max() for features, wanted in
                   zip(encoder_features(converted, image_axes(xyz)), expected)]
    assert all(difference < 1e-5 for difference in differences[:3]) and all(d > 0.1 for d in differences[3:])


def test_the_conversion_is_stated_in_one_line_with_what_it_leaves(tmp_path):
    path = tmp_path / 'model_swinvit.pt'
    torch.save(authors_file(windowed_network().encoder), path)
    assert '\n' not in AXES_NOTE
    for words in ('(x, y, z)', "nnU-Net's (z, y, x)", 'not converted: their intensities', '[0, 1]', 'RAS'):
        assert words in AXES_NOTE
    assert read_network_weights(path).notes == (AXES_NOTE,)
    converted = windowed_network()
    assert AXES_NOTE in adapt_checkpoint(converted, path, 1).lines()  # what adapt-weights prints
    assert load_pretrained_encoder(converted, path).summary().splitlines()[1] == AXES_NOTE  # what a trainer logs
    # a network's own checkpoint is not in the authors' order: nothing converted, nothing said
    torch.save({'state_dict': converted.state_dict()}, path)
    assert read_network_weights(path).notes == ()


def test_a_file_in_the_authors_layout_with_other_shapes_is_refused_naming_the_tensor():
    flat = {'state_dict': {'module.patch_embed.proj.weight': torch.zeros(12, 1, 2, 2)}}
    with pytest.raises(CheckpointError, match=r"has the keys of the Swin UNETR authors' encoder but not its shapes: "
                                              r'module\.patch_embed\.proj\.weight: .* \(12, 1, 2, 2\) is not'):
        read_network_weights(flat)
