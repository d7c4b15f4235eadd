"""The pre-training trainer: a network trainer's network and a method, composed.

``nnUNetv2_train D CONF FOLD -tr nnUNetTrainerX_Pretrain<Method>`` pre-trains the encoder (with MAE the whole
network) of the network that ``nnUNetTrainerX`` trains, with nnU-Net's patch sampling, augmentation, schedule, logs,
``progress.png``, ``--c`` and ``-num_gpus``. Labels are never read by the loss (nor by the patch sampling: no
foreground oversampling). Validation reports the same losses on the validation cases; nothing is segmented or
exported. A trainer is declared by its two parts::

    class nnUNetTrainerMedNeXtS_k5_PretrainTokenCL(PretrainingTrainer):
        \"\"\"Token-level contrastive pre-training of MedNeXt-S k5, for nnUNetTrainerMedNeXtS_k5.\"\"\"
        network_trainer, method = nnUNetTrainerMedNeXtS_k5, TokenCL()

``checkpoint_final.pth`` (and ``_best``, lowest moving average of the validation loss, and ``_latest``) holds the
segmentation network's state dict under ``network_weights`` (the keys of ``nnUNetTrainerX``'s network; the decoder
at its initialisation, except after MAE, which trains it too) and the method's heads under ``pretraining_heads``, so
stock ``-pretrained_weights`` fine-tunes from it and ``--c`` resumes the heads too. ``pretraining_report.json``
beside it says what was pre-trained on what.
"""
import dataclasses
import json
import os
from typing import ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn

from nnunet_plugins.pretraining.checkpoint import HEADS_KEY
from nnunet_plugins.pretraining.method import OPTIMISER_SETTINGS, OptimiserSettings, PretrainingMethod, PretrainingModel
from nnunet_plugins.pretraining.nnunet_overrides import PretrainingOverrides
from nnunet_plugins.training.base import Role, nnUNetTrainerPlugin
from nnunet_plugins.weights.provenance import REPORT_FILE


class MethodSetting:
    """A pre-training trainer's optimiser setting (``initial_lr``, ...): the method's
    (``method.optimiser.<name>``) unless a subclass declares its own value, as on a supervised trainer."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: object, owner: type):
        return getattr(owner.method.optimiser, self.name)


class PretrainingTrainer(PretrainingOverrides):
    """One pre-training trainer for every network and method: ``network_trainer`` builds the segmentation network
    from the plans (and checks the patch), ``method`` (a :class:`~nnunet_plugins.pretraining.method.PretrainingMethod`)
    supplies heads, views, losses and every optimiser setting; nothing else comes from the network's supervised
    trainer.

    Settings are declared on a subclass: ``initial_lr``, ``weight_decay``, ``adam_eps``, ``warmup_epochs``,
    ``algorithm``, ``sgd_momentum``, ``warmup_from_zero``, ``decay`` (default: the method's
    :class:`~nnunet_plugins.pretraining.method.OptimiserSettings`), nnU-Net's ``num_epochs`` and the like, and the
    method's own as another method object, e.g. ``method = TokenCL(same_position_weight=0)``.
    """

    role = Role.PRETRAINING
    network_trainer: ClassVar[type[nnUNetTrainer]]
    method: ClassVar[PretrainingMethod]
    initial_lr = MethodSetting()
    weight_decay = MethodSetting()
    adam_eps = MethodSetting()
    warmup_epochs = MethodSetting()
    algorithm = MethodSetting()
    sgd_momentum = MethodSetting()
    warmup_from_zero = MethodSetting()
    decay = MethodSetting()
    enable_deep_supervision = False
    oversample_foreground_percent = 0.0

    def __init_subclass__(cls, **kwargs):
        """Refuse a method's setting declared on the trainer (``same_position_weight = 0``), which the method would
        never see: it belongs in the method object."""
        super().__init_subclass__(**kwargs)
        method = getattr(cls, 'method', None)
        if method is None:
            return
        declared = set(cls.__dict__) - set(OPTIMISER_SETTINGS)
        misplaced = sorted({f.name for f in dataclasses.fields(method) if f.init} & declared)
        if misplaced:
            settings = ', '.join(f'{name}={cls.__dict__[name]!r}' for name in misplaced)
            raise TypeError(f'{cls.__name__} declares {", ".join(misplaced)}, a setting of its method, on the trainer, '
                            f'where the method would not see it; declare method = {type(method).__name__}({settings}) '
                            f'instead')

    # ---- the composition ----

    @classmethod
    def segmentation_network(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                             num_input_channels: int, num_output_channels: int) -> nn.Module:
        """The network ``network_trainer`` trains (its patch check included), without deep supervision."""
        return cls.network_trainer.build_network_architecture(plans_manager, configuration_manager,
                                                              num_input_channels, num_output_channels,
                                                              enable_deep_supervision=False)

    @classmethod
    def network_name(cls) -> str:
        trainer = cls.network_trainer
        name = trainer.network_name() if issubclass(trainer, nnUNetTrainerPlugin) else \
            f"{trainer.__name__}'s network of the plans"
        return f'{name} with {cls.method.name} heads'

    def method_of_run(self) -> PretrainingMethod:
        """This run's copy of the class's method object (what it derives from the patch is the run's), checked."""
        method = dataclasses.replace(type(self).method)
        method.check()
        return method

    def optimiser_settings_of_run(self) -> OptimiserSettings:
        """The optimiser settings this run trains with: the method's, a subclass's declarations and the short
        schedule's warm-up (``nnUNet_plugins_epochs``) applied."""
        return OptimiserSettings(**{name: getattr(self, name) for name in OPTIMISER_SETTINGS})

    def switch_gradient_checkpointing(self, model: PretrainingModel) -> None:
        """The run's ``nnUNet_plugins_checkpointing`` goes to the segmentation network inside the model, which has
        the switch."""
        super().switch_gradient_checkpointing(model.network)

    def pretraining_model(self) -> PretrainingModel:
        """The segmentation network (``.network``) and the heads (``.heads``), without DDP and compile wrappers."""
        return self.plain_network()

    # ---- what the steps share ----

    def autocast(self):
        """Mixed precision on CUDA, as nnU-Net's steps."""
        return autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context()

    @staticmethod
    def as_numpy(losses: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """nnU-Net's step output: ``loss`` (the total), each term and each reading."""
        return {'loss' if key == 'total' else key: value.detach().cpu().numpy() for key, value in losses.items()}

    # ---- the report ----

    def write_report(self) -> None:
        with open(os.path.join(self.output_folder, REPORT_FILE), 'w') as f:
            json.dump(self.report(), f, indent=2)

    def report(self) -> dict:
        """What ``pretraining_report.json`` says: the method, the run, the cases and the pre-trained tensors."""
        model = self.pretraining_model()
        pretrained = model.pretrained_tensors()
        tensors = model.network.state_dict(keep_vars=True)
        training, validation = self.do_split()
        return {
            'method': self.method.describe(),
            'trainer': type(self).__name__,
            'network_trainer': self.network_trainer.__name__,
            'dataset': self.plans_manager.dataset_name,
            'plans': self.plans_manager.plans_name,
            'configuration': self.configuration_name,
            'fold': self.fold,
            'cases': {'training': sorted(training), 'validation': sorted(validation)},
            'epochs': self.current_epoch,
            'iterations_per_epoch': self.num_iterations_per_epoch,
            'batch_size': self.batch_size,
            'patch_size': list(self.configuration_manager.patch_size),
            'optimiser': dataclasses.asdict(self.optimiser_settings_of_run()),
            **self.method.report(),
            # the tensors the method trains, under every key they have (nnU-Net's decoders also hold the encoder)
            'pretrained_tensors': [key for key, tensor in tensors.items() if id(tensor) in pretrained],
            'initialised_tensors': [key for key, tensor in tensors.items() if id(tensor) not in pretrained],
            'heads': f'{HEADS_KEY} in the checkpoint: ' + ', '.join(model.heads.state_dict()),
        }
