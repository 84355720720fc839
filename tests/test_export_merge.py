"""Merge -> export, against ``mmer_dist.method.reference`` on the source checkpoints.

The bf16 store (four formats, one with 3 and one with 2 extra vocabulary rows) holds three
published versions (conftest ``MERGES``): defaults; per-tensor scope with K=0.6 and two
per-model lambdas; global K=0.9, alpha 0.7, a lambda, and only three of the four models.
Every exported tensor must equal the reference computed in float32 and cast to the checkpoint's
dtype, bit for bit.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import FORMATS, MERGES
from store_helpers import (
    VOCAB_TENSORS,
    assert_identical,
    assert_state_dicts_identical,
    aux_files,
    load_dir,
    mapping_of,
    reference_for_version,
    run_cli,
    shared_rows,
    split_checkpoint,
    status_json,
)
from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration, VideoLlavaForConditionalGeneration

from mmer_dist.method import MergeSettings
from mmer_dist.method.reference import (
    reference_merge,
    reference_merged,
    reference_reconstruct,
    reference_text_weights,
)

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def merged(merged_store, sources):
    status = status_json(merged_store)
    base = sources.base("bf16")
    models = {fmt: sources.llm(fmt, "bf16") for fmt in FORMATS}
    versions = {v["version"]: v for v in status["versions"]}
    refs = {n: reference_for_version(v, base, models) for n, v in versions.items()}
    return SimpleNamespace(path=merged_store, status=status, base=base, models=models, versions=versions, refs=refs)


def _cast(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in weights.items()}


def test_versions_record_their_settings(merged):
    assert sorted(merged.versions) == [1, 2, 3] == [i + 1 for i in range(len(MERGES))]
    v1, v2, v3 = (merged.versions[i] for i in (1, 2, 3))
    assert (v1["method"], v1["topk"], v1["scope"], v1["alpha"], v1["mask_rule"]) == ("ties", 0.8, "global", 1.0, "mmer")
    assert v1["models"] == list(FORMATS) and v1["lams"] == [1.0] * 4
    assert (v2["topk"], v2["scope"]) == (0.6, "per-tensor")
    assert v2["lams"] == [0.5, 1.0, 1.0, 2.0]
    assert (v3["topk"], v3["alpha"], v3["scope"]) == (0.9, 0.7, "global")
    assert v3["models"] == ["llava-hf", "llava", "generic"] and v3["lams"] == [1.0, 1.5, 1.0]


def _reconstruct_cases():
    for i, extra in enumerate(MERGES):
        version = i + 1
        models = FORMATS if "--models" not in extra else ("llava-hf", "llava", "generic")
        for fmt in models:
            yield version, fmt


@pytest.mark.parametrize("version,fmt", list(_reconstruct_cases()))
def test_reconstructed_export_matches_reference(merged, ckpts, sources, tmp_path, version, fmt):
    """theta_hat_i = theta_pre + m_i * tau* on the shared rows, the model's own extra rows, its own
    component and aux files, under its own key names."""
    out = tmp_path / "out"
    run_cli("export", "model", "--store", merged.path, "--model", fmt, "--version", version, "--out", out, "--quiet")
    ref = merged.refs[version]
    i = merged.versions[version]["models"].index(fmt)
    want = _cast(reference_reconstruct(merged.base, ref.tau_star, ref.masks[i]), BF16)
    src_llm, src_component = sources.split(fmt, "bf16")
    got_llm, got_component = split_checkpoint(out, fmt)
    assert sorted(got_llm) == sorted(want)
    for name, w in want.items():
        assert_identical(got_llm[name][: w.shape[0]], w, f"v{version} {fmt} {name}")
        if name in VOCAB_TENSORS:  # the model-specific rows come back as they were
            assert_identical(got_llm[name][w.shape[0]:], src_llm[name][w.shape[0]:], f"{fmt} {name} extra rows")
    assert_state_dicts_identical(got_component, src_component, f"{fmt} component")
    # same key names as the source checkpoint, nothing more
    assert sorted(load_dir(out)) == sorted(load_dir(ckpts.finetuned(fmt, "bf16")))
    assert aux_files(out) == aux_files(ckpts.finetuned(fmt, "bf16"))
    # the reconstruction is not the original: the test would notice a --original mix-up
    assert not torch.equal(got_llm["model.layers.0.mlp.up_proj.weight"], src_llm["model.layers.0.mlp.up_proj.weight"])


def test_default_version_is_latest(merged, tmp_path):
    out = tmp_path / "out"
    run_cli("export", "model", "--store", merged.path, "--model", "llava", "--out", out, "--quiet")
    ref = merged.refs[3]
    want = _cast(reference_reconstruct(merged.base, ref.tau_star, ref.masks[1]), BF16)
    got, _ = split_checkpoint(out, "llava")
    for name, w in want.items():
        assert_identical(got[name][: w.shape[0]], w, name)


def _image_inputs(path, model_vocab):
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(" ".join(["<image>"] * 4) + " what is in the picture ?", return_tensors="pt").input_ids
    assert tok.unk_token_id not in ids[0].tolist() and int(ids.max()) < model_vocab
    return ids


@pytest.mark.parametrize("fmt,cls", [("llava-hf", LlavaForConditionalGeneration),
                                     ("video-llava-hf", VideoLlavaForConditionalGeneration)])
def test_reconstructed_hf_model_loads_and_runs(merged, tmp_path, fmt, cls):
    out = tmp_path / "out"
    run_cli("export", "model", "--store", merged.path, "--model", fmt, "--version", 1, "--out", out, "--quiet")
    model = cls.from_pretrained(out)
    assert model.dtype == BF16
    # the loaded model's LLM parameters are the reference reconstruction
    ref = merged.refs[1]
    want = _cast(reference_reconstruct(merged.base, ref.tau_star, ref.masks[FORMATS.index(fmt)]), BF16)
    state = model.state_dict()
    split = mapping_of(out, fmt).split(state.keys())
    assert set(split.llm) == set(want)
    for name, w in want.items():
        assert_identical(state[split.llm[name]][: w.shape[0]], w, f"loaded {fmt} {name}")
    vocab = model.config.text_config.vocab_size
    with torch.no_grad():
        if fmt == "llava-hf":
            ids = _image_inputs(out, vocab)
            logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, 8, 8, dtype=BF16)).logits
        else:
            tok = AutoTokenizer.from_pretrained(out)
            ids = tok(" ".join(["<video>"] * 40) + " what is this", return_tensors="pt").input_ids
            logits = model(input_ids=ids, pixel_values_videos=torch.randn(1, 8, 3, 8, 8, dtype=BF16)).logits
    assert logits.shape == (1, ids.shape[1], vocab) and torch.isfinite(logits).all()


def test_reconstructed_original_llava_llm_loads(merged, tmp_path):
    """The original LLaVA layout has no transformers class: its LLM part loads as Llama."""
    out = tmp_path / "out"
    run_cli("export", "model", "--store", merged.path, "--model", "llava", "--version", 1, "--out", out, "--quiet")
    model = LlamaForCausalLM.from_pretrained(out)
    ref = merged.refs[1]
    want = _cast(reference_reconstruct(merged.base, ref.tau_star, ref.masks[FORMATS.index("llava")]), BF16)
    state = model.state_dict()
    for name, w in want.items():
        assert_identical(state[name][: w.shape[0]], w, f"loaded llava {name}")
    assert model.config.vocab_size == 258
    with torch.no_grad():
        logits = model(torch.tensor([[1, 20, 30, 257]])).logits
    assert logits.shape == (1, 4, 258) and torch.isfinite(logits).all()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_merged_export_matches_reference(merged, ckpts, tmp_path, version):
    out = tmp_path / "out"
    run_cli("export", "merged", "--store", merged.path, "--version", version, "--out", out, "--quiet")
    ref = merged.refs[version]
    want = _cast(reference_merged(merged.base, ref.tau_star, merged.versions[version]["alpha"]), BF16)
    assert_state_dicts_identical(load_dir(out), want, f"merged v{version}")
    assert aux_files(out) == aux_files(ckpts.base("bf16"))
    if version == 1:
        model = LlamaForCausalLM.from_pretrained(out)
        assert torch.isfinite(model(torch.tensor([[1, 5, 6]])).logits).all()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_text_export_matches_reference(merged, tmp_path, version):
    out = tmp_path / "out"
    run_cli("export", "text", "--store", merged.path, "--version", version, "--out", out, "--quiet")
    ref = merged.refs[version]
    want = _cast(reference_text_weights(merged.base, ref.tau_star, ref.masks), BF16)
    assert_state_dicts_identical(load_dir(out), want, f"text v{version}")


BASELINES = [
    ("ties", [], MergeSettings("ties")),
    ("ties", ["--topk", "0.7", "--scope", "per-tensor", "--alpha", "1.3"], MergeSettings("ties", 0.7, "per-tensor", 1.3)),
    ("ta", [], MergeSettings("ta")),
    ("ta", ["--alpha", "0.5"], MergeSettings("ta", alpha=0.5)),
    ("naive", [], MergeSettings("naive")),
    ("dare", [], MergeSettings("ta", dare_rate=0.5)),
    ("dare", ["--dare-rate", "0.3", "--dare-seed", "7"], MergeSettings("ta", dare_rate=0.3, dare_seed=7)),
    ("ties", ["--dare-rate", "0.2", "--dare-seed", "3"], MergeSettings("ties", dare_rate=0.2, dare_seed=3)),
]


@pytest.mark.parametrize("method,args,settings", BASELINES,
                         ids=[f"{m}{'-' + '-'.join(a) if a else ''}" for m, a, _ in BASELINES])
def test_baseline_export_matches_reference(merged, tmp_path, method, args, settings):
    """``export --merged --method M`` computes the baseline from the stored models now."""
    out = tmp_path / "out"
    before = status_json(merged.path)
    run_cli("export", "merged", "--store", merged.path, "--method", method, *args, "--out", out, "--quiet")
    ids = list(FORMATS)
    settings = MergeSettings(settings.method, settings.topk, settings.scope, settings.alpha, settings.mask_rule,
                             (1.0,) * len(ids), settings.dare_rate, settings.dare_seed)
    ref = reference_merge(merged.base, [shared_rows(merged.models[m], merged.base) for m in ids], settings, ids)
    want = _cast(reference_merged(merged.base, ref.tau_star, settings.alpha), BF16)
    assert_state_dicts_identical(load_dir(out), want, f"--method {method} {args}")
    after = status_json(merged.path)
    assert after["catalog_snapshot"] == before["catalog_snapshot"]  # a baseline export publishes nothing


def test_export_refuses_a_nonempty_output(merged, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("export", "merged", "--store", merged.path, "--out", out, "--quiet", ok=False)
    assert str(out) in r.err and "--overwrite" in r.err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite replaces only a previous export, never a directory holding the user's files
    r = run_cli("export", "merged", "--store", merged.path, "--out", out, "--overwrite", "--quiet", ok=False)
    assert "not one" in r.err and [p.name for p in out.iterdir()] == ["keep.txt"]
    exported = tmp_path / "exported"
    run_cli("export", "text", "--store", merged.path, "--out", exported, "--quiet")
    run_cli("export", "merged", "--store", merged.path, "--out", exported, "--overwrite", "--quiet")
    assert (exported / "model.safetensors").exists() and (out / "keep.txt").read_text() == "mine"
