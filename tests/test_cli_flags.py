"""Flags that would be ignored for the command at hand are refused with a message naming them."""

from __future__ import annotations

import pytest
from store_helpers import run_cli


@pytest.mark.parametrize("args,message", [
    (["--model", "m", "--method", "ties"], "--method goes with --merged"),
    (["--merged", "--method", "ties", "--version", "1"], "drop --version"),
    (["--model", "m", "--original", "--version", "1"], "drop --version"),
    (["--text", "--original"], "--original goes with --model"),
    (["--merged", "--topk", "0.5"], "--topk only apply with --merged --method"),
    (["--merged", "--neuro-keep-parallel"], "--neuro-keep-parallel only apply"),
    (["--text", "--dare-rate", "0.1", "--dare-seed", "3"], "--dare-rate, --dare-seed only apply"),
])
def test_export_refuses_flags_that_do_not_apply(merged_store, tmp_path, args, message):
    r = run_cli("export", "--store", merged_store, *args, "--out", tmp_path / "out", ok=False)
    assert r.rc == 2 and message in r.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--neuro-energy", "0.5"], "apply to --merge neuro only"),
    (["--merge", "ties", "--neuro-keep-parallel"], "apply to --merge neuro only"),
    (["--address", "auto"], "are for --backend ray"),
    (["--worker-resources", '{"gpu_node": 1}'], "are for --backend ray"),
    (["--backend", "ray", "--device", "cuda"], "--device is for --backend local"),
])
def test_merge_refuses_flags_that_do_not_apply(stores, tmp_path, args, message):
    store = stores.fresh(tmp_path / "s", models=True)
    r = run_cli("merge", "--store", store, "--quiet", *args, ok=False)
    assert r.rc == 2 and message in r.err


@pytest.mark.parametrize("value", ["[1, 2]", '{"a": "x"}', "{nope"])
def test_worker_resources_must_be_a_json_object_of_amounts(stores, tmp_path, value):
    store = stores.fresh(tmp_path / "s", models=True)
    r = run_cli("merge", "--store", store, "--backend", "ray", "--worker-resources", value, ok=False)
    assert r.rc == 2 and "--worker-resources" in r.err


def test_ingest_refuses_model_flags_with_base_and_chunking_with_model(stores, ckpts, tmp_path):
    r = run_cli("ingest", "--store", tmp_path / "a", "--base", ckpts.base("bf16"), "--format", "llava-hf", ok=False)
    assert "--format is for --model" in r.err
    r = run_cli("ingest", "--store", tmp_path / "b", "--base", ckpts.base("bf16"), "--lam", "0.5", ok=False)
    assert "--lam is for --model" in r.err
    store = stores.fresh(tmp_path / "s")
    r = run_cli("ingest", "--store", store, "--model", "x", "--modality", "image", "--path",
                ckpts.finetuned("llava-hf", "bf16"), "--chunk-elems", "100", ok=False)
    assert "--chunk-elems is fixed by the base" in r.err
