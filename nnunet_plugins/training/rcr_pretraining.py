"""Self-supervised pre-training of paper 003 (rotation, contrastive, reconstruction: "RCR") as nnU-Net trainers.

``nnUNetv2_train D CONF FOLD -tr nnUNetTrainerX_PretrainRCR`` pre-trains the encoder of the network that
``nnUNetTrainerX`` trains (the machinery, checkpoint and report: :mod:`nnunet_plugins.training.pretraining`).
Per iteration (:mod:`nnunet_plugins.training.proxy_tasks`): two rotated, cut-out views of every patch, the
encoder's bottleneck, three heads (:mod:`nnunet_plugins.networks.pretraining_heads`), three losses summed.

nnU-Net's own augmentation is kept, except what would make the rotation task ambiguous: mirroring in the y-x
plane (mirroring y and x is a half turn) and in-plane rotations beyond 30 degrees (nnU-Net rotates 2d and
anisotropic patches by up to 180).

Optimiser as in the paper: AdamW, learning rate 4e-4, weight decay 1e-5, linear warm-up (2 epochs: the paper's
500 iterations at nnU-Net's 250 per epoch) then cosine decay, a function of the epoch so that ``--c`` resumes
it exactly; nnU-Net's gradient-norm clipping at 12.
"""
import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_plugins.networks.pretraining_heads import PretrainingModel
from nnunet_plugins.training.pretraining import SelfSupervisedPretraining
from nnunet_plugins.training.proxy_tasks import LOSS_TERMS, allowed_rotations, make_views, proxy_losses

METHOD = ('RCR of paper 003 (Swin UNETR pre-training): two views per patch, each rotated by a quarter turn in the y-x '
          'plane and cut out (<= 30% of voxels); L1 reconstruction of the rotated uncut view + 4-way rotation '
          'cross-entropy + NT-Xent (cosine, temperature 0.5, 512-d), weights 1/1/1; rotation and contrastive heads '
          'on the spatially averaged bottleneck')
MAX_INPLANE_ROTATION = 30. / 360 * 2 * np.pi


class PretrainRCR(SelfSupervisedPretraining):
    """Turns a plugin trainer into its RCR pre-training trainer; put it first among the bases::

        class nnUNetTrainerMedNeXtS_k5_PretrainRCR(PretrainRCR, nnUNetTrainerMedNeXtS_k5):
            \"\"\"RCR pre-training of MedNeXt-S k5's encoder.\"\"\"
    """

    method_name = 'RCR'
    method = METHOD
    loss_terms = LOSS_TERMS

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.rotations = allowed_rotations(self.configuration_manager.patch_size)

    @classmethod
    def pretraining_model_for(cls, network: nn.Module, num_input_channels: int,
                              configuration_manager: ConfigurationManager) -> PretrainingModel:
        return PretrainingModel(network, num_input_channels, configuration_manager.patch_size)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        dims = len(self.configuration_manager.patch_size)
        rotation = (max(rotation[0], -MAX_INPLANE_ROTATION), min(rotation[1], MAX_INPLANE_ROTATION))
        mirror_axes = tuple(axis for axis in mirror_axes if axis < dims - 2)
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        views = make_views(batch['data'].to(self.device, non_blocking=True), self.rotations, self.rng)
        with self._autocast():
            return proxy_losses(self.network(views.inputs), views)

    def method_log(self) -> list[str]:
        if len(self.rotations) == 4:
            return []
        patch = list(self.configuration_manager.patch_size)
        return [f'The patch {patch} is not square in y-x ({patch[-2]} x {patch[-1]}): a 90 or 270 degree turn would '
                f'change its shape, so the rotation task draws 0 and 180 degrees only.']

    def method_report(self) -> dict:
        return {'rotations_degrees': [90 * k for k in self.rotations]}
