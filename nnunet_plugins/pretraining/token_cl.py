"""Token-level contrastive pre-training of paper 004 (SimCLR form, its eq. 3) as a method object.

Views, tokens and collapse monitor: :mod:`~nnunet_plugins.pretraining.token_method`. The loss
(:func:`~nnunet_plugins.pretraining.token_losses.token_contrastive_loss`) takes every token of every volume on every
DDP rank as a candidate; its denominator weights the same position in the other volumes of the anchor's view by
exactly ``same_position_weight`` (w: 5, the paper's default; 1 is plain token NT-Xent, eq. 1; 0 takes those terms out,
an ablation).
"""
from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np
import torch
from torch import nn

from nnunet_plugins.pretraining.ddp import gather_rows
from nnunet_plugins.pretraining.token_losses import SAME_POSITION_WEIGHT, TEMPERATURE, token_contrastive_loss
from nnunet_plugins.pretraining.token_method import TokenMethod


def token_contrastive_loss_across_ranks(z: torch.Tensor, z_hat: torch.Tensor, same_position_weight: float,
                                        temperature: float) -> torch.Tensor:
    """Eq. 3 with this rank's volumes as anchors and every rank's volumes as candidates.

    ``z``, ``z_hat``: ``(B, D, *grid)`` this rank's position-aligned projected tokens of the two views. Under DDP,
    with the same ``B`` on every rank, the loss averaged over ranks (as nnU-Net logs it) and DDP's averaged
    gradients equal the single-process loss and gradients on all ranks' volumes in one batch.
    """
    everywhere, offset = gather_rows(z.flatten(1))
    everywhere_hat, _ = gather_rows(z_hat.flatten(1))
    shape = (-1, *z.shape[1:])
    return token_contrastive_loss(everywhere.view(shape), everywhere_hat.view(shape), same_position_weight,
                                  temperature, anchor_volumes=slice(offset, offset + len(z)))


@dataclass
class TokenCL(TokenMethod):
    """Eq. 3 on the per-token projections; ``same_position_weight`` (w >= 0; 1 is eq. 1, see
    :func:`~nnunet_plugins.pretraining.token_losses.token_contrastive_loss` for 0) and ``temperature`` are its
    settings."""
    name = 'TokenCL'
    loss_terms = ('token_contrastive',)
    same_position_weight: float = SAME_POSITION_WEIGHT
    temperature: float = TEMPERATURE

    def check(self) -> None:
        super().check()
        if self.same_position_weight < 0:
            raise ValueError(f'same_position_weight {self.same_position_weight} < 0 could make eq. 3\'s denominator '
                             f'negative; 1 is plain token NT-Xent (eq. 1), the paper uses {SAME_POSITION_WEIGHT}')

    def describe(self) -> str:
        return (f'token-level contrastive learning of paper 004 (SimCLR form, eq. 3): {self.views_description()}; '
                f'cosine similarity, temperature {self.temperature}, same position in the other volumes weighted w = '
                f'{self.same_position_weight} in the denominator (w = 1: eq. 1)')

    def losses(self, model: nn.Module, data: torch.Tensor, rng: np.random.Generator,
               autocast: Callable[[], ContextManager]) -> dict[str, torch.Tensor]:
        tokens, projections = self.outputs_on_views(model, data, rng, autocast)
        loss = token_contrastive_loss_across_ranks(projections[1], projections[0], self.same_position_weight,
                                                   self.temperature)
        return {'token_contrastive': loss, 'total': loss, **self.monitor(tokens)}

    def report(self) -> dict:
        return {**super().report(), 'same_position_weight': self.same_position_weight,
                'temperature': self.temperature}
