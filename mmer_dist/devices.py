"""The one device resolver: a user's device name ("auto", "cpu", "cuda", "cuda:N") -> a torch device.

``auto`` is CUDA when this process may use a GPU and the CPU otherwise. Whether it may is what
torch sees, unless the caller knows better (``has_gpu``: a Ray actor placed without a GPU can
still see one, and must not take it).
"""

from __future__ import annotations

import torch

from mmer_dist.errors import InvalidInputError


def resolve_device(name: str | torch.device | None = "auto", *, has_gpu: bool | None = None,
                   what: str = "device") -> torch.device:
    """``what`` names the setting in errors (``--device`` for a flag)."""
    if name in (None, "auto"):
        usable = torch.cuda.is_available() if has_gpu is None else has_gpu and torch.cuda.is_available()
        return torch.device("cuda" if usable else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidInputError(f"{what} {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"{what} {name!r}: mmer runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"{what} {name}: no CUDA device is visible to this process")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"{what} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device
