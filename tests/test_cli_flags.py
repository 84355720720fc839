"""The command line offers only options that mean something for what is asked, and refuses the
rest with a message naming them: export kinds are subcommands (each with its own options),
merge settings that a method does not use are refused (and never recorded), and a model or a
lambda given twice is refused before anything runs."""

from __future__ import annotations

import pytest
from store_helpers import run_cli, status_json


@pytest.mark.parametrize("args,message", [
    (["model", "--model", "m", "--method", "ties"], "unrecognized arguments: --method"),
    (["original", "--model", "m", "--version", "1"], "unrecognized arguments: --version"),
    (["text", "--topk", "0.5"], "unrecognized arguments: --topk"),
    (["merged", "--method", "ties", "--version", "1"], "not allowed with argument --method"),
    (["merged", "--topk", "0.5"], "--topk set how a baseline is computed; they go with --method"),
    (["merged", "--neuro-keep-parallel"], "--neuro-keep-parallel set how a baseline"),
    (["merged", "--method", "ta", "--topk", "0.5"], "--topk apply to --merge neuro|ties only"),
    (["merged", "--method", "ties", "--dare-seed", "3"], "--dare-seed goes with --dare-rate"),
])
def test_export_offers_only_options_of_its_kind(merged_store, tmp_path, args, message):
    kind, *rest = args
    r = run_cli("export", kind, "--store", merged_store, *rest, "--out", tmp_path / "out", ok=False)
    assert r.rc == 2 and message in r.err, r.err
    assert not (tmp_path / "out").exists()


def test_export_needs_a_kind(merged_store, tmp_path):
    r = run_cli("export", "--store", merged_store, "--out", tmp_path / "out", ok=False)
    assert r.rc == 2 and "choose from 'model', 'original', 'merged', 'text'" in r.err


@pytest.mark.parametrize("args,message", [
    (["--neuro-energy", "0.5"], "--neuro-energy apply to --merge neuro only"),
    (["--merge", "ties", "--neuro-keep-parallel"], "apply to --merge neuro only"),
    (["--merge", "ta", "--topk", "0.3"], "--topk apply to --merge neuro|ties only, not --merge ta"),
    (["--merge", "naive", "--scope", "per-tensor"], "--scope apply to --merge neuro|ties only"),
    (["--mask", "tall", "--topk", "0.5"], "not --merge ta"),  # TALL merges over task arithmetic
    (["--dare-seed", "4"], "--dare-seed goes with --dare-rate"),
    (["--models", "llava", "llava"], "--models names 'llava' more than once"),
    (["--lam", "llava=0.5", "--lam", "llava=0.7"], "--lam gives model 'llava' more than once"),
    (["--address", "auto"], "are for --backend ray"),
    (["--worker-resources", '{"gpu_node": 1}'], "are for --backend ray"),
    (["--backend", "ray", "--device", "cuda"], "--device is for --backend local"),
])
def test_merge_refuses_flags_that_do_not_apply(stores, tmp_path, args, message):
    store = stores.fresh(tmp_path / "s", models=True)
    before = status_json(store)
    r = run_cli("merge", "--store", store, "--quiet", *args, ok=False)
    assert r.rc == 2 and message in r.err, r.err
    assert status_json(store)["catalog_snapshot"] == before["catalog_snapshot"]


def test_a_method_records_only_the_settings_it_uses(stores, tmp_path):
    store = stores.fresh(tmp_path / "s", models=True)
    run_cli("merge", "--store", store, "--quiet", "--no-compile", "--merge", "ta", "--alpha", "0.5")
    run_cli("merge", "--store", store, "--quiet", "--no-compile", "--topk", "0.6", "--dare-rate", "0.1",
            "--dare-seed", "5")
    ta, ties = status_json(store)["versions"]
    assert (ta["method"], ta["alpha"], ta["topk"], ta["scope"], ta["dare_seed"], ta["neuro_energy"]) == \
        ("ta", 0.5, None, None, None, None)
    assert (ties["method"], ties["topk"], ties["scope"], ties["dare_rate"], ties["dare_seed"]) == \
        ("ties", 0.6, "global", 0.1, 5)
    assert ties["neuro_energy"] is None and ties["neuro_keep_parallel"] is None


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


@pytest.mark.parametrize("value", ["-1", "soon", "inf"])
def test_wait_must_be_a_finite_number_of_seconds(tmp_path, value):
    r = run_cli("promote", "--store", tmp_path, "--version", "1", "--wait", value, ok=False)  # refused on parsing
    assert r.rc == 2 and "--wait" in r.err and "seconds" in r.err, r.err
