"""The HTTP face: OpenAI-compatible routes, bearer-token auth, body limits, overload, deadlines, SSE.
No torch here.

    POST /v1/chat/completions    chat (``stream`` for server-sent events, ``data: [DONE]`` last)
    GET  /v1/models              ``merged`` (expansion) and each model of the served version, with its
                                 residency (slot / mask-native) on the LLM replica that answered
    GET  /healthz                the ingress is up
    GET  /readyz                 ``loading``, ``serving vN`` or ``degraded: why`` (200 while a version answers)

Every failure is an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``: a 4xx
when the request is at fault, a 429 with ``Retry-After`` when ``max_ongoing_requests`` are in
flight and ``max_queued_requests`` wait (this replica's own queue, so the 429 has that body too),
a 503 when a process died under the request or it ran past ``request_timeout_s`` (a stream that
has started ends with an error event, then ``[DONE]``). Each is one log line, never a traceback.
The LLM deployment is reached through a Serve handle (one hop per request, not per token) and
answers errors as events, so Serve logs no traceback for a client's mistake; a client that
disconnects cancels its request, which frees its KV caches on the stages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
import uuid
import weakref
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from serve import log
from serve.config import ServeOptions
from serve.errors import ApiError
from serve.protocol import MERGED, parse_request

READY_TIMEOUT_S = 5.0  # /readyz: an LLM replica that does not answer within it is still loading


class Gate:
    """At most ``limit`` requests in flight in this replica and ``queue`` more waiting (-1: no
    bound); beyond that, a 429. Entered before the body is read, so a slow upload holds its slot."""

    def __init__(self, limit: int, queue: int):
        self._slots, self._queue, self._waiting = asyncio.Semaphore(limit), queue, 0

    async def enter(self, retry_after_s: float) -> Callable[[], None]:
        """Wait for a slot; returns its release."""
        if self._slots.locked() and 0 <= self._queue <= self._waiting:
            raise ApiError(429, f"the server is busy ({self._waiting} requests waiting); retry in "
                                f"{retry_after_s:g} s", code="rate_limit_exceeded")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        return self._slots.release


class OpenAIIngress:
    def __init__(self, llm, options: dict):
        self.llm = llm  # handle of the LLM deployment
        self.options = ServeOptions.from_args(options)
        self.token = self.options.api_token()
        self.gate = Gate(self.options.max_ongoing_requests, self.options.max_queued_requests)

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), self.token):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.options.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is over {limit} bytes")
        return b"".join(chunks)

    def error_response(self, e: BaseException, where: str) -> JSONResponse:
        """The OpenAI error body for ``e``, logged as one line."""
        err = log_error(e, where)
        headers = {"Retry-After": str(math.ceil(self.options.retry_after_s))} if err.status in (429, 503) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this in each replica after the constructor: routes bound to this instance
        (FastAPI's class-based views through ``@app.post`` on methods break on FastAPI >= 0.137)."""
        app = FastAPI(title="mmer-dist", description="One OpenAI-compatible endpoint over a merged MMER store")
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/models", self.list_models, methods=["GET"])
        app.add_api_route("/healthz", self.healthz, methods=["GET"])
        app.add_api_route("/readyz", self.readyz, methods=["GET"])
        return app

    async def chat_completions(self, request: Request):
        where = "POST /v1/chat/completions"
        deadline = asyncio.get_running_loop().time() + self.options.request_timeout_s
        try:
            self._authorize(request)
            release = _once(await self.gate.enter(self.options.retry_after_s))
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return self.error_response(e, where)
        events = None
        try:
            async with asyncio.timeout_at(deadline):
                parsed = parse_request(await self._read_body(request))
                # a model's requests go to the replica that serves it already (serve.deployment)
                routing = {} if parsed.model == MERGED else {"multiplexed_model_id": parsed.model}
                events = self.llm.options(stream=True, **routing).chat.remote(parsed)
                accepted = _raise_error(await events.__anext__())
            # every chunk names the store version that answered: a request stays on the version it
            # was admitted on, whatever is promoted meanwhile
            completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": parsed.model,
                          "system_fingerprint": f"mmer-v{accepted['version']}"}
            if parsed.stream:
                usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
                stream = _sse(events, completion, usage, bool(parsed.logprobs), deadline,
                              self.options.request_timeout_s, release)
                weakref.finalize(stream, release)  # a stream never started (client gone) frees its slot too
                release = None  # the stream releases its slot when it ends
                return StreamingResponse(stream, media_type="text/event-stream")
            async with asyncio.timeout_at(deadline):
                return await _collect(events, completion, bool(parsed.logprobs))
        except Exception as e:  # noqa: BLE001
            if events is not None:
                events.cancel()  # a request past its deadline (or refused) stops on the engine too
            return self.error_response(_ingress_error(e, self.options.request_timeout_s), where)
        finally:
            if release is not None:
                release()

    async def list_models(self, request: Request):
        try:
            self._authorize(request)
            return {"object": "list", "data": await self.llm.models.remote()}
        except Exception as e:  # noqa: BLE001
            return self.error_response(e, "GET /v1/models")

    async def healthz(self):
        return {"status": "ok"}

    async def readyz(self):
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                status = await self.llm.ready.remote()
        except TimeoutError:  # no LLM replica answers yet: one is starting (loading its version)
            return JSONResponse({"status": "loading", "ready": False}, status_code=503)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": f"degraded: {ApiError.from_exception(e).message}", "ready": False},
                                status_code=503)
        return JSONResponse(status, status_code=200 if status["ready"] else 503)


def log_error(e: BaseException, where: str) -> ApiError:
    """``e`` as the ApiError the client gets, logged as one line."""
    err = ApiError.from_exception(e)
    log.log(logging.INFO if err.status < 500 else logging.WARNING, "%s -> %d %s", where, err.status, err.message)
    return err


def _once(release: Callable[[], None]) -> Callable[[], None]:
    done = []

    def once() -> None:
        if not done:
            done.append(True)
            release()
    return once


def _raise_error(event: dict) -> dict:
    """The LLM deployment answers a failure as an ``error`` event (see the module docstring)."""
    if event["type"] == "error":
        raise event["error"]
    return event


def _ingress_error(e: BaseException, timeout_s: float) -> BaseException:
    """What the ingress itself ran into: its deadline, or a client gone before its body came."""
    if isinstance(e, TimeoutError):
        return ApiError(503, f"the request did not finish within {timeout_s:g} s (request_timeout_s); retry later")
    if isinstance(e, ClientDisconnect):
        return ApiError(499, "the client closed the connection before its request was read")
    return e


async def _collect(events, completion: dict, logprobs: bool) -> JSONResponse:
    text, content_logprobs, done = [], [], None
    async for event in events:
        event = _raise_error(event)
        if event["type"] == "token":
            text.append(event["text"])
            if logprobs and "logprob" in event:
                content_logprobs.append(_logprob(event))
        elif event["type"] == "done":
            done = event
    if done is None:
        raise ApiError(500, "the answer ended without a finish reason")
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
              "finish_reason": done["finish_reason"], "logprobs": {"content": content_logprobs} if logprobs else None}
    return JSONResponse({**completion, "object": "chat.completion", "choices": [choice], "usage": done["usage"]})


async def _sse(events, completion: dict, include_usage: bool, logprobs: bool, deadline: float, timeout_s: float,
               release: Callable[[], None]):
    def chunk(delta: dict, finish=None, lp=None, usage=None, choices=True) -> str:
        body = {**completion, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lp}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async with asyncio.timeout_at(deadline):
            async for event in events:
                event = _raise_error(event)
                if event["type"] == "token":
                    lp = {"content": [_logprob(event)]} if logprobs and "logprob" in event else None
                    yield chunk({"content": event["text"]}, lp=lp)
                elif event["type"] == "done":
                    yield chunk({}, finish=event["finish_reason"])
                    if include_usage:
                        yield chunk({}, usage=event["usage"], choices=False)
    except Exception as e:  # noqa: BLE001 - the stream has started: report in band, then end it
        events.cancel()
        err = log_error(_ingress_error(e, timeout_s), "POST /v1/chat/completions (stream)")
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        release()
    yield "data: [DONE]\n\n"


def _logprob(event: dict) -> dict:
    entry = {k: v for k, v in event["logprob"].items() if k != "id"}
    entry["top_logprobs"] = [{k: v for k, v in t.items() if k != "id"} for t in event.get("top_logprobs", [])]
    return entry
