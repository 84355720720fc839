"""The HTTP face: OpenAI-compatible routes, bearer-token auth, body limits, SSE. No torch here.

    POST /v1/chat/completions    chat (``stream`` for server-sent events, ``data: [DONE]`` last)
    GET  /v1/models              ``merged`` (expansion) and each model of the served version
    GET  /healthz                the ingress is up
    GET  /readyz                 a version is loaded and answering

Every failure is an OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` with a
4xx status when the request is at fault. The LLM deployment is reached through a Serve handle (one
hop per request, not per token); a client that disconnects cancels its request, which frees its KV
caches on the stages.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from serve.config import ServeOptions
from serve.errors import ApiError, root_cause
from serve.protocol import ChatCompletionRequest, check_part_types

def error_response(e: BaseException) -> JSONResponse:
    err = ApiError.from_exception(e)
    return JSONResponse(err.body(), status_code=err.status)


class OpenAIIngress:
    def __init__(self, llm, options: dict):
        self.llm = llm  # handle of the LLM deployment
        self.options = ServeOptions.from_args(options)
        self.token = self.options.api_token()

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), self.token):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           code="invalid_api_key")

    async def _parse(self, request: Request) -> ChatCompletionRequest:
        limit = self.options.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body is over {limit} bytes")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object")
        check_part_types(payload)
        try:
            parsed = ChatCompletionRequest.model_validate(payload)
        except ValidationError as e:
            # of a union's alternatives, the deepest error names the real problem
            first = max(e.errors(), key=lambda err: len(err["loc"]))
            # without pydantic's labels of union alternatives ("list[tagged-union[...]]"): the path only
            where = ".".join(str(x) for x in first["loc"] if not (isinstance(x, str) and "[" in x))
            raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"],
                           param=str(first["loc"][0]) if first["loc"] else None) from None
        parsed.check_supported()
        return parsed

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
        try:
            self._authorize(request)
            parsed = await self._parse(request)
            events = self.llm.options(stream=True).chat.remote(parsed)
            accepted = await events.__anext__()  # raises here when the request is refused
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return error_response(e)
        # every chunk names the store version that answered: a request stays on the version it
        # was admitted on, whatever is promoted meanwhile
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": parsed.model,
                      "system_fingerprint": f"mmer-v{accepted['version']}"}
        if parsed.stream:
            usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(_sse(events, completion, usage, bool(parsed.logprobs)),
                                     media_type="text/event-stream")
        return await _collect(events, completion, bool(parsed.logprobs))

    async def list_models(self, request: Request):
        try:
            self._authorize(request)
            return {"object": "list", "data": await self.llm.models.remote()}
        except Exception as e:  # noqa: BLE001
            return error_response(e)

    async def healthz(self):
        return {"status": "ok"}

    async def readyz(self):
        try:
            stats = await self.llm.ready.remote()
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "not ready", "error": str(root_cause(e))}, status_code=503)
        return {"status": "ready", **stats}


async def _collect(events, completion: dict, logprobs: bool) -> JSONResponse:
    text, content_logprobs, done = [], [], None
    try:
        async for event in events:
            if event["type"] == "token":
                text.append(event["text"])
                if logprobs and "logprob" in event:
                    content_logprobs.append(_logprob(event))
            elif event["type"] == "done":
                done = event
    except Exception as e:  # noqa: BLE001
        return error_response(e)
    if done is None or done["finish_reason"] == "error":
        return JSONResponse(ApiError(500, f"generation failed: {(done or {}).get('error')}").body(), status_code=500)
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
              "finish_reason": done["finish_reason"], "logprobs": {"content": content_logprobs} if logprobs else None}
    return JSONResponse({**completion, "object": "chat.completion", "choices": [choice], "usage": done["usage"]})


async def _sse(events, completion: dict, include_usage: bool, logprobs: bool):
    def chunk(delta: dict, finish=None, lp=None, usage=None, choices=True) -> str:
        body = {**completion, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": lp}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for event in events:
            if event["type"] == "token":
                lp = {"content": [_logprob(event)]} if logprobs and "logprob" in event else None
                yield chunk({"content": event["text"]}, lp=lp)
            elif event["type"] == "done":
                reason = event["finish_reason"] if event["finish_reason"] != "error" else "stop"
                yield chunk({}, finish=reason)
                if include_usage:
                    yield chunk({}, usage=event["usage"], choices=False)
    except Exception as e:  # noqa: BLE001 - the stream has started: report in band, then end it
        yield f"data: {json.dumps(ApiError.from_exception(e).body())}\n\n"
    yield "data: [DONE]\n\n"


def _logprob(event: dict) -> dict:
    entry = {k: v for k, v in event["logprob"].items() if k != "id"}
    entry["top_logprobs"] = [{k: v for k, v in t.items() if k != "id"} for t in event.get("top_logprobs", [])]
    return entry
