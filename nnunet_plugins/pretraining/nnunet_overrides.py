"""Every method of nnU-Net 2.8 that pre-training overrides, in one place; each docstring names the nnU-Net method it
replaces or extends and why.

``nnUNetv2_train`` runs a pre-training trainer through nnU-Net's own loop (``run_training``): patch sampling and
augmentation, epochs, ``--c``, ``-num_gpus``, the log. What differs is what a step computes (a method's losses on
two views, not a segmentation loss), what is logged and drawn (loss terms and readings, not the pseudo Dice), what a
checkpoint holds (the heads beside the network), which cases train (unlabeled ones too) and that nothing is
segmented at the end. tests/test_pretraining_legacy.py records the signature of every method overridden here and
fails, naming it, when the installed nnU-Net changes one.
"""
import os
from time import time

import numpy as np
import torch
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnunet_plugins.networks.layout import follow_device_layout
from nnunet_plugins.pretraining.checkpoint import HEADS_KEY, adaptation_plan
from nnunet_plugins.pretraining.ddp import gather_values
from nnunet_plugins.pretraining.method import WarmupDecayLRScheduler
from nnunet_plugins.pretraining.progress import plot_progress
from nnunet_plugins.pretraining.unlabeled import nnUNetDatasetWithUnlabeled, unlabeled_identifiers
from nnunet_plugins.training.base import nnUNetTrainerPlugin
from nnunet_plugins.weights import CheckpointError, read_checkpoint
from nnunet_plugins.weights.nnssl import ADAPTATION_PLAN_KEY

EMA = 0.9  # smoothing of the validation loss that picks checkpoint_best.pth, as nnU-Net's pseudo Dice's


class PretrainingLogger(LocalLogger):
    """nnU-Net's per-epoch logging with a method's loss terms and readings instead of the pseudo Dice.

    Args:
        terms: names of the loss terms (their sum is the loss).
        readings: names of values logged beside the loss that are no part of it (e.g. a collapse monitor).
        readings_label: the y-axis label of the readings' panel.
    """

    def __init__(self, terms: tuple[str, ...], readings: tuple[str, ...] = (), readings_label: str = '',
                 verbose: bool = False):
        """Extends ``LocalLogger.__init__``: nnU-Net's keys without the pseudo Dice's (nothing is segmented), with
        ``train_``/``val_`` keys per term and reading."""
        super().__init__(verbose)
        for key in ('mean_fg_dice', 'ema_fg_dice', 'dice_per_class_or_region'):
            del self.my_fantastic_logging[key]
        self.terms, self.readings, self.readings_label = terms, readings, readings_label
        self.my_fantastic_logging.update({f'{split}_{name}': [] for split in ('train', 'val')
                                          for name in (*terms, *readings)})

    def plot_progress_png(self, output_folder: str) -> None:
        """Replaces ``LocalLogger.plot_progress_png``, which draws the pseudo Dice: the terms and readings instead
        (:func:`~nnunet_plugins.pretraining.progress.plot_progress`)."""
        plot_progress(self.my_fantastic_logging, self.terms, self.readings, self.readings_label,
                      os.path.join(output_folder, 'progress.png'))


class PretrainingOverrides(nnUNetTrainerPlugin):
    """nnU-Net's trainer with pre-training's steps, logging, checkpoints and cases; the base of
    :class:`~nnunet_plugins.pretraining.trainer.PretrainingTrainer`, which supplies the composition (``method``,
    ``network_trainer``, ``segmentation_network``, ``method_of_run``, ``optimiser_settings_of_run``,
    ``pretraining_model``) and what the steps share (``autocast``, ``as_numpy``, ``write_report``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        """Extends ``nnUNetTrainer.__init__``: the run's copy of the method (checked before anything is built), the
        logger of its terms (nnU-Net's has the pseudo Dice's keys), and the generator of the views (seeded from
        numpy's global state, so ``np.random.seed`` seeds the views too)."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.method = self.method_of_run()
        self.logger.local_logger = PretrainingLogger(self.method.loss_terms, self.method.readings,
                                                     self.method.readings_label)
        self.rng = np.random.default_rng(np.random.randint(2 ** 32))

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Replaces ``nnUNetTrainer.build_network_architecture``: the network trainer's network (deep supervision
        off: only the encoder runs, or with MAE the whole network but the deep-supervision heads) with the method's
        heads, in the network's CPU memory layout (its own layout hook runs on its forward, which the encoder
        methods bypass)."""
        network = cls.segmentation_network(plans_manager, configuration_manager, num_input_channels,
                                           num_output_channels)
        model = cls.method.build_model(network, num_input_channels, configuration_manager.patch_size)
        return follow_device_layout(model, network.cpu_layout) if hasattr(network, 'cpu_layout') else model

    def initialize(self):
        """Extends ``nnUNetTrainer.initialize`` (and the plugin base's, which logs the model and its heads): unlabeled
        cases load with the labeled ones (nnU-Net infers its dataset class from the labeled folder); the method
        derives its views from the built model; the log states the segmentation network and the optimiser; DDP is
        wrapped again with ``find_unused_parameters`` (nnU-Net's expects a gradient for every parameter, and the
        decoder gets none, or with MAE the segmentation heads)."""
        super().initialize()
        unlabeled = unlabeled_identifiers(self.preprocessed_dataset_folder)
        if unlabeled:  # added by `nnunet-plugins add-unlabeled`; the labeled cases load as before
            self.dataset_class = nnUNetDatasetWithUnlabeled
            self.print_to_log_file(f'{len(unlabeled)} unlabeled cases join the training cases '
                                   f'(from {self.preprocessed_dataset_folder}_unlabeled)')
        model = self.pretraining_model()
        self.method.prepare(model, self.configuration_manager.patch_size)
        self.print_to_log_file(f'{self.network_trainer.__name__}\'s network: {model.network.extra_repr()}, '
                               f'{sum(p.numel() for p in model.network.parameters()):,} parameters')
        self.print_to_log_file(f'pre-training optimiser: {self.optimiser_settings_of_run().describe(self.num_epochs)}')
        if self.is_ddp:
            # no device_ids: DDP takes the parameters' device (nnU-Net's device_ids=[rank] holds on one node only)
            self.network = DistributedDataParallel(self.network.module, find_unused_parameters=True)

    def do_split(self) -> tuple[list[str], list[str]]:
        """Extends ``nnUNetTrainer.do_split``: nnU-Net's split of the labeled cases, with every unlabeled case added
        to training (never to validation)."""
        training, validation = super().do_split()
        return training + unlabeled_identifiers(self.preprocessed_dataset_folder), validation

    def configure_optimizers(self):
        """Replaces ``nnUNetTrainer.configure_optimizers``: the method's optimiser (AdamW, or paper 004's or nnssl's
        SGD) on the parameters the model trains (encoder and heads; with MAE the network but its segmentation heads,
        and the head), with the method's settings (:meth:`optimiser_settings_of_run`), warm-up then cosine or poly
        decay."""
        settings = self.optimiser_settings_of_run()
        optimizer = settings.build(self.pretraining_model().trainable_parameters())
        scheduler = WarmupDecayLRScheduler(optimizer, settings.initial_lr, settings.warmup_epochs, self.num_epochs,
                                           settings.warmup_from_zero, settings.decay)
        return optimizer, scheduler

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Extends nnU-Net's method of that name: the method may narrow the rotations and mirror axes of nnU-Net's
        augmentation (RCR's rotation task would be ambiguous otherwise)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        rotation, mirror_axes = self.method.augmentation(rotation, mirror_axes,
                                                         len(self.configuration_manager.patch_size))
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def on_train_start(self):
        """Extends ``nnUNetTrainer.on_train_start``: the log says the method and what it derived from the patch."""
        super().on_train_start()
        self.print_to_log_file(f'{self.method.name} pre-training: {self.method.describe()}.')
        for line in self.method.log_lines(self.configuration_manager.patch_size):
            self.print_to_log_file(line)

    def train_step(self, batch: dict) -> dict:
        """Replaces ``nnUNetTrainer.train_step`` (which computes the segmentation loss against ``batch['target']``):
        the method's losses on the patches alone, nnU-Net's mixed precision and gradient clipping at 12, then the
        method's step after the optimiser's (BYOL's target). Returns the total as ``loss``, every term and reading."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.method.losses(self.network, batch['data'].to(self.device, non_blocking=True), self.rng,
                                    self.autocast)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses['total']).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            losses['total'].backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        self.method.after_optimizer_step(self.pretraining_model())
        result = self.as_numpy(losses)
        self.check_finite_loss(result['loss'])
        return result

    def validation_step(self, batch: dict) -> dict:
        """Replaces ``nnUNetTrainer.validation_step`` (the segmentation loss and the pseudo Dice's counts): the same
        losses as :meth:`train_step` on the validation cases."""
        return self.as_numpy(self.method.losses(self.network, batch['data'].to(self.device, non_blocking=True),
                                                self.rng, self.autocast))

    def on_train_epoch_end(self, train_outputs: list[dict]):
        """Replaces ``nnUNetTrainer.on_train_epoch_end``, which logs the loss alone: every term and reading too."""
        self.log_means(train_outputs, 'train')

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        """Replaces ``nnUNetTrainer.on_validation_epoch_end``, which computes the pseudo Dice: the means of the
        loss, terms and readings."""
        self.log_means(val_outputs, 'val')

    def log_means(self, outputs: list[dict], split: str) -> None:
        """Log the mean of the total, each term and each reading over the epoch's steps (and DDP ranks); a reading
        that is undefined on a step (NaN) is left out of its mean."""
        for key in ('loss', *self.method.loss_terms, *self.method.readings):
            values = gather_values(np.array([output[key] for output in outputs]))
            if key in self.method.readings:
                mean = float(np.nanmean(values)) if np.isfinite(values).any() else float('nan')
            else:
                mean = float(values.mean())
            self.logger.log(f'{split}_losses' if key == 'loss' else f'{split}_{key}', mean, self.current_epoch)

    def on_epoch_end(self):
        """Replaces ``nnUNetTrainer.on_epoch_end``: the loss terms and readings in the log instead of the pseudo
        Dice, and ``checkpoint_best.pth`` at the lowest moving average of the validation loss (kept in nnU-Net's
        ``_best_ema``) instead of the highest of the pseudo Dice; periodic checkpoints and ``progress.png`` as
        nnU-Net's."""
        self.logger.log('epoch_end_timestamps', time(), self.current_epoch)
        value = self.logger.get_value
        for split in ('train', 'val'):
            terms = ', '.join(f'{term} {np.round(value(f"{split}_{term}", -1), decimals=4)}'
                              for term in self.method.loss_terms)
            self.print_to_log_file(f'{split}_loss', np.round(value(f'{split}_losses', -1), decimals=4), f'({terms})')
            if self.method.readings:
                readings = ', '.join(f'{name} {np.round(value(f"{split}_{name}", -1), decimals=4)}'
                                     for name in self.method.readings)
                self.print_to_log_file(f'{split} {self.method.readings_label}: {readings}')
        duration = value('epoch_end_timestamps', -1) - value('epoch_start_timestamps', -1)
        self.print_to_log_file(f'Epoch time: {np.round(duration, decimals=2)} s')
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, 'checkpoint_latest.pth'))
        average = None
        for loss in value('val_losses', None):
            average = loss if average is None else EMA * average + (1 - EMA) * loss
        if self._best_ema is None or average < self._best_ema:
            self._best_ema = average
            self.print_to_log_file(f'New best moving average of the validation loss: {np.round(average, 4)}')
            self.save_checkpoint(os.path.join(self.output_folder, 'checkpoint_best.pth'))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Replaces ``nnUNetTrainer.perform_actual_validation``: there is no segmentation to predict or export."""
        self.print_to_log_file('Pre-training: no segmentation to validate or export; the validation losses are in '
                               'this log and progress.png.')

    def save_checkpoint(self, filename: str) -> None:
        """Replaces ``nnUNetTrainer.save_checkpoint``: nnU-Net's entries, with ``network_weights`` the segmentation
        network's alone (what stock ``-pretrained_weights`` loads into the supervised trainer's network) and the
        heads under :data:`~nnunet_plugins.pretraining.checkpoint.HEADS_KEY`, and the adaptation plan nnssl's tools
        read (:func:`~nnunet_plugins.pretraining.checkpoint.adaptation_plan`)."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        model = self.pretraining_model()
        torch.save({
            'network_weights': model.network.state_dict(),
            HEADS_KEY: model.heads.state_dict(),
            'optimizer_state': self.optimizer.state_dict(),
            'grad_scaler_state': self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            'logging': self.logger.get_checkpoint(),
            '_best_ema': self._best_ema,
            'current_epoch': self.current_epoch + 1,
            'init_args': self.my_init_kwargs,
            'trainer_name': self.__class__.__name__,
            'inference_allowed_mirroring_axes': self.inference_allowed_mirroring_axes,
            ADAPTATION_PLAN_KEY: adaptation_plan(model.network, self.plans_manager, self.configuration_manager,
                                                 self.configuration_name, self.num_input_channels),
        }, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """Replaces ``nnUNetTrainer.load_checkpoint`` (``--c``), which loads ``network_weights`` into the whole
        model: the network and the heads apart, and a refusal, naming the file, of a checkpoint without heads."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(filename_or_checkpoint, str):
            self.check_checkpoint_file(filename_or_checkpoint)
            checkpoint = read_checkpoint(filename_or_checkpoint, map_location=self.device)
        if HEADS_KEY not in checkpoint:
            raise CheckpointError(
                f'{filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "the checkpoint"} has no '
                f'{HEADS_KEY}: it was not written by a pre-training trainer, so `--c` cannot continue from it. Move it '
                f'out of {self.output_folder}, or pre-train this fold anew in an empty folder.')
        model = self.pretraining_model()
        model.network.load_state_dict(checkpoint['network_weights'])
        model.heads.load_state_dict(checkpoint[HEADS_KEY])
        self.my_init_kwargs = checkpoint['init_args']
        self.current_epoch = checkpoint['current_epoch']
        self.logger.load_checkpoint(checkpoint['logging'])
        self._best_ema = checkpoint['_best_ema']
        self.inference_allowed_mirroring_axes = checkpoint.get('inference_allowed_mirroring_axes',
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint['optimizer_state'])
        if self.grad_scaler is not None and checkpoint['grad_scaler_state'] is not None:
            self.grad_scaler.load_state_dict(checkpoint['grad_scaler_state'])

    def on_train_end(self):
        """Extends ``nnUNetTrainer.on_train_end``: ``pretraining_report.json`` beside the final checkpoint."""
        super().on_train_end()
        if self.local_rank == 0:
            self.write_report()
