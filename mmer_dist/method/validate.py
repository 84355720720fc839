"""Input checks for the method layer. Every message names the model and the tensor at fault."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from mmer_dist.errors import InvalidInputError


def check_topk(topk: float) -> None:
    if not (isinstance(topk, (int, float)) and 0.0 < topk <= 1.0):
        raise InvalidInputError(f"top-K fraction must lie in (0, 1], got {topk!r}")


def check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0.0):
        raise InvalidInputError(f"alpha (the tau* scale) must be a finite number > 0, got {alpha!r}")


def check_lam(lam: float, model: str) -> None:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0.0):
        raise InvalidInputError(f"lambda of model {model!r} must be a finite number >= 0, got {lam!r}")


def check_drop_rate(p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise InvalidInputError(f"DARE drop rate must lie in [0, 1), got {p!r}")


def check_model_count(n: int) -> None:
    if n < 1:
        raise InvalidInputError("a merge needs at least one fine-tuned model, got none")


def check_finite(t: torch.Tensor, model: str, tensor: str, offset: int = 0) -> None:
    """Raise if ``t`` holds NaN or Inf; the message locates the first bad entry.

    ``offset`` is the flat index of ``t``'s first entry in its tensor (for a chunk).
    """
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).reshape(-1).nonzero()[0])
        value = t.reshape(-1)[bad].item()
        raise InvalidInputError(
            f"model {model!r}, tensor {tensor!r}: non-finite value {value} at flat index {offset + bad}"
        )


def check_aligned(
    models: Sequence[torch.Tensor], base: torch.Tensor, names: Sequence[str], tensor: str
) -> None:
    """All models must share the base's shape and be floating point; their dtypes may differ
    from the base's and from each other (task vectors are float32, which holds bf16, fp16 and
    fp32 values exactly)."""
    check_model_count(len(models))
    if len(names) != len(models):
        raise InvalidInputError(f"tensor {tensor!r}: {len(models)} models but {len(names)} names")
    if not base.is_floating_point():
        raise InvalidInputError(f"base, tensor {tensor!r}: dtype {base.dtype} is not floating point")
    for name, m in zip(names, models):
        if tuple(m.shape) != tuple(base.shape):
            raise InvalidInputError(
                f"model {name!r}, tensor {tensor!r}: shape {tuple(m.shape)} differs from the "
                f"base's {tuple(base.shape)}"
            )
        if not m.is_floating_point():
            raise InvalidInputError(f"model {name!r}, tensor {tensor!r}: dtype {m.dtype} is not floating point")


def check_models(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
                 names: Sequence[str]) -> None:
    """Whole in-memory models: same tensor names as the base, aligned shapes/dtypes, all finite."""
    check_model_count(len(models))
    if len(names) != len(models):
        raise InvalidInputError(f"{len(models)} models but {len(names)} names")
    for name, model in zip(names, models):
        missing, extra = sorted(set(base) - set(model)), sorted(set(model) - set(base))
        if missing or extra:
            raise InvalidInputError(f"model {name!r}: tensors missing {missing}, unexpected {extra}")
    for tensor in sorted(base):
        check_aligned([m[tensor] for m in models], base[tensor], names, tensor)
        check_finite(base[tensor], "base", tensor)
        for name, model in zip(names, models):
            check_finite(model[tensor], name, tensor)
