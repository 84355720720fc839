"""The LLM server: a store version's pipeline, its chat assets, and chat requests turned into tokens.

``LLMServer`` is a plain class (the ``LLMEngine`` deployment wraps it; tests can build it without
Serve): it loads a version — the stage actors (``RayPipeline``, or any ``Pipeline``), the engine's
step loop (``AsyncEngine``), each model's tokenizer / template / media spec — and answers
``chat``: resolve the mode from the model id (``merged`` = expansion, a model id = retention),
resolve each media part's model, have the encoders embed the media, build the prompt the way the
model was trained (``serve.chat``), and stream the engine's tokens back as text deltas.

Each request takes a reference to the served version when it is admitted and keeps it to its
last token, so a version switch (``switch_to``) never changes a running request: new requests go
to the new version at once, and the old one is dropped when its last request ends.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from mmer_dist.errors import InvalidInputError, MmerError
from mmer_dist.model.async_engine import AsyncEngine
from mmer_dist.model.engine import Engine, EngineLimits, GenerationRequest, Pipeline
from mmer_dist.model.prompt import Expansion, Retention, check_text_policy, plan_prompt
from mmer_dist.model.sampling import SamplingParams
from mmer_dist.store.serving import ServerLease
from mmer_dist.store.store import Store
from mmer_dist.store.weights import VersionWeights
from serve.chat import ChatAssets, Media, expansion_parts, retention_parts
from serve.config import ServeOptions
from serve.errors import ApiError, root_cause

log = logging.getLogger(__name__)
MERGED = "merged"
_PAYLOAD_KEYS = {"image_url": ("image_url", "url"), "video_url": ("video_url", "url"),
                 "input_audio": ("input_audio", "data"), "point_cloud": ("point_cloud", "data")}


@dataclass
class ServedVersion:
    version: int
    weights: VersionWeights
    pipeline: Pipeline
    engine: AsyncEngine
    base: ChatAssets
    models: dict[str, ChatAssets]
    modalities: dict[str, str]
    tasks: dict[str, str | None] = field(default_factory=dict)  # a model added for a new task (`mmer add --task`)
    created: int = field(default_factory=lambda: int(time.time()))
    active: int = 0  # requests admitted on this version and not yet finished

    def candidates(self, part_type: str) -> list[str]:
        return [m for m, a in self.models.items() if a.media is not None and a.media.part_type == part_type]


def media_payload(part: dict, allow_remote: bool) -> bytes:
    """The raw bytes of a media part (data URL or base64), named in every error."""
    outer, key = _PAYLOAD_KEYS[part["type"]]
    value = part[outer][key]
    if key == "url":
        if value.startswith(("http://", "https://")):
            if not allow_remote:
                raise ApiError(400, f"{part['type']}: remote URLs are not enabled on this server; send a data URL",
                               param="messages")
            return _fetch(value)
        if not value.startswith("data:") or "," not in value:
            raise ApiError(400, f"{part['type']}: expected a data URL (data:<mime>;base64,...)", param="messages")
        header, value = value.split(",", 1)
        if not header.endswith(";base64"):
            raise ApiError(400, f"{part['type']}: only base64 data URLs are supported", param="messages")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{part['type']}: the payload is not valid base64", param="messages") from None


def _fetch(url: str, limit: int = 64 << 20) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            data = r.read(limit + 1)
    except Exception as e:
        raise ApiError(400, f"could not fetch {url!r}: {e}", param="messages") from None
    if len(data) > limit:
        raise ApiError(413, f"{url!r} is larger than {limit} bytes", param="messages")
    return data


class LLMServer:
    def __init__(self, options: ServeOptions, encode: Callable, pipeline_factory: Callable[[VersionWeights], Pipeline],
                 cache_dir: str | Path | None = None):
        """``encode(model_id, part_type, payload, limits) -> awaitable tensor`` embeds media;
        ``pipeline_factory(weights)`` places a version's stages."""
        self.options = options
        self._encode = encode
        self._pipeline_factory = pipeline_factory
        self._cache = Path(cache_dir or tempfile.mkdtemp(prefix="mmer-serve-"))
        self.current: ServedVersion | None = None
        self._retiring: list[ServedVersion] = []
        self._lock = threading.RLock()  # versions change from the follower thread and the event loop
        self._switching = threading.Lock()
        self.lease = ServerLease(options.store)  # `mmer gc` keeps every version this server holds

    # -- versions --------------------------------------------------------------------------------

    def load(self, version: int | None) -> ServedVersion:
        store = Store.open(self.options.store)
        weights = VersionWeights(store, version)
        root = self._cache / hashlib.sha256(self.options.store.encode()).hexdigest()[:12]
        base = ChatAssets.load(weights.fetch_files(None, root / "base"), None, None)
        models, modalities, tasks = {}, {}, {}
        for m in weights.models:
            record = weights.catalog.model(m)
            tasks[m] = record.task
            folder = weights.fetch_files(m, root / f"{m}-{record.sha256[:12]}", weights=False)
            models[m] = ChatAssets.load(folder, m, record.modality)
            modalities[m] = record.modality
        pipeline = self._pipeline_factory(weights)
        limits = EngineLimits(self.options.max_running, self.options.max_step_tokens)
        engine = AsyncEngine(Engine(pipeline, limits), name=f"mmer-engine-v{weights.version}")
        return ServedVersion(weights.version, weights, pipeline, engine, base, models, modalities, tasks)

    def target_version(self, pinned: int | None) -> int:
        """The version to serve: the pinned one, else the store's serving pointer (the latest
        published version while no pointer is set)."""
        if pinned is not None:
            return pinned
        catalog = Store.open(self.options.store).catalog()
        return catalog.serving_version()

    def follow(self, pinned: int | None, max_versions: int = 2, drain_timeout_s: float = 600.0) -> bool:
        """Load and switch to the target version if it is not the one served; True if it switched.
        Blocking (the new version's stages load beside the old one): call it off the event loop.
        At most ``max_versions`` versions are held at once: a switch waits for older versions'
        last requests first."""
        with self._switching:
            target = self.target_version(pinned)
            if self.current is not None and self.current.version == target:
                return False
            deadline = time.monotonic() + drain_timeout_s
            while len(self._retiring) + 1 >= max_versions and time.monotonic() < deadline:
                time.sleep(0.1)
                self._drop_idle()
            log.info("switching to version %d", target)
            self.switch_to(self.load(target))
            return True

    def switch_to(self, served: ServedVersion) -> None:
        """New requests go to ``served`` from now on; the previous version finishes what it has."""
        with self._lock:
            old, self.current = self.current, served
            if old is not None and old is not served:
                self._retiring.append(old)
        self._drop_idle()
        self._hold()

    def _hold(self) -> None:
        with self._lock:
            versions = [v.version for v in (*self._retiring, *([self.current] if self.current else []))]
        try:
            self.lease.hold(versions)
        except (OSError, MmerError) as e:  # a read-only store (a pinned RayService) still serves
            log.warning("could not write the server lease: %s", e)

    def _drop_idle(self) -> None:
        with self._lock:
            idle = [v for v in self._retiring if v.active == 0]
            self._retiring = [v for v in self._retiring if v.active != 0]
        if idle:
            self._hold()
        for v in idle:
            v.engine.shutdown()
            shutdown = getattr(v.pipeline, "shutdown", None)
            if shutdown is not None:
                shutdown()
            log.info("version %d dropped (no requests left)", v.version)

    def model_ids(self) -> list[str]:
        return [MERGED, *self.current.models] if self.current else []

    def models_listing(self) -> list[dict]:
        v = self.current
        if v is None:
            return []
        return [{"id": MERGED, "object": "model", "created": v.created, "owned_by": "mmer",
                 "mmer": {"mode": "expansion", "version": v.version}}] + [
            {"id": m, "object": "model", "created": v.created, "owned_by": "mmer",
             "mmer": {"mode": "retention", "modality": v.modalities[m], "task": v.tasks.get(m), "version": v.version,
                      "part_type": a.media.part_type if a.media else None}}
            for m, a in v.models.items()]

    # -- chat ------------------------------------------------------------------------------------

    def _resolve_media(self, served: ServedVersion, part: dict, retention_model: str | None) -> str:
        kind, named = part["type"], part.get("model")
        if retention_model is not None:
            spec = served.models[retention_model].media
            if spec is None or spec.part_type != kind:
                takes = spec.part_type if spec else "no media"
                raise ApiError(400, f"model {retention_model!r} takes {takes} parts, not {kind}; send mixed media "
                                    f"to model {MERGED!r}", param="messages")
            if named not in (None, retention_model):
                raise ApiError(400, f"a {kind} part names model {named!r} in a request to {retention_model!r}",
                               param="messages")
            return retention_model
        candidates = served.candidates(kind)
        if named is not None:
            if named not in candidates:
                raise ApiError(400, f"a {kind} part names model {named!r}, which is not a {kind} model of version "
                                    f"{served.version} (candidates: {', '.join(candidates) or 'none'})",
                               param="messages")
            return named
        default = self.options.default_part_models.get(kind)
        if default in candidates:
            return default
        # a model added for a new task of a modality is reached by name (or a configured default):
        # adding one never changes where the parts of existing clients go
        primary = [m for m in candidates if not served.tasks.get(m)] or candidates
        if len(primary) == 1:
            return primary[0]
        if not candidates:
            raise ApiError(400, f"no model of version {served.version} takes {kind} parts", param="messages")
        raise ApiError(400, f"several models take {kind} parts ({', '.join(primary)}): name one with "
                            f"\"model\": \"<id>\" in the part", param="messages")

    async def chat(self, request: dict, request_id: str | None = None) -> AsyncIterator[dict]:
        """Events: ``accepted`` (once the prompt is built), ``token`` per generated token (text delta,
        logprobs), and ``done`` (finish reason, usage). Errors before ``accepted`` raise ApiError."""
        with self._lock:  # the version is pinned here, at admission, for the request's whole life
            served = self.current
            if served is None:
                raise ApiError(503, "no version is loaded yet")
            served.active += 1
        try:
            async for event in self._chat(served, request, request_id or uuid.uuid4().hex):
                yield event
        finally:
            with self._lock:
                served.active -= 1
            self._drop_idle()

    async def _chat(self, served: ServedVersion, request: dict, request_id: str) -> AsyncIterator[dict]:
        model = request["model"]
        if model != MERGED and model not in served.models:
            raise ApiError(404, f"model {model!r} does not exist (models: {', '.join(self.model_ids())})",
                           param="model", code="model_not_found")
        retention = None if model == MERGED else model
        policy = request.get("text_policy") or self.options.text_policy
        try:
            check_text_policy(policy)
        except InvalidInputError as e:
            raise ApiError(400, str(e), param="text_policy") from None
        if retention is not None and request.get("text_policy"):
            raise ApiError(400, f"text_policy applies to model {MERGED!r} only", param="text_policy")
        messages = request["messages"]
        parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"] if p["type"] != "text"]
        limits = self.options.limits
        if len(parts) > limits.max_media_parts:
            raise ApiError(400, f"{len(parts)} media parts; at most {limits.max_media_parts} per request",
                           param="messages")
        owners = [self._resolve_media(served, p, retention) for p in parts]
        payloads = [media_payload(p, self.options.allow_remote_media) for p in parts]
        try:
            embeds = await asyncio.gather(*(self._encode(m, p["type"], data, limits)
                                            for m, p, data in zip(owners, parts, payloads)))
            media = [Media(m, e) for m, e in zip(owners, embeds)]
            if retention is not None:
                prompt_parts = retention_parts(served.models[retention], messages, media)
                mode = Retention(retention)
            else:
                prompt_parts = expansion_parts(served.base, served.models, messages, media)
                mode = Expansion(policy)
            prompt = plan_prompt(prompt_parts, mode, served.weights.vocabulary)
        except InvalidInputError as e:  # also an encoder's, arriving wrapped in Ray's task error
            raise ApiError(400, str(root_cause(e)), param="messages") from None
        if len(prompt) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; this server takes at most "
                                f"{limits.max_prompt_tokens}", param="messages")
        assets = served.models[prompt.vocab_model] if prompt.vocab_model else served.base
        sampling = self._sampling(request, len(prompt), served.pipeline.max_positions, assets)
        generation = GenerationRequest(request_id, prompt, sampling)
        try:
            served.engine.engine.validate(generation)
        except InvalidInputError as e:
            raise ApiError(400, str(e), param="max_tokens") from None
        yield {"type": "accepted", "version": served.version, "prompt_tokens": len(prompt), "model": model}
        tokens = served.engine.generate(generation)
        try:
            async for event in _detokenize(tokens, assets, request.get("stop") or []):
                yield event
        finally:
            await tokens.aclose()  # a stop string or a gone client ends the request: its caches go

    def _sampling(self, request: dict, prompt_len: int, context: int, assets: ChatAssets) -> SamplingParams:
        limit = self.options.limits.max_completion_tokens
        asked = request.get("max_completion_tokens", request.get("max_tokens"))
        if asked is None:
            asked = max(1, min(limit, context - prompt_len))
        if not isinstance(asked, int) or asked < 1:
            raise ApiError(400, f"max_tokens must be a positive integer, got {asked!r}", param="max_tokens")
        if asked > limit:
            raise ApiError(400, f"max_tokens {asked} is over this server's limit of {limit}", param="max_tokens")
        top = request.get("top_logprobs") or 0
        if top and not request.get("logprobs"):
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            return SamplingParams(
                max_tokens=asked, temperature=1.0 if request.get("temperature") is None else request["temperature"],
                top_p=1.0 if request.get("top_p") is None else request["top_p"], seed=request.get("seed"),
                stop_token_ids=assets.stop_token_ids, logprobs=bool(request.get("logprobs")), top_logprobs=top)
        except InvalidInputError as e:
            raise ApiError(400, str(e)) from None

    def stats(self) -> dict:
        return {"version": self.current.version if self.current else None,
                "retiring": [v.version for v in self._retiring],
                "engine": self.current.engine.stats() if self.current else None}

    def shutdown(self) -> None:
        for v in [*self._retiring, *([self.current] if self.current else [])]:
            v.engine.shutdown()
            if (shutdown := getattr(v.pipeline, "shutdown", None)) is not None:
                shutdown()
        self._retiring, self.current = [], None
        self.lease.release()


async def _detokenize(events, assets: ChatAssets, stops: list[str]) -> AsyncIterator[dict]:
    """Token events -> text deltas (incremental decoding; a partial UTF-8 character waits for the
    next token) and the stop strings: the text ends before the first one, and generation stops.
    A stop token ends the answer without being part of it."""
    ids: list[int] = []
    sent = 0
    async for e in events:
        if e.finish_reason in ("error", "abort"):
            yield {"type": "done", "finish_reason": e.finish_reason, "error": e.error,
                   "usage": _usage(e.prompt_tokens, e.completion_tokens)}
            return
        at_stop_token = e.finish_reason == "stop"
        if not at_stop_token:
            ids.append(e.token)
        text = assets.decode(ids)
        reason = e.finish_reason
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        ready = len(text) if reason else len(text.rstrip("\ufffd"))
        delta = text[sent:ready]
        sent = max(sent, ready)
        token = {"type": "token", "text": delta}
        if e.logprob is not None and not at_stop_token:
            token["logprob"] = _logprob_entry(assets, e.token, e.logprob)
            token["top_logprobs"] = [_logprob_entry(assets, t, lp) for t, lp in e.top_logprobs]
        if delta or "logprob" in token:
            yield token
        if reason:
            yield {"type": "done", "finish_reason": reason, "usage": _usage(e.prompt_tokens, e.completion_tokens)}
            return


def _logprob_entry(assets: ChatAssets, token: int, logprob: float) -> dict:
    text = assets.token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "id": token}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
