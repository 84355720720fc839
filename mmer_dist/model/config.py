"""The decoder's shape, read from the base's config: what a stage needs to run a Llama-family layer."""

from __future__ import annotations

from dataclasses import dataclass

from mmer_dist.errors import InvalidInputError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # one block: RMSNorm, RoPE, GQA attention, SwiGLU MLP
# (biases, where a checkpoint has them, are found from its tensors, not from config flags)


@dataclass(frozen=True)
class DecoderConfig:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    rms_eps: float
    tie_embeddings: bool
    raw: dict  # the base's config.json (RoPE parameters are read from it by transformers)

    @classmethod
    def from_base_config(cls, config: dict) -> DecoderConfig:
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidInputError(f"the serving engine runs Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                                    f"the base is {model_type!r}")
        if config.get("hidden_act", "silu") != "silu":
            raise InvalidInputError(f"the base uses activation {config['hidden_act']!r}; the engine runs SwiGLU (silu)")
        n_heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            n_layers=int(config["num_hidden_layers"]), hidden=hidden, n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or hidden // n_heads),
            intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
            max_positions=int(config.get("max_position_embeddings", 2048)),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)), raw=dict(config))

    def hf_config(self):
        """The transformers config object (for its RoPE implementation)."""
        from transformers import AutoConfig

        raw = {k: v for k, v in self.raw.items() if k not in ("architectures", "transformers_version")}
        return AutoConfig.for_model(raw.pop("model_type", "llama"), **raw)
