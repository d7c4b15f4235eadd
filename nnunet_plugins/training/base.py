"""What every plugin trainer changes in nnU-Net's ``nnUNetTrainer``, and nothing else.

nnU-Net's planning, preprocessing, data augmentation, loss and 1000 x 250 schedule stay as they are.
A plugin trainer adds:

- its network, built by one family factory (:meth:`network_from_plan`) on the plans' topology, checked
  against the patch size before training, and described in the training log;
- every schedule and optimiser setting it declares on its class (``num_epochs = 300``, ``initial_lr``,
  ...), which nnU-Net's ``__init__`` would otherwise overwrite with its own defaults;
- the network's own deep-supervision scales, with a non-zero loss weight on every head
  (DDP requires every parameter to get a gradient);
- AdamW with poly decay per epoch, after a linear warm-up of ``warmup_epochs`` (``--c`` resumes it
  exactly, the learning rate being a function of the epoch);
- for fine-tuning, an encoder held fixed for the first ``freeze_encoder_epochs`` epochs, and a warning in the log
  when the pre-training behind ``-pretrained_weights`` trained on this fold's validation cases;
- the plugin's environment variables, read once when the trainer is made (:class:`PluginSettings`, kept as
  ``plugin_settings``): short schedules from ``nnUNet_plugins_epochs`` / ``nnUNet_plugins_iterations`` (the
  warm-up keeps its share of the epochs, or takes ``nnUNet_plugins_warmup_epochs``), announced loudly, and
  gradient checkpointing from ``nnUNet_plugins_checkpointing``, said in the log where the network has none;
- a clear error instead of training on when the loss stays non-finite;
- refusals, before training, to start from scratch over a fold that already holds checkpoints, to
  ``--c`` with a shorter schedule than the checkpoint has trained, and to read a damaged checkpoint
  without naming it.
"""
import os
import sys
from enum import Enum

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunet_plugins import settings
from nnunet_plugins.weights import CheckpointError, check_readable
from nnunet_plugins.weights.provenance import (
    REPORT_FILE, leaking_folds_warning, pretrained_weights_argument, pretraining_cases)
from nnunet_plugins.networks.layout import follow_device_layout
from nnunet_plugins.networks.topology import Levels, ShallowPlanError
from nnunet_plugins.presets import preset_for
from nnunet_plugins.settings import PluginSettings
from nnunet_plugins.training.schedule import WarmupPolyLRScheduler

MAX_NONFINITE_STEPS = 25
CHECKPOINT_FILES = ('checkpoint_final.pth', 'checkpoint_latest.pth', 'checkpoint_best.pth')
# nnUNetTrainer.__init__ assigns these as instance attributes; a value a subclass declares on its class wins
CLASS_SETTINGS = ('initial_lr', 'weight_decay', 'oversample_foreground_percent', 'probabilistic_oversampling',
                  'num_iterations_per_epoch', 'num_val_iterations_per_epoch', 'num_epochs',
                  'enable_deep_supervision', 'save_every')


class Role(str, Enum):
    """What a trainer class is for; ``nnunet-plugins trainers``, the benchmark and the tests select trainers by it."""
    SUPERVISED = 'supervised'  # trains a network from scratch
    UPKERN = 'upkern'  # trains a network started from another trained run (MedNeXt's UpKern)
    FINETUNE = 'fine-tune'  # a supervised trainer with the fine-tuning schedule, for -pretrained_weights
    PRETRAINING = 'pre-training'  # self-supervised pre-training of a network's encoder


class nnUNetTrainerPlugin(nnUNetTrainer):
    """Base of the plugin trainers; a network family supplies :meth:`network_from_plan`, :meth:`network_levels` and its
    optimiser settings.

    Any of :data:`CLASS_SETTINGS` declared on a subclass takes effect, e.g. a 300-epoch variant::

        class nnUNetTrainerMedNeXtL_300epochs(nnUNetTrainerMedNeXtL):
            num_epochs = 300

    and so do ``warmup_epochs`` (linear warm-up before the poly decay) and ``freeze_encoder_epochs`` (the
    parameters of ``network.encoder`` get no optimiser step in the first epochs), for fine-tuning.
    """

    role: Role = Role.SUPERVISED
    initial_lr: float = 1e-3
    weight_decay: float = 3e-5
    adam_eps: float = 1e-8
    # for networks that cannot take a one-voxel bottleneck, what is undefined there (in the patch-size error)
    undefined_on_one_voxel: str | None = None
    # the 3d network's memory layout on a CPU, in training and inference (networks.layout): PyTorch's default unless
    # a family was measured faster in the other (docs/benchmarks.md, 2026-11-29 layout entry)
    cpu_layout: str = 'contiguous'
    # fine-tuning: epochs of linear warm-up before the poly decay; epochs in which network.encoder stays fixed
    warmup_epochs: int = 0
    freeze_encoder_epochs: int = 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # the environment is read here, once: a variable changed later changes nothing for this trainer
        self.plugin_settings = PluginSettings.from_environment()
        for name in CLASS_SETTINGS:
            if hasattr(type(self), name):
                setattr(self, name, getattr(type(self), name))
        self._nonfinite_steps = 0
        self._loaded_checkpoint = None  # the file name load_checkpoint read (--c), e.g. checkpoint_latest.pth
        self.warmup_epochs, self.freeze_encoder_epochs = type(self).warmup_epochs, type(self).freeze_encoder_epochs
        self._apply_schedule_override()
        if not 0 <= self.warmup_epochs < self.num_epochs:
            raise ValueError(f'{type(self).__name__}: warmup_epochs={self.warmup_epochs} must be at least 0 and less '
                             f'than num_epochs={self.num_epochs}, so that the poly decay follows the warm-up')

    def _apply_schedule_override(self) -> None:
        epochs, iterations = self.plugin_settings.epochs, self.plugin_settings.iterations
        warmup = self.plugin_settings.warmup_epochs
        if epochs is None and iterations is None and warmup is None:
            return
        default = f'{self.num_epochs} x {self.num_iterations_per_epoch}, warm-up {self.warmup_epochs}'
        if warmup is not None:
            self.warmup_epochs = warmup
        if epochs is not None:
            if warmup is None and self.warmup_epochs:  # the warm-up keeps its share of the shortened schedule
                self.warmup_epochs = min(epochs - 1, max(1, round(self.warmup_epochs * epochs / self.num_epochs)))
            self.num_epochs = epochs
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = max(1, round(iterations / 5))
        asked = self.plugin_settings.as_set(settings.EPOCHS, settings.ITERATIONS, settings.WARMUP_EPOCHS)
        self.print_to_log_file(
            f'!!!!! SHORT SCHEDULE ({asked}): {self.num_epochs} epochs x {self.num_iterations_per_epoch} iterations '
            f'({self.num_val_iterations_per_epoch} validation), warm-up {self.warmup_epochs}, instead of {default}. '
            f'Fine for smoke tests, not for results. !!!!!')

    def initialize(self):
        super().initialize()
        network = self.plain_network()
        self.switch_gradient_checkpointing(network)
        self.print_to_log_file(f'{self.network_name()}: {network.extra_repr()}, '
                               f'{sum(p.numel() for p in network.parameters()):,} parameters')
        if self.warmup_epochs and hasattr(self.lr_scheduler, 'describe'):  # a subclass may bring its own scheduler
            self.print_to_log_file(f'learning rate: {self.lr_scheduler.describe()}')
        if self.freeze_encoder_epochs:
            encoder = getattr(network, 'encoder', None)
            if not isinstance(encoder, nn.Module):
                raise ValueError(f'{type(self).__name__}: freeze_encoder_epochs={self.freeze_encoder_epochs} holds '
                                 f'network.encoder fixed, but {type(network).__name__} has no encoder submodule')
            self._frozen_parameters = list(encoder.parameters())
            self.optimizer.register_step_pre_hook(self._hold_frozen_encoder)
            self.print_to_log_file(f'encoder ({len(self._frozen_parameters)} parameter tensors) held fixed in epochs '
                                   f'0-{self.freeze_encoder_epochs - 1}, trained from epoch '
                                   f'{self.freeze_encoder_epochs}')

    def plain_network(self) -> nn.Module:
        """The network without the DDP and torch.compile wrappers (either may be absent: nnU-Net wraps DDP after
        ``configure_optimizers``, which pre-training gives the model's parameters)."""
        network = self.network.module if isinstance(self.network, DistributedDataParallel) else self.network
        return network._orig_mod if isinstance(network, OptimizedModule) else network

    def switch_gradient_checkpointing(self, network: nn.Module) -> None:
        """Give the network this run's ``nnUNet_plugins_checkpointing``, before its first step; say in the training
        log when the network has no gradient checkpointing to switch (3D UX-Net, UTNetV2, nnU-Net's own).

        nnU-Net's ``initialize()`` builds the network with the classmethod :meth:`build_network_architecture`, which
        nnU-Net's predictor, ``adapt-weights`` and the benchmark call too: it knows the plans, not the trainer, and
        builds the family's default (where checkpointing changes nothing at inference). The trainer then sets its
        own value on the network it trains: the ``gradient_checkpointing`` attribute a network that supports it
        exposes (MedNeXt: every block; Swin UNETR: the Swin blocks).
        """
        wanted = self.plugin_settings.checkpointing
        if wanted is None:
            return
        if hasattr(network, 'gradient_checkpointing'):
            network.gradient_checkpointing = wanted
        else:
            self.print_to_log_file(
                f'!!!!! {settings.CHECKPOINTING}={self.plugin_settings.value(settings.CHECKPOINTING)!r} is not '
                f'applied: {self.network_name()} has no gradient checkpointing to switch (MedNeXt and Swin UNETR '
                f'have). Unset it for this trainer. !!!!!')

    # ---- the network, from the family's factory ----

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, deep_supervision: bool) -> nn.Module:
        """The family's network on the configuration's topology, built by its factory on :meth:`network_levels`,
        with the family's default gradient checkpointing (see :meth:`switch_gradient_checkpointing`).

        The network has ``strides`` (per level, the stride into it) and ``kernel_sizes`` attributes.
        """
        raise NotImplementedError

    @classmethod
    def network_levels(cls, configuration_manager: ConfigurationManager) -> Levels:
        """The levels the family's factory builds on this configuration, from its levels function (e.g.
        ``mednext_levels``), without building the network; raises ShallowPlanError when the plan is too shallow."""
        raise NotImplementedError

    @classmethod
    def network_name(cls) -> str:
        """What the training log calls the network."""
        return cls.__name__.removeprefix('nnUNetTrainer')

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        if enable_deep_supervision and getattr(cls, 'enable_deep_supervision', True) is False:
            raise ValueError(f'{cls.__name__} builds {cls.network_name()}, which has one output and no deep '
                             f'supervision; build it with enable_deep_supervision=False.')
        cls.check_patch_size(configuration_manager)
        network = cls.network_from_plan(configuration_manager, num_input_channels, num_output_channels,
                                        enable_deep_supervision)
        return follow_device_layout(network, cls.cpu_layout) if len(configuration_manager.patch_size) == 3 else network

    @staticmethod
    def plan_topology(configuration_manager: ConfigurationManager) -> tuple[list[list[int]], list[list[int]]]:
        """The configuration's per-stage ``strides`` and ``kernel_sizes`` (from its ``architecture`` block)."""
        arch_kwargs = configuration_manager.network_arch_init_kwargs
        missing = [key for key in ('strides', 'kernel_sizes') if key not in arch_kwargs]
        if missing:
            raise ValueError(
                f'the plans configuration has no architecture.arch_kwargs.{" or ".join(missing)}, which the plugin '
                f'networks take their topology from. Use a plans file written by nnU-Net 2.4 or later '
                f'(nnUNetv2_plan_experiment), or a configuration that inherits_from one that has them.')
        return arch_kwargs['strides'], arch_kwargs['kernel_sizes']

    @classmethod
    def network_strides(cls, configuration_manager: ConfigurationManager) -> list[list[int]]:
        """Strides of the network's resolution levels, one list per level, level 0 first, as its factory builds
        it on this configuration (:meth:`network_levels`); the patch check and the deep-supervision scales use it."""
        return [list(stride) for stride in cls.network_levels(configuration_manager).strides]

    @classmethod
    def check_patch_size(cls, configuration_manager: ConfigurationManager) -> None:
        """Raise ValueError, saying what each axis needs, when the network cannot take the plans' patch size."""
        patch_size, spacing = list(configuration_manager.patch_size), list(configuration_manager.spacing)
        try:
            strides = cls.network_strides(configuration_manager)
        except ShallowPlanError as error:
            raise ValueError(f'{cls.__name__} cannot take patch size {patch_size}: {error}; nnU-Net plans more '
                             f'levels for a larger patch. ' + cls.patch_advice([2 * p for p in patch_size], spacing)
                             ) from None
        divisors = np.prod(np.array(strides), axis=0).tolist()
        bad = [axis for axis, (p, d) in enumerate(zip(patch_size, divisors)) if p % d]
        if bad:
            suggestion = [max(d, round(p / d) * d) for p, d in zip(patch_size, divisors)]
            raise ValueError(
                f'{cls.__name__} cannot take patch size {patch_size}: '
                + ', '.join(f'axis {a} ({patch_size[a]}) must be divisible by {divisors[a]}' for a in bad)
                + ' (the product of its strides over the levels the network uses). '
                + cls.patch_advice(cls._more_than_one_voxel(suggestion, divisors), spacing))
        bottleneck = [p // d for p, d in zip(patch_size, divisors)]
        if cls.undefined_on_one_voxel and np.prod(bottleneck) == 1:
            raise ValueError(
                f'{cls.__name__} cannot take patch size {patch_size}: with strides {strides} its bottleneck would '
                f'be {bottleneck}, a single voxel, on which {cls.undefined_on_one_voxel}. '
                + cls.patch_advice(cls._more_than_one_voxel(patch_size, divisors), spacing))

    @classmethod
    def _more_than_one_voxel(cls, patch_size: list[int], divisors: list[int]) -> list[int]:
        """``patch_size`` (divisible by ``divisors``) with its most downsampled axis doubled where the bottleneck
        would otherwise be the single voxel the network cannot take."""
        suggestion = list(patch_size)
        if cls.undefined_on_one_voxel and suggestion == divisors:
            axis = int(np.argmax(divisors))
            suggestion[axis] = 2 * divisors[axis]
        return suggestion

    @classmethod
    def patch_advice(cls, patch_size: list[int], spacing: list[float]) -> str:
        """The end of every patch-size error: how to get a configuration that has ``patch_size`` at ``spacing`` (the
        spacing decides nnU-Net's strides, and so what the network needs)."""
        # a subclass (a _Finetune trainer, a user's variant) takes the preset of the trainer it derives from
        preset = next((found for base in cls.__mro__ if (found := preset_for(base.__name__, len(patch_size)))),
                      None)
        command = ('' if preset is None else
                   f'`nnunet-plugins plans DATASET --preset {preset.name} --patch {" ".join(map(str, patch_size))} '
                   f'--spacing {" ".join(f"{s:.4g}" for s in spacing)}` adds a configuration with them and nnU-Net\'s '
                   f'strides for them; or ')
        return (f'Use a patch_size such as {patch_size}: {command}set it in a configuration that inherits_from this '
                f'one, or re-plan with nnUNetv2_plan_experiment.')

    @classmethod
    def deep_supervision_scales(cls, configuration_manager: ConfigurationManager) -> list[list[float]]:
        """Scale of every network output relative to the patch, highest resolution first."""
        strides = np.array(cls.network_strides(configuration_manager), dtype=float)
        return [list(scale) for scale in 1 / np.cumprod(strides, axis=0)]

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        return self.deep_supervision_scales(self.configuration_manager)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        if getattr(type(self), 'enable_deep_supervision', True) is not False:  # else: one output, nothing to switch
            super().set_deep_supervision_enabled(enabled)

    def deep_supervision_weights(self) -> list[float]:
        """Loss weight of every output, highest resolution first, summing to 1.

        nnU-Net weights its lowest output 0; here every head counts, halving per level (as MedNeXt's reference).
        """
        weights = np.array([1 / 2 ** i for i in range(len(self._get_deep_supervision_scales()))])
        return (weights / weights.sum()).tolist()

    def _build_loss(self) -> nn.Module:
        loss = super()._build_loss()
        if self.enable_deep_supervision:
            loss = DeepSupervisionWrapper(loss.loss, self.deep_supervision_weights())
        return loss

    # ---- optimisation ----

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr,
                                      weight_decay=self.weight_decay, eps=self.adam_eps)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)

    def _hold_frozen_encoder(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """Optimiser pre-step hook: in the frozen epochs, drop the encoder's gradients, so that AdamW skips its
        parameters (no update, no weight decay, no moment). Gradients are still computed, so DDP, which expects
        every parameter's gradient, works unchanged; nnU-Net's gradient-norm clipping still counts them."""
        if self.current_epoch < self.freeze_encoder_epochs:
            for parameter in self._frozen_parameters:
                parameter.grad = None

    def train_step(self, batch: dict) -> dict:
        try:
            result = super().train_step(batch)
        except torch.OutOfMemoryError as error:
            raise torch.OutOfMemoryError(f'{self.out_of_memory_advice()}\nThe error: {error}') from error
        self.check_finite_loss(result['loss'])
        return result

    def out_of_memory_advice(self) -> str:
        """What ran out of GPU memory, and what to change so that it fits."""
        checkpointing = getattr(self.plain_network(), 'gradient_checkpointing', None)
        switch = '' if checkpointing is None else f', gradient checkpointing {"on" if checkpointing else "off"}'
        first = 'set nnUNet_plugins_checkpointing=1 (about half the memory for a quarter more step time on a GPU), ' \
            if checkpointing is False else ''
        return (f'{self.__class__.__name__} ran out of GPU memory in a training step (patch '
                f'{self.configuration_manager.patch_size}, batch {self.batch_size}, '
                f'{self.label_manager.num_segmentation_heads} outputs{switch}). To make it fit: {first}a smaller '
                f'batch or patch as a configuration of its own (nnunet-plugins plans DATASET --preset NAME --batch N '
                f'--patch ...), or a smaller network. nnunet-plugins benchmark DATASET CONFIGURATION -tr '
                f'{self.__class__.__name__} --variants checkpointing measures the memory with and without '
                f'checkpointing before a run.')

    def check_finite_loss(self, loss: np.ndarray) -> None:
        """Count consecutive iterations whose training ``loss`` is not finite; raise after
        :data:`MAX_NONFINITE_STEPS` of them."""
        if np.all(np.isfinite(loss)):
            self._nonfinite_steps = 0
        else:
            self._nonfinite_steps += 1
            if self._nonfinite_steps >= MAX_NONFINITE_STEPS:
                raise FloatingPointError(
                    f'{self.__class__.__name__}: the training loss was NaN or infinite for {self._nonfinite_steps} '
                    f'consecutive iterations (epoch {self.current_epoch}); stopping instead of training on. '
                    f'Checkpoints written so far are in {self.output_folder}. Check the images for NaNs, then try '
                    f'a lower learning rate or, on a GPU, nnUNet_compile=f.')

    # ---- safety ----

    def existing_checkpoints(self) -> list[str]:
        """The nnU-Net checkpoint files this fold's output folder already holds."""
        return [f for f in CHECKPOINT_FILES if os.path.isfile(os.path.join(self.output_folder, f))]

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        if isinstance(filename_or_checkpoint, str):
            self.check_checkpoint_file(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)

    def check_checkpoint_file(self, filename: str) -> None:
        """Raise CheckpointError, naming ``filename`` and what to do, when it cannot be read; remember its name."""
        try:
            check_readable(filename)
        except CheckpointError as error:
            others = [f for f in self.existing_checkpoints() if os.path.join(self.output_folder, f) !=
                      os.path.abspath(filename)]
            raise CheckpointError(
                f'{type(self).__name__}: {error}. Move it out of {self.output_folder}'
                + (f' to continue from {" or ".join(others)}' if others else '')
                + ', or train this fold anew in an empty folder.') from None
        self._loaded_checkpoint = os.path.basename(filename)

    def on_train_start(self):
        if self.current_epoch == 0:
            existing = self.existing_checkpoints()
            if existing:
                raise RuntimeError(
                    f'{self.output_folder} already holds a training run ({", ".join(existing)}), and this run would '
                    f'start from scratch over it. Continue that run with `nnUNetv2_train ... --c`, or move or delete '
                    f'the folder to train anew.')
        elif self.current_epoch > self.num_epochs or (self.current_epoch == self.num_epochs
                                                      and self._loaded_checkpoint != 'checkpoint_final.pth'):
            asked = self.plugin_settings.value(settings.EPOCHS)
            cause, fix = ((f'{settings.EPOCHS}={asked} asks for {self.num_epochs} epochs',
                           f'Unset {settings.EPOCHS} to continue {type(self).__name__}\'s own schedule, or set it to '
                           f'more than {self.current_epoch}.') if asked else
                          (f'{type(self).__name__} trains {self.num_epochs} epochs',
                           f'Set {settings.EPOCHS} to more than {self.current_epoch} to train on.'))
            raise RuntimeError(
                f'{self._loaded_checkpoint} in {self.output_folder} is at epoch {self.current_epoch}, but {cause}, so '
                f'`--c` would end the run without training the epochs left (nor decaying the learning rate to its '
                f'end). {fix}')
        if self.current_epoch == 0 and self.role is not Role.PRETRAINING:
            self.check_pretraining_fold(pretrained_weights_argument(sys.argv))
        super().on_train_start()

    def check_pretraining_fold(self, weights_file: str | None) -> None:
        """Say in the log whether the pre-training behind ``weights_file`` (``nnUNetv2_train``'s
        ``-pretrained_weights``, None without it) trained on this fold's validation cases: a warning naming how many,
        and the fix, when it did (the fold's validation would no longer be cross-validation); one line when its
        cases are unknown (no ``pretraining_report.json`` beside the file, nor an ``adapt-weights`` report)."""
        if weights_file is None:
            return
        pretraining = pretraining_cases(weights_file)
        if pretraining is None:
            self.print_to_log_file(f'no {REPORT_FILE} beside {weights_file} (nor an adapt-weights report of its '
                                   f'cases): which cases it was pre-trained on is unknown, so fold {self.fold}\'s '
                                   f'validation cases were not checked against them')
        elif self.fold == 'all':
            self.print_to_log_file(f'fold all has no validation cases of its own: evaluate on a separate test set, '
                                   f'which the pre-training ({len(pretraining.training)} training cases, listed in '
                                   f'{pretraining.report}) must not have seen')
        else:
            validation = self.do_split()[1]
            warning = leaking_folds_warning(pretraining, {self.fold: validation})
            self.print_to_log_file(
                f'!!!!! {warning} !!!!!' if warning else
                f'the pre-training (fold {pretraining.fold}, {pretraining.report}) trained on none of fold '
                f'{self.fold}\'s {len(validation)} validation cases')
