"""Paper 003's proxy tasks (Sec. 4, 5.2) on a batch of nnU-Net patches: the two views and the three losses.

Every sub-volume (nnU-Net's augmented patch, ``(C, *S)`` with ``S`` = (z, y, x) or (y, x)) gives two views,
each rotated by a random quarter turn in the y-x plane (the paper's "along the z-axis"; the last two axes of
nnU-Net's arrays) and cut out, by one of two rules (``cutout``):

- ``'text'``, the paper's text (Sec. 5.2: "the ROI dropping rate is set to 30%; the dropped regions are randomly
  generated and they sum up to reach overall number of voxels"; no box size or fill stated): random boxes, each side
  1 voxel up to 40% of its axis, set to 0 (the mean of nnU-Net's z-scored intensities), each added if the masked
  share stays at most 30%, until it nearly reaches 30% (:func:`text_cutout_boxes`);
- ``'authors'``, the authors' code (Project-MONAI/research-contributions, SwinUNETR/Pretrain/utils/ops.py): a rate
  drawn from U(0, 0.3) per view, boxes each side ``int(5%)`` to ``int(25%) - 1`` voxels of its axis (at least 1,
  clipped at the end of the axis), drawn until their volumes (overlaps counted again) sum to the rate's share of
  the voxels (:func:`authors_cutout_boxes`), filled with Gaussian noise rescaled to span [0, 1] in each box
  (:func:`noise_fill`); then, unless the sub-volume drawn from the same view's batch is itself, a second such set of
  boxes with a new rate takes that other sub-volume's rotated, uncut values.

Losses, weighted 1/1/1:

- reconstruction: L1 between the reconstruction of the cut view and the rotated, uncut view;
- rotation: 4-way cross-entropy of the quarter turn;
- contrastive: NT-Xent (cosine similarity, temperature 0.5): the two views of a sub-volume are positives, every
  other view in the batch (on every DDP rank) a negative.
"""
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_plugins.pretraining.ddp import gather_rows

MAX_CUTOUT_FRACTION = 0.3
BOX_SIDE_FRACTION = 0.4  # a cutout box's side along an axis: 1 voxel up to this share of the axis
FILLED = 0.95  # boxes are added until this share of the cutout budget is masked (or MAX_BOX_DRAWS were drawn)
MAX_BOX_DRAWS = 500
AUTHORS_MAX_RATE = 0.3  # the authors' dropping rate is drawn from U(0, this) per view
AUTHORS_MIN_SIDE, AUTHORS_MAX_SIDE = 0.05, 0.25  # the authors' box sides, as shares of the axis
CUTOUTS = ('text', 'authors')
TEMPERATURE = 0.5
LOSS_TERMS = ('reconstruction', 'rotation', 'contrastive')


def allowed_rotations(patch_size: Sequence[int]) -> tuple[int, ...]:
    """Quarter turns in the y-x plane that keep ``patch_size``: all four when y and x are equal, else 0 and 2."""
    return (0, 1, 2, 3) if patch_size[-1] == patch_size[-2] else (0, 2)


def rotate(x: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Rotate each sample of ``x`` ``(B, C, *S)`` by its number of quarter turns ``(B,)`` in the y-x plane."""
    return torch.stack([torch.rot90(sample, int(k), dims=(-2, -1)) for sample, k in zip(x, quarter_turns)])


Box = tuple[slice, ...]


def text_cutout_boxes(spatial_shape: Sequence[int], rng: np.random.Generator,
                      max_fraction: float = MAX_CUTOUT_FRACTION) -> list[Box]:
    """The paper's text's cutout of ``spatial_shape``: random boxes, each added if the masked share (their union)
    stays at most ``max_fraction``, until it nearly reaches it (the dropped regions "sum up to" the paper's 30%)."""
    mask = np.zeros(spatial_shape, dtype=bool)
    budget = int(max_fraction * mask.size)
    masked, boxes = 0, []
    for _ in range(MAX_BOX_DRAWS):
        if masked >= FILLED * budget:
            break
        sides = [int(rng.integers(1, max(1, round(BOX_SIDE_FRACTION * n)) + 1)) for n in spatial_shape]
        starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(spatial_shape, sides)]
        box = tuple(slice(start, start + side) for start, side in zip(starts, sides))
        added = int(np.count_nonzero(~mask[box]))
        if masked + added > budget:
            continue
        mask[box] = True
        masked += added
        boxes.append(box)
    return boxes


def authors_side_range(n: int) -> tuple[int, int]:
    """The authors' box side along an axis of ``n`` voxels, inclusive: ``int(5% n)`` to ``int(25% n) - 1``, at
    least 1 voxel (their code draws empty boxes on axes under 20 voxels)."""
    low = max(1, int(AUTHORS_MIN_SIDE * n))
    return low, max(low, int(AUTHORS_MAX_SIDE * n) - 1)


def authors_cutout_boxes(spatial_shape: Sequence[int], rng: np.random.Generator) -> tuple[float, list[Box]]:
    """The authors' cutout of ``spatial_shape``: a rate from U(0, 0.3), and boxes drawn until their volumes (clipped
    at the patch's end, overlaps counted again) sum to at least the rate's share of the voxels. Returns both."""
    rate = float(rng.uniform(0, AUTHORS_MAX_RATE))
    target, dropped, boxes = rate * np.prod(spatial_shape), 0, []
    while dropped < target:
        box = []
        for n in spatial_shape:
            low, high = authors_side_range(n)
            start = int(rng.integers(0, n - low + 1))
            box.append(slice(start, min(n, start + int(rng.integers(low, high + 1)))))
        dropped += int(np.prod([s.stop - s.start for s in box]))
        boxes.append(tuple(box))
    return rate, boxes


def noise_fill(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """The authors' fill of a box ``shape`` (channels included): standard Gaussian noise rescaled to span exactly
    [0, 1] (their intensities are scaled to [0, 1]; here they are z-scored); 0 where the box holds one value."""
    noise = rng.standard_normal(shape)
    return (noise - noise.min()) / max(float(noise.max() - noise.min()), np.finfo(float).tiny)


def authors_cutout(targets: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' cutout of ``targets`` ``(N, C, *S)`` (one view of ``N`` sub-volumes): noise boxes, then boxes
    pasted from another sub-volume of ``targets`` (drawn among all ``N``, none when it is the same one). Returns the
    cut views and their masks ``(N, *S)``, True in every box."""
    inputs, masks = targets.clone(), torch.zeros((len(targets), *targets.shape[2:]), dtype=torch.bool)
    for i in range(len(targets)):
        for box in authors_cutout_boxes(targets.shape[2:], rng)[1]:
            fill = noise_fill(inputs[i][(slice(None), *box)].shape, rng)
            inputs[i][(slice(None), *box)] = torch.as_tensor(fill, dtype=inputs.dtype, device=inputs.device)
            masks[i][box] = True
        partner = int(rng.integers(0, len(targets)))
        if partner != i:
            for box in authors_cutout_boxes(targets.shape[2:], rng)[1]:
                inputs[i][(slice(None), *box)] = targets[partner][(slice(None), *box)]
                masks[i][box] = True
    return inputs, masks.to(targets.device)


@dataclass
class Views:
    """Two views per sub-volume of a batch of ``B``: view 1 of every sub-volume, then view 2 (``2B`` rows)."""
    inputs: torch.Tensor  # (2B, C, *S): rotated and cut out
    targets: torch.Tensor  # (2B, C, *S): rotated, not cut out
    rotations: torch.Tensor  # (2B,): quarter turns, int64
    masks: torch.Tensor  # (2B, *S): True where cut out


def make_views(batch: torch.Tensor, rotations: Sequence[int], rng: np.random.Generator,
               cutout: str = 'text') -> Views:
    """Two rotated, cut-out views of every sample of ``batch`` ``(B, C, *S)``; rotations drawn from ``rotations``,
    the cutout by the rule ``cutout`` (``'text'`` or ``'authors'``, see the module)."""
    both = torch.cat([batch, batch])
    quarter_turns = torch.as_tensor(rng.choice(np.asarray(rotations), size=len(both)), dtype=torch.long)
    targets = rotate(both, quarter_turns)
    if cutout == 'authors':  # each view's batch on its own, as the authors cut their two views' batches
        halves = [authors_cutout(half, rng) for half in targets.chunk(2)]
        inputs, masks = (torch.cat(parts) for parts in zip(*halves))
    else:
        masks = np.zeros((len(both), *targets.shape[2:]), dtype=bool)
        for mask in masks:
            for box in text_cutout_boxes(targets.shape[2:], rng):
                mask[box] = True
        masks = torch.as_tensor(masks, device=batch.device)
        inputs = targets.masked_fill(masks[:, None], 0)
    return Views(inputs, targets, quarter_turns.to(batch.device), masks)


def nt_xent(view1: torch.Tensor, view2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """NT-Xent of SimCLR: the mean over this rank's ``2N`` views of ``-log(exp(sim(i, j)/t) / sum_{k != i}
    exp(sim(i, k)/t))``, with ``j`` the other view of ``i``'s sub-volume, ``k`` every view on every rank.

    ``view1``, ``view2``: ``(N, D)`` embeddings of the two views of this rank's ``N`` sub-volumes. Under DDP, with
    the same ``N`` on every rank, the loss averaged over ranks (as nnU-Net logs it) and DDP's averaged gradients
    equal the single-process loss and gradients on all ranks' sub-volumes in one batch.
    """
    first, offset = gather_rows(F.normalize(view1, dim=1))
    second, _ = gather_rows(F.normalize(view2, dim=1))
    candidates = torch.cat([first, second])
    total, local = len(first), torch.arange(offset, offset + len(view1), device=view1.device)
    anchors = torch.cat([local, local + total])
    positives = torch.cat([local + total, local])
    logits = candidates[anchors] @ candidates.T / temperature
    itself = F.one_hot(anchors, len(candidates)).bool()
    return F.cross_entropy(logits.masked_fill(itself, float('-inf')), positives)


def proxy_losses(outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], views: Views) -> dict[str, torch.Tensor]:
    """The three losses and their sum ``total`` (weights 1/1/1), in float32, from the heads' ``outputs``
    (reconstruction ``(2B, C, *S)``, rotation logits ``(2B, 4)``, embeddings ``(2B, D)``) on ``views``."""
    reconstruction, rotation_logits, embeddings = (o.float() for o in outputs)
    view1, view2 = embeddings.chunk(2)
    losses = {'reconstruction': F.l1_loss(reconstruction, views.targets.float()),
              'rotation': F.cross_entropy(rotation_logits, views.rotations),
              'contrastive': nt_xent(view1, view2)}
    losses['total'] = sum(losses.values())
    return losses
