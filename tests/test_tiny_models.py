"""Tiny models: real transformers checkpoints that load, carry the requested deltas and vocab."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration, VideoLlavaForConditionalGeneration

from mmer_dist.demo import tiny_models
from mmer_dist.errors import InvalidInputError
from mmer_dist.formats import CheckpointReader, FormatMapping, detect_format


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save_base(tmp_path_factory.mktemp("tiny") / "base", seed=0)


def _llm(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Canonical LLM tensors of a checkpoint, through the format mapping."""
    reader = CheckpointReader(path)
    mapping = FormatMapping.load(path / tiny_models.GENERIC_MAPPING_FILE if fmt == "generic" else fmt)
    return {canonical: reader.read(source) for canonical, source in mapping.split(reader.keys()).llm.items()}


def test_base_loads_and_runs(base: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(base)
    assert model.config.num_hidden_layers == 4 and model.config.num_key_value_heads == 2
    assert model(torch.tensor([[1, 20, 30]])).logits.shape == (1, 3, 256)
    tok = AutoTokenizer.from_pretrained(base)
    assert len(tok) == 256
    content = [{"type": "image"}, {"type": "text", "text": "describe the image"}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|> <image> describe the image </s> <|assistant|>"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids and ids[2] == tok.convert_tokens_to_ids("<image>")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["llava-hf", "video-llava-hf", "llava", "generic"])
def test_deltas_nonzero_in_requested_dtype(base: Path, tmp_path: Path, fmt: str, dtype: torch.dtype) -> None:
    path = tiny_models.save_finetuned(base, tmp_path / fmt, fmt, dtype=dtype, seed=3)
    reader = CheckpointReader(base)
    tuned = _llm(path, fmt)
    assert sorted(tuned) == reader.keys()
    changed_total = 0
    for key, t in tuned.items():
        assert t.dtype == dtype, key
        changed = (t != reader.read(key).to(dtype)).sum().item()
        assert changed > 0.75 * t.numel(), (key, changed)  # 32-entry norms are the noisy ones
        changed_total += changed
    assert changed_total > 0.93 * sum(t.numel() for t in tuned.values())


@pytest.mark.parametrize("fmt,cls", [("llava-hf", LlavaForConditionalGeneration),
                                     ("video-llava-hf", VideoLlavaForConditionalGeneration)])
def test_hf_formats_load_with_from_pretrained(base: Path, tmp_path: Path, fmt: str, cls: type) -> None:
    path = tiny_models.save_finetuned(base, tmp_path / fmt, fmt, seed=5, extra_vocab=3)
    model = cls.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    tuned = _llm(path, fmt)
    params = dict(model.named_parameters())
    down = "layers.2.mlp.down_proj.weight"
    assert torch.equal(params[f"model.language_model.{down}"], tuned[f"model.{down}"])
    assert torch.equal(params["lm_head.weight"], tuned["lm_head.weight"])
    tok = AutoTokenizer.from_pretrained(path)
    if fmt == "llava-hf":
        ids = tok(" ".join(["<image>"] * 4) + " what is this", return_tensors="pt").input_ids
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 8, 8, dtype=torch.bfloat16))
    else:
        ids = tok(" ".join(["<video>"] * 40) + " what is this", return_tensors="pt").input_ids
        out = model(input_ids=ids, pixel_values_videos=torch.randn(1, 8, 3, 8, 8, dtype=torch.bfloat16))
    assert out.logits.shape == (1, ids.shape[1], 259) and torch.isfinite(out.logits).all()
    assert json.loads((path / "processor_config.json").read_text())["patch_size"] == 4


@pytest.mark.parametrize("fmt", ["llava-hf", "llava", "generic"])
def test_extra_vocab_grows_embedding_and_head_only(base: Path, tmp_path: Path, fmt: str) -> None:
    path = tiny_models.save_finetuned(base, tmp_path / fmt, fmt, extra_vocab=4, seed=2)
    reader = CheckpointReader(base)
    for key, t in _llm(path, fmt).items():
        expected = reader.info(key).shape
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = (expected[0] + 4, *expected[1:])
        assert tuple(t.shape) == expected, key
    mapping = FormatMapping.load(path / tiny_models.GENERIC_MAPPING_FILE if fmt == "generic" else fmt)
    assert mapping.llm_config(CheckpointReader(path).config)["vocab_size"] == 260
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 260 and tok.convert_tokens_to_ids("<extra_3>") == 259


def test_deterministic_by_seed(base: Path, tmp_path: Path) -> None:
    a = tiny_models.save_finetuned(base, tmp_path / "a", "llava", seed=7)
    b = tiny_models.save_finetuned(base, tmp_path / "b", "llava", seed=7)
    c = tiny_models.save_finetuned(base, tmp_path / "c", "llava", seed=8)
    assert CheckpointReader(a).sha256() == CheckpointReader(b).sha256() != CheckpointReader(c).sha256()


def test_sharded_outputs(base: Path, tmp_path: Path) -> None:
    for fmt in ("llava-hf", "llava"):
        path = tiny_models.save_finetuned(base, tmp_path / fmt, fmt, max_shard_size=30_000)
        reader = CheckpointReader(path)
        assert (path / "model.safetensors.index.json").exists() and len({reader.info(k).file for k in reader.keys()}) > 1
        assert detect_format(reader) == fmt
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava-hf")


def test_llava_original_and_generic_layouts(base: Path, tmp_path: Path) -> None:
    llava = CheckpointReader(tiny_models.save_finetuned(base, tmp_path / "llava", "llava"))
    assert llava.config["architectures"] == ["LlavaLlamaForCausalLM"] and llava.config["model_type"] == "llava_llama"
    assert llava.config["mm_hidden_size"] == 16 and llava.info("model.mm_projector.0.weight").shape == (32, 16)
    assert llava.info("model.mm_projector.2.weight").shape == (32, 32)
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in llava.keys()
    audio = tiny_models.save_finetuned(base, tmp_path / "point", "generic", modality="point")
    keys = CheckpointReader(audio).keys()
    assert "llm.lm_head.weight" in keys and "point_projector.weight" in keys and "point_encoder.proj.weight" in keys
    encoder = tiny_models.TinyMediaEncoder()
    encoder.load_state_dict({k.removeprefix("point_"): CheckpointReader(audio).read(k).float()
                             for k in keys if k.startswith("point_")})
    assert encoder(torch.randn(5, 8)).shape == (5, 32)
    with pytest.raises(InvalidInputError, match="modality"):
        tiny_models.save_finetuned(base, tmp_path / "x", "llava-hf", modality="audio")
    with pytest.raises(InvalidInputError, match="format 'gguf' unknown"):
        tiny_models.save_finetuned(base, tmp_path / "x", "gguf")
