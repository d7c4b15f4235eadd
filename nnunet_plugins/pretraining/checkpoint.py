"""The pre-training checkpoint: nnU-Net's, with the method's heads beside the segmentation network's weights, and an
adaptation plan in nnssl's format.

``network_weights`` holds the state dict of the supervised trainer's network (what stock ``-pretrained_weights``
reads), :data:`HEADS_KEY` the heads' (what ``--c`` restores besides nnU-Net's entries), and
:data:`~nnunet_plugins.weights.nnssl.ADAPTATION_PLAN_KEY` what nnssl's and nnU-Net master's fine-tuning tools read
(:func:`adaptation_plan`). The file is read by :func:`nnunet_plugins.weights.read_checkpoint`, as every weight file.
"""
from typing import Any

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_plugins.weights.files import PRETRAINING_HEADS_KEY as HEADS_KEY
from nnunet_plugins.weights.transfer import input_layers
# nnssl's DynamicArchitecturePlans takes exactly these arguments (those of ResidualEncoderUNet in nnU-Net's plans)
_NNSSL_DYNAMIC_KWARGS = ('n_stages', 'features_per_stage', 'conv_op', 'kernel_sizes', 'strides', 'n_blocks_per_stage',
                         'n_conv_per_stage_decoder', 'conv_bias', 'norm_op', 'norm_op_kwargs', 'dropout_op',
                         'dropout_op_kwargs', 'nonlin', 'nonlin_kwargs')
# the stem and encoder paths of this package's own networks (every encoder, stem included, is network.encoder)
_OWN_ENCODER, _OWN_STEM = 'encoder', 'encoder.stem'


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and numpy numbers as Python's, as nnssl serialises (``torch.load`` with
    ``weights_only=True``, as nnssl and nnU-Net master read checkpoints, takes no numpy)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value.tolist() if hasattr(value, 'tolist') else value


def adaptation_plan(network: nn.Module, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                    configuration: str, num_input_channels: int) -> dict:
    """The serialised nnssl ``AdaptationPlan`` of a pre-training of ``network`` (built from ``configuration`` of
    the plans, ``num_input_channels`` in), every field nnssl's ``AdaptationPlan.from_dict`` reads.

    - ``architecture_plans``: the network's class path (the plans' for nnU-Net's own network); for
      ResidualEncoderUNet its arguments as nnssl's dynamic architectures take them, for other networks none (nnssl
      cannot build them; the keys still locate the weights);
    - ``pretrain_plan``: the dataset's plans as nnssl's ``Plan``, with this configuration's spacing and patch
      (``spacing_style`` 'median', nnU-Net's target spacing being the median spacing save for anisotropic data);
    - ``recommended_downstream_patchsize``: the pre-training's patch; ``pretrain_num_input_channels``;
    - ``key_to_encoder``, ``key_to_stem``, ``keys_to_in_proj``: the network's own attributes where
      dynamic_network_architectures declares them, else ``encoder``, ``encoder.stem`` and the convolutions that take
      the image; ``key_to_lpe`` None (no learned positional embedding is transferred by these keys).
    """
    settings = configuration_manager.configuration
    class_name = configuration_manager.network_arch_class_name  # nnU-Net's network; a plugin's is its own class
    if class_name.rsplit('.', 1)[-1] != type(network).__name__:
        class_name = f'{type(network).__module__}.{type(network).__qualname__}'
    kwargs = configuration_manager.network_arch_init_kwargs
    dynamic = class_name.rsplit('.', 1)[-1] == 'ResidualEncoderUNet' and set(kwargs) == set(_NNSSL_DYNAMIC_KWARGS)
    in_proj = sorted(name.removesuffix('.weight') for name in input_layers(network, num_input_channels))
    plans = plans_manager.plans
    plan = _plain({
        'architecture_plans': {
            'arch_class_name': class_name,
            'arch_kwargs': {key: kwargs[key] for key in _NNSSL_DYNAMIC_KWARGS} if dynamic else None,
            # as nnssl derives them: the arguments given as class paths, in its order
            'arch_kwargs_requiring_import': [key for key in _NNSSL_DYNAMIC_KWARGS if isinstance(kwargs[key], str)]
            if dynamic else None,
        },
        'pretrain_plan': {
            'dataset_name': plans_manager.dataset_name,
            'plans_name': plans_manager.plans_name,
            'original_median_spacing_after_transp': plans['original_median_spacing_after_transp'],
            'image_reader_writer': plans['image_reader_writer'],
            'transpose_forward': plans['transpose_forward'],
            'transpose_backward': plans['transpose_backward'],
            'configurations': {configuration: {
                'data_identifier': configuration_manager.data_identifier,
                'preprocessor_name': configuration_manager.preprocessor_name,
                'spacing_style': 'median',
                'normalization_schemes': configuration_manager.normalization_schemes,
                'use_mask_for_norm': configuration_manager.use_mask_for_norm,
                'resampling_fn_data': settings['resampling_fn_data'],
                'resampling_fn_data_kwargs': settings['resampling_fn_data_kwargs'],
                'resampling_fn_mask': settings['resampling_fn_seg'],
                'resampling_fn_mask_kwargs': settings['resampling_fn_seg_kwargs'],
                'spacing': configuration_manager.spacing,
                'patch_size': configuration_manager.patch_size,
            }},
            'experiment_planner_used': plans.get('experiment_planner_used', 'nnU-Net'),
        },
        'pretrain_num_input_channels': num_input_channels,
        'recommended_downstream_patchsize': configuration_manager.patch_size,
        'key_to_encoder': getattr(network, 'key_to_encoder', _OWN_ENCODER),
        'key_to_stem': getattr(network, 'key_to_stem', _OWN_STEM if hasattr(network.encoder, 'stem') else
                               in_proj[0]),
        'key_to_lpe': None,
    })
    plan['keys_to_in_proj'] = tuple(getattr(network, 'keys_to_in_proj', in_proj))  # a tuple, as nnssl saves it
    return plan
