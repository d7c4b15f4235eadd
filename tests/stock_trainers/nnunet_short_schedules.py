"""nnU-Net's own trainer with a test-sized schedule, for the tests' ensembles with a stock trainer.

nnU-Net's shortest trainer, ``nnUNetTrainer_1epoch``, still runs 250 training and 50 validation iterations; this
subclass changes those two numbers and nothing else (network, loss, data augmentation, checkpoints, validation and
export are nnU-Net's). The tests put this folder on ``nnUNet_extTrainer`` after the plugin's.
"""
import torch
from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import nnUNetTrainer_1epoch


class nnUNetTrainer_1epoch_2iterations(nnUNetTrainer_1epoch):
    """``nnUNetTrainer_1epoch`` with 2 training and 1 validation iteration, as the plugin trainers run in the tests."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
