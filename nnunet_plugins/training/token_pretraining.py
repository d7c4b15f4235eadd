"""Token-level pre-training of paper 004 (Sec. 3.2-3.3) as nnU-Net trainers: SimCLR form (eq. 3) and BYOL form (eq. 2).

``nnUNetv2_train D CONF FOLD -tr nnUNetTrainerX_PretrainTokenCL`` (or ``_PretrainTokenBYOL``) pre-trains the encoder
of the network that ``nnUNetTrainerX`` trains (the machinery, checkpoint and report:
:mod:`nnunet_plugins.training.pretraining`). Per iteration:

- two views of every patch (:mod:`nnunet_plugins.training.token_views`): texture transforms on both, token-block
  masking (75%) on one, a random symmetry of the token grid (quarter turns in y-x, flips) on the other;
- the tokens are the encoder's feature map at :attr:`TokenPretraining.token_stage` (the bottleneck), projected per
  token (:mod:`nnunet_plugins.networks.token_heads`); the transformed view's map is restored with the exact inverse
  of its transform, so token ``m`` of both views covers the same block of the patch ("rotate-and-restore");
- TokenCL: eq. 3 (:mod:`nnunet_plugins.training.token_contrast`), every token of every volume on every DDP rank a
  candidate; TokenBYOL: eq. 2 in both directions, online encoder + projection + predictor against an EMA target;
- the collapse monitor on the encoder's tokens, logged per epoch and drawn in ``progress.png``: mean cosine
  similarity of same-position tokens across volumes (the paper's collapse is this going to 1), of the two views'
  matching tokens, and of different positions within a volume.

Class settings, for variants and ablations declared as subclasses (e.g. ``same_position_weight = 0``):
``same_position_weight`` (w of eq. 3, TokenCL), ``temperature``, ``mask_ratio``, ``rotate_and_restore`` (False: no
spatial transform, the paper's Table 4 without Gamma_s), ``token_stage``, ``texture_settings``,
``target_momentum`` (TokenBYOL).

Optimiser: RCR's (AdamW 4e-4, weight decay 1e-5, 2 warm-up epochs then cosine; gradient-norm clipping at 12), not
the paper's SGD (lr 1e-4, Nesterov momentum 0.99), which did not learn within a short nnU-Net schedule here.
``scripts/token_optimiser_check.py`` (2026-11-29, 2 shared CPU cores): nnU-Net's PlainConvUNet on the tiny
synthetic dataset, patch 8 x 16 x 16 (4 x 2 x 2 tokens), batch 2, the same seed, 10 epochs x 15 iterations; eq. 3
(w = 5) is log 68 = 4.22 when all similarities are equal. Training loss in epochs 1 / 2 / 10: SGD (nnU-Net's poly
decay, weight decay 3e-5) 4.19 / 4.21 / 4.12 (validation 4.21 / 4.18 / 4.16, within the noise between epochs),
AdamW 4.05 / 3.65 / 3.60 (validation 3.75 / 3.60 / 3.60).
"""
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_plugins.networks.token_heads import TokenBYOLModel, TokenPretrainingModel
from nnunet_plugins.training.pretraining import SelfSupervisedPretraining
from nnunet_plugins.training.proxy_tasks import gather_rows
from nnunet_plugins.training.token_contrast import (
    SAME_POSITION_WEIGHT, TEMPERATURE, CollapseReading, byol_token_loss, collapse_monitor, token_contrastive_loss)
from nnunet_plugins.training.token_views import (
    MASK_RATIO, GridTransform, TextureSettings, allowed_transforms, check_mask_ratio, make_views, restore_each)

IDENTITY = GridTransform(0, ())
TARGET_MOMENTUM = 0.996  # BYOL's base momentum of the target's moving average


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


class TokenPretraining(SelfSupervisedPretraining):
    """What both forms of paper 004 share: the views, the token grid, rotate-and-restore and the collapse monitor."""

    readings = CollapseReading._fields
    readings_label = 'collapse monitor (mean cosine)'
    mask_ratio = MASK_RATIO
    rotate_and_restore = True
    token_stage = -1
    texture_settings = TextureSettings()
    model_class = TokenPretrainingModel

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        check_mask_ratio(self.mask_ratio)

    @classmethod
    def pretraining_model_for(cls, network: nn.Module, num_input_channels: int,
                              configuration_manager: ConfigurationManager) -> TokenPretrainingModel:
        return cls.model_class(network, num_input_channels, configuration_manager.patch_size, cls.token_stage)

    def initialize(self):
        super().initialize()
        self.token_grid = self.pretraining_model().grid
        allowed = allowed_transforms(self.configuration_manager.patch_size, self.token_grid)  # checks the grid too
        self.transforms = allowed if self.rotate_and_restore else (IDENTITY,)

    def _outputs_on_views(self, batch: dict) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The model's outputs on the two views of the batch's ``B`` patches, float32, each as a pair (masked view's,
        transformed view's restored) of ``(B, C, *grid)`` maps."""
        data = batch['data'].to(self.device, non_blocking=True)
        views = make_views(data, self.token_grid, self.transforms, self.rng, self.mask_ratio, self.texture_settings)
        with self._autocast():
            outputs = self.network(torch.cat([views.masked, views.transformed]))
        pairs = []
        for output in outputs:
            masked, transformed = output.float().split(len(data))
            pairs.append((masked, restore_each(transformed, views.transforms)))
        return tuple(pairs)

    @staticmethod
    def _monitor(tokens: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The collapse monitor's readings on the two views' encoder tokens, as scalars."""
        reading = collapse_monitor(tokens[1], tokens[0])
        return {name: torch.tensor(value) for name, value in reading._asdict().items()}

    def method_log(self) -> list[str]:
        patch, grid = list(self.configuration_manager.patch_size), list(self.token_grid)
        drawn = ', '.join(map(str, self.transforms))
        if not self.rotate_and_restore:
            return [f'rotate-and-restore is off: the second view keeps its orientation (tokens {grid}).']
        lines = [f'rotate-and-restore draws from {len(self.transforms)} transforms of the {grid} token grid: {drawn}.']
        if not any(t.quarter_turns % 2 for t in self.transforms):
            lines.append(f'The patch {patch} or its token grid {grid} is not square in y-x: a 90 or 270 degree turn '
                         f'would change its shape, so only half turns and flips are drawn.')
        return lines

    def method_report(self) -> dict:
        return {'token_stage': self.token_stage, 'token_grid': list(self.token_grid), 'mask_ratio': self.mask_ratio,
                'rotate_and_restore': self.rotate_and_restore, 'transforms': [str(t) for t in self.transforms],
                'texture': self.texture_settings.__dict__}


class PretrainTokenCL(TokenPretraining):
    """Turns a plugin trainer into its token-level contrastive (paper 004, SimCLR form, eq. 3) pre-training trainer;
    put it first among the bases::

        class nnUNetTrainerMedNeXtS_k5_PretrainTokenCL(PretrainTokenCL, nnUNetTrainerMedNeXtS_k5):
            \"\"\"Token-level contrastive pre-training of MedNeXt-S k5's encoder.\"\"\"
    """

    method_name = 'TokenCL'
    loss_terms = ('token_contrastive',)
    same_position_weight = SAME_POSITION_WEIGHT
    temperature = TEMPERATURE

    @property
    def method(self) -> str:
        return (f'token-level contrastive learning of paper 004 (SimCLR form, eq. 3): texture transforms on both '
                f'views, {self.mask_ratio:.0%} of the token blocks masked on one, a symmetry of the token grid on the '
                f'other {"restored on its feature map" if self.rotate_and_restore else "(off)"}; cosine similarity, '
                f'temperature {self.temperature}, same position in other volumes weighted w = '
                f'{self.same_position_weight} in the denominator')

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.same_position_weight < 0:
            raise ValueError(f'{type(self).__name__}: same_position_weight {self.same_position_weight} < 0 would '
                             f'reward the collapse it penalises; 0 is plain token NT-Xent, the paper uses 5')

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        tokens, projections = self._outputs_on_views(batch)
        loss = token_contrastive_loss_across_ranks(projections[1], projections[0], self.same_position_weight,
                                                   self.temperature)
        return {'token_contrastive': loss, 'total': loss, **self._monitor(tokens)}

    def method_report(self) -> dict:
        return {**super().method_report(), 'same_position_weight': self.same_position_weight,
                'temperature': self.temperature}


class PretrainTokenBYOL(TokenPretraining):
    """Turns a plugin trainer into its token-level BYOL (paper 004, eq. 2) pre-training trainer; put it first among
    the bases.

    The online path (encoder, projection, predictor) predicts the EMA target's projection of the other view, per
    token, in both directions (as BYOL symmetrises); the target follows the online encoder and projection by
    ``xi <- m xi + (1 - m) theta`` after every optimiser step, ``m`` = :attr:`target_momentum`.
    """

    method_name = 'TokenBYOL'
    loss_terms = ('token_byol',)
    target_momentum = TARGET_MOMENTUM
    model_class = TokenBYOLModel

    @property
    def method(self) -> str:
        return (f'token-level BYOL of paper 004 (eq. 2): texture transforms on both views, {self.mask_ratio:.0%} of '
                f'the token blocks masked on one, a symmetry of the token grid on the other '
                f'{"restored on its feature map" if self.rotate_and_restore else "(off)"}; online encoder, per-token '
                f'projection and predictor against an EMA target (momentum {self.target_momentum}), per-token '
                f'squared distance of normalised vectors, both directions averaged')

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        tokens, predictions, targets = self._outputs_on_views(batch)
        loss = (byol_token_loss(predictions[0], targets[1]) + byol_token_loss(predictions[1], targets[0])) / 2
        return {'token_byol': loss, 'total': loss, **self._monitor(tokens)}

    def after_optimizer_step(self) -> None:
        self.pretraining_model().update_target(self.target_momentum)

    def method_report(self) -> dict:
        return {**super().method_report(), 'target_momentum': self.target_momentum}
