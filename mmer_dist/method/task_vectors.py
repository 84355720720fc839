"""Task vectors tau_i = theta_i - theta_pre, always in float32 (DESIGN.md, "The method, exactly")."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def task_vectors(models: torch.Tensor | Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Stack of task vectors, shape (N, *base.shape), float32.

    ``models`` is a stacked (N, ...) tensor or a sequence of N tensors, any floating dtype;
    each value is widened to float32 before the subtraction, so bf16/fp16 inputs give exact deltas
    whenever float32 can hold them.
    """
    if not isinstance(models, torch.Tensor):
        models = torch.stack(list(models))
    return models.float() - base.float()


def model_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the model axis (dim 0) in model order, one addition at a time, from +0.

    The order is part of the contract: every path (reference, streaming, compiled, Ray) adds
    models left to right, so tau* is bit-identical across them and masks, which compare against
    tau*, agree bit for bit even at exact ties. Starting from +0 only matters where every term is
    -0 (the sum is then +0).

    Traced for a CPU kernel (``torch.export`` for the ahead-of-time kernels, or ``torch.compile``),
    it is one reduction over dim 0 instead of a loop: inductor's C++ backend accumulates a
    reduction over the outer axis index by index from 0 (the same additions; a cascade of partial
    sums only past 4096 terms, more models than a kernel takes), and the kernel then serves any
    number of models without a new compile. Triton's reductions are trees, so on GPUs the loop
    stays. Tests hold the compiled kernels bit-identical to this loop up to N = 64.
    """
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        return x.sum(0)
    acc = x[0] + 0.0
    for i in range(1, x.shape[0]):
        acc = acc + x[i]
    return acc


def exact_div(numerator: torch.Tensor, denominator: torch.Tensor | float) -> torch.Tensor:
    """The correctly rounded float32 quotient, the same on every device and in compiled kernels.

    A plain float32 ``/`` is not: PyTorch's CUDA kernels turn division by a scalar into a multiply
    by its reciprocal, and Triton (torch.compile on GPU) emits approximate float32 division; both
    were seen to move tau* by one ulp against the CPU. Dividing in float64 and rounding once to
    float32 gives the correctly rounded float32 quotient (a float64 quotient of float32 operands
    never rounds onto a float32 tie), and float64 division is IEEE on every backend.

    On CPU a float32 tensor divided by a float32 tensor is already IEEE (eager and inductor's C++
    kernels both emit the division instruction), so it is kept in float32: the same quotient, and
    a sixth less work in the fused final kernel than two float64 divisions per 16 entries.
    """
    if (isinstance(denominator, torch.Tensor) and numerator.device.type == "cpu"
            and numerator.dtype == denominator.dtype == torch.float32):
        return numerator / denominator
    return (numerator.double() / denominator).float()
