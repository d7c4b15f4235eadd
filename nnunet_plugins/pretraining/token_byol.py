"""Token-level BYOL pre-training of paper 004 (its eq. 2) as a method object.

Views, tokens and collapse monitor: :mod:`~nnunet_plugins.pretraining.token_method`. The online path (encoder,
projection, predictor) predicts the EMA target's projection of the other view, per token, in both directions (as
BYOL symmetrises); the target (:class:`~nnunet_plugins.pretraining.token_heads.EmaTarget`, saved with the heads)
follows the online encoder and projection by ``xi <- m xi + (1 - m) theta`` after every optimiser step.
"""
from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np
import torch
from torch import nn

from nnunet_plugins.pretraining.token_heads import TokenBYOLModel
from nnunet_plugins.pretraining.token_losses import byol_token_loss
from nnunet_plugins.pretraining.token_method import TokenMethod

TARGET_MOMENTUM = 0.996  # BYOL's base momentum of the target's moving average


@dataclass
class TokenBYOL(TokenMethod):
    """Eq. 2 against an EMA target; ``target_momentum`` (m in [0, 1]) is its setting."""
    name = 'TokenBYOL'
    loss_terms = ('token_byol',)
    target_momentum: float = TARGET_MOMENTUM
    model_class = TokenBYOLModel

    def describe(self) -> str:
        return (f'token-level BYOL of paper 004 (eq. 2): {self.views_description()}; online encoder, per-token '
                f'projection and predictor against an EMA target (momentum {self.target_momentum}), per-token '
                f'squared distance of normalised vectors, both directions averaged')

    def losses(self, model: nn.Module, data: torch.Tensor, rng: np.random.Generator,
               autocast: Callable[[], ContextManager]) -> dict[str, torch.Tensor]:
        tokens, predictions, targets = self.outputs_on_views(model, data, rng, autocast)
        loss = (byol_token_loss(predictions[0], targets[1]) + byol_token_loss(predictions[1], targets[0])) / 2
        return {'token_byol': loss, 'total': loss, **self.monitor(tokens)}

    def after_optimizer_step(self, model: TokenBYOLModel) -> None:
        model.update_target(self.target_momentum)

    def report(self) -> dict:
        return {**super().report(), 'target_momentum': self.target_momentum}
