"""The OpenAI chat-completions wire format the endpoint speaks (the subset it serves), and its errors.

Content parts beyond OpenAI's own: ``video_url`` ({"url": data URL of a video file}) and
``point_cloud`` ({"data": base64 of a float32 .npy array of shape (N, 3) or (N, 6)}); every media
part may name the model it is for with ``"model": "<id>"`` (expansion mode, where several models
take the same part type). The request may carry ``text_policy`` (``extra_body`` in the openai
client) for the merged model. Unknown fields the API does not act on are refused when they ask
for something this server does not do (``n`` > 1, tools, ...), and otherwise ignored, as OpenAI's
own server ignores what it does not know.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.errors import ApiError


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class _Media(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None  # which model's encoder (mmer extension)


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: str | None = None


class ImagePart(_Media):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str
    format: Literal["wav"] = "wav"


class AudioPart(_Media):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str


class VideoPart(_Media):
    type: Literal["video_url"]
    video_url: VideoURL


class PointCloud(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str


class PointCloudPart(_Media):
    type: Literal["point_cloud"]
    point_cloud: PointCloud


ContentPart = Annotated[TextPart | ImagePart | AudioPart | VideoPart | PointCloudPart, Field(discriminator="type")]
MediaPart = ImagePart | AudioPart | VideoPart | PointCloudPart


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "response_format": None, "audio": None, "modalities": None, "prediction": None}


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
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

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise ApiError(400, f"n={self.n} is not supported: one choice per request", param="n")
        extras = self.model_extra or {}
        for key in UNSUPPORTED:
            if extras.get(key) not in (None, [], {}):
                raise ApiError(400, f"{key!r} is not supported by this server", param=key)

    def completion_limit(self, default: int) -> int:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; send one", param="max_tokens")
        value = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return default if value is None else value


PART_TYPES = ("text", "image_url", "input_audio", "video_url", "point_cloud")


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
            if kind not in PART_TYPES:
                raise ApiError(400, f"messages[{i}].content[{j}]: unknown content part type {kind!r}; expected one "
                                    f"of {', '.join(PART_TYPES)}", param="messages")
