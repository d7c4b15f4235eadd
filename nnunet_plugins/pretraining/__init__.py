"""Self-supervised pre-training of a network's encoder, as nnU-Net trainers built by composition.

A pre-training trainer (:class:`~nnunet_plugins.pretraining.trainer.PretrainingTrainer`) is a network trainer (whose
network it pre-trains, e.g. ``nnUNetTrainerMedNeXtS``) and a method object (:mod:`~nnunet_plugins.pretraining.method`):

- methods, one module each: :mod:`~nnunet_plugins.pretraining.rcr` (paper 003),
  :mod:`~nnunet_plugins.pretraining.token_cl` and :mod:`~nnunet_plugins.pretraining.token_byol` (paper 004, sharing
  :mod:`~nnunet_plugins.pretraining.token_method`), :mod:`~nnunet_plugins.pretraining.mae` (nnssl's masked-image
  modelling of the whole network); their views, heads and losses in ``rcr_*``, ``token_*`` and ``mae_*``;
- written once for every method: the trainer (:mod:`~nnunet_plugins.pretraining.trainer`), nnU-Net's overridden
  methods (:mod:`~nnunet_plugins.pretraining.nnunet_overrides`), ``progress.png``
  (:mod:`~nnunet_plugins.pretraining.progress`), the checkpoint (:mod:`~nnunet_plugins.pretraining.checkpoint`), the
  DDP gathers (:mod:`~nnunet_plugins.pretraining.ddp`), unlabeled cases (:mod:`~nnunet_plugins.pretraining.unlabeled`)
  and the encoder's stages (:mod:`~nnunet_plugins.pretraining.encoder`).

The stock-CLI trainers (``nnUNetTrainerMedNeXtS_PretrainRCR``, ...) are declared at the end of each network family's
trainer module in :mod:`nnunet_plugins.training`.
"""
from nnunet_plugins.pretraining.mae import MAE
from nnunet_plugins.pretraining.method import NNSSL_SGD, PAPER_004_SGD, OptimiserSettings, PretrainingMethod
from nnunet_plugins.pretraining.rcr import RCR
from nnunet_plugins.pretraining.token_byol import TokenBYOL
from nnunet_plugins.pretraining.token_cl import TokenCL
from nnunet_plugins.pretraining.trainer import PretrainingTrainer

__all__ = ['MAE', 'NNSSL_SGD', 'PAPER_004_SGD', 'OptimiserSettings', 'PretrainingMethod', 'PretrainingTrainer', 'RCR',
           'TokenBYOL', 'TokenCL']
