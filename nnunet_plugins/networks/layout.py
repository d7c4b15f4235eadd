"""The memory layout a plugin network runs in, chosen by the device of its input.

On a CPU, oneDNN's depthwise 3d convolutions are much faster channels-last (MedNeXt: 1.7x per training step,
1.8x per inference patch); on an H100 cuDNN was 1.6x slower channels-last, so CUDA keeps PyTorch's default.
:func:`follow_device_layout` makes a network switch at its first forward on a device, so every path that runs
it (``nnUNetv2_train``, ``nnUNetv2_predict``, ``nnUNetPredictor``, the validation after training) gets the
fast layout without asking for it. Measured per family in docs/benchmarks.md: channels-last made MedNeXt's CPU
prediction 1.3-1.5x faster, and 3D UX-Net's, UTNetV2's and Swin UNETR's 0.77-1.03x as fast, so only MedNeXt uses
it (the trainers' ``cpu_layout``).
"""
import torch
from torch import nn

LAYOUTS = {'channels-last': torch.channels_last_3d, 'contiguous': torch.contiguous_format}


def follow_device_layout(network: nn.Module, cpu_layout: str = 'channels-last') -> nn.Module:
    """Run ``network`` (3d) in ``cpu_layout`` on a CPU and in PyTorch's default layout elsewhere; returns it.

    The layout is ``network.cpu_layout`` (a key of :data:`LAYOUTS`), which may be changed later; weights and
    input are converted when the input's device or the layout asked for changes, not on every call.
    """
    network.cpu_layout = cpu_layout
    network.register_forward_pre_hook(_convert_to_device_layout)
    return network


def _convert_to_device_layout(network: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        return None
    converted = getattr(network, '_converted_to', None)
    if x.device.type != 'cpu' and converted is None:
        return None  # never converted: already in the default layout (and nothing for torch.compile to trace)
    layout = LAYOUTS[network.cpu_layout] if x.device.type == 'cpu' else torch.contiguous_format
    if converted != (x.device, layout):
        network.to(memory_format=layout)
        network._converted_to = (x.device, layout)
    return (x.contiguous(memory_format=layout), *args[1:])


def memory_layout(network: nn.Module) -> str:
    """'channels-last' or 'contiguous': the strides of the first conv weight whose two layouts differ.

    (``is_contiguous`` cannot tell: depthwise and 1x1 weights count as contiguous in both layouts, yet
    their strides, which decide the layout of the activations, differ.)
    """
    for parameter in network.parameters():
        if parameter.dim() in (4, 5):
            layout = torch.channels_last if parameter.dim() == 4 else torch.channels_last_3d
            channels_last = torch.empty(parameter.shape, device='meta', memory_format=layout).stride()
            contiguous = torch.empty(parameter.shape, device='meta').stride()
            if channels_last != contiguous:
                return 'channels-last' if parameter.stride() == channels_last else 'contiguous'
    return 'contiguous'
