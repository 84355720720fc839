"""Per-request KV caches of one stage: allocated when a request arrives, freed when it ends.

Each request reserves its whole length up front (prompt + max new tokens, known at admission),
one (layers, kv_heads, length, head_dim) tensor each for keys and values, so decoding never
reallocates and a finished or cancelled request returns exactly what it took.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmer_dist.errors import InvalidInputError


@dataclass
class RequestCache:
    keys: torch.Tensor  # (layers, kv_heads, capacity, head_dim)
    values: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


class KVCacheTable:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype):
        self.shape = (n_layers, n_kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self._caches: dict[str, RequestCache] = {}

    def allocate(self, request_id: str, capacity: int) -> RequestCache:
        if request_id in self._caches:
            raise InvalidInputError(f"request {request_id!r} already has a KV cache on this stage")
        layers, heads, dim = self.shape
        keys = torch.empty((layers, heads, capacity, dim), device=self.device, dtype=self.dtype)
        cache = RequestCache(keys, torch.empty_like(keys))
        self._caches[request_id] = cache
        return cache

    def get(self, request_id: str) -> RequestCache:
        cache = self._caches.get(request_id)
        if cache is None:
            raise InvalidInputError(f"request {request_id!r} has no KV cache on this stage (finished or never "
                                    "started)")
        return cache

    def release(self, request_id: str) -> bool:
        return self._caches.pop(request_id, None) is not None

    def __len__(self) -> int:
        return len(self._caches)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._caches

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._caches.values())
