"""The kit's validation hook for ``mmer calibrate``, and the kit's validation / test halves.

    mmer calibrate --store S --eval mmer_dist.demo.calibration:kit_accuracy

``kit_accuracy(model_id, store, version)`` is the held-out accuracy of kit model ``model_id``
rebuilt from the store: its own encoder + connector (its component) around theta_hat_i of
``version`` (``mmer_dist.demo.kit_store``), on the *validation* half of its task's held-out
samples. The kit's held-out set of each task is split in two by position: even positions are
the validation half (calibration picks lam on them), odd positions the report half (the quality
benchmark reports on them), so a tuned lam is never chosen on the samples it is scored on. The
task, seed and split sizes come from the model's ``mmer_kit.json``, which ingest keeps with its
component; a model without one is not a kit model and is refused.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from mmer_dist.demo.kit.evaluate import KIT_META, cached_split
from mmer_dist.demo.kit.tasks import Sample, get_task
from mmer_dist.demo.kit_store import KitRunner, llm_states
from mmer_dist.errors import InvalidInputError
from mmer_dist.store import layout
from mmer_dist.store.store import Store
from mmer_dist.store.weights import VersionWeights
from mmer_dist.store.weightsets import WeightSet

_RUNNERS: OrderedDict[tuple[str, str, str], KitRunner] = OrderedDict()  # (store, model, sha) -> rebuilt model
_LOCK = threading.Lock()
MAX_RUNNERS = 16


def validation_half(samples: list[Sample]) -> list[Sample]:
    return samples[0::2]


def report_half(samples: list[Sample]) -> list[Sample]:
    return samples[1::2]


def kit_accuracy(model_id: str, store: str, version: int) -> float:
    """Validation accuracy (0..1) of kit model ``model_id`` with theta_hat_i of ``version``."""
    weights = VersionWeights(Store.open(store), version)
    task, held_out = kit_task(weights.store, model_id)
    runner = _runner(weights, model_id)
    runner.set_llm(llm_states(weights, {model_id: WeightSet.hat(model_id)})[model_id])
    return runner.accuracy(task, validation_half(held_out))


def kit_task(store: Store, model_id: str):
    """(task, its held-out samples) of a kit model, from the ``mmer_kit.json`` kept in the store."""
    path = f"{layout.model_component(model_id)}/files/{KIT_META}"
    if not store.exists_path(path):
        raise InvalidInputError(f"model {model_id!r} has no {KIT_META}: not a kit model, so kit_accuracy cannot "
                                "score it (write a hook for it)")
    meta = json.loads(store.get_bytes(path))
    task = get_task(meta["task"])
    sizes = meta["splits"][task.name]
    return task, cached_split(task.name, meta["seed"], sizes["n_train"], sizes["n_test"]).test


def _runner(weights: VersionWeights, model_id: str) -> KitRunner:
    key = (weights.store.url, model_id, weights.catalog.model(model_id).sha256)
    with _LOCK:
        if key in _RUNNERS:
            _RUNNERS.move_to_end(key)
            return _RUNNERS[key]
    runner = KitRunner(weights, model_id)
    with _LOCK:
        _RUNNERS[key] = runner
        while len(_RUNNERS) > MAX_RUNNERS:
            _RUNNERS.popitem(last=False)
    return runner
