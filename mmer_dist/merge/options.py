"""Execution choices for a merge (backend, kernel compilation, device), resolved from CLI flags."""

from __future__ import annotations

import os

from mmer_dist.store.catalog import Catalog

# Below this many parameter x model entries, torch.compile's start-up (seconds per kernel) costs
# more than the eager kernels take.
COMPILE_THRESHOLD = 50_000_000


def resolve_compile(flag: bool | None, catalog: Catalog) -> bool:
    if flag is not None:
        return flag
    params = sum(t.numel for t in catalog.tensors)
    return params * max(1, len(catalog.models)) >= COMPILE_THRESHOLD


def resolve_device(name: str) -> str:
    from mmer_dist.devices import resolve_device as resolve

    # auto -> cuda or cpu here, in the driver (as before the one resolver); refuses what this
    # process cannot use
    return str(resolve(name, what="--device"))


def choose_backend(name: str, address: str | None, workers: int | None,
                   worker_resources: dict[str, float] | None = None, progress: bool = False):
    """(backend, number of shards)."""
    if name == "local":
        from mmer_dist.merge.local import LocalBackend

        return LocalBackend(), workers or 1
    from mmer_dist.merge.ray_backend import RayBackend

    backend = RayBackend(address or os.environ.get("RAY_ADDRESS") or "local", worker_resources=worker_resources,
                         bars=progress)
    return backend, workers or backend.default_workers()
