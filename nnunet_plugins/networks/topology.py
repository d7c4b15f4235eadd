"""What the plugin networks share in reading their topology from nnU-Net plans: levels, kernels, padding, depth."""
from dataclasses import dataclass
from typing import Sequence


class ShallowPlanError(ValueError):
    """The plans configuration has fewer stages than the network needs; a larger patch gets more stages."""


@dataclass(frozen=True)
class Levels:
    """A network's resolution levels as its factory builds them on a plan, level 0 (full resolution) first.

    ``strides[l]`` is the stride per axis into level ``l`` (level 0 all ones); ``plan_kernels[l]`` is the nnU-Net
    kernel of the plan stage whose kernel pattern level ``l`` takes (an axis of kernel 1 there keeps kernel 1 in the
    network). Every entry has one value per spatial axis (2 or 3).
    """

    strides: tuple[tuple[int, ...], ...]
    plan_kernels: tuple[tuple[int, ...], ...]

    def kernels(self, size: int) -> list[list[int]]:
        """Per level, the kernel of a conv of ``size``: ``size`` along every axis, 1 where the nnU-Net kernel is 1."""
        return [[1 if k == 1 else size for k in kernel] for kernel in self.plan_kernels]


def levels_of(strides: Sequence[Sequence[int]], plan_kernels: Sequence[Sequence[int]]) -> Levels:
    """:class:`Levels` from per-level ``strides`` and ``plan_kernels`` (lists or tuples), of the same length."""
    if len(strides) != len(plan_kernels):
        raise ValueError(f'{len(strides)} strides but {len(plan_kernels)} kernels; a plan has one of each per stage')
    return Levels(tuple(tuple(s) for s in strides), tuple(tuple(k) for k in plan_kernels))


def same_padding(kernel_size: Sequence[int]) -> list[int]:
    """Padding that keeps the spatial size of a stride-1 convolution with an odd ``kernel_size``."""
    return [k // 2 for k in kernel_size]
