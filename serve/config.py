"""The endpoint's settings: one typed object, validated once, from the app's ``args``.

``serve run serve/config.yaml`` and a RayService pass these as the application's ``args``
(``serve.app:build``), ``mmer serve`` builds them from its flags. Every field is described here,
and only here.
"""

from __future__ import annotations

import os
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmer_dist.errors import InvalidInputError
from mmer_dist.media.parts import MEDIA_PART_TYPES, MediaLimits
from mmer_dist.model.policies import DEFAULT_TEXT_POLICY, TEXT_POLICIES


def parse_bytes(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", str(value).lower())
    if not m:
        raise ValueError(f"not a size: {value!r} (e.g. 2GB, 512MB)")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)])


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(32 << 20, gt=0, description="largest request body accepted (413 above it)")
    max_media_parts: int = Field(8, ge=0, description="media parts per request")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="pixels of one decoded image or video frame")
    max_audio_seconds: float = Field(60.0, gt=0, description="length of one audio clip")
    max_video_frames: int = Field(512, gt=0, description="frames a video may have before sampling")
    max_points: int = Field(500_000, gt=0, description="points of one point cloud")
    max_prompt_tokens: int = Field(4096, gt=0, description="prompt tokens (media tokens included)")
    max_completion_tokens: int = Field(1024, gt=0, description="largest max_tokens a request may ask for")

    def media(self) -> MediaLimits:
        """What the media decoders enforce (the fields they share, by name)."""
        return MediaLimits(max_part_bytes=self.max_body_bytes, **{
            name: getattr(self, name) for name in MediaLimits.__dataclass_fields__ if name != "max_part_bytes"})


class ServeOptions(BaseModel):
    """What ``serve.app:build`` takes (the Serve application's ``args``)."""

    model_config = ConfigDict(extra="forbid")
    store: str = Field(description="store URL: a local path or an fsspec URL (s3://bucket/store)")
    version: int | None = Field(None, ge=1, description="serve this version (pinned); default: follow the "
                                "store's serving pointer (the latest version while none is set)")
    stages: int = Field(1, ge=1, description="pipeline stages of the LLM (one Ray actor per range of layers)")
    stage_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each stage "
                                              "actor needs (e.g. {'llm_stage': 1} to put one stage per node)")
    stage_gpus: float = Field(0.0, ge=0, description="GPUs per stage actor (0: CPU stages)")
    spare_stages: bool = Field(True, description="keep one warm stage process per stage (imports done, no "
                               "weights), so a lost stage or a new version's stages start in seconds; costs one "
                               "idle process per stage")
    device: str = Field("auto", description="torch device of the stages: auto (CUDA when the actor has a GPU), cpu, cuda")
    dtype: str = Field("auto", description="compute dtype: auto (the store's), bfloat16, float16, float32")
    slot_budget: int | str = Field("2GB", validate_default=True,
                                   description="bytes per stage for dense theta_hat slots (LRU)")
    text_policy: str = Field(DEFAULT_TEXT_POLICY, description=f"default text policy of 'merged': {', '.join(TEXT_POLICIES)}")
    default_part_models: dict[str, str] = Field(default_factory=dict, description="part type -> model id for "
                                                "expansion requests where several models take the part type")
    replicas: int = Field(1, ge=1, description="LLM engine replicas, each a whole pipeline with its own slots; a "
                          "model's requests go to a replica that serves it (Serve's model multiplexing). A "
                          "config's LLMEngine num_replicas or autoscaling_config overrides it")
    max_running: int = Field(64, ge=1, description="requests decoding together in one replica")
    max_step_tokens: int = Field(8192, ge=1, description="prompt tokens admitted per engine step")
    limits: Limits = Field(default_factory=Limits)
    allow_remote_media: bool = Field(False, description="fetch http(s) media URLs (off: data URLs only)")
    api_token_env: str | None = Field("MMER_API_TOKEN", description="environment variable holding the bearer "
                                      "token; unset or empty variable: no auth")
    max_ongoing_requests: int = Field(64, ge=1, description="requests in flight per ingress replica")
    max_queued_requests: int = Field(128, ge=-1, description="requests queued beyond that before a 429 "
                                     "(-1: no limit)")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After of a 429")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often a replica exports its stages' slot "
                                      "residency and builds as metrics")
    follow_interval_s: float = Field(2.0, gt=0, description="how often the serving pointer is polled")
    request_timeout_s: float = Field(300.0, gt=0, description="longest a request may take, end to end; past it "
                                     "the client gets a 503 (a stream: an error event) and the request is cancelled")
    step_timeout_s: float = Field(300.0, gt=0, description="longest one engine step may take; a stage that does "
                                  "not answer within it counts as lost (its version's stages are rebuilt)")

    @field_validator("slot_budget")
    @classmethod
    def _budget(cls, v):
        return parse_bytes(v)

    @field_validator("max_queued_requests")
    @classmethod
    def _queue(cls, v):
        if v == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or at least 1")
        return v

    @field_validator("text_policy")
    @classmethod
    def _policy(cls, v):
        if v not in TEXT_POLICIES:
            raise ValueError(f"unknown text policy {v!r}; expected one of {', '.join(TEXT_POLICIES)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"unknown dtype {v!r}; expected auto, bfloat16, float16 or float32")
        return v

    @field_validator("default_part_models")
    @classmethod
    def _parts(cls, v):
        if bad := sorted(set(v) - set(MEDIA_PART_TYPES)):
            raise ValueError(f"unknown part types {bad}; expected {', '.join(MEDIA_PART_TYPES)}")
        return v

    def api_token(self) -> str | None:
        return (os.environ.get(self.api_token_env) or None) if self.api_token_env else None

    @classmethod
    def from_args(cls, args: dict) -> ServeOptions:
        from pydantic import ValidationError

        try:
            return cls.model_validate(args)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise InvalidInputError(f"serve options: {problems}") from None
