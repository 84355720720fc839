"""Validation hooks for tests/test_calibrate.py: deterministic scores of (model, store, version)."""

from __future__ import annotations

from mmer_dist.store.weights import VersionWeights

# the lam each model's score peaks at (closest_to_target)
TARGETS = {"llava-hf": 0.7, "video-llava-hf": 1.2, "llava": 0.5, "generic": 1.5}


def version_lam(model_id: str, store: str, version: int) -> float:
    weights = VersionWeights.open(store, version)
    return weights.record.lams[weights.model_index(model_id)]


def closest_to_target(model_id: str, store: str, version: int) -> float:
    return -abs(version_lam(model_id, store, version) - TARGETS[model_id])


def constant(model_id: str, store: str, version: int) -> float:
    return 0.5


def raises(model_id: str, store: str, version: int) -> float:
    raise RuntimeError(f"no validation data for {model_id}")


def not_a_number(model_id: str, store: str, version: int) -> float:
    return float("nan")


NOT_CALLABLE = 3
