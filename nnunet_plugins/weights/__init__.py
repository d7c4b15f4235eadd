"""Weight files: reading every layout the package accepts, UpKern, transfer into another network, their reports.

A leaf: it imports torch only, so networks, trainers and commands may all use it. ``files`` is the one module that
opens weight files; ``upkern`` starts a larger-kernel MedNeXt from a trained one; ``transfer`` copies what fits of a
foreign or encoder-only file into a network (``nnunet-plugins adapt-weights``); ``swin_axes`` moves the Swin UNETR
authors' encoder to nnU-Net's axis order as ``files`` reads it; ``report`` is what their reports share.
"""
from nnunet_plugins.weights.files import (
    ENCODER_PREFIX, LAYOUTS, CheckpointError, NetworkWeights, check_readable, read_checkpoint, read_network_weights,
    sha256_of, strip_wrapper_prefixes)
from nnunet_plugins.weights.report import WeightsReport
from nnunet_plugins.weights.transfer import TransferReport, WeightTransferError, adapt_checkpoint, transfer_weights
from nnunet_plugins.weights.upkern import UpKernError, UpKernReport, upkern_from_checkpoint, upkern_state_dict

__all__ = ['ENCODER_PREFIX', 'LAYOUTS', 'CheckpointError', 'NetworkWeights', 'check_readable', 'read_checkpoint',
           'read_network_weights', 'sha256_of', 'strip_wrapper_prefixes', 'WeightsReport', 'TransferReport',
           'WeightTransferError', 'adapt_checkpoint', 'transfer_weights', 'UpKernError', 'UpKernReport',
           'upkern_from_checkpoint', 'upkern_state_dict']
