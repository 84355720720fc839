"""Session fixtures for the store / ingest / export / CLI tests.

Real checkpoints (``mmer_dist.tiny_models``, saved with ``save_pretrained`` or the format's own
layout), built once per session and only when a test asks for them:

- one tiny base per dtype (fp32, fp16, bf16);
- one fine-tune per format per dtype, where each format also covers one input variant:
  ``llava-hf`` is sharded (save_pretrained's ``max_shard_size``), ``video-llava-hf`` has 3 extra
  vocabulary rows, ``llava`` is sharded *and* has 2 extra rows, ``generic`` is a single file.

Stores are built from them once (templates) and copied for tests that change a store:

- ``ingested_store(dtype)``: base + the four fine-tunes (ids = format names), nothing merged;
- ``merged_store``: the bf16 one with three published versions (see ``MERGES``).

Tests must treat the templates as read-only: copy with ``copy_store`` before changing anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from ray_helpers import RAY_TEST_ENV
from store_helpers import run_cli, split_checkpoint

from mmer_dist.demo import tiny_models
from mmer_dist.demo.kit import build_kit

# Pinned for the whole session, so no in-process ``ray.init`` (with or without the ``ray_env``
# fixture) writes RAY_AUTH_MODE=token into os.environ for the Ray clusters of later tests.
os.environ.update(RAY_TEST_ENV)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = ("llava-hf", "video-llava-hf", "llava", "generic")
MODALITY = {"llava-hf": "image", "video-llava-hf": "video", "llava": "image", "generic": "audio"}
SEEDS = {"llava-hf": 11, "video-llava-hf": 12, "llava": 13, "generic": 14}
VARIANTS = {
    "llava-hf": {"max_shard_size": 40_000},
    "video-llava-hf": {"extra_vocab": 3},
    "llava": {"extra_vocab": 2, "max_shard_size": 40_000},
    "generic": {},
}
# Published versions of ``merged_store``, in order (version = position + 1).
MERGES = (
    (),  # v1: defaults (ties, global, K=0.8, lambda 1)
    ("--scope", "per-tensor", "--topk", "0.6", "--lam", "llava-hf=0.5", "--lam", "generic=2.0"),  # v2
    ("--topk", "0.9", "--alpha", "0.7", "--lam", "llava=1.5", "--models", "llava-hf", "llava", "generic"),  # v3
)


def ingest_args(store, model_id: str, path: Path, fmt: str, *, modality: str | None = None) -> list:
    """CLI arguments that ingest the fine-tune at ``path`` of format ``fmt``."""
    args = ["ingest", "--store", store, "--model", model_id, "--path", path, "--modality",
            modality or MODALITY[fmt], "--quiet"]
    if fmt == "generic":
        args += ["--format", "generic", "--mapping", path / tiny_models.GENERIC_MAPPING_FILE]
    return args


class Checkpoints:
    """Lazily built, cached tiny checkpoints under one session directory."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[tuple, Path] = {}

    def base(self, dtype: str = "bf16") -> Path:
        key = ("base", dtype)
        if key not in self._cache:
            self._cache[key] = tiny_models.save_base(self.root / f"base-{dtype}", dtype=DTYPES[dtype], seed=0)
        return self._cache[key]

    def finetuned(self, fmt: str, dtype: str = "bf16") -> Path:
        key = (fmt, dtype)
        if key not in self._cache:
            self._cache[key] = tiny_models.save_finetuned(
                self.base(dtype), self.root / f"{fmt}-{dtype}", fmt, modality=MODALITY[fmt], dtype=DTYPES[dtype],
                seed=SEEDS[fmt], **VARIANTS[fmt])
        return self._cache[key]

    def custom(self, name: str, build) -> Path:
        """A checkpoint built once by ``build(path)`` (other architectures, ...)."""
        key = ("custom", name)
        if key not in self._cache:
            path = self.root / f"custom-{name}"
            build(path)
            self._cache[key] = path
        return self._cache[key]


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("checkpoints"))


class Sources:
    """Source checkpoints loaded with ``safetensors.torch.load_file`` (cached): the oracle's inputs."""

    def __init__(self, ckpts: Checkpoints):
        self.ckpts = ckpts
        self._cache: dict[tuple, object] = {}

    def base(self, dtype: str = "bf16") -> dict[str, torch.Tensor]:
        key = ("base", dtype)
        if key not in self._cache:
            self._cache[key] = load_file(self.ckpts.base(dtype) / "model.safetensors")
        return self._cache[key]

    def split(self, fmt: str, dtype: str = "bf16") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(LLM by canonical name, including extra vocabulary rows; component by source key)."""
        key = (fmt, dtype)
        if key not in self._cache:
            self._cache[key] = split_checkpoint(self.ckpts.finetuned(fmt, dtype), fmt)
        return self._cache[key]

    def llm(self, fmt: str, dtype: str = "bf16") -> dict[str, torch.Tensor]:
        return self.split(fmt, dtype)[0]


@pytest.fixture(scope="session")
def sources(ckpts: Checkpoints) -> Sources:
    return Sources(ckpts)


def copy_store(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


class Stores:
    """Store templates, built once per session; copy one before changing it."""

    def __init__(self, root: Path, ckpts: Checkpoints):
        self.root = root
        self.ckpts = ckpts
        self._cache: dict[tuple, Path] = {}

    def base_only(self, dtype: str = "bf16") -> Path:
        key = ("base", dtype)
        if key not in self._cache:
            path = self.root / f"base-{dtype}"
            run_cli("ingest", "--store", path, "--base", self.ckpts.base(dtype), "--quiet")
            self._cache[key] = path
        return self._cache[key]

    def ingested(self, dtype: str = "bf16") -> Path:
        key = ("ingested", dtype)
        if key not in self._cache:
            path = copy_store(self.base_only(dtype), self.root / f"ingested-{dtype}")
            for fmt in FORMATS:
                run_cli(*ingest_args(path, fmt, self.ckpts.finetuned(fmt, dtype), fmt))
            self._cache[key] = path
        return self._cache[key]

    def merged(self) -> Path:
        key = ("merged",)
        if key not in self._cache:
            path = copy_store(self.ingested("bf16"), self.root / "merged-bf16")
            for extra in MERGES:
                run_cli("merge", "--store", path, "--quiet", "--no-compile", "--device", "cpu", *extra)
            self._cache[key] = path
        return self._cache[key]

    def fresh(self, dest: Path, dtype: str = "bf16", *, models: bool = False) -> Path:
        """A private copy (base only, or base + the four fine-tunes) at ``dest``."""
        return copy_store(self.ingested(dtype) if models else self.base_only(dtype), dest)


@pytest.fixture(scope="session")
def stores(tmp_path_factory: pytest.TempPathFactory, ckpts: Checkpoints) -> Stores:
    return Stores(tmp_path_factory.mktemp("stores"), ckpts)


@pytest.fixture(scope="session")
def merged_store(stores: Stores) -> Path:
    return stores.merged()


def pytest_report_header(config):
    from method_helpers import TEST_DEVICE

    return f"mmer streaming kernels under test run on: {TEST_DEVICE} (MMER_TEST_DEVICE)"


def pytest_configure(config):
    from method_helpers import TEST_DEVICE

    # an asked-for device that is absent is an error, never a silent fall back to the CPU
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"MMER_TEST_DEVICE={TEST_DEVICE}, but torch sees no CUDA device")


# -- the demo kit (really trained small multimodal models), test size ---------------------------

KIT_SEED = 0


@pytest.fixture(scope="session")
def kit_pair(tmp_path_factory: pytest.TempPathFactory):
    """(kit built here, its twin built by another process from scratch, same size and seed)."""
    twin_dir = tmp_path_factory.mktemp("kit-twin")
    code = f"from mmer_dist.demo.kit import build_kit; build_kit({str(twin_dir)!r}, size='test', seed={KIT_SEED})"
    twin = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kit = build_kit(tmp_path_factory.mktemp("kit"), size="test", seed=KIT_SEED)
    out, _ = twin.communicate(timeout=600)
    assert twin.returncode == 0, out
    return kit, build_kit(twin_dir, size="test", seed=KIT_SEED)


@pytest.fixture(scope="session")
def kit(kit_pair):
    return kit_pair[0]


# -- parallel runs (pytest-xdist, `-n`): tests that share an expensive session fixture run on one
# worker, so it is built once per run, not once per worker

SHARED_FIXTURE_GROUPS = {"kit_pair": "kit", "kit": "kit"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the marks into node ids
def pytest_collection_modifyitems(config, items):
    """xdist groups: the kit's tests on one worker (the session's kit is built once), every other
    module's tests on one worker each, so a module fixture (a Serve application, compiled kernels,
    a store) is set up once, not once per worker that happens to draw one of its tests."""
    for item in items:
        groups = {SHARED_FIXTURE_GROUPS[f] for f in getattr(item, "fixturenames", ()) if f in SHARED_FIXTURE_GROUPS}
        item.add_marker(pytest.mark.xdist_group(groups.pop() if groups else item.module.__name__))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4; every worker starts Ray clusters and Serve
    applications of its own, and more would contend for memory rather than finish sooner."""
    return max(1, min(os.cpu_count() or 1, 4))
