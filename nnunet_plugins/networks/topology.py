"""What the plugin networks share in reading their topology from nnU-Net plans: kernels, padding, depth."""
from typing import Sequence


class ShallowPlanError(ValueError):
    """The plans configuration has fewer stages than the network needs; a larger patch gets more stages."""


def kernels_from_plan(plan_kernel_sizes: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Per level, the plan's kernel with every axis of nnU-Net kernel 1 kept at 1 and every other axis ``size``."""
    return [[1 if k == 1 else size for k in kernel] for kernel in plan_kernel_sizes]


def same_padding(kernel_size: Sequence[int]) -> list[int]:
    """Padding that keeps the spatial size of a stride-1 convolution with an odd ``kernel_size``."""
    return [k // 2 for k in kernel_size]
