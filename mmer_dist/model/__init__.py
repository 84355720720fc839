"""The serving engine: MMER's routed forward for many concurrent requests, in plain torch.

Weights come straight from a store version (``mmer_dist.store.weights``); a ``DecoderStage`` owns
a range of decoder layers with its requests' KV caches and dense weight sets in a byte budget;
``Engine`` batches requests continuously over a pipeline of stages; ``plan_prompt`` turns a
request's parts and mode (retention / expansion with a text policy) into per-token routing.
No Ray, no HTTP here: ``serve/`` wraps it.
"""

from mmer_dist.model.engine import Engine, EngineLimits, GenerationRequest, LocalPipeline, TokenEvent
from mmer_dist.model.prompt import (
    DEFAULT_TEXT_POLICY, TEXT_POLICIES, Expansion, MediaPart, Prompt, Retention, TextPart, plan_prompt,
)
from mmer_dist.model.sampling import SamplingParams
from mmer_dist.model.stage import DecoderStage

__all__ = ["DEFAULT_TEXT_POLICY", "TEXT_POLICIES", "DecoderStage", "Engine", "EngineLimits", "Expansion",
           "GenerationRequest", "LocalPipeline", "MediaPart", "Prompt", "Retention", "SamplingParams", "TextPart",
           "TokenEvent", "plan_prompt"]
