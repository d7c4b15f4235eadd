"""UpKern (MedNeXt paper, Sec. 2.3 and Algorithm 1): start a larger-kernel network from a trained smaller-kernel one.

Every tensor of the target network must exist in the source under the same name. A tensor whose shape is
equal is copied bit for bit; a convolution kernel whose shape differs only in its spatial dimensions, each
of them equal or grown (a size-1 axis staying 1), is resized with ``interpolate(mode='trilinear')``
(``'bilinear'`` for 2d kernels, ``align_corners`` at torch's default, as in the paper's code). Anything
else (a missing or extra tensor, different channels, a shrinking kernel, a 1 that becomes larger) is an
error that names the offending tensors, so nothing is silently left at its random initialisation.
"""
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nnunet_plugins.weights.files import read_network_weights, sha256_of, strip_wrapper_prefixes
from nnunet_plugins.weights.report import WeightsReport

_INTERPOLATION_MODES = {1: 'linear', 2: 'bilinear', 3: 'trilinear'}
_NAMED_MISMATCHES = 5


class UpKernError(ValueError):
    """The source checkpoint cannot initialise the target network."""


@dataclass
class ResizedTensor:
    name: str
    source_shape: list[int]
    target_shape: list[int]


@dataclass
class UpKernReport(WeightsReport):
    """What UpKern did: which tensors were copied and which were resized, from what shape to what shape."""

    source: str = ''
    source_sha256: str = ''
    source_trainer: str | None = None
    source_configuration: str | None = None
    copied: list[str] = field(default_factory=list)
    resized: list[ResizedTensor] = field(default_factory=list)

    def summary(self) -> str:
        return (f'UpKern from {self.source} (sha256 {self.source_sha256[:12]}..., trainer {self.source_trainer}, '
                f'configuration {self.source_configuration}): {len(self.copied)} tensors copied, '
                f'{len(self.resized)} kernels resized')

    def lines(self) -> list[str]:
        """The summary, then one line per resized kernel."""
        return [self.summary()] + [f'  resized {r.name}: {tuple(r.source_shape)} -> {tuple(r.target_shape)}'
                                   for r in self.resized]


def _is_kernel_growth(source_shape: torch.Size, target_shape: torch.Size) -> bool:
    """True when only the spatial kernel size differs and every spatial axis stays equal or grows from > 1."""
    if len(source_shape) != len(target_shape) or len(target_shape) - 2 not in _INTERPOLATION_MODES:
        return False
    if source_shape[:2] != target_shape[:2]:
        return False
    return all(s == t or 1 < s < t for s, t in zip(source_shape[2:], target_shape[2:]))


def _describe(mismatches: list[str], total: int, what: str) -> str:
    more = f' and {total - len(mismatches)} more' if total > len(mismatches) else ''
    return f'{what}: ' + '; '.join(mismatches) + more


def upkern_state_dict(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], UpKernReport]:
    """The target's state dict initialised from ``source`` by UpKern, and the report of what was done.

    Args:
        source: state dict of the trained network (keys may carry torch.compile/DDP prefixes).
        target: state dict of the untrained network; gives names, shapes and dtypes of the result.

    Raises:
        UpKernError: when the tensor names differ, or a tensor's shape is neither equal nor a grown kernel.
    """
    source = {strip_wrapper_prefixes(k): v for k, v in source.items()}
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(_describe(missing[:_NAMED_MISMATCHES], len(missing), 'missing in the source'))
        if unexpected:
            problems.append(_describe(unexpected[:_NAMED_MISMATCHES], len(unexpected), 'only in the source'))
        raise UpKernError('the source is not the same kind of network as the target (another architecture, '
                          'another number of resolution levels, or deep-supervision heads that differ); '
                          + ' | '.join(problems))

    incompatible = [f'{k}: source {tuple(source[k].shape)}, target {tuple(t.shape)}' for k, t in target.items()
                    if source[k].shape != t.shape and not _is_kernel_growth(source[k].shape, t.shape)]
    if incompatible:
        raise UpKernError(
            _describe(incompatible[:_NAMED_MISMATCHES], len(incompatible),
                      'tensor shapes do not fit (another MedNeXt size, number of input channels or classes, '
                      'plans topology, or a kernel that would shrink)'))

    result, report = {}, UpKernReport()
    for name, target_tensor in target.items():
        tensor = source[name]
        if tensor.shape == target_tensor.shape:
            result[name] = tensor.clone()
            report.copied.append(name)
        else:
            spatial = list(target_tensor.shape[2:])
            resized = nn.functional.interpolate(tensor.float(), size=spatial, mode=_INTERPOLATION_MODES[len(spatial)])
            result[name] = resized.to(target_tensor.dtype)
            report.resized.append(ResizedTensor(name, list(tensor.shape), list(target_tensor.shape)))
    if not report.resized:
        raise UpKernError('the source has the same kernel sizes as the target, so there is nothing to upsample; '
                          'to start from a run with the same kernels use nnUNetv2_train -pretrained_weights')
    return result, report


def upkern_from_checkpoint(network: nn.Module, path: Path | str) -> UpKernReport:
    """Initialise ``network`` in place by UpKern from the weight file at ``path``; return the report.

    Raises:
        CheckpointError: the file cannot be read or holds no network weights (:func:`read_network_weights`).
        UpKernError: its weights cannot initialise ``network`` (:func:`upkern_state_dict`).
    """
    path = Path(path).resolve()
    weights = read_network_weights(path)
    state, report = upkern_state_dict(weights.state_dict, network.state_dict())
    network.load_state_dict(state, strict=True)
    report.source, report.source_sha256 = str(path), sha256_of(path)
    report.source_trainer, report.source_configuration = weights.trainer, weights.configuration
    return report
