"""OpenAI-style content parts <-> raw media, the one place that knows their JSON shapes.

What the endpoint does with each part type of a chat message (every payload inline, base64):

- ``text``: ``{"type": "text", "text": "..."}``, rendered by the chat template; nothing to decode.
- ``image_url``: ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (PNG
  or JPEG) -> RGB uint8 (H, W, 3) -> the model's image processor. No adapter.
- ``input_audio``: ``{"type": "input_audio", "input_audio": {"data": "<base64 WAV>", "format":
  "wav"}}`` -> :class:`~mmer_dist.media.decode.Waveform` -> the model's adapter (``spectrogram``)
  -> an RGB image -> the model's image processor.
- ``video_url``: ``{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`` (any
  container FFmpeg reads) -> uint8 (T, H, W, 3), T = the model's frame count (its processor's
  ``num_frames``), sampled uniformly -> the model's video processor. No adapter.
- ``point_cloud``: ``{"type": "point_cloud", "point_cloud": {"data": "<base64 .npy>"}}`` (float32,
  (N, 3) xyz or (N, 6) xyz + rgb) -> float32 (N, 3|6) -> the model's adapter (``point-projection``)
  -> an RGB image -> the model's image processor.

In the chat template each media part becomes its placeholder token (``<image>``, ``<audio>``,
``<video>``, ``<point>``), which the model's processor expands to the number of embeddings its
encoder produces. A part may carry ``"model": "<id>"`` to name the model it is for (serving's
routing); this module ignores that key. Remote URLs are never fetched here: only ``data:`` URLs.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmer_dist.errors import InvalidInputError
from mmer_dist.media import decode, encode

MEDIA_PART_TYPES = ("image_url", "input_audio", "video_url", "point_cloud")
PLACEHOLDERS = {"image_url": "<image>", "input_audio": "<audio>", "video_url": "<video>", "point_cloud": "<point>"}


@dataclass(frozen=True)
class MediaLimits:
    """What one media part may hold; the endpoint's configured limits."""

    max_part_bytes: int = 32 * 1024 * 1024  # of the base64 text
    max_pixels: int = decode.DEFAULT_MAX_PIXELS
    max_audio_seconds: float = decode.DEFAULT_MAX_SECONDS
    max_video_frames: int = decode.DEFAULT_MAX_FRAMES
    max_points: int = decode.DEFAULT_MAX_POINTS


def image_part(image: np.ndarray) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": _data_url("image/png", encode.encode_png(image))}}


def audio_part(samples: np.ndarray, sample_rate: int) -> dict[str, Any]:
    data = base64.b64encode(encode.encode_wav(samples, sample_rate)).decode("ascii")
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def video_part(frames: np.ndarray, fps: int = 8) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": _data_url("video/mp4", encode.encode_video(frames, fps=fps))}}


def point_cloud_part(points: np.ndarray) -> dict[str, Any]:
    return {"type": "point_cloud", "point_cloud": {"data": base64.b64encode(encode.encode_points(points)).decode("ascii")}}


def media_part(part_type: str, raw: Any) -> dict[str, Any]:
    """The content part for ``raw`` (what :func:`decode_part` returns for that part type)."""
    if part_type == "image_url":
        return image_part(raw)
    if part_type == "input_audio":
        return audio_part(*raw)
    if part_type == "video_url":
        return video_part(raw)
    if part_type == "point_cloud":
        return point_cloud_part(raw)
    raise InvalidInputError(f"unknown media part type {part_type!r}; expected one of {list(MEDIA_PART_TYPES)}")


def decode_part(part: dict[str, Any], *, num_frames: int = 8, limits: MediaLimits = MediaLimits()) -> Any:
    """A media content part -> its raw media: an RGB image, a :class:`~mmer_dist.media.decode.Waveform`,
    ``num_frames`` video frames, or a point array. Every problem is an InvalidInputError naming the field."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InvalidInputError("content part: expected an object with a string 'type'")
    kind = part["type"]
    if kind not in MEDIA_PART_TYPES:
        raise InvalidInputError(f"content part type {kind!r} is not a media type; expected one of {list(MEDIA_PART_TYPES)}")
    body = part.get(kind)
    if not isinstance(body, dict):
        raise InvalidInputError(f"{kind}: expected an object under {kind!r}")
    if kind == "image_url":
        return decode.decode_image(_from_data_url(body, kind, limits), max_pixels=limits.max_pixels)
    if kind == "video_url":
        return decode.decode_video(_from_data_url(body, kind, limits), num_frames=num_frames,
                                   max_frames=limits.max_video_frames, max_pixels=limits.max_pixels)
    if kind == "input_audio":
        if body.get("format", "wav") != "wav":
            raise InvalidInputError(f"input_audio.format {body.get('format')!r}: only 'wav' is accepted")
        return decode.decode_wav(_b64(body.get("data"), f"{kind}.data", limits), max_seconds=limits.max_audio_seconds)
    return decode.decode_points(_b64(body.get("data"), f"{kind}.data", limits), max_points=limits.max_points)


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _from_data_url(body: dict[str, Any], kind: str, limits: MediaLimits) -> bytes:
    url = body.get("url")
    if not isinstance(url, str):
        raise InvalidInputError(f"{kind}.url: expected a string")
    head, sep, payload = url.partition(",")
    if not url.startswith("data:"):
        raise InvalidInputError(f"{kind}.url: only data: URLs are accepted (remote URLs are not fetched)")
    if not sep or not head.endswith(";base64"):
        raise InvalidInputError(f"{kind}.url: expected 'data:<mime type>;base64,<data>'")
    return _b64(payload, f"{kind}.url", limits)


def _b64(text: Any, field: str, limits: MediaLimits) -> bytes:
    if not isinstance(text, str) or not text:
        raise InvalidInputError(f"{field}: expected a non-empty base64 string")
    if len(text) > limits.max_part_bytes:
        raise InvalidInputError(f"{field}: {len(text)} bytes of base64, over the limit of {limits.max_part_bytes}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInputError(f"{field}: invalid base64 ({e})") from None
