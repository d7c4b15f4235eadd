"""What every self-supervised pre-training trainer shares, whatever its method (RCR, token-level CL or BYOL).

``nnUNetv2_train D CONF FOLD -tr nnUNetTrainerX_Pretrain<Method>`` pre-trains the encoder of the network that
``nnUNetTrainerX`` trains, with nnU-Net's patch sampling, augmentation, schedule, logs, ``progress.png``, ``--c``
and ``-num_gpus``. Labels are never read by the loss (nor by the patch sampling: no foreground oversampling).
:class:`SelfSupervisedPretraining` holds the machinery; a method (:mod:`~nnunet_plugins.training.rcr_pretraining`,
:mod:`~nnunet_plugins.training.token_pretraining`) supplies its model of network and heads, its losses and what it
logs. Validation reports the same losses on the validation cases; nothing is segmented or exported.

``checkpoint_final.pth`` (and ``_best``, lowest moving average of the validation loss, and ``_latest``) holds the
segmentation network's state dict under ``network_weights`` (the keys of ``nnUNetTrainerX``'s network; the decoder
at its initialisation) and the method's heads under ``pretraining_heads``, so stock ``-pretrained_weights``
fine-tunes from it and ``--c`` resumes the heads too. ``pretraining_report.json`` beside it says what was
pre-trained on what.
"""
import json
import math
import os
from time import time

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import _LRScheduler

from nnunet_plugins.checkpoints import CheckpointError
from nnunet_plugins.networks.layout import follow_device_layout
from nnunet_plugins.training.base import Role
from nnunet_plugins.training.unlabeled import nnUNetDatasetWithUnlabeled, unlabeled_identifiers

matplotlib.use('agg')
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend, as nnU-Net does)

REPORT_FILE = 'pretraining_report.json'
HEADS_KEY = 'pretraining_heads'
EMA = 0.9  # smoothing of the validation loss that picks checkpoint_best.pth, as nnU-Net's pseudo Dice
COLORS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red')


class WarmupCosineLRScheduler(_LRScheduler):
    """Linear warm-up over ``warmup_epochs`` (from ``initial_lr / (warmup_epochs + 1)``), then cosine decay towards
    0 at ``max_epochs``; ``step(epoch)`` sets the learning rate of that epoch (nnU-Net steps once per epoch)."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, warmup_epochs: int, max_epochs: int):
        self.initial_lr, self.warmup_epochs, self.max_epochs = initial_lr, warmup_epochs, max_epochs
        super().__init__(optimizer)

    def describe(self) -> str:
        return (f'linear warm-up to {self.initial_lr} over the first {self.warmup_epochs} epochs, then cosine decay '
                f'over {self.max_epochs - self.warmup_epochs} epochs')

    def learning_rate(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.initial_lr * (epoch + 1) / (self.warmup_epochs + 1)
        progress = (epoch - self.warmup_epochs) / max(1, self.max_epochs - self.warmup_epochs)
        return self.initial_lr * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, epoch: int | None = None) -> None:
        epoch = self.last_epoch + 1 if epoch is None else epoch
        self.last_epoch = epoch
        for group in self.optimizer.param_groups:
            group['lr'] = self.learning_rate(epoch)
        self._last_lr = [group['lr'] for group in self.optimizer.param_groups]


class PretrainingLogger(LocalLogger):
    """nnU-Net's per-epoch logging with a method's loss terms and readings instead of the pseudo Dice.

    ``progress.png`` draws nnU-Net's loss, epoch-time and learning-rate panels, one of the loss terms when there
    is more than one, and one of the readings when there are any (training solid, validation dotted).

    Args:
        terms: names of the loss terms (their sum is the loss).
        readings: names of values logged beside the loss that are no part of it (e.g. a collapse monitor).
        readings_label: the y-axis label of the readings' panel.
    """

    def __init__(self, terms: tuple[str, ...], readings: tuple[str, ...] = (), readings_label: str = '',
                 verbose: bool = False):
        super().__init__(verbose)
        for key in ('mean_fg_dice', 'ema_fg_dice', 'dice_per_class_or_region'):
            del self.my_fantastic_logging[key]
        self.terms, self.readings, self.readings_label = terms, readings, readings_label
        self.my_fantastic_logging.update({f'{split}_{name}': [] for split in ('train', 'val')
                                          for name in (*terms, *readings)})

    def plot_progress_png(self, output_folder: str) -> None:
        logged = self.my_fantastic_logging
        epochs = list(range(min(len(values) for values in logged.values())))
        panels = [('loss (sum of the terms)', ('losses',), ('loss',))]
        if len(self.terms) > 1:
            panels.append(('loss term', self.terms, self.terms))
        if self.readings:
            panels.append((self.readings_label, self.readings, self.readings))
        plt.rcParams['font.size'] = 30  # nnU-Net's progress.png scales its fonts alike (seaborn, font_scale 2.5)
        fig, axes = plt.subplots(len(panels) + 2, 1, figsize=(30, 18 * (len(panels) + 2)))
        for ax, (ylabel, keys, labels) in zip(axes, panels):
            for key, label, color in zip(keys, labels, COLORS):
                ax.plot(epochs, logged[f'train_{key}'][:len(epochs)], color=color, ls='-', label=f'{label}_tr',
                        linewidth=4)
                ax.plot(epochs, logged[f'val_{key}'][:len(epochs)], color=color, ls='dotted', label=f'{label}_val',
                        linewidth=3)
            ax.set(xlabel='epoch', ylabel=ylabel)
        durations, rates = axes[-2:]
        durations.plot(epochs, [end - start for start, end in zip(logged['epoch_start_timestamps'],
                                                                  logged['epoch_end_timestamps'])][:len(epochs)],
                       color='b', ls='-', label='epoch duration', linewidth=4)
        durations.set(xlabel='epoch', ylabel='time [s]', ylim=(0, durations.get_ylim()[1]))
        rates.plot(epochs, logged['lrs'][:len(epochs)], color='b', ls='-', label='learning rate', linewidth=4)
        rates.set(xlabel='epoch', ylabel='learning rate')
        for ax in axes:
            ax.legend(loc=(0, 1))
        plt.tight_layout()
        fig.savefig(os.path.join(output_folder, 'progress.png'))
        plt.close(fig)


class SelfSupervisedPretraining:
    """Turns a plugin trainer (a subclass of ``nnUNetTrainerPlugin``) into a pre-training trainer; a method derives
    from it and is put first among a trainer's bases::

        class nnUNetTrainerMedNeXtS_k5_PretrainRCR(PretrainRCR, nnUNetTrainerMedNeXtS_k5):
            \"\"\"RCR pre-training of MedNeXt-S k5's encoder.\"\"\"

    The trainer after it builds the segmentation network (deep supervision off: only the encoder runs).

    A method supplies :attr:`method_name`, :attr:`method`, :attr:`loss_terms` (and :attr:`readings`),
    :meth:`pretraining_model_for` (a module with the segmentation network as ``network``, the heads as ``heads`` and
    ``trainable_parameters()``) and :meth:`_losses`; it may change the optimiser (:meth:`configure_optimizers`,
    AdamW with warm-up and cosine decay here), :meth:`after_optimizer_step`, :meth:`method_log` and
    :meth:`method_report`.
    """

    method_name: str  # e.g. 'RCR', as the training log names the method
    method: str  # what the training log and the report say the method is
    loss_terms: tuple[str, ...]  # the terms :meth:`_losses` returns, whose sum ('total') is minimised
    readings: tuple[str, ...] = ()  # values :meth:`_losses` also returns, logged and drawn but not minimised
    readings_label: str = ''
    role = Role.PRETRAINING
    initial_lr = 4e-4
    weight_decay = 1e-5
    warmup_epochs = 2
    enable_deep_supervision = False
    oversample_foreground_percent = 0.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.logger.local_logger = PretrainingLogger(self.loss_terms, self.readings, self.readings_label)
        self.rng = np.random.default_rng(np.random.randint(2 ** 32))  # np.random.seed(...) seeds the views too

    # ---- the network: the segmentation network and the heads ----

    @classmethod
    def segmentation_network(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                             num_input_channels: int, num_output_channels: int) -> nn.Module:
        """The network the matching supervised trainer trains, without deep supervision."""
        return super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                  num_output_channels, enable_deep_supervision=False)

    @classmethod
    def pretraining_model_for(cls, network: nn.Module, num_input_channels: int,
                              configuration_manager: ConfigurationManager) -> nn.Module:
        """The method's model: ``network`` (kept as ``.network``) with the heads on its encoder (``.heads``)."""
        raise NotImplementedError

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = cls.segmentation_network(plans_manager, configuration_manager, num_input_channels,
                                           num_output_channels)
        model = cls.pretraining_model_for(network, num_input_channels, configuration_manager)
        # the network's own layout hook (networks.layout) runs on its forward, which pre-training bypasses
        return follow_device_layout(model, network.cpu_layout) if hasattr(network, 'cpu_layout') else model

    def pretraining_model(self) -> nn.Module:
        """The segmentation network and the heads, without the DDP and torch.compile wrappers."""
        return super().plain_network()

    def plain_network(self) -> nn.Module:
        """The segmentation network, as in the supervised trainer."""
        return self.pretraining_model().network

    def initialize(self):
        super().initialize()
        unlabeled = unlabeled_identifiers(self.preprocessed_dataset_folder)
        if unlabeled:  # added by `nnunet-plugins add-unlabeled`; the labeled cases load as before
            self.dataset_class = nnUNetDatasetWithUnlabeled
            self.print_to_log_file(f'{len(unlabeled)} unlabeled cases join the training cases '
                                   f'(from {self.preprocessed_dataset_folder}_unlabeled)')
        heads = self.pretraining_model().heads
        self.print_to_log_file(f'{self.pretraining_model().extra_repr()}, '
                               f'{sum(p.numel() for p in heads.parameters()):,} parameters')
        if self.is_ddp:  # nnU-Net's DDP expects a gradient for every parameter; the decoder gets none here
            self.network = DistributedDataParallel(self.network.module, device_ids=[self.local_rank],
                                                   find_unused_parameters=True)

    def do_split(self) -> tuple[list[str], list[str]]:
        """nnU-Net's split of the labeled cases, with every unlabeled case added to training (never to validation)."""
        training, validation = super().do_split()
        return training + unlabeled_identifiers(self.preprocessed_dataset_folder), validation

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.pretraining_model().trainable_parameters(), lr=self.initial_lr,
                                      weight_decay=self.weight_decay, eps=self.adam_eps)
        return optimizer, WarmupCosineLRScheduler(optimizer, self.initial_lr, self.warmup_epochs, self.num_epochs)

    # ---- training and validation steps ----

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The method's loss terms, their sum ``total`` and its :attr:`readings` (scalars) on a batch of patches."""
        raise NotImplementedError

    def _autocast(self):
        """Mixed precision on CUDA, as nnU-Net's steps."""
        return autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context()

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._losses(batch)
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
        self.after_optimizer_step()
        result = self._numpy(losses)
        self.check_finite_loss(result['loss'])
        return result

    def after_optimizer_step(self) -> None:
        """What a method does after every optimiser step (BYOL moves its target)."""

    def validation_step(self, batch: dict) -> dict:
        return self._numpy(self._losses(batch))

    @staticmethod
    def _numpy(losses: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """nnU-Net's step output: ``loss`` (the total), each term and each reading."""
        return {'loss' if key == 'total' else key: value.detach().cpu().numpy() for key, value in losses.items()}

    def _log_means(self, outputs: list[dict], split: str) -> None:
        """Log the mean of the total, each term and each reading over the epoch's steps (and DDP ranks); a reading
        that is undefined on a step (NaN) is left out of its mean."""
        for key in ('loss', *self.loss_terms, *self.readings):
            values = np.array([output[key] for output in outputs])
            if self.is_ddp:
                everywhere = [None] * dist.get_world_size()
                dist.all_gather_object(everywhere, values)
                values = np.concatenate(everywhere)
            if key in self.readings:
                mean = float(np.nanmean(values)) if np.isfinite(values).any() else float('nan')
            else:
                mean = float(values.mean())
            self.logger.log(f'{split}_losses' if key == 'loss' else f'{split}_{key}', mean, self.current_epoch)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        self._log_means(train_outputs, 'train')

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        self._log_means(val_outputs, 'val')

    def method_log(self) -> list[str]:
        """Lines the training log gets at the start, after the method's description."""
        return []

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f'{self.method_name} pre-training: {self.method}.')
        for line in self.method_log():
            self.print_to_log_file(line)

    def on_epoch_end(self):
        """nnU-Net's, with the loss terms and readings for the pseudo Dice and checkpoint_best.pth at the lowest
        moving average of the validation loss (kept in nnU-Net's ``_best_ema``)."""
        self.logger.log('epoch_end_timestamps', time(), self.current_epoch)
        value = self.logger.get_value
        for split in ('train', 'val'):
            terms = ', '.join(f'{term} {np.round(value(f"{split}_{term}", -1), decimals=4)}'
                              for term in self.loss_terms)
            self.print_to_log_file(f'{split}_loss', np.round(value(f'{split}_losses', -1), decimals=4), f'({terms})')
            if self.readings:
                readings = ', '.join(f'{name} {np.round(value(f"{split}_{name}", -1), decimals=4)}'
                                     for name in self.readings)
                self.print_to_log_file(f'{split} {self.readings_label}: {readings}')
        duration = value('epoch_end_timestamps', -1) - value('epoch_start_timestamps', -1)
        self.print_to_log_file(f'Epoch time: {np.round(duration, decimals=2)} s')
        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, 'checkpoint_latest.pth'))
        smoothed = self._val_ema()
        if self._best_ema is None or smoothed < self._best_ema:
            self._best_ema = smoothed
            self.print_to_log_file(f'New best moving average of the validation loss: {np.round(smoothed, 4)}')
            self.save_checkpoint(os.path.join(self.output_folder, 'checkpoint_best.pth'))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def _val_ema(self) -> float:
        """The exponential moving average of the validation loss over the epochs so far."""
        average = None
        for loss in self.logger.get_value('val_losses', None):
            average = loss if average is None else EMA * average + (1 - EMA) * loss
        return average

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file('Pre-training: no segmentation to validate or export; the validation losses are in '
                               'this log and progress.png.')

    # ---- checkpoints and the report ----

    def save_checkpoint(self, filename: str) -> None:
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
        }, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(filename_or_checkpoint, str):
            self.check_checkpoint_file(filename_or_checkpoint)
            checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
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
        super().on_train_end()
        if self.local_rank == 0:
            with open(os.path.join(self.output_folder, REPORT_FILE), 'w') as f:
                json.dump(self.report(), f, indent=2)

    def method_report(self) -> dict:
        """The method's settings for the report."""
        return {}

    def report(self) -> dict:
        """What ``pretraining_report.json`` says: the method, the run, the cases and the pre-trained tensors."""
        network = self.plain_network()
        encoder_tensors = {id(t) for t in network.encoder.state_dict(keep_vars=True).values()}
        tensors = network.state_dict(keep_vars=True)
        training, validation = self.do_split()
        return {
            'method': self.method,
            'trainer': type(self).__name__,
            'dataset': self.plans_manager.dataset_name,
            'plans': self.plans_manager.plans_name,
            'configuration': self.configuration_name,
            'fold': self.fold,
            'cases': {'training': sorted(training), 'validation': sorted(validation)},
            'epochs': self.current_epoch,
            'iterations_per_epoch': self.num_iterations_per_epoch,
            'batch_size': self.batch_size,
            'patch_size': list(self.configuration_manager.patch_size),
            **self.method_report(),
            # tensors of the encoder, under every key they have (nnU-Net's decoders also hold the encoder)
            'pretrained_tensors': [key for key, tensor in tensors.items() if id(tensor) in encoder_tensors],
            'initialised_tensors': [key for key, tensor in tensors.items() if id(tensor) not in encoder_tensors],
            'heads': f'{HEADS_KEY} in the checkpoint: ' + ', '.join(self.pretraining_model().heads.state_dict()),
        }
