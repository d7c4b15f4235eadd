"""MedNeXt trainers: ``nnUNetTrainerMedNeXt{S,B,M,L}`` (kernel 3), ``..._k5`` (kernel 5, from scratch) and
``..._k5_UpKern`` (kernel 5, started from the matching kernel-3 run).

Optimiser as in the reference's nnU-Net trainer: AdamW, learning rate 1e-3, weight decay 3e-5 and
eps 1e-4 (eps 1e-8 gave NaN losses under fp16), poly decay, gradient-norm clipping at 12 (nnU-Net's).
"""
import os
from pathlib import Path

from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_plugins import settings
from nnunet_plugins.networks.mednext import mednext_from_plan, mednext_levels
from nnunet_plugins.networks.topology import Levels
from nnunet_plugins.pretraining import MAE, RCR, PretrainingTrainer, TokenBYOL, TokenCL
from nnunet_plugins.training.base import Role, nnUNetTrainerPlugin
from nnunet_plugins.training.schedule import FINETUNE_WARMUP_EPOCHS
from nnunet_plugins.weights import CheckpointError, UpKernError, upkern_from_checkpoint

UPKERN_REPORT_FILE = 'upkern_report.json'


class MedNeXtTrainer(nnUNetTrainerPlugin):
    """Shared by the MedNeXt trainers, which set ``variant`` (a size of the network's ``VARIANTS``) and
    ``kernel_size``."""

    variant: str
    kernel_size: int
    initial_lr = 1e-3
    weight_decay = 3e-5
    adam_eps = 1e-4
    # oneDNN's depthwise 3d convolutions: a 32x96x96 prediction 0.77-0.79x (S) and 0.67x (L) of the default layout's time
    cpu_layout = 'channels-last'

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, deep_supervision: bool) -> nn.Module:
        return mednext_from_plan(num_input_channels, num_output_channels, *cls.plan_topology(configuration_manager),
                                 variant=cls.variant, kernel_size=cls.kernel_size, deep_supervision=deep_supervision)

    @classmethod
    def network_levels(cls, configuration_manager: ConfigurationManager) -> Levels:
        return mednext_levels(*cls.plan_topology(configuration_manager))

    @classmethod
    def network_name(cls) -> str:
        return f'MedNeXt-{cls.variant} k{cls.kernel_size}'


class nnUNetTrainerMedNeXtS(MedNeXtTrainer):
    """MedNeXt-S, kernel 3 (5.6M parameters)."""
    variant, kernel_size = 'S', 3


class nnUNetTrainerMedNeXtB(MedNeXtTrainer):
    """MedNeXt-B, kernel 3 (10.5M parameters)."""
    variant, kernel_size = 'B', 3


class nnUNetTrainerMedNeXtM(MedNeXtTrainer):
    """MedNeXt-M, kernel 3 (17.6M parameters, gradient checkpointing)."""
    variant, kernel_size = 'M', 3


class nnUNetTrainerMedNeXtL(MedNeXtTrainer):
    """MedNeXt-L, kernel 3 (61.8M parameters, gradient checkpointing)."""
    variant, kernel_size = 'L', 3


class nnUNetTrainerMedNeXtS_k5(MedNeXtTrainer):
    """MedNeXt-S, kernel 5, from scratch (5.9M parameters)."""
    variant, kernel_size = 'S', 5


class nnUNetTrainerMedNeXtB_k5(MedNeXtTrainer):
    """MedNeXt-B, kernel 5, from scratch (11.0M parameters)."""
    variant, kernel_size = 'B', 5


class nnUNetTrainerMedNeXtM_k5(MedNeXtTrainer):
    """MedNeXt-M, kernel 5, from scratch (18.3M parameters, gradient checkpointing)."""
    variant, kernel_size = 'M', 5


class nnUNetTrainerMedNeXtL_k5(MedNeXtTrainer):
    """MedNeXt-L, kernel 5, from scratch (63.0M parameters, gradient checkpointing)."""
    variant, kernel_size = 'L', 5


class MedNeXtUpKernTrainer(MedNeXtTrainer):
    """Shared by the UpKern trainers: on a fresh start, the network is initialised by UpKern from a trained run.

    The source is ``checkpoint_final.pth`` of ``source_trainer`` on the same dataset, plans, configuration
    and fold, or the file named by ``nnUNet_plugins_upkern_source``. A fold that already holds its own
    checkpoint (``--c``, ``--val``) skips UpKern, since nnU-Net loads that checkpoint next.
    """

    role = Role.UPKERN
    source_trainer: str

    def conventional_source(self) -> Path:
        """``checkpoint_final.pth`` of ``source_trainer`` on this run's dataset, plans, configuration and fold."""
        identifier = convert_trainer_plans_config_to_identifier(
            self.source_trainer, self.plans_manager.plans_name, self.configuration_name)
        return Path(self.output_folder_base).parent / identifier / f'fold_{self.fold}' / 'checkpoint_final.pth'

    def initialize(self):
        if self.was_initialized:
            return
        super().initialize()
        own = self.existing_checkpoints()
        if own:
            self.print_to_log_file(f'UpKern skipped: this fold already holds {own[0]}, which nnU-Net loads instead')
            return
        override = self.plugin_settings.value(settings.UPKERN_SOURCE)
        source = self.plugin_settings.upkern_source or self.conventional_source()
        if override and not source.is_file():
            raise FileNotFoundError(
                f'{settings.UPKERN_SOURCE}={override!r} names no file. Set it to the checkpoint file to start from, '
                f'or unset it to start from {self.conventional_source()}.')
        if not source.is_file():
            raise FileNotFoundError(
                f'{type(self).__name__} starts from a trained {self.source_trainer} run, but {source} does not exist. '
                f'Train that first (nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name} '
                f'{self.fold} -tr {self.source_trainer} -p {self.plans_manager.plans_name}), or set '
                f'{settings.UPKERN_SOURCE} to the checkpoint file to start from.')
        try:
            report = upkern_from_checkpoint(self.plain_network(), source)
        except UpKernError as error:
            raise UpKernError(f'{type(self).__name__} cannot start from {source}: {error}') from None
        except CheckpointError as error:
            fix = (f'Set {settings.UPKERN_SOURCE} to a checkpoint file that is whole, or unset it to start from '
                   f'{self.conventional_source()}.' if override else
                   f'Train {self.source_trainer} on this fold again (move its folder away first), or set '
                   f'{settings.UPKERN_SOURCE} to another checkpoint file to start from.')
            raise CheckpointError(f'{type(self).__name__} starts from {self.source_trainer}\'s weights, but {error}. '
                                  f'{fix}') from None
        for line in report.lines():
            self.print_to_log_file(line)
        if self.local_rank == 0:
            report.save(os.path.join(self.output_folder, UPKERN_REPORT_FILE))


class nnUNetTrainerMedNeXtS_k5_UpKern(MedNeXtUpKernTrainer):
    """MedNeXt-S, kernel 5, started by UpKern from nnUNetTrainerMedNeXtS of the same fold."""
    variant, kernel_size, source_trainer = 'S', 5, 'nnUNetTrainerMedNeXtS'


class nnUNetTrainerMedNeXtB_k5_UpKern(MedNeXtUpKernTrainer):
    """MedNeXt-B, kernel 5, started by UpKern from nnUNetTrainerMedNeXtB of the same fold."""
    variant, kernel_size, source_trainer = 'B', 5, 'nnUNetTrainerMedNeXtB'


class nnUNetTrainerMedNeXtM_k5_UpKern(MedNeXtUpKernTrainer):
    """MedNeXt-M, kernel 5, started by UpKern from nnUNetTrainerMedNeXtM of the same fold."""
    variant, kernel_size, source_trainer = 'M', 5, 'nnUNetTrainerMedNeXtM'


class nnUNetTrainerMedNeXtL_k5_UpKern(MedNeXtUpKernTrainer):
    """MedNeXt-L, kernel 5, started by UpKern from nnUNetTrainerMedNeXtL of the same fold."""
    variant, kernel_size, source_trainer = 'L', 5, 'nnUNetTrainerMedNeXtL'


# ---- fine-tuning and pre-training (declared here, with the network they train; `nnunet-plugins trainers` lists them)


class nnUNetTrainerMedNeXtS_Finetune(nnUNetTrainerMedNeXtS):
    """MedNeXt-S k3, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerMedNeXtB_Finetune(nnUNetTrainerMedNeXtB):
    """MedNeXt-B k3, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerMedNeXtM_Finetune(nnUNetTrainerMedNeXtM):
    """MedNeXt-M k3, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerMedNeXtL_Finetune(nnUNetTrainerMedNeXtL):
    """MedNeXt-L k3, fine-tuning: 50-epoch linear warm-up, then poly decay."""
    role, warmup_epochs = Role.FINETUNE, FINETUNE_WARMUP_EPOCHS


class nnUNetTrainerMedNeXtS_PretrainRCR(PretrainingTrainer):
    """RCR pre-training of MedNeXt-S k3, for nnUNetTrainerMedNeXtS."""
    network_trainer, method = nnUNetTrainerMedNeXtS, RCR()


class nnUNetTrainerMedNeXtS_PretrainTokenCL(PretrainingTrainer):
    """Token-level contrastive pre-training of MedNeXt-S k3, for nnUNetTrainerMedNeXtS."""
    network_trainer, method = nnUNetTrainerMedNeXtS, TokenCL()


class nnUNetTrainerMedNeXtS_PretrainTokenBYOL(PretrainingTrainer):
    """Token-level BYOL pre-training of MedNeXt-S k3, for nnUNetTrainerMedNeXtS."""
    network_trainer, method = nnUNetTrainerMedNeXtS, TokenBYOL()


class nnUNetTrainerMedNeXtS_PretrainMAE(PretrainingTrainer):
    """nnssl's masked-image modelling of the whole MedNeXt-S k3 (encoder and decoder), for nnUNetTrainerMedNeXtS."""
    network_trainer, method = nnUNetTrainerMedNeXtS, MAE()


class nnUNetTrainerMedNeXtB_PretrainRCR(PretrainingTrainer):
    """RCR pre-training of MedNeXt-B k3, for nnUNetTrainerMedNeXtB."""
    network_trainer, method = nnUNetTrainerMedNeXtB, RCR()


class nnUNetTrainerMedNeXtB_PretrainTokenCL(PretrainingTrainer):
    """Token-level contrastive pre-training of MedNeXt-B k3, for nnUNetTrainerMedNeXtB."""
    network_trainer, method = nnUNetTrainerMedNeXtB, TokenCL()


class nnUNetTrainerMedNeXtB_PretrainTokenBYOL(PretrainingTrainer):
    """Token-level BYOL pre-training of MedNeXt-B k3, for nnUNetTrainerMedNeXtB."""
    network_trainer, method = nnUNetTrainerMedNeXtB, TokenBYOL()


class nnUNetTrainerMedNeXtB_PretrainMAE(PretrainingTrainer):
    """nnssl's masked-image modelling of the whole MedNeXt-B k3 (encoder and decoder), for nnUNetTrainerMedNeXtB."""
    network_trainer, method = nnUNetTrainerMedNeXtB, MAE()


class nnUNetTrainerMedNeXtM_PretrainRCR(PretrainingTrainer):
    """RCR pre-training of MedNeXt-M k3, for nnUNetTrainerMedNeXtM."""
    network_trainer, method = nnUNetTrainerMedNeXtM, RCR()


class nnUNetTrainerMedNeXtM_PretrainTokenCL(PretrainingTrainer):
    """Token-level contrastive pre-training of MedNeXt-M k3, for nnUNetTrainerMedNeXtM."""
    network_trainer, method = nnUNetTrainerMedNeXtM, TokenCL()


class nnUNetTrainerMedNeXtM_PretrainTokenBYOL(PretrainingTrainer):
    """Token-level BYOL pre-training of MedNeXt-M k3, for nnUNetTrainerMedNeXtM."""
    network_trainer, method = nnUNetTrainerMedNeXtM, TokenBYOL()


class nnUNetTrainerMedNeXtM_PretrainMAE(PretrainingTrainer):
    """nnssl's masked-image modelling of the whole MedNeXt-M k3 (encoder and decoder), for nnUNetTrainerMedNeXtM."""
    network_trainer, method = nnUNetTrainerMedNeXtM, MAE()


class nnUNetTrainerMedNeXtL_PretrainRCR(PretrainingTrainer):
    """RCR pre-training of MedNeXt-L k3, for nnUNetTrainerMedNeXtL."""
    network_trainer, method = nnUNetTrainerMedNeXtL, RCR()


class nnUNetTrainerMedNeXtL_PretrainTokenCL(PretrainingTrainer):
    """Token-level contrastive pre-training of MedNeXt-L k3, for nnUNetTrainerMedNeXtL."""
    network_trainer, method = nnUNetTrainerMedNeXtL, TokenCL()


class nnUNetTrainerMedNeXtL_PretrainTokenBYOL(PretrainingTrainer):
    """Token-level BYOL pre-training of MedNeXt-L k3, for nnUNetTrainerMedNeXtL."""
    network_trainer, method = nnUNetTrainerMedNeXtL, TokenBYOL()


class nnUNetTrainerMedNeXtL_PretrainMAE(PretrainingTrainer):
    """nnssl's masked-image modelling of the whole MedNeXt-L k3 (encoder and decoder), for nnUNetTrainerMedNeXtL."""
    network_trainer, method = nnUNetTrainerMedNeXtL, MAE()
