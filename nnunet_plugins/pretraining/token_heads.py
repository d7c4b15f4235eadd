"""The heads of paper 004's token-level pre-training (Sec. 3.2), on any encoder's token map.

- :class:`TokenHead`: an MLP applied to every token alone, the per-token projection ``g`` (and BYOL's predictor
  ``pred``). It is a module of the pre-training model, so the optimiser trains it with the encoder; the
  authors' code creates its projection inside the epoch loop and never optimises it.
- :class:`EmaTarget`: BYOL's target path (eq. 2), a frozen copy of the online encoder and projection that
  follows them by exponential moving average and never gets a gradient.
- :class:`TokenPretrainingModel` (SimCLR form) and :class:`TokenBYOLModel`: a segmentation network with these heads
  on one stage of its encoder, the tokens being that stage's feature map.
"""
import copy
from typing import Sequence

import torch
from torch import nn

from nnunet_plugins.pretraining.encoder import encoder_stage, stage_shape
from nnunet_plugins.pretraining.method import PretrainingModel

PROJECTION_SIZE = 128  # SimCLR's projection output
HIDDEN_SIZE = 512


class TokenHead(nn.Module):
    """Linear, ReLU, linear on every token: ``(B, in_channels, *grid) -> (B, out_channels, *grid)``.

    Args:
        in_channels: channels of a token.
        out_channels: channels of the projection.
        hidden_channels: width of the hidden layer.
    """

    def __init__(self, in_channels: int, out_channels: int = PROJECTION_SIZE, hidden_channels: int = HIDDEN_SIZE):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden_channels), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_channels, out_channels))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.movedim(1, -1)).movedim(-1, 1)


class EmaTarget(nn.Module):
    """A copy of ``online`` without gradient that :meth:`update` moves towards it: ``xi <- m xi + (1 - m) theta``.

    ``forward`` runs the copy under ``torch.no_grad``. Buffers (e.g. normalisation statistics) are copied as they
    are. Its parameters have ``requires_grad=False``, so an optimiser that is handed them leaves them alone.

    Args:
        online: the online path to follow (e.g. encoder and projection in one module).
    """

    def __init__(self, online: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(online).requires_grad_(False)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """One EMA step towards ``online`` (the module this target was copied from) with ``momentum`` in [0, 1]."""
        if not 0 <= momentum <= 1:
            raise ValueError(f'momentum {momentum} is outside [0, 1]; BYOL uses 0.996 to 1')
        targets, sources = dict(self.module.named_parameters()), dict(online.named_parameters())
        if targets.keys() != sources.keys():
            raise ValueError(f'the online module has parameters {sorted(sources.keys() ^ targets.keys())} that the '
                             f'target does not share; update the target with the module it was made from')
        for name, target in targets.items():
            target.lerp_(sources[name].detach(), 1 - momentum)
        buffers = dict(online.named_buffers())
        for name, target in self.module.named_buffers():
            target.copy_(buffers[name])


class TokenPath(nn.Module):
    """An encoder's feature map at one stage and its per-token projection, as one module (BYOL's target copies it).

    ``forward``: ``(B, C_in, *S) -> (tokens (B, C, *grid), projections (B, D, *grid))``.

    Args:
        encoder: a network's ``encoder`` submodule (:func:`~nnunet_plugins.pretraining.encoder.encoder_stage`).
        projection: the per-token projection ``g``.
        stage: which of the encoder's outputs are the tokens, -1 the deepest.
    """

    def __init__(self, encoder: nn.Module, projection: TokenHead, stage: int):
        super().__init__()
        self.encoder, self.projection, self.stage = encoder, projection, stage

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = encoder_stage(self.encoder, x, self.stage)
        return tokens, self.projection(tokens)


class TokenPretrainingModel(PretrainingModel):
    """A segmentation network and the token heads on one stage of its encoder (paper 004's SimCLR form); only the
    encoder runs.

    ``network`` keeps exactly the keys the matching supervised trainer's network has, the heads are in ``heads``
    (``projection``), so the two are saved apart.

    Args:
        network: the segmentation network, with an ``encoder`` submodule.
        input_channels: channels of its input.
        patch_size: the input's spatial shape ``S``.
        stage: which of the encoder's outputs are the tokens, -1 (the bottleneck) by default.
        projection_size, hidden_size: ``D`` of the projection and the width of its hidden layer.

    ``forward``: ``(B, C_in, *S) -> (tokens (B, C, *grid), projections (B, D, *grid))``.
    """

    def __init__(self, network: nn.Module, input_channels: int, patch_size: Sequence[int], stage: int = -1,
                 projection_size: int = PROJECTION_SIZE, hidden_size: int = HIDDEN_SIZE):
        super().__init__()
        self.network, self.stage = network, stage
        channels, *self.grid = stage_shape(network.encoder, input_channels, patch_size, stage)
        self.heads = nn.ModuleDict({'projection': TokenHead(channels, projection_size, hidden_size)})

    def online(self) -> TokenPath:
        """The encoder and projection as one module (not a submodule of this model: no second key for them)."""
        return TokenPath(self.network.encoder, self.heads['projection'], self.stage)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = encoder_stage(self.network.encoder, x, self.stage)
        return tokens, self.heads['projection'](tokens)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The encoder's and the heads' parameters that take gradients (not the decoder, not BYOL's target)."""
        return [p for p in (*self.network.encoder.parameters(), *self.heads.parameters()) if p.requires_grad]

    def extra_repr(self) -> str:
        head = self.heads['projection'].mlp
        return (f'token heads on the encoder\'s stage {self.stage} ({head[0].in_features} channels x {self.grid} '
                f'tokens): per-token projection MLP {head[0].in_features}-{head[0].out_features}-'
                f'{head[2].out_features}')


class TokenBYOLModel(TokenPretrainingModel):
    """:class:`TokenPretrainingModel` with paper 004's BYOL form (eq. 2): a per-token predictor on the online path
    and an EMA target of encoder and projection (``heads['target']``, saved with the heads).

    ``forward``: ``(B, C_in, *S) -> (tokens (B, C, *grid), predictions (B, D, *grid), target projections (B, D,
    *grid))``, the target's without gradient.
    """

    def __init__(self, network: nn.Module, input_channels: int, patch_size: Sequence[int], stage: int = -1,
                 projection_size: int = PROJECTION_SIZE, hidden_size: int = HIDDEN_SIZE):
        super().__init__(network, input_channels, patch_size, stage, projection_size, hidden_size)
        self.heads['predictor'] = TokenHead(projection_size, projection_size, hidden_size)
        self.heads['target'] = EmaTarget(self.online())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens, projections = super().forward(x)
        return tokens, self.heads['predictor'](projections), self.heads['target'](x)[1]

    def update_target(self, momentum: float) -> None:
        """One EMA step of the target towards the online encoder and projection."""
        self.heads['target'].update(self.online(), momentum)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, predictor MLP, EMA target of encoder and projection'
