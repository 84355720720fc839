"""Fine-tunes in bf16, fp16 and fp32 merged against one bf16 base: chunks are read upcast to
float32 (exact for all three), so tau* and the masks equal the reference computed from the
source checkpoints, and each model comes back in its own dtype. The store's dtype is the base's."""

from __future__ import annotations

import pytest
import torch
from conftest import MODALITY, ingest_args
from store_helpers import (
    assert_state_dicts_identical,
    load_dir,
    reference_for_version,
    run_cli,
    shared_rows,
    split_checkpoint,
    status_json,
)

from mmer_dist.demo import tiny_models
from mmer_dist.method.reference import reference_reconstruct
from mmer_dist.store import layout
from mmer_dist.store.store import Store

DTYPES = {"llava-hf": torch.float16, "generic": torch.float32, "llava": torch.bfloat16}


@pytest.fixture(scope="module")
def mixed(ckpts, sources, tmp_path_factory):
    base = ckpts.base("bf16")
    paths = {fmt: ckpts.custom(f"mixed-{fmt}", lambda p, fmt=fmt: tiny_models.save_finetuned(
        base, p, fmt, modality=MODALITY[fmt], dtype=DTYPES[fmt], seed=40 + len(fmt))) for fmt in DTYPES}
    store = tmp_path_factory.mktemp("mixed") / "store"
    run_cli("ingest", "--store", store, "--base", base, "--quiet")
    for fmt, path in paths.items():
        run_cli(*ingest_args(store, fmt, path, fmt))
    run_cli("merge", "--store", store, "--quiet", "--no-compile", "--device", "cpu", "--lam", "generic=0.7")
    models = {fmt: split_checkpoint(path, fmt)[0] for fmt, path in paths.items()}
    return store, paths, sources.base("bf16"), models


def test_each_model_keeps_its_dtype_and_the_store_the_base_dtype(mixed):
    store, _, _, _ = mixed
    status = status_json(store)
    assert status["base"]["base_dtype"] == "bfloat16"
    assert {m["id"]: m["dtype"] for m in status["models"]} == {"llava-hf": "float16", "generic": "float32",
                                                               "llava": "bfloat16"}


def test_mixed_dtype_merge_equals_the_reference(mixed, tmp_path):
    store, paths, base, models = mixed
    version = status_json(store)["versions"][-1]
    ref = reference_for_version(version, base, models)
    s = Store.open(str(store))
    for t in s.catalog().tensors:
        got = s.read(f"{layout.version_tau_star(version['version'])}/{t.name}").reshape(ref.tau_star[t.name].shape)
        assert torch.equal(got.view(torch.int32), ref.tau_star[t.name].view(torch.int32)), t.name
    for fmt in DTYPES:
        out = tmp_path / fmt
        run_cli("export", "model", "--store", store, "--model", fmt, "--out", out, "--quiet")
        got = load_dir(out)
        i = version["models"].index(fmt)
        want = reference_reconstruct(base, ref.tau_star, ref.masks[i])
        llm, _ = split_checkpoint(out, fmt)
        for name, w in want.items():
            g = llm[name][: w.shape[0]] if name in ("model.embed_tokens.weight", "lm_head.weight") else llm[name]
            assert g.dtype == DTYPES[fmt], (fmt, name, g.dtype)
            assert torch.equal(g, w.to(DTYPES[fmt])), (fmt, name)
        assert got  # the export is a whole checkpoint


def test_original_exports_are_bit_exact_in_their_dtypes(mixed, tmp_path):
    store, paths, _, _ = mixed
    for fmt, path in paths.items():
        run_cli("export", "original", "--store", store, "--model", fmt, "--out", tmp_path / fmt, "--quiet")
        assert_state_dicts_identical(load_dir(tmp_path / fmt), load_dir(path), fmt)
