"""The OpenAI chat-completions wire format the endpoint speaks (the subset it serves), and its errors.

Content parts beyond OpenAI's own: ``video_url`` ({"url": data URL of a video file}) and
``point_cloud`` ({"data": base64 of a float32 .npy array of shape (N, 3) or (N, 6)}); every media
part may name the model it is for with ``"model": "<id>"`` (expansion mode, where several models
take the same part type). The request may carry ``text_policy`` (``extra_body`` in the openai
client) for the merged model. Unknown fields the API does not act on are refused when they ask
for something this server does not do (``n`` > 1, tools, ...), and otherwise ignored, as OpenAI's
own server ignores what it does not know.

``parse_request`` is the one way in: body bytes -> a checked ``ChatCompletionRequest``, every
problem a 400 naming where it is (JSON nested deeper than ``MAX_JSON_DEPTH``, a string that is
not Unicode, an unknown part type, a value out of OpenAI's range).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmer_dist.media.parts import MEDIA_PART_TYPES, PART_TYPES
from serve.errors import ApiError

MERGED = "merged"  # the model id of expansion mode (MMER's routed forward); every other id is a model's

# The wire types are named ``*ContentPart`` / ``Message``; the engine's prompt pieces
# (``mmer_dist.model.prompt.TextPart`` / ``MediaPart``) are what these become after admission.


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class MediaContentPart(BaseModel):
    """A media part; ``payload()`` is its data URL or base64 text (where ``PART_TYPES`` says)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None  # which model's encoder (mmer extension)

    def payload(self) -> str:
        outer, key = PART_TYPES[self.type].payload
        return getattr(getattr(self, outer), key)


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: str | None = None


class ImageContentPart(MediaContentPart):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str
    format: Literal["wav"] = "wav"


class AudioContentPart(MediaContentPart):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str


class VideoContentPart(MediaContentPart):
    type: Literal["video_url"]
    video_url: VideoURL


class PointCloud(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str


class PointCloudContentPart(MediaContentPart):
    type: Literal["point_cloud"]
    point_cloud: PointCloud


ContentPart = Annotated[TextContentPart | ImageContentPart | AudioContentPart | VideoContentPart
                        | PointCloudContentPart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def media(self) -> list[MediaContentPart]:
        return [p for p in self.content if isinstance(p, MediaContentPart)] if isinstance(self.content, list) else []


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "response_format": None, "audio": None, "modalities": None, "prediction": None}


class ChatCompletionRequest(BaseModel):
    """The request as sent; value ranges are OpenAI's. What depends on the server (its token
    limits, the served models) is checked at admission (``serve.request``)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    text_policy: str | None = None  # mmer extension

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and (len(v) > 4 or not all(v)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; send one")
        return self

    @property
    def asked_tokens(self) -> int | None:
        """The completion length asked for (``max_completion_tokens``, or the older ``max_tokens``)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def media(self) -> list[MediaContentPart]:
        return [p for m in self.messages for p in m.media()]

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise ApiError(400, f"n={self.n} is not supported: one choice per request", param="n")
        extras = self.model_extra or {}
        for key in UNSUPPORTED:
            if extras.get(key) not in (None, [], {}):
                raise ApiError(400, f"{key!r} is not supported by this server", param=key)


WIRE_PART_TYPES = ("text", *MEDIA_PART_TYPES)


def check_part_types(payload: dict) -> None:
    """An unknown content part type, named with where it is (pydantic's union errors would not)."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in WIRE_PART_TYPES:
                raise ApiError(400, f"messages[{i}].content[{j}]: unknown content part type {kind!r}; expected one "
                                    f"of {', '.join(WIRE_PART_TYPES)}", param="messages")


MAX_JSON_DEPTH = 32  # a chat request nests 6 deep; deeper is an attack on the parser, not a request


def parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_json(payload)
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


def check_json(payload: Any) -> None:
    """No deeper than ``MAX_JSON_DEPTH``, and every string Unicode that UTF-8 can hold (JSON's
    ``\\ud800`` escapes decode to lone surrogates, which tokenizers refuse). Iterative: the
    check itself cannot overflow the stack."""
    stack = [(payload, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, (*path, str(k))) for k, v in value.items())
            for k in value:
                _check_text(k, path)
        elif isinstance(value, list):
            stack.extend((v, (*path, str(i))) for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: tuple[str, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = ".".join(path) or "the request body"
        raise ApiError(400, f"{where}: the text holds a lone UTF-16 surrogate ({text[e.start]!r} at character "
                            f"{e.start}); send valid Unicode", param=path[0] if path else None) from None
