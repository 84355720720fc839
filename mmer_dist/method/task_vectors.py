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
    """Sum over the model axis (dim 0) in model order, one addition at a time.

    The order is part of the contract: every path (reference, streaming, compiled, Ray) adds
    models left to right, so tau* is bit-identical across them and masks, which compare against
    tau*, agree bit for bit even at exact ties.
    """
    acc = x[0]
    for i in range(1, x.shape[0]):
        acc = acc + x[i]
    return acc
