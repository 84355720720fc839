"""Merge steps other than TIES, and DARE, as tau* producers on the same code path.

- ``task_arithmetic_sum``: tau* = sum_i tau_i (Ilharco et al. 2023); theta* = theta_pre + s*tau*
  with s the version's alpha.
- ``naive_mean``: tau* = mean_i tau_i, so theta* = theta_pre + mean tau_i, the plain average of
  the theta_i up to float32 rounding (NaiveMC, Chen et al. 2024).
- ``dare``: drop each entry of tau_i with probability p and rescale survivors by 1/(1-p)
  (Yu et al. 2024). The drop decision is a pure hash of (seed, model id, tensor name, flat
  index), so it does not depend on chunking, shard layout, device or model order, and adding a
  model later leaves the other models' drops unchanged.
"""

from __future__ import annotations

import zlib

import torch

from mmer_dist.method.task_vectors import exact_div, model_sum

_MASK32 = 0xFFFFFFFF


def task_arithmetic_sum(tau: torch.Tensor) -> torch.Tensor:
    return model_sum(tau)


def naive_mean(tau: torch.Tensor) -> torch.Tensor:
    # N as a tensor: a kernel compiled for any N must not bake it in as a constant
    return exact_div(model_sum(tau), torch.full((), tau.shape[0], dtype=tau.dtype, device=tau.device))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def stable_key(text: str) -> int:
    """A 32-bit key of a name that is the same in every process (unlike ``hash``)."""
    return zlib.crc32(text.encode())


def dare_keep(seed: int, model_key: int, tensor_key: int, flat_index: torch.Tensor, p: float) -> torch.Tensor:
    """Bool keep-mask for entries at ``flat_index`` (int64) of one model's tensor."""
    h = _fmix32(torch.full_like(flat_index, (seed ^ model_key) & _MASK32))
    h = _fmix32(h ^ tensor_key)
    h = _fmix32(h ^ (flat_index & _MASK32))
    h = _fmix32(h ^ (flat_index >> 32))
    return h >= int(p * 2**32)


def dare(tau: torch.Tensor, p: float, seed: int, model_keys: tuple[int, ...], tensor_key: int,
         flat_offset: int | torch.Tensor) -> torch.Tensor:
    """DARE on an (N, ...) chunk whose first entry has index ``flat_offset`` in its tensor.

    Survivors are multiplied by float32(1 / (1 - p)).
    """
    if p == 0.0:
        return tau
    index = flat_offset + torch.arange(tau[0].numel(), dtype=torch.int64, device=tau.device)
    keep = torch.stack([dare_keep(seed, k, tensor_key, index, p) for k in model_keys]).reshape(tau.shape)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32, device=tau.device)
    return torch.where(keep, tau * scale, torch.zeros((), dtype=tau.dtype, device=tau.device))
