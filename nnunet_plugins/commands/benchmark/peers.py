"""Which trainer a benchmark row name means, and MONAI's networks as peers trained with the MedNeXt recipe."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_plugins.commands.lookup import find_trainer
from nnunet_plugins.registry import plugin_trainers
from nnunet_plugins.training.base import Role
from nnunet_plugins.training.base import nnUNetTrainerPlugin
from nnunet_plugins.training.mednext import MedNeXtTrainer


class PeerTrainer(nnUNetTrainerPlugin):
    """A MONAI network trained like the MedNeXt trainers (optimiser, loss weights, layout), so only the network
    differs. Its topology is fixed: ``downsamplings`` halvings along every axis, whatever the plans say."""

    initial_lr = MedNeXtTrainer.initial_lr
    weight_decay = MedNeXtTrainer.weight_decay
    adam_eps = MedNeXtTrainer.adam_eps
    downsamplings: int

    @classmethod
    def network_strides(cls, configuration_manager: ConfigurationManager) -> list[list[int]]:
        dims = len(configuration_manager.patch_size)
        return [[1] * dims] + [[2] * dims] * cls.downsamplings

    @classmethod
    def network_from_plan(cls, configuration_manager: ConfigurationManager, num_input_channels: int,
                          num_output_channels: int, deep_supervision: bool) -> nn.Module:
        return cls.build_peer(len(configuration_manager.patch_size), num_input_channels, num_output_channels,
                              deep_supervision)

    @classmethod
    def build_peer(cls, dims: int, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
        raise NotImplementedError


class MONAIMedNeXtPeer(PeerTrainer):
    """MONAI's ``create_mednext(variant, kernel_size=...)``; outputs full, 1/2, ..., 1/16 with deep supervision."""

    variant: str
    kernel_size: int
    downsamplings = 4
    cpu_layout = MedNeXtTrainer.cpu_layout  # the layout ours runs in, so that the two are compared alike

    @classmethod
    def build_peer(cls, dims: int, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
        from monai.networks.nets.mednext import create_mednext
        return create_mednext(cls.variant, spatial_dims=dims, in_channels=in_channels, out_channels=num_classes,
                              kernel_size=cls.kernel_size, deep_supervision=deep_supervision)


class MONAISwinUNETRPeer(PeerTrainer):
    """MONAI's SwinUNETR with the paper's embedding size 48 (about 62M parameters); one output."""

    downsamplings = 5
    enable_deep_supervision = False

    @classmethod
    def build_peer(cls, dims: int, in_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
        from monai.networks.nets import SwinUNETR
        return SwinUNETR(in_channels=in_channels, out_channels=num_classes, feature_size=48, spatial_dims=dims)


PEERS: dict[str, type[PeerTrainer]] = {
    **{f'MedNeXt{variant}{"_k5" if kernel == 5 else ""}':
       type(f'MONAIMedNeXt{variant}_k{kernel}', (MONAIMedNeXtPeer,), {'variant': variant, 'kernel_size': kernel})
       for kernel in (3, 5) for variant in 'SBML'},
    'SwinUNETR': MONAISwinUNETRPeer,
}


def default_trainers() -> list[str]:
    """Every supervised plugin trainer: the UpKern, fine-tuning and pre-training ones build the networks of those."""
    return [trainer.__name__ for trainer in plugin_trainers(Role.SUPERVISED)]


def trainer_class(name: str) -> type[nnUNetTrainer]:
    """The trainer (or peer) class called ``name``: a peer, a plugin trainer, or any trainer nnU-Net finds."""
    if name in PEERS:
        return PEERS[name]
    found = find_trainer(name)
    if found is None:
        raise ValueError(f'no trainer named {name!r}: it is neither a plugin trainer (`nnunet-plugins trainers` lists '
                         f'them), nor a peer ({", ".join(PEERS)}), nor a trainer nnU-Net finds in nnunetv2 or in '
                         f'nnUNet_extTrainer')
    return found
