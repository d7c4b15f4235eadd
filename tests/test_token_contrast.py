"""Paper 004's token-level pre-training pieces: views, rotate-and-restore, eq. 2 and 3, heads, collapse monitor."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_plugins.pretraining.token_heads import EmaTarget, TokenHead
from nnunet_plugins.pretraining.token_losses import byol_token_loss, collapse_monitor, token_contrastive_loss
from nnunet_plugins.pretraining.token_views import (
    TextureSettings, allowed_transforms, apply_each, block_size, input_mask_block, make_views, mask_grid, mask_patches,
    restore_each, texture)

# (patch, token grid): cubic, anisotropic (square in y-x), non-square in y-x, 2d square and non-square, and a
# square token grid on a patch that is not square in y-x
GRIDS = {
    '3d cubic': ((8, 8, 8), (4, 4, 4)),
    '3d anisotropic': ((4, 16, 16), (2, 4, 4)),
    '3d non-square': ((4, 6, 12), (2, 3, 4)),
    '2d square': ((8, 8), (4, 4)),
    '2d non-square': ((6, 10), (3, 5)),
    'non-square patch': ((4, 8, 12), (2, 4, 4)),
}
ALLOWED_COUNT = {'3d cubic': 16, '3d anisotropic': 16, '3d non-square': 8, '2d square': 8, '2d non-square': 4,
                 'non-square patch': 8}


def index_grid(shape: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    """``(batch, 1, *shape)``: every cell holds its own flat index."""
    return torch.arange(math.prod(shape)).reshape(1, 1, *shape).repeat(batch, 1, *[1] * len(shape))


@pytest.mark.parametrize('name', GRIDS)
def test_restore_inverts_every_allowed_transform_on_tokens_and_on_the_blocks_they_cover(name):
    patch, grid = GRIDS[name]
    allowed = allowed_transforms(patch, grid)
    assert len(set(allowed)) == ALLOWED_COUNT[name]
    tokens = index_grid(grid, batch=len(allowed))
    assert torch.equal(restore_each(apply_each(tokens, allowed), allowed), tokens)
    assert len({tuple(t.apply(tokens[0]).flatten().tolist()) for t in allowed}) == len(allowed)  # all different
    # an "encoder" that gives every block of the patch its token's index: the transformed view's tokens, once
    # restored, are the original tokens, so token m of both views covers the same block of the patch
    block = [p // g for p, g in zip(patch, grid)]
    voxels = tokens.float()
    for axis, size in enumerate(block):
        voxels = voxels.repeat_interleave(size, dim=axis + 2)
    pool = F.max_pool3d if len(grid) == 3 else F.max_pool2d
    encoded = pool(apply_each(voxels, allowed), kernel_size=block)
    assert torch.equal(restore_each(encoded, allowed).long(), tokens)


@pytest.mark.parametrize('name', ['3d non-square', '2d non-square', 'non-square patch'])
def test_on_non_square_grids_only_transforms_that_keep_the_grid_are_allowed(name):
    patch, grid = GRIDS[name]
    allowed = allowed_transforms(patch, grid)
    assert {t.quarter_turns for t in allowed} == {0, 2}
    for t in allowed:
        assert t.apply(torch.zeros(1, *grid)).shape == (1, *grid)
        assert t.apply(torch.zeros(1, *patch)).shape == (1, *patch)
    assert 'rot180+flip y' in [str(t) for t in allowed]


def test_a_token_grid_that_does_not_divide_the_patch_is_refused():
    with pytest.raises(ValueError, match=r'token grid of \[3, 3\] does not divide the patch \[8, 8\]'):
        allowed_transforms((8, 8), (3, 3))


@pytest.mark.parametrize('patch, block, grid', [
    ((64, 128, 128), (4, 8, 8), (16, 16, 16)),  # the authors' patch and block
    ((80, 160, 160), (5, 10, 10), (16, 16, 16)),
    ((8, 16, 16), (1, 1, 1), (8, 16, 16)),  # under 16 voxels: blocks of 1 voxel
    ((56, 40), (3, 2), (19, 20)),  # 56 = 18 x 3 + 2: a shorter last block
])
def test_input_masking_blocks_are_patch_over_16_per_axis(patch, block, grid):
    assert input_mask_block(patch) == block and mask_grid(patch, block) == grid


def voxel_mask(mask: torch.Tensor, block: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """``(B, *grid)`` block mask -> ``(B, *patch)``: a voxel is masked when the block holding it (index // block) is."""
    index = torch.meshgrid(*[torch.arange(size) // b for size, b in zip(patch, block)], indexing='ij')
    return mask[(slice(None), *index)]


def test_views_mask_the_drawn_share_of_input_blocks_with_noise_and_transform_the_other_view():
    rng = np.random.default_rng(0)
    patch, grid = (16, 32, 64), (2, 4, 8)  # token grid of a stride-8 encoder
    block = input_mask_block(patch)
    assert block == (1, 2, 4)
    batch = torch.randn(3, 2, *patch) + 5  # no voxel is near 0 before masking
    allowed = allowed_transforms(patch, grid)
    views = make_views(batch, block, allowed, rng, settings=TextureSettings(probability=0))  # noise fill, std 0.1
    assert views.mask.shape == (3, 16, 16, 16)
    assert views.mask.flatten(1).sum(1).tolist() == [round(0.75 * 16 ** 3)] * 3
    masked = voxel_mask(views.mask, block, patch)[:, None].expand_as(batch)
    assert masked.float().mean() == pytest.approx(0.75)
    assert torch.equal(views.masked[~masked], batch[~masked])
    noise = views.masked[masked]
    assert abs(float(noise.mean())) < 0.01 and float(noise.std()) == pytest.approx(0.1, rel=0.02)
    assert not torch.equal(views.masked[:, 0][masked[:, 0]], views.masked[:, 1][masked[:, 1]])  # per channel
    # every token of the encoder still sees some of its region here: its 8 x 8 x 8 voxels hold 64 blocks
    per_token = F.avg_pool3d((~masked[:, :1]).float(), kernel_size=block_size(patch, grid))
    assert per_token.min() > 0
    assert all(t in allowed for t in views.transforms)
    assert torch.equal(restore_each(views.transformed, views.transforms), batch)


def test_a_shorter_last_block_is_masked_within_the_patch():
    patch, block = (56, 40), (3, 2)
    masked, mask = mask_patches(torch.full((2, 1, *patch), 5.0), block, 0.5, np.random.default_rng(1))
    assert mask.shape == (2, 19, 20) and mask.flatten(1).sum(1).tolist() == [190, 190]
    assert torch.equal(masked[:, 0] == 0, voxel_mask(mask, block, patch))


def test_token_granularity_masks_whole_token_regions_with_zero():
    rng = np.random.default_rng(0)
    patch, grid = GRIDS['3d anisotropic']
    batch = torch.randn(3, 2, *patch) + 5
    views = make_views(batch, block_size(patch, grid), allowed_transforms(patch, grid), rng,
                       settings=TextureSettings(probability=0), mask_noise_std=0)
    assert views.mask.shape == (3, *grid)
    assert views.mask.flatten(1).sum(1).tolist() == [round(0.75 * 32)] * 3
    masked = voxel_mask(views.mask, (2, 4, 4), patch)[:, None].expand_as(batch)
    assert torch.all(views.masked[masked] == 0)
    assert torch.equal(views.masked[~masked], batch[~masked])


@pytest.mark.parametrize('ratio', [0.85, 0.9, 1.0, -0.1])
def test_mask_ratio_of_85_percent_or_more_is_refused_with_the_papers_reason(ratio):
    with pytest.raises(ValueError, match=r'mask_ratio .* no visual information'):
        mask_patches(torch.ones(1, 1, 4, 4), (2, 2), ratio, np.random.default_rng(0))


def test_mask_ratio_zero_masks_nothing():
    masked, mask = mask_patches(torch.ones(2, 1, 4, 4), (2, 2), 0, np.random.default_rng(0))
    assert not mask.any() and torch.equal(masked, torch.ones(2, 1, 4, 4))


@pytest.mark.parametrize('shape', [(2, 1, 8, 8), (2, 1, 4, 8, 8)])
def test_texture_transforms_change_intensities_only_when_drawn(shape):
    batch = torch.randn(shape)
    assert torch.equal(texture(batch, TextureSettings(probability=0), np.random.default_rng(0)), batch)
    textured = texture(batch, TextureSettings(probability=1), np.random.default_rng(0))
    assert textured.shape == batch.shape and textured.dtype == batch.dtype and type(textured) is torch.Tensor
    assert not torch.allclose(textured, batch)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def loop_eq3(z: torch.Tensor, z_hat: torch.Tensor, w: float, t: float = 0.5) -> float:
    """Paper 004's eq. 3 written out from the paper, term by term in plain Python, averaged over every token of both
    views as the anchor ``z_m^i`` (its positive ``z_hat_m^i``, the other view's token m of volume i):

    ``-s(z_m^i, z_hat_m^i)/t + log(sum_{z not in z_m, z != z_m^i} exp(s(z_m^i, z)/t) + w sum_{j != i} exp(s(z_m^i,
    z_m^j)/t))``, ``z`` running over every token of both views, ``z_m`` the tokens m of the other volumes in the
    anchor's view: those are in the second sum only, weighted ``w``."""
    views = [[[[float(v[i, d, m]) for d in range(v.shape[1])] for m in range(v.shape[2])] for i in range(v.shape[0])]
             for v in (z.flatten(2).double(), z_hat.flatten(2).double())]
    volumes, positions = len(views[0]), len(views[0][0])
    total, anchors = 0.0, 0
    for v in range(2):
        for i in range(volumes):
            for m in range(positions):
                anchor = views[v][i][m]
                first_sum = 0.0
                for v2 in range(2):
                    for j in range(volumes):
                        for n in range(positions):
                            is_anchor = (v2, j, n) == (v, i, m)
                            in_z_m = v2 == v and n == m and j != i
                            if not is_anchor and not in_z_m:
                                first_sum += math.exp(cosine(anchor, views[v2][j][n]) / t)
                second_sum = sum(math.exp(cosine(anchor, views[v][j][m]) / t) for j in range(volumes) if j != i)
                positive = cosine(anchor, views[1 - v][i][m])
                total += -positive / t + math.log(first_sum + w * second_sum)
                anchors += 1
    return total / anchors


def loop_token_nt_xent(z: torch.Tensor, z_hat: torch.Tensor, t: float = 0.5) -> float:
    """Eq. 1 token by token: ``-log(exp(s(a, p)/t) / sum_{c != a} exp(s(a, c)/t))`` over both views' tokens."""
    tokens = torch.cat([z.flatten(2), z_hat.flatten(2)]).transpose(1, 2).reshape(-1, z.shape[1]).double()
    half = len(tokens) // 2
    losses = []
    for a in range(len(tokens)):
        similarity = [float(F.cosine_similarity(tokens[a], tokens[c], dim=0)) / t for c in range(len(tokens))]
        others = sum(math.exp(s) for c, s in enumerate(similarity) if c != a)
        losses.append(-math.log(math.exp(similarity[(a + half) % len(tokens)]) / others))
    return sum(losses) / len(losses)


@pytest.mark.parametrize('volumes, grid', [(1, (2, 3)), (2, (2, 1, 2)), (3, (2, 3)), (4, (1, 2, 2)), (3, (1, 1, 1))])
@pytest.mark.parametrize('w', [0.0, 1.0, 5.0, 0.7, 2.5])
def test_eq3_equals_the_papers_equation_written_out_in_a_loop(volumes, grid, w):
    torch.manual_seed(volumes + len(grid))
    z, z_hat = torch.randn(volumes, 4, *grid), torch.randn(volumes, 4, *grid)
    assert float(token_contrastive_loss(z, z_hat, w)) == pytest.approx(loop_eq3(z, z_hat, w), rel=1e-5)


def test_w_one_is_plain_token_nt_xent_and_w_weights_same_position_similarity():
    torch.manual_seed(1)
    z, z_hat = torch.randn(3, 5, 2, 2), torch.randn(3, 5, 2, 2)
    plain = float(token_contrastive_loss(z, z_hat, 1))
    assert plain == pytest.approx(loop_token_nt_xent(z, z_hat), rel=1e-5)
    losses = [float(token_contrastive_loss(z, z_hat, w)) for w in (0, 0.5, 1, 5, 6)]
    assert losses == sorted(losses) and len(set(losses)) == len(losses)
    # the weight multiplies exactly the same-position terms of the anchor's view: the collapse of Sec. 3.3 (z_m^i =
    # z_m^j) raises the loss by log((rest + w (B - 1) e^{1/t}) / (rest + (B - 1) e^{1/t})), more the larger w is
    collapsed = z[:1].expand_as(z).clone()
    gap = [float(token_contrastive_loss(collapsed, z_hat, w)) - float(token_contrastive_loss(z, z_hat, w))
           for w in (1, 5)]
    assert gap[1] > gap[0]
    one = float(token_contrastive_loss(z[:1], z_hat[:1], 5))  # no other volume: w has nothing to weight
    assert one == pytest.approx(float(token_contrastive_loss(z[:1], z_hat[:1], 0)), rel=1e-6)
    assert math.isfinite(float(token_contrastive_loss(z[:1, :, :1, :1], z_hat[:1, :, :1, :1], 0)))  # the positive alone
    with pytest.raises(ValueError, match='same_position_weight -1'):
        token_contrastive_loss(z, z_hat, -1)
    with pytest.raises(ValueError, match='restore the transformed view'):
        token_contrastive_loss(z, z_hat[..., :1])


def test_anchor_volumes_split_the_loss_as_ddp_ranks_would():
    torch.manual_seed(2)
    z, z_hat = torch.randn(4, 5, 1, 2, 3), torch.randn(4, 5, 1, 2, 3)
    halves = [float(token_contrastive_loss(z, z_hat, 5, anchor_volumes=slice(r, r + 2))) for r in (0, 2)]
    assert sum(halves) / 2 == pytest.approx(float(token_contrastive_loss(z, z_hat, 5)), rel=1e-6)
    assert halves[0] != pytest.approx(halves[1])


def test_projection_head_is_trained_by_the_optimiser_of_the_pretraining_model():
    torch.manual_seed(0)
    model = nn.ModuleDict({'encoder': nn.Conv3d(1, 8, 2, stride=2), 'projection': TokenHead(8, 16, 32)})
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.99, nesterov=True)
    before = {k: v.clone() for k, v in model['projection'].state_dict().items()}
    x = torch.randn(3, 1, 4, 4, 4)
    z, z_hat = (model['projection'](model['encoder'](v)) for v in (x, x + 0.1 * torch.randn_like(x)))
    assert z.shape == (3, 16, 2, 2, 2)
    token_contrastive_loss(z, z_hat).backward()
    optimiser.step()
    assert all(not torch.equal(before[k], v) for k, v in model['projection'].state_dict().items())


def test_byol_target_follows_the_online_weights_by_the_momentum_and_gets_no_gradient():
    torch.manual_seed(0)
    online, predictor = TokenHead(4, 6, 8), TokenHead(6, 6, 8)
    target = EmaTarget(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    theta = {k: v.clone() for k, v in online.state_dict().items()}
    xi = {k: v.clone() for k, v in target.module.state_dict().items()}
    target.update(online, momentum=0.9)
    for k, v in target.module.state_dict().items():
        torch.testing.assert_close(v, 0.9 * xi[k] + 0.1 * theta[k])
        assert not torch.equal(v, theta[k])

    x = torch.randn(2, 4, 2, 3)
    goal = target(x + 0.1)
    assert not goal.requires_grad
    byol_token_loss(predictor(online(x)), goal).backward()
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert all(p.grad is not None for p in online.parameters())
    with pytest.raises(ValueError, match='momentum 1.5'):
        target.update(online, 1.5)


def test_byol_token_loss_is_the_squared_distance_of_normalised_tokens():
    z = torch.randn(2, 3, 2, 2)
    assert float(byol_token_loss(z, 2 * z)) == pytest.approx(0, abs=1e-6)
    assert float(byol_token_loss(z, -z)) == pytest.approx(4)
    cosine = F.cosine_similarity(z, torch.roll(z, 1, 0), dim=1).mean()
    assert float(byol_token_loss(z, torch.roll(z, 1, 0))) == pytest.approx(float(2 - 2 * cosine), rel=1e-5)


def one_hot_tokens(indices: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, M)`` indices -> ``(B, size, M)`` one-hot token maps (grid ``M`` flattened into 2d ``(1, M)``)."""
    return F.one_hot(indices, size).float().transpose(1, 2)[:, :, None, :]


def test_collapse_monitor_on_constructed_tokens():
    same = torch.ones(3, 4, 2, 2)
    assert collapse_monitor(same, same) == pytest.approx((1, 1, 1))
    by_position = one_hot_tokens(torch.arange(4).repeat(3, 1), 4)  # the paper's collapse: position alone
    assert collapse_monitor(by_position, by_position) == pytest.approx((1, 1, 0))
    by_volume = one_hot_tokens(torch.arange(3)[:, None].repeat(1, 4), 4)
    assert collapse_monitor(by_volume, -by_volume) == pytest.approx((0, -1, 1))
    reading = collapse_monitor(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2))
    assert math.isnan(reading.across_volumes) and not math.isnan(reading.within_volume)
