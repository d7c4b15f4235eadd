"""The heads of paper 004's token-level pre-training (Sec. 3.2), on any encoder's token map.

- :class:`TokenHead`: an MLP applied to every token alone, the per-token projection ``g`` (and BYOL's predictor
  ``pred``). It is a module of the pre-training model, so the optimiser trains it with the encoder; the
  authors' code creates its projection inside the epoch loop and never optimises it.
- :class:`EmaTarget`: BYOL's target path (eq. 2), a frozen copy of the online encoder and projection that
  follows them by exponential moving average and never gets a gradient.
"""
import copy

import torch
from torch import nn

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
