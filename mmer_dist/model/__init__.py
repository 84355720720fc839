"""The serving engine: MMER's routed forward for many concurrent requests, in plain torch.

Weights come straight from a store version (``mmer_dist.store.weights``); a ``DecoderStage`` owns
a range of decoder layers with its requests' KV caches and dense weight sets in a byte budget;
``Engine`` batches requests continuously over a pipeline of stages; ``plan_prompt`` turns a
request's parts and mode (retention / expansion with a text policy) into per-token routing.
No Ray, no HTTP here: ``serve/`` wraps it.
"""

import importlib

# Resolved on first use, so that importing one submodule (``mmer_dist.model.prompt`` for the CLI's
# choices) does not import the engine and transformers with it.
_EXPORTS = {
    "Engine": "engine", "EngineLimits": "engine", "GenerationRequest": "engine", "LocalPipeline": "engine",
    "TokenEvent": "engine", "DEFAULT_TEXT_POLICY": "prompt", "TEXT_POLICIES": "prompt", "Expansion": "prompt",
    "MediaPart": "prompt", "Prompt": "prompt", "Retention": "prompt", "TextPart": "prompt", "plan_prompt": "prompt",
    "SamplingParams": "sampling", "DecoderStage": "stage",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
