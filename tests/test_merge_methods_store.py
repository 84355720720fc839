"""Merge methods beyond TIES through the store: NeuroMerging, TALL-masks and the MMER ablations.

Each is published as a version whose catalog row names its method and rule, and its exports
equal the whole-tensor reference. NeuroMerging's reference decomposes rows with a plain SVD and
the engine through the Gram matrix (both float64, rounded to float32 at the end): tau* then
agrees to float32 rounding, and at most 1e-4 of mask bits may differ at exact thresholds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FORMATS, copy_store
from store_helpers import load_dir, reference_for_version, run_cli, shared_rows, split_checkpoint, status_json

from mmer_dist.method import MergeSettings
from mmer_dist.store import layout
from mmer_dist.store.store import Store
from mmer_dist.method.reference import reference_merge, reference_merged, reference_reconstruct

BF16 = torch.bfloat16

VARIANTS = [
    ([], "ties", "mmer", False),
    (["--merge", "neuro", "--neuro-energy", "0.9"], "neuro", "mmer", True),
    (["--merge", "neuro", "--neuro-keep-parallel", "--scope", "per-tensor"], "neuro", "mmer", True),
    (["--mask", "tall", "--lam", "llava-hf=0.4"], "ta", "tall", False),
    (["--merge", "ties", "--mask", "tall"], "ties", "tall", False),
    (["--mask", "mmer-no-sign"], "ties", "mmer-no-sign", False),
    (["--mask", "mmer-no-magnitude"], "ties", "mmer-no-magnitude", False),
]


@pytest.fixture(scope="module")
def variant_store(stores, tmp_path_factory, sources):
    path = copy_store(stores.ingested("bf16"), tmp_path_factory.mktemp("variants") / "store")
    for args, _, _, _ in VARIANTS:
        run_cli("merge", "--store", path, "--quiet", "--no-compile", *args)
    status = status_json(path)
    base = sources.base("bf16")
    models = {fmt: sources.llm(fmt, "bf16") for fmt in FORMATS}
    return path, status, base, models


def _close(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    if exact:
        return torch.equal(got.view(torch.int16), want.view(torch.int16))
    diff = (got.float() - want.float()).abs()
    # bf16 outputs: one bf16 step of the value is the rounding granularity
    return bool((diff <= want.float().abs() * 2.0 ** -7 + 1e-6).all())


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=[" ".join(v[0]) for v in VARIANTS])
def test_variant_versions_match_the_reference(variant_store, tmp_path, index):
    path, status, base, models = variant_store
    args, method, rule, svd = VARIANTS[index]
    version = status["versions"][index]
    assert (version["method"], version["mask_rule"]) == (method, rule)
    if method == "neuro":
        assert (version["neuro_energy"], version["neuro_keep_parallel"]) == \
            (0.9 if "--neuro-energy" in args else 1.0, "--neuro-keep-parallel" in args)
    else:
        assert version["neuro_energy"] is None and version["neuro_keep_parallel"] is None
    ref = reference_for_version(version, base, models)
    out = tmp_path / "merged"
    run_cli("export", "merged", "--store", path, "--version", version["version"], "--out", out, "--quiet")
    want = reference_merged(base, ref.tau_star, version["alpha"])
    got = load_dir(out)
    for name, w in want.items():
        assert _close(got[name], w.to(BF16), exact=not svd), name
    for fmt in ("llava-hf", "generic"):
        i = version["models"].index(fmt)
        out = tmp_path / fmt
        run_cli("export", "model", "--store", path, "--model", fmt, "--version", version["version"], "--out", out, "--quiet")
        got_llm, _ = split_checkpoint(out, fmt)
        want = reference_reconstruct(base, ref.tau_star, ref.masks[i])
        mismatched = 0
        for name, w in want.items():
            g = got_llm[name][: w.shape[0]]
            if svd:
                mismatched += int((~torch.isclose(g.float(), w.to(BF16).float(), rtol=2.0 ** -7, atol=1e-6)).sum())
            else:
                assert torch.equal(g.view(torch.int16), w.to(BF16).view(torch.int16)), (fmt, name)
        assert mismatched <= 1e-4 * sum(w.numel() for w in want.values())


def test_ablation_masks_are_supersets_of_the_full_rule(variant_store):
    """Dropping a condition can only set more bits: the stored masks of the ablations contain
    the full MMER rule's masks (same tau*), and are strictly larger somewhere."""
    path, status, _, _ = variant_store
    store = Store.open(str(path))
    version_of = {v["mask_rule"]: v["version"] for v in status["versions"] if v["method"] == "ties"}
    catalog = store.catalog()
    for rule in ("mmer-no-sign", "mmer-no-magnitude"):
        strictly_more = False
        for model in FORMATS:
            for t in catalog.tensors:
                i = list(FORMATS).index(model)
                full = store.read(f"{layout.version_masks(version_of['mmer'])}/{t.name}", i)
                ablated = store.read(f"{layout.version_masks(version_of[rule])}/{t.name}", i)
                assert not bool((full & ~ablated).any()), (rule, model, t.name)
                strictly_more |= bool((ablated & ~full).any())
        assert strictly_more, rule


def test_neuro_baseline_export_matches_reference(variant_store, tmp_path):
    path, status, base, models = variant_store
    before = status_json(path)["catalog_snapshot"]
    out = tmp_path / "neuro"
    run_cli("export", "merged", "--store", path, "--method", "neuro", "--topk", "0.7", "--out", out, "--quiet")
    ids = list(FORMATS)
    settings = MergeSettings("neuro", 0.7, lams=(1.0,) * len(ids))
    ref = reference_merge(base, [shared_rows(models[m], base) for m in ids], settings, ids)
    got = load_dir(out)
    for name, w in reference_merged(base, ref.tau_star, 1.0).items():
        assert _close(got[name], w.to(BF16), exact=False), name
    assert status_json(path)["catalog_snapshot"] == before
