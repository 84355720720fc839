"""A model's (or the base's) files from the store, in a local folder that is never seen half-written.

Each folder is named by what it holds (the model id and its checkpoint digest), fetched under a
temporary name and renamed into place: a reader sees the whole folder or none, and of two
fetches at once (threads of one replica, or replicas sharing a cache) the first rename wins and
the other's copy is removed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from mmer_dist.store.weights import StoreWeights


def component_folder(weights: StoreWeights, model_id: str | None, root: Path, *, with_weights: bool) -> Path:
    """``model_id``'s component files (None: the base's), with its encoder weights if ``with_weights``."""
    if model_id is None:
        name = "base"
    else:
        name = f"{model_id}-{weights.catalog.model(model_id).sha256[:12]}" + ("" if with_weights else "-assets")
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        weights.fetch_files(model_id, staging, weights=with_weights)
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():  # not another fetch that won the race: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
