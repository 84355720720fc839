"""Ingest -> ``mmer export --model ID --original`` gives back the source checkpoint bit for bit:
every LLM and component tensor (same keys, dtype, bits), extra vocabulary rows, and every aux
file (config, tokenizer, processor, mapping), for each format and each dtype, sharded or not."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DTYPES, FORMATS, MODALITY, VARIANTS
from store_helpers import assert_state_dicts_identical, aux_files, load_dir, run_cli, status_json

from mmer_dist.formats import CheckpointReader


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_original_export_is_bit_identical(stores, ckpts, tmp_path, fmt, dtype):
    store = stores.ingested(dtype)
    src = ckpts.finetuned(fmt, dtype)
    out = tmp_path / "out"
    run_cli("export", "original", "--store", store, "--model", fmt, "--out", out, "--quiet")

    want = load_dir(src)
    got = load_dir(out)
    assert_state_dicts_identical(got, want, f"{fmt}/{dtype} original export")
    assert {t.dtype for t in got.values()} == {DTYPES[dtype]}
    assert aux_files(out) == aux_files(src)
    assert len(aux_files(src)) >= 3  # config + tokenizer files at least: the comparison is not vacuous


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_catalog_records_each_model(stores, ckpts, sources, dtype):
    """What ingest recorded about the inputs matches the inputs (and the variants really are
    sharded / carry extra rows, so the round trip above covers them)."""
    status = status_json(stores.ingested(dtype))
    base = sources.base(dtype)
    n_params = sum(t.numel() for t in base.values())
    assert status["parameters"] == n_params and status["tensors"] == len(base)
    by_id = {m["id"]: m for m in status["models"]}
    assert list(by_id) == list(FORMATS)
    for fmt in FORMATS:
        m, src = by_id[fmt], ckpts.finetuned(fmt, dtype)
        llm, component = sources.split(fmt, dtype)
        extra = VARIANTS[fmt].get("extra_vocab", 0)
        assert llm["model.embed_tokens.weight"].shape[0] == base["model.embed_tokens.weight"].shape[0] + extra
        sharded = (src / "model.safetensors.index.json").exists()
        assert sharded == ("max_shard_size" in VARIANTS[fmt])
        if sharded:
            assert len(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
        assert m["modality"] == MODALITY[fmt]
        assert m["dtype"] == {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
        assert m["params"] == n_params
        assert m["extra_rows"] == extra
        assert m["component_params"] == sum(t.numel() for t in component.values()) > 0
        assert m["sha256"] == CheckpointReader(src).sha256()
        assert m["source"] == str(src)
        assert m["lam"] == 1.0
    assert len({m["sha256"] for m in by_id.values()}) == len(FORMATS)


def test_original_export_sharded_output(stores, ckpts, tmp_path):
    """A small --max-shard-size writes several shards plus an index; the tensors are unchanged
    and transformers loads it."""
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "out"
    run_cli("export", "original", "--store", stores.ingested("bf16"), "--model", "llava-hf", "--out", out,
            "--max-shard-size", "30KB", "--quiet")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    src = ckpts.finetuned("llava-hf", "bf16")
    assert_state_dicts_identical(load_dir(out), load_dir(src), "sharded export")
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_bf16_is_stored_losslessly(stores, sources):
    """bf16 lives in zarr as its uint16 bits; reading through the Store gives the same bits."""
    from mmer_dist.store.store import Store

    store = Store.open(str(stores.ingested("bf16")))
    llm = sources.llm("video-llava-hf", "bf16")
    name = "model.layers.1.self_attn.q_proj.weight"
    arr = store.array(f"models/video-llava-hf/llm/{name}")
    assert str(arr.dtype) == "uint16" and arr.attrs["dtype"] == "bfloat16"
    got = store.read_rows(f"models/video-llava-hf/llm/{name}", 0, arr.shape[0])
    assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), llm[name].view(torch.int16))
    extra = store.read_rows("models/video-llava-hf/extra/lm_head.weight", 0, 3)
    assert torch.equal(extra.view(torch.int16), llm["lm_head.weight"][-3:].view(torch.int16))
