"""Shared pieces of the serving tests: a small merged store of three tiny multimodal models, their
exports (the references), real media payloads, and a real Ray Serve application on loopback.

Models (tiny, random, bf16, built in code by ``mmer_dist.demo.tiny_models``):
    vision  LlavaForConditionalGeneration (image_url)
    video   VideoLlavaForConditionalGeneration (video_url), with 2 extra vocabulary rows
    audio   LlavaForConditionalGeneration reading spectrograms (input_audio through its
            ``mmer_adapter.json``)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mmer_dist.demo import tiny_models
from mmer_dist.export import export_model
from mmer_dist.ingest import ingest_base, ingest_model
from mmer_dist.merge.engine import MergeRequest, merge
from mmer_dist.merge.local import LocalBackend

MODELS = (("vision", "llava-hf", "image", 31, 0), ("video", "video-llava-hf", "video", 32, 2),
          ("audio", "llava-hf", "audio", 33, 0))
TOKEN_ENV = "MMER_SERVE_TEST_TOKEN"
TOKEN = "test-token-123"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
           "TOKENIZERS_PARALLELISM": "false", TOKEN_ENV: TOKEN}


def save_audio_adapter(path: Path) -> None:
    from mmer_dist.media.adapters import SpectrogramAdapter, save_adapter

    save_adapter(SpectrogramAdapter(height=8, width=8, n_fft=64, sample_rate=8000, fmax=4000.0), path)


def build_store(root: Path) -> tuple[str, dict[str, Path]]:
    """The merged store and each model's ``mmer export model`` directory."""
    ckpt = root / "checkpoints"
    base = tiny_models.save_base(ckpt / "base", dtype=torch.bfloat16, seed=0)
    store = str(root / "store")
    ingest_base(store, base, progress=False)
    for model_id, fmt, modality, seed, extra in MODELS:
        path = tiny_models.save_finetuned(base, ckpt / model_id, fmt, dtype=torch.bfloat16, seed=seed,
                                          extra_vocab=extra)
        if modality == "audio":
            save_audio_adapter(path)
        ingest_model(store, model_id, path, modality, fmt=fmt, progress=False)
    merge(store, MergeRequest(), LocalBackend(), workers=1, progress=False)
    exports = {m: export_model(store, m, root / "exports" / m, progress=False) for m, *_ in MODELS}
    return store, exports


# -- media ---------------------------------------------------------------------------------------


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def tone(freq: float = 440.0, seconds: float = 0.5, rate: int = 8000) -> tuple[np.ndarray, int]:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate


def video(seed: int = 0, frames: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8)


# -- a Serve application ------------------------------------------------------------------------------


def app_args(store: str, **overrides) -> dict:
    return {"store": store, "dtype": "float32", "api_token_env": TOKEN_ENV, "slot_budget": "64MB",
            "limits": {"max_completion_tokens": 64, "max_image_pixels": 64 * 64, "max_body_bytes": 4 << 20},
            **overrides}


@contextlib.contextmanager
def serve_app(apps: dict[str, dict], *, port: int, ray_init: dict | None = None):
    """Ray (embedded unless ``ray_init`` says where) and Serve on ``port``, with each of ``apps``
    (route prefix -> app args) deployed; yields the base URL."""
    import ray
    from ray import serve

    from serve.app import build

    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(**(ray_init or {"address": "local", "num_cpus": 8, "include_dashboard": False}), log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for i, (prefix, args) in enumerate(apps.items()):
            serve.run(build(args), name=f"app{i}", route_prefix=prefix)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ReplicaLogs:
    """The Serve replica logs of one application, from a point on (``new()``: what was written since)."""

    def __init__(self, app: str):
        import ray

        self.folder = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
        self.app = app
        self.sizes = {p: p.stat().st_size for p in self._files()}

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob(f"replica_{self.app}_*.log"))

    def new(self) -> str:
        out = []
        for p in self._files():
            with open(p, "rb") as f:
                f.seek(self.sizes.get(p, 0))
                out.append(f.read().decode(errors="replace"))
        return "".join(out)


def replica_process(app: str, deployment: str):
    """The psutil process of the one live replica of ``deployment`` (Ray titles it
    ``ray::ServeReplica:app:name``) in this test's Ray cluster: its raylets' descendants only (other
    Ray clusters on the machine may run an app of the same name)."""
    import psutil
    import ray

    node = ray._private.worker.global_worker.node
    raylets = {p.process.pid for p in node.all_processes.get("raylet", [])}
    title = f"ServeReplica:{app}:{deployment}"

    def ours(p) -> bool:
        if not raylets:  # a cluster this process did not start: no way to tell, take every match
            return True
        try:
            return any(parent.pid in raylets for parent in p.parents())
        except psutil.Error:
            return False

    found = [p for p in psutil.process_iter(["cmdline"])
             if any(title in part for part in p.info["cmdline"] or []) and ours(p)]
    assert len(found) == 1, f"{len(found)} processes titled {title}"
    return found[0]


def in_process_server(store: str):
    """The endpoint's server code (``LLMServer``) in this process over a one-stage ``LocalPipeline``
    and the store's encoders: the reference for what the endpoint answers."""
    from mmer_dist.model.engine import LocalPipeline
    from serve.config import ServeOptions
    from serve.encoders import MediaEncoders
    from serve.llm import LLMServer

    options = ServeOptions.from_args(app_args(store))
    encoders = MediaEncoders(store)

    async def encode(m, p, data, limits):
        return encoders.encode_sync(m, p, data, limits)

    return LLMServer(options, encode, lambda w: LocalPipeline.build(w, 1, dtype=torch.float32,
                                                                   slot_budget_bytes=options.slot_budget))


async def chat_events(server, request: dict) -> list[dict]:
    """Every event of one request (an OpenAI request body) to an in-process server."""
    from serve.protocol import ChatCompletionRequest

    return [e async for e in server.chat(ChatCompletionRequest.model_validate(request))]


def in_process_chat(store: str, request: dict) -> list[dict]:
    """The events the in-process reference server gives ``request`` on the store's served version."""
    server = in_process_server(store)
    server.versions.switch_to(server.versions.load(None))
    try:
        return asyncio.run(chat_events(server, request))
    finally:
        server.shutdown()


def wait_for(predicate, timeout: float = 120.0, what: str = "condition") -> float:
    """Polls ``predicate`` until it holds (returns when); the timeout only bounds a hang."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return time.time()
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
