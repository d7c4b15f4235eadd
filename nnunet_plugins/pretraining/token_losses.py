"""Paper 004's token-level losses (Sec. 3.2-3.3) and its collapse monitor.

Inputs are the two views' token maps after the projection head, ``z`` (the restored transformed view) and
``z_hat`` (the masked view), each ``(B, D, *grid)`` with ``grid`` = (z, y, x) or (y, x); token ``m`` of volume
``i`` is ``z[i, :, m]``. Tokens are compared by cosine similarity.

- :func:`token_contrastive_loss`: eq. 3 (SimCLR form). Every token of both views is an anchor; its positive is
  the other view's token at the same position of the same volume; its denominator holds every other token of both
  views (the positive included) with weight 1, except the same position in the other volumes of the anchor's own
  view (the paper's collapse, Sec. 3.3: ``z_m^i`` equal to ``z_m^j``), which carry weight ``w``. ``w`` = 1 is plain
  token-level NT-Xent (eq. 1). Any batch size; the authors' code assumes two volumes and does not compute eq. 3.
- :func:`byol_token_loss`: eq. 2 (BYOL form), per-token squared distance of normalised vectors.
- :func:`collapse_monitor`: the three mean cosine similarities that show the paper's collapse.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

TEMPERATURE = 0.5
SAME_POSITION_WEIGHT = 5.0  # w of eq. 3: the paper's default (Sec. 3.3) and its best (Sec. 4.4, Fig. 6)


def _tokens(z: torch.Tensor) -> torch.Tensor:
    """``(B, D, *grid) -> (B, M, D)``, unit length, ``M`` = number of tokens."""
    return F.normalize(z.flatten(2).transpose(1, 2).float(), dim=-1)


def _check_pair(z: torch.Tensor, z_hat: torch.Tensor) -> None:
    if z.shape != z_hat.shape or z.ndim not in (4, 5):
        raise ValueError(f'token maps of equal shape (B, D, Y, X) or (B, D, Z, Y, X) expected, got {list(z.shape)} and '
                         f'{list(z_hat.shape)}; restore the transformed view before the loss')


def _view_volume_position(rows: torch.Tensor, volumes: int, positions: int) -> tuple[torch.Tensor, ...]:
    """View, volume and position of ``rows`` of the flattened ``(2, volumes, positions)`` tokens."""
    return rows // (volumes * positions), rows // positions % volumes, rows % positions


def token_contrastive_loss(z: torch.Tensor, z_hat: torch.Tensor, same_position_weight: float = SAME_POSITION_WEIGHT,
                           temperature: float = TEMPERATURE, anchor_volumes: slice = slice(None)) -> torch.Tensor:
    """Eq. 3 averaged over the ``2 M`` anchors (every token of both views) of each volume in ``anchor_volumes``;
    a scalar.

    For anchor ``a`` = token ``m`` of volume ``i`` in one view, ``p`` its positive (token ``m`` of volume ``i`` in
    the other view), ``a_j`` token ``m`` of volume ``j`` in ``a``'s view and ``s`` the cosine similarity:
    ``-s(a, p)/t + log(sum_{c not a, not any a_j} exp(s(a, c)/t) + w sum_{j != i} exp(s(a, a_j)/t))``, ``c`` running
    over every token of both views. Eq. 3 takes the ``a_j`` out of its first sum ("z not in z_m") and adds them
    back with weight ``w``: read so, ``w`` = 1 gives eq. 1's denominator back, and the terms the paper weights
    (Sec. 3.3: "adding a weight on the term ... in the denominator") carry exactly ``w``. Same position in the
    other view (``c`` = the other view's token ``m`` of volume ``j``) stays in the first sum: eq. 3 names only the
    anchor's view.

    Args:
        z, z_hat: ``(B, D, *grid)`` projected tokens of the two views, position-aligned.
        same_position_weight: ``w`` >= 0. The paper's default is 5 (Sec. 3.3: "The default value of w in this work
            is set as 5"; Sec. 4.4, Fig. 6: the best of the values tried); the paper adds that the best value depends
            on the number of denominator terms (batch size, tokens). 1 is eq. 1, the paper's "without weight"
            (Table 4). 0 is allowed and means: the same position in the other volumes of the anchor's view is no
            negative at all, so nothing in the loss but the other view's tokens keeps ``z_m^i`` from ``z_m^j``; that
            invites the paper's collapse instead of penalising it. It is an ablation (what those terms do), not a
            setting to train with; the loss stays finite (the positive is always in the denominator). Below 0 is
            refused: the denominator could become negative.
        temperature: ``t``.
        anchor_volumes: the volumes whose tokens are anchors; every volume's tokens are candidates. Under DDP,
            pass every rank's gathered tokens and this rank's volumes: the mean over ranks of equal batches is
            the loss of all ranks' volumes in one batch.

    Memory: a ``2AM x 2BM`` similarity matrix, ``A`` anchor volumes (A = B = 2, 8^3 tokens: 1024^2 floats).
    """
    _check_pair(z, z_hat)
    if same_position_weight < 0:
        raise ValueError(f'same_position_weight {same_position_weight} < 0 could make eq. 3\'s denominator negative; '
                         f'1 is plain token NT-Xent (eq. 1), the paper uses {SAME_POSITION_WEIGHT}')
    views = torch.stack([_tokens(z), _tokens(z_hat)])  # (2, B, M, D)
    _, volumes, positions, _ = views.shape
    flat = views.flatten(0, 2)  # token m of volume i in view v is row v * B * M + i * M + m
    device = flat.device
    anchor_ids = torch.arange(volumes, device=device)[anchor_volumes]
    anchors = (torch.arange(2, device=device)[:, None, None] * volumes * positions
               + anchor_ids[None, :, None] * positions + torch.arange(positions, device=device)).flatten()
    logits = flat[anchors] @ flat.T / temperature
    candidates = torch.arange(len(flat), device=device)
    a_view, a_volume, a_position = (part[:, None] for part in _view_volume_position(anchors, volumes, positions))
    c_view, c_volume, c_position = _view_volume_position(candidates, volumes, positions)
    same_position = (a_view == c_view) & (a_position == c_position) & (a_volume != c_volume)  # the a_j of each a
    log_weight = math.log(same_position_weight) if same_position_weight > 0 else float('-inf')
    denominator = logits.masked_fill(anchors[:, None] == candidates, float('-inf'))
    denominator = torch.where(same_position, denominator + log_weight, denominator)
    positives = (anchors + volumes * positions) % len(flat)
    rows = torch.arange(len(anchors), device=device)
    return (torch.logsumexp(denominator, dim=1) - logits[rows, positives]).mean()


def byol_token_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 2 averaged over tokens: ``|| p/|p| - g/|g| ||^2`` per token (= 2 - 2 cos); a scalar.

    Args:
        prediction: ``(B, D, *grid)`` the online path's ``pred(g_theta(z))``.
        target: ``(B, D, *grid)`` the target path's ``g_xi(z_hat)`` at the same positions; no gradient flows
            into it. BYOL symmetrises by adding the loss with the views swapped; that is the caller's.
    """
    _check_pair(prediction, target)
    difference = _tokens(prediction) - _tokens(target.detach())
    return difference.pow(2).sum(-1).mean()


class CollapseReading(NamedTuple):
    """Mean cosine similarities; the paper's collapse (Sec. 3.3, Fig. 3a) is ``across_volumes`` going to 1."""
    across_volumes: float  # same position, different volumes, same view (nan for one volume)
    across_views: float  # same position and volume, the two views: the positives
    within_volume: float  # different positions, same volume and view (nan for one token)


def _mean_off_diagonal_cosine(units: torch.Tensor) -> torch.Tensor:
    """Mean cosine over ordered pairs of distinct rows of each ``(..., N, D)`` group of unit vectors, averaged
    over groups: ``(|sum u|^2 - sum |u|^2) / (N (N - 1))``, without the ``N x N`` matrix."""
    rows = units.shape[-2]
    pairs = units.sum(-2).pow(2).sum(-1) - units.pow(2).sum((-2, -1))
    return (pairs / (rows * (rows - 1))).mean() if rows > 1 else torch.tensor(float('nan'))


@torch.no_grad()
def collapse_monitor(z: torch.Tensor, z_hat: torch.Tensor) -> CollapseReading:
    """The three readings on the position-aligned token maps ``z``, ``z_hat`` ``(B, D, *grid)`` of one batch
    (projected or not: the paper's collapse shows in both), each averaged over both views."""
    _check_pair(z, z_hat)
    views = torch.stack([_tokens(z), _tokens(z_hat)])  # (2, B, M, D)
    return CollapseReading(
        across_volumes=float(_mean_off_diagonal_cosine(views.transpose(1, 2))),
        across_views=float((views[0] * views[1]).sum(-1).mean()),
        within_volume=float(_mean_off_diagonal_cosine(views)))
