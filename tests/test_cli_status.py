"""``mmer status``: the catalog as JSON (checked field by field against the inputs and the
reference merge) and as tables; ``mmer --help`` for every command."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import FORMATS, MODALITY, ingest_args
from store_helpers import MMER, reference_for_version, run_cli, status_json

from mmer_dist.formats import CheckpointReader


@pytest.fixture(scope="module")
def status(merged_store):
    return status_json(merged_store)


def test_status_json_base_and_models(status, merged_store, ckpts, sources):
    base = sources.base("bf16")
    assert status["store"] == str(merged_store)
    assert status["base"]["base_source"] == str(ckpts.base("bf16"))
    assert status["base"]["base_dtype"] == "bfloat16"
    assert status["base"]["base_sha256"] == CheckpointReader(ckpts.base("bf16")).sha256()
    assert json.loads(status["base"]["base_config"])["num_hidden_layers"] == 4
    assert status["tensors"] == len(base)
    assert status["parameters"] == sum(t.numel() for t in base.values())
    assert [m["id"] for m in status["models"]] == list(FORMATS)
    for m in status["models"]:
        src = ckpts.finetuned(m["id"], "bf16")
        assert (m["modality"], m["dtype"], m["lam"]) == (MODALITY[m["id"]], "bfloat16", 1.0)
        assert m["format"] == ("tiny-audio-llm" if m["id"] == "generic" else m["id"])
        assert m["params"] == status["parameters"]
        assert m["sha256"] == CheckpointReader(src).sha256() and len(m["sha256"]) == 64


def test_status_json_versions_match_reference(status, sources):
    """K, scope, alpha, lambdas, and mask / tau* densities equal to popcounts of the reference."""
    base = sources.base("bf16")
    models = {fmt: sources.llm(fmt, "bf16") for fmt in FORMATS}
    params = status["parameters"]
    assert [v["version"] for v in status["versions"]] == [1, 2, 3]
    for v in status["versions"]:
        ref = reference_for_version(v, base, models)
        popcounts = [sum(int(m.sum()) for m in mask.values()) for mask in ref.masks]
        assert v["mask_density"] == [c / params for c in popcounts], v["version"]
        nonzero = sum(int((t != 0).sum()) for t in ref.tau_star.values())
        assert v["tau_star_density"] == nonzero / params
        assert 0.05 < min(v["mask_density"]) and max(v["mask_density"]) < 0.99  # masks are not trivial
        assert v["backend"] == "local" and v["passes"][-1] == "FinalPass" and v["seconds"] > 0
        assert v["details"]["resumed"] is False
        if v["scope"] == "global":
            assert v["details"]["thresholds"]["*"] == ref.thresholds["*"]
            assert v["details"]["majority"] == ref.majority
    # different settings really gave different masks
    assert len({tuple(v["mask_density"][:1]) for v in status["versions"]}) == 3


def test_status_table_prints(merged_store):
    r = run_cli("status", "--store", merged_store)
    for word in ("models", "versions", "bfloat16", "generic", "per-tensor", "0.6", "tiny-audio"):
        assert word in r.out, word
    assert r.err == ""


def test_status_table_subprocess_narrow_terminal(merged_store):
    """The real entry point, with a narrow terminal: prints, exit 0."""
    env = {**os.environ, "COLUMNS": "60"}
    r = subprocess.run([*MMER, "status", "--store", str(merged_store)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "models" in r.stdout and "versions" in r.stdout


def test_status_of_base_only_store(stores, tmp_path):
    store = stores.fresh(tmp_path / "s")
    st = status_json(store)
    assert st["models"] == [] and st["versions"] == [] and st["base"]["base_dtype"] == "bfloat16"
    assert "models" in run_cli("status", "--store", store).out


def test_ingest_lambda_is_recorded_and_used_by_merge(stores, ckpts, tmp_path):
    """``ingest --lam`` is the model's default lambda: listed by status, used when merge has no --lam."""
    store = stores.fresh(tmp_path / "s")
    run_cli(*ingest_args(store, "img", ckpts.finetuned("llava", "bf16"), "llava"), "--lam", "0.7")
    run_cli(*ingest_args(store, "aud", ckpts.finetuned("generic", "bf16"), "generic"))
    st = status_json(store)
    assert [(m["id"], m["lam"]) for m in st["models"]] == [("img", 0.7), ("aud", 1.0)]
    run_cli("merge", "--store", store, "--quiet", "--no-compile")
    run_cli("merge", "--store", store, "--quiet", "--no-compile", "--lam", "img=1.25")
    versions = status_json(store)["versions"]
    assert [v["lams"] for v in versions] == [[0.7, 1.0], [1.25, 1.0]]
    assert versions[0]["mask_density"][0] > versions[1]["mask_density"][0]  # larger lambda, sparser mask


@pytest.mark.parametrize("command", ["ingest", "merge", "export model", "export original", "export merged",
                                     "export text", "status"])
def test_help(command):
    r = run_cli(*command.split(), "--help", ok=True)
    assert "--store" in r.out
