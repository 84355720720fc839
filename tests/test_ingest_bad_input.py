"""Bad input and faults: each is refused with a message that names the problem (model id, tensor,
key or file), and leaves the store exactly as it was: same catalog snapshot, same models and
versions, not one file added or removed (the writer lock file aside)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from conftest import copy_store, ingest_args
from safetensors.torch import load_file, save_file
from store_helpers import StoreState, run_cli, status_json
from transformers import LlamaConfig, LlamaForCausalLM

from mmer_dist.demo import tiny_models


@pytest.fixture(scope="module")
def victim(merged_store, tmp_path_factory) -> Path:
    """A copy of the bf16 store (base, four models, three versions) shared by this module: every
    command run on it must fail and leave it unchanged, which ``refused`` checks each time."""
    return copy_store(merged_store, tmp_path_factory.mktemp("victim") / "store")


def refused(store: Path, *args, expect: tuple[str, ...]) -> str:
    """Run ``mmer ARGS``, which must fail naming every string in ``expect`` and change nothing."""
    before = StoreState.capture(store)
    r = run_cli(*args, ok=False)
    assert r.rc == 2, (r.rc, r.err)
    for word in expect:
        assert word in r.err, f"{word!r} not in the message: {r.err}"
    assert "Traceback" not in r.err
    after = StoreState.capture(store)
    assert after == before, "the store changed"
    return r.err


def clone(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edit_single_file(path: Path, edit) -> None:
    """Rewrite a single-file checkpoint's tensors through ``edit(dict)``."""
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


# -- format and layout ----------------------------------------------------------------------------


def test_wrong_format_flag(victim, ckpts):
    """``--format llava-hf`` on a Video-LLaVA checkpoint: its towers are keys llava-hf does not know."""
    src = ckpts.finetuned("video-llava-hf", "bf16")
    err = refused(victim, *ingest_args(victim, "vid2", src, "video-llava-hf"), "--format", "llava-hf",
                  expect=("'vid2'", "llava-hf", "image_tower.", str(src)))
    assert "neither the LLM nor the modality component" in err


def test_undetectable_format(victim, ckpts):
    """A checkpoint no built-in format explains (the generic one without its mapping)."""
    src = ckpts.finetuned("generic", "bf16")
    refused(victim, "ingest", "--store", victim, "--model", "aud2", "--path", src, "--modality", "audio",
            expect=("cannot tell its format", str(src), "--format generic --mapping"))


def test_generic_without_mapping(victim, ckpts):
    src = ckpts.finetuned("generic", "bf16")
    refused(victim, "ingest", "--store", victim, "--model", "aud2", "--path", src, "--modality", "audio",
            "--format", "generic", expect=("--mapping",))


def test_unknown_keys(victim, ckpts, tmp_path):
    path = clone(ckpts.finetuned("video-llava-hf", "bf16"), tmp_path / "ckpt")
    edit_single_file(path, lambda t: t.update({"audio_encoder.proj.weight": torch.zeros(4, 4, dtype=torch.bfloat16)}))
    refused(victim, *ingest_args(victim, "vid2", path, "video-llava-hf"),
            expect=("'vid2'", "audio_encoder.proj.weight", "video-llava-hf"))


def test_unknown_format_name_is_rejected_by_the_parser(victim, ckpts):
    refused(victim, *ingest_args(victim, "x", ckpts.finetuned("llava", "bf16"), "llava"), "--format", "llava-next",
            expect=("llava-next",))


# -- architecture, tensors --------------------------------------------------------------------------


def _other_depth(path: Path) -> None:
    base = tiny_models.save_base(path.parent / f"{path.name}-base", num_hidden_layers=2)
    tiny_models.save_finetuned(base, path, "llava-hf", seed=5)


def _other_width(path: Path) -> None:
    config = tiny_models.tiny_text_config()
    config.hidden_size, config.intermediate_size = 48, 96
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig.from_dict(config.to_dict()))
    base_path = path.parent / f"{path.name}-base"
    base.to(torch.bfloat16).save_pretrained(base_path)
    tiny_models.build_tokenizer(256).save_pretrained(base_path)
    tiny_models.save_finetuned(base_path, path, "llava", seed=5)


@pytest.mark.parametrize("name,build,field,got,want", [
    ("depth", _other_depth, "num_hidden_layers", 2, 4),
    ("width", _other_width, "hidden_size", 48, 32),
])
def test_other_architecture(victim, ckpts, name, build, field, got, want):
    path = ckpts.custom(name, build)
    refused(victim, "ingest", "--store", victim, "--model", "alien", "--path", path, "--modality", "image", "--quiet",
            expect=("'alien'", "architecture differs", f"{field} is {got}", f"the base has {want}"))


def test_tensor_shape_differs(victim, ckpts, tmp_path):
    """The config agrees with the base but one tensor does not."""
    path = clone(ckpts.finetuned("video-llava-hf", "bf16"), tmp_path / "ckpt")
    key = "language_model.model.layers.1.self_attn.o_proj.weight"
    edit_single_file(path, lambda t: t.update({key: t[key][:, :31].contiguous()}))
    refused(victim, *ingest_args(victim, "vid2", path, "video-llava-hf"),
            expect=("'vid2'", "model.layers.1.self_attn.o_proj.weight", "(32, 31)", "(32, 32)"))


def test_missing_tensor(victim, ckpts, tmp_path):
    path = clone(ckpts.finetuned("video-llava-hf", "bf16"), tmp_path / "ckpt")
    edit_single_file(path, lambda t: t.pop("language_model.model.layers.2.mlp.up_proj.weight"))
    refused(victim, *ingest_args(victim, "vid2", path, "video-llava-hf"),
            expect=("'vid2'", "missing", "model.layers.2.mlp.up_proj.weight"))


def test_extra_llm_tensor(victim, ckpts, tmp_path):
    path = clone(ckpts.finetuned("video-llava-hf", "bf16"), tmp_path / "ckpt")
    key = "language_model.model.layers.4.mlp.up_proj.weight"
    edit_single_file(path, lambda t: t.update({key: t["language_model.model.layers.3.mlp.up_proj.weight"].clone()}))
    refused(victim, *ingest_args(victim, "vid2", path, "video-llava-hf"),
            expect=("'vid2'", "the base does not have", "model.layers.4.mlp.up_proj.weight"))


def test_extra_rows_on_one_vocabulary_tensor_only(victim, ckpts, tmp_path):
    """Embedding with 3 extra rows but an LM head without: refused before anything is written."""
    path = clone(ckpts.finetuned("video-llava-hf", "bf16"), tmp_path / "ckpt")
    key = "language_model.lm_head.weight"
    edit_single_file(path, lambda t: t.update({key: t[key][:256].contiguous()}))
    refused(victim, *ingest_args(victim, "vid2", path, "video-llava-hf"),
            expect=("'vid2'", "'lm_head.weight'", "0 extra vocabulary rows", "'model.embed_tokens.weight' has 3"))


def test_mixed_dtypes_in_one_checkpoint(victim, ckpts, tmp_path):
    path = clone(ckpts.finetuned("video-llava-hf", "bf16"), tmp_path / "ckpt")
    key = "language_model.model.norm.weight"
    edit_single_file(path, lambda t: t.update({key: t[key].float()}))
    refused(victim, *ingest_args(victim, "vid2", path, "video-llava-hf"), expect=("'vid2'", "mix dtypes"))


def test_a_model_in_another_dtype_than_the_others_is_accepted(stores, ckpts, tmp_path):
    """Fine-tunes may differ in dtype from the base and from each other (merged upcast to
    float32; see test_merge_mixed_dtypes): an fp16 model joins a bf16 store as float16."""
    store = stores.fresh(tmp_path / "store", models=True)
    run_cli(*ingest_args(store, "img16", ckpts.finetuned("llava-hf", "fp16"), "llava-hf"))
    assert {m["id"]: m["dtype"] for m in status_json(store)["models"]}["img16"] == "float16"


# -- NaN / Inf, found while streaming (after writing has begun) ----------------------------------------


@pytest.mark.parametrize("where,key,index,expect", [
    ("llm", "llm.model.layers.2.mlp.down_proj.weight", (3, 5), ("model.layers.2.mlp.down_proj.weight", "nan", "flat index 197")),
    ("llm-head", "llm.lm_head.weight", (200, 7), ("lm_head.weight", "nan", f"flat index {200 * 32 + 7}")),
    ("component", "audio_projector.weight", (1, 2), ("audio_projector.weight", "inf")),
])
def test_non_finite_values(victim, ckpts, tmp_path, where, key, index, expect):
    path = clone(ckpts.finetuned("generic", "bf16"), tmp_path / "ckpt")
    value = float("inf") if where == "component" else float("nan")
    edit_single_file(path, lambda t: t[key].__setitem__(index, value))
    refused(victim, *ingest_args(victim, "aud2", path, "generic"), expect=("'aud2'", *expect))
    assert not (victim / "models" / "aud2").exists()


def test_nan_in_extra_vocabulary_rows(victim, ckpts, tmp_path):
    path = clone(ckpts.finetuned("video-llava-hf", "bf16"), tmp_path / "ckpt")
    edit_single_file(path, lambda t: t["language_model.lm_head.weight"].__setitem__((257, 4), float("nan")))
    refused(victim, *ingest_args(victim, "vid2", path, "video-llava-hf"),
            expect=("'vid2'", "lm_head.weight", "nan", f"flat index {257 * 32 + 4}"))


def test_nan_in_a_later_chunk_of_a_small_chunk_store(stores, ckpts, tmp_path):
    """With many chunks per tensor the reported position is still the tensor's flat index."""
    store = tmp_path / "store"
    run_cli("ingest", "--store", store, "--base", ckpts.base("bf16"), "--chunk-elems", "256", "--quiet")
    path = clone(ckpts.finetuned("generic", "bf16"), tmp_path / "ckpt")
    edit_single_file(path, lambda t: t["llm.model.layers.1.mlp.gate_proj.weight"].__setitem__((50, 9), float("nan")))
    refused(store, *ingest_args(store, "aud", path, "generic"),
            expect=("'aud'", "model.layers.1.mlp.gate_proj.weight", f"flat index {50 * 32 + 9}"))


# -- damaged files ---------------------------------------------------------------------------------


def test_truncated_safetensors(victim, ckpts, tmp_path):
    path = clone(ckpts.finetuned("video-llava-hf", "bf16"), tmp_path / "ckpt")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    refused(victim, *ingest_args(victim, "vid2", path, "video-llava-hf"), expect=(str(f), "truncated"))


def test_truncated_shard(victim, ckpts, tmp_path):
    path = clone(ckpts.finetuned("llava-hf", "bf16"), tmp_path / "ckpt")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    refused(victim, *ingest_args(victim, "img2", path, "llava-hf"), expect=(str(shard),))


def test_missing_shard(victim, ckpts, tmp_path):
    path = clone(ckpts.finetuned("llava", "bf16"), tmp_path / "ckpt")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    refused(victim, *ingest_args(victim, "img2", path, "llava"), expect=(shard.name, "missing"))


def test_corrupt_header(victim, ckpts, tmp_path):
    path = clone(ckpts.finetuned("video-llava-hf", "bf16"), tmp_path / "ckpt")
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:40] = b"\xff garbage that is not json \x00\x01"[:32].ljust(32, b"#")
    f.write_bytes(bytes(raw))
    refused(victim, *ingest_args(victim, "vid2", path, "video-llava-hf"), expect=(str(f), "header"))


def test_corrupt_config(victim, ckpts, tmp_path):
    path = clone(ckpts.finetuned("llava", "bf16"), tmp_path / "ckpt")
    (path / "config.json").write_text("{ not json")
    refused(victim, *ingest_args(victim, "img2", path, "llava"), expect=(str(path / "config.json"),))


def test_checkpoint_path_missing(victim, tmp_path):
    refused(victim, "ingest", "--store", victim, "--model", "x", "--path", tmp_path / "nowhere", "--modality", "image",
            expect=(str(tmp_path / "nowhere"), "not a directory"))


# -- ids, store state, commands ------------------------------------------------------------------------


@pytest.mark.parametrize("args,expect", [
    (("--model", "x", "--modality", "image"), ("--path",)),
    (("--model", "x", "--path", "/p"), ("--modality",)),
    (("--base", "/b", "--modality", "image"), ("--modality is for --model",)),
    (("--model", "x", "--base", "/b"), ("not allowed with",)),
    ((), ("one of the arguments --base --model --manifest is required",)),
])
def test_ingest_argument_errors(victim, args, expect):
    refused(victim, "ingest", "--store", victim, *args, expect=expect)


def test_duplicate_model_id(victim, ckpts):
    refused(victim, *ingest_args(victim, "llava", ckpts.finetuned("llava", "bf16"), "llava"),
            expect=("'llava'", "already in the store"))


@pytest.mark.parametrize("bad_id", ["a/b", "../x", "", "_lead", ".hidden"])
def test_invalid_model_id(victim, ckpts, bad_id):
    refused(victim, *ingest_args(victim, bad_id, ckpts.finetuned("llava", "bf16"), "llava"),
            expect=(repr(bad_id), "not valid"))


def test_merge_without_models(stores, tmp_path):
    store = stores.fresh(tmp_path / "store")
    refused(store, "merge", "--store", store, "--quiet", expect=("no models to merge",))


def test_merge_with_unknown_lambda_model(victim):
    refused(victim, "merge", "--store", victim, "--quiet", "--lam", "nope=0.5", expect=("'nope'", "--lam"))


def test_merge_with_unknown_model(victim):
    refused(victim, "merge", "--store", victim, "--quiet", "--models", "llava", "nope", expect=("'nope'",))


@pytest.mark.parametrize("args,expect", [
    (("--topk", "0"), ("top-K",)),
    (("--topk", "1.5"), ("top-K",)),
    (("--alpha", "-1"), ("alpha",)),
    (("--dare-rate", "1.0"), ("DARE",)),
    (("--lam", "llava=-1"), ("'llava'", "lambda")),
])
def test_merge_with_bad_settings(victim, args, expect):
    refused(victim, "merge", "--store", victim, "--quiet", *args, expect=expect)


def test_export_of_unknown_model(victim, tmp_path):
    out = tmp_path / "out"
    refused(victim, "export", "model", "--store", victim, "--model", "nope", "--out", out, "--quiet",
            expect=("'nope'", "llava-hf"))
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_export_of_model_not_in_version(victim, tmp_path):
    out = tmp_path / "out"
    refused(victim, "export", "model", "--store", victim, "--model", "video-llava-hf", "--version", "3", "--out", out,
            expect=("'video-llava-hf'", "version 3"))
    assert not out.exists()


def test_export_of_unknown_version(victim, tmp_path):
    out = tmp_path / "out"
    refused(victim, "export", "merged", "--store", victim, "--version", "9", "--out", out, expect=("version 9",))
    assert not out.exists()


def test_export_before_any_merge(stores, tmp_path):
    store = stores.fresh(tmp_path / "store", models=True)
    out = tmp_path / "out"
    refused(store, "export", "model", "--store", store, "--model", "llava", "--out", out, expect=("mmer merge",))
    refused(store, "export", "text", "--store", store, "--out", out, expect=("mmer merge",))
    assert not out.exists()


# -- a store path that is not a store ---------------------------------------------------------------------


def _not_a_store(kind: str, path: Path) -> None:
    if kind == "empty":
        path.mkdir()
    elif kind == "files":
        (path / "sub").mkdir(parents=True)
        (path / "notes.txt").write_text("hello")
        (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    elif kind == "zarr-group":
        zarr.open_group(str(path), mode="w", attributes={"owner": "someone else"}).create_array(
            "x", shape=(4,), dtype="float32")
    elif kind == "zarr-array":
        zarr.create_array(str(path), shape=(4,), dtype="float32")
    elif kind == "bad-zarr-json":
        path.mkdir()
        (path / "zarr.json").write_text("{ this is not json")


NOT_A_STORE = ["missing", "empty", "files", "zarr-group", "zarr-array", "bad-zarr-json"]


@pytest.mark.parametrize("kind", NOT_A_STORE)
@pytest.mark.parametrize("command", ["ingest", "merge", "export", "status"])
def test_store_path_that_is_not_a_store(ckpts, tmp_path, kind, command):
    store = tmp_path / "store"
    _not_a_store(kind, store)
    out = tmp_path / "out"
    args = {
        "ingest": ingest_args(store, "m", ckpts.finetuned("llava", "bf16"), "llava"),
        "merge": ["merge", "--store", store, "--quiet"],
        "export": ["export", "merged", "--store", store, "--out", out, "--quiet"],
        "status": ["status", "--store", store],
    }[command]
    refused(store, *args, expect=(str(store), "not an mmer store"))
    assert store.exists() == (kind != "missing") and not out.exists()


@pytest.mark.parametrize("kind", ["files", "zarr-group", "zarr-array", "bad-zarr-json"])
def test_base_ingest_into_something_else(ckpts, tmp_path, kind):
    """``ingest --base`` creates a store only at a new or empty path."""
    store = tmp_path / "store"
    _not_a_store(kind, store)
    refused(store, "ingest", "--store", store, "--base", ckpts.base("bf16"), "--quiet", expect=(str(store),))


def test_second_base_is_refused(victim, ckpts):
    refused(victim, "ingest", "--store", victim, "--base", ckpts.base("bf16"), "--quiet",
            expect=("already has a base",))


def test_base_that_is_not_llama(tmp_path, ckpts):
    store = tmp_path / "store"
    r = run_cli("ingest", "--store", store, "--base", ckpts.finetuned("llava-hf", "bf16"), "--quiet", ok=False)
    assert "Llama-family" in r.err and "llava-hf" in r.err
    assert not store.exists()


def test_a_failed_ingest_does_not_block_a_good_one(stores, ckpts, tmp_path):
    """After a NaN refusal, the same id ingests cleanly from a good checkpoint and round-trips."""
    from store_helpers import assert_state_dicts_identical, load_dir

    victim = stores.fresh(tmp_path / "store", models=True)

    bad = clone(ckpts.finetuned("generic", "bf16"), tmp_path / "bad")
    edit_single_file(bad, lambda t: t["llm.model.norm.weight"].__setitem__(3, float("nan")))
    refused(victim, *ingest_args(victim, "aud2", bad, "generic"), expect=("'aud2'", "model.norm.weight"))
    good = ckpts.finetuned("generic", "bf16")
    run_cli(*ingest_args(victim, "aud2", good, "generic"))
    out = tmp_path / "out"
    run_cli("export", "original", "--store", victim, "--model", "aud2", "--out", out, "--quiet")
    assert_state_dicts_identical(load_dir(out), load_dir(good))
    assert json.loads((out / "mmer_mapping.json").read_text())["name"] == "tiny-audio-llm"
