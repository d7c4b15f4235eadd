"""nnU-Net's own trainer with a test-sized schedule, for the tests that pair a stock trainer with the plugin's.

nnU-Net's shortest trainer, ``nnUNetTrainer_1epoch``, still runs 250 training and 50 validation iterations and then
predicts every validation case; this subclass runs 2 and 1 and skips that closing validation (nnU-Net's own code,
not the plugin's; the tests predict from its checkpoint instead). Network, loss, data augmentation and checkpoints are
nnU-Net's. The tests put this folder on ``nnUNet_extTrainer`` after the plugin's, as the README shows for a user's
own trainers.
"""
import torch
from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import nnUNetTrainer_1epoch

from nnunet_plugins.training.nnunet_network import nnUNetTrainer_Finetune


class nnUNetTrainer_1epoch_2iterations(nnUNetTrainer_1epoch):
    """``nnUNetTrainer_1epoch`` with 2 training and 1 validation iteration, as the plugin trainers run in the tests,
    and no closing validation. nnU-Net records the arguments by name, hence no ``*args``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file('no closing validation in this test trainer')


class nnUNetTrainer_Finetune_2epochs_2iterations(nnUNetTrainer_Finetune):
    """The plugin's ``nnUNetTrainer_Finetune`` (nnU-Net's network and SGD, a warm-up) with the test schedule: 2 epochs,
    the first the warm-up, of 2 training and 1 validation iteration, and no closing validation."""
    warmup_epochs = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 2, 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file('no closing validation in this test trainer')
