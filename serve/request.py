"""One chat request's life: admission (the typed request -> a checked ``GenerationRequest``) and
its stream of tokens as text deltas.

``admit`` resolves the mode from the model id (``merged`` = expansion, a model id = retention),
each media part's model, has the encoders embed the media, builds the prompt the way the model
was trained (``serve.chat``) and the sampling parameters. Every check that depends on the server
(its limits, the served version's models) happens here, once; the wire format's own ranges are
checked when the request is parsed (``serve.protocol``), the context length by the engine when
the request is submitted (``AsyncEngine.generate``).

``detokenize`` turns the engine's ``TokenEvent``s into text deltas, applying the stop strings; a
request the engine ended for want of a stage is a 503, one it failed a 500.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from mmer_dist.errors import InvalidInputError
from mmer_dist.media.parts import PART_TYPES, MediaLimits, payload_bytes
from mmer_dist.model.engine import GenerationRequest
from mmer_dist.model.prompt import Expansion, MediaPart, Retention, check_text_policy, plan_prompt
from mmer_dist.model.sampling import SamplingParams
from serve.chat import ChatAssets, expansion_parts, retention_parts
from serve.config import Limits, ServeOptions
from serve.errors import ApiError, root_cause
from serve.protocol import MERGED, ChatCompletionRequest, MediaContentPart
from serve.versions import ServedVersion

Encode = Callable[[str, str, bytes, MediaLimits], Awaitable[object]]  # (model, part type, payload, limits) -> rows


@dataclass(frozen=True)
class Admission:
    generation: GenerationRequest
    assets: ChatAssets  # the tokenizer the answer is read with
    stops: tuple[str, ...]


def model_ids(served: ServedVersion) -> list[str]:
    return [MERGED, *served.models]


async def admit(served: ServedVersion, request: ChatCompletionRequest, options: ServeOptions, encode: Encode,
                request_id: str) -> Admission:
    model = request.model
    if model != MERGED and model not in served.models:
        raise ApiError(404, f"model {model!r} does not exist (models: {', '.join(model_ids(served))})",
                       param="model", code="model_not_found")
    retention = None if model == MERGED else model
    policy = request.text_policy or options.text_policy
    try:
        check_text_policy(policy)
    except InvalidInputError as e:
        raise ApiError(400, str(e), param="text_policy") from None
    if retention is not None and request.text_policy:
        raise ApiError(400, f"text_policy applies to model {MERGED!r} only", param="text_policy")
    parts = request.media()
    limits = options.limits
    if len(parts) > limits.max_media_parts:
        raise ApiError(400, f"{len(parts)} media parts; at most {limits.max_media_parts} per request",
                       param="messages")
    owners = [resolve_media(served, p, retention, options.default_part_models) for p in parts]
    media_limits = limits.media()
    payloads = [media_payload(p, options.allow_remote_media, media_limits) for p in parts]
    try:
        embeds = await asyncio.gather(*(encode(m, p.type, data, media_limits)
                                        for m, p, data in zip(owners, parts, payloads)))
        media = [MediaPart(m, e) for m, e in zip(owners, embeds)]
        if retention is not None:
            prompt_parts = retention_parts(served.models[retention], request.messages, media)
            mode = Retention(retention)
        else:
            prompt_parts = expansion_parts(served.base, served.models, request.messages, media)
            mode = Expansion(policy)
        prompt = plan_prompt(prompt_parts, mode, served.weights.vocabulary)
    except InvalidInputError as e:  # also an encoder's, arriving wrapped in Ray's task error
        raise ApiError(400, str(root_cause(e)), param="messages") from None
    if len(prompt) > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens; this server takes at most "
                            f"{limits.max_prompt_tokens}", param="messages")
    assets = served.models[prompt.vocab_model] if prompt.vocab_model else served.base
    sampling = sampling_params(request, len(prompt), served.pipeline.max_positions, assets, limits)
    return Admission(GenerationRequest(request_id, prompt, sampling), assets, tuple(request.stop or ()))


def resolve_media(served: ServedVersion, part: MediaContentPart, retention_model: str | None,
                  default_part_models: dict[str, str]) -> str:
    """The model whose encoder takes ``part``: the retention model, the one the part names, the
    configured default for its type, or the one model of the version that takes it."""
    kind, named = part.type, part.model
    if retention_model is not None:
        spec = served.models[retention_model].media
        if spec is None or not spec.takes(kind):
            takes = " or ".join(spec.prompts) if spec else "no media"
            raise ApiError(400, f"model {retention_model!r} takes {takes} parts, not {kind}; send other media "
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
    default = default_part_models.get(kind)
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


def media_payload(part: MediaContentPart, allow_remote: bool, limits: MediaLimits = MediaLimits()) -> bytes:
    """The raw bytes of a media part (a data URL, base64, or a fetched http(s) URL where allowed)."""
    spec, text = PART_TYPES[part.type], part.payload()
    if spec.data_url and text.startswith(("http://", "https://")):
        if not allow_remote:
            raise ApiError(400, f"{part.type}: remote URLs are not enabled on this server; send a data URL",
                           param="messages")
        return _fetch(text)
    try:
        return payload_bytes(spec, text, limits)
    except InvalidInputError as e:
        raise ApiError(400, str(e), param="messages") from None


def _fetch(url: str, limit: int = 64 << 20) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            data = r.read(limit + 1)
    except Exception as e:  # noqa: BLE001 - whatever the network says, it is the URL's problem
        raise ApiError(400, f"could not fetch {url!r}: {e}", param="messages") from None
    if len(data) > limit:
        raise ApiError(413, f"{url!r} is larger than {limit} bytes", param="messages")
    return data


def sampling_params(request: ChatCompletionRequest, prompt_len: int, context: int, assets: ChatAssets,
                    limits: Limits) -> SamplingParams:
    limit = limits.max_completion_tokens
    asked = request.asked_tokens
    if asked is None:
        asked = max(1, min(limit, context - prompt_len))
    elif asked > limit:
        raise ApiError(400, f"max_tokens {asked} is over this server's limit of {limit}", param="max_tokens")
    top = request.top_logprobs or 0
    if top and not request.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    try:
        return SamplingParams(
            max_tokens=asked, temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed,
            stop_token_ids=assets.stop_token_ids, logprobs=bool(request.logprobs), top_logprobs=top)
    except InvalidInputError as e:
        raise ApiError(400, str(e)) from None


async def detokenize(events, assets: ChatAssets, stops: Sequence[str]) -> AsyncIterator[dict]:
    """Token events -> text deltas (incremental decoding; a partial UTF-8 character waits for the
    next token) and the stop strings: the text ends before the first one, and generation stops.
    A stop token ends the answer without being part of it."""
    ids: list[int] = []
    sent = 0
    async for e in events:
        if e.finish_reason == "unavailable":  # a stage died with the request's caches
            raise ApiError(503, "the server lost a pipeline stage while answering; retry")
        if e.finish_reason == "error":
            raise ApiError(500, f"generation failed ({e.error.split(':')[0] if e.error else 'unknown error'})")
        if e.finish_reason == "abort":
            yield {"type": "done", "finish_reason": "abort", "usage": _usage(e.prompt_tokens, e.completion_tokens)}
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
