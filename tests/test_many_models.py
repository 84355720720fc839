"""Many models through the real CLI: a manifest of 33 checkpoints, one of them damaged, ingests the
other 32 and names it; their merge equals the oracle bit for bit (the kernels take any N). And
``mmer add`` of a model that flips the majority sign equals a from-scratch merge: one final pass
where no sign sum is exactly 0, else one final pass and a rewrite of just those entries.

Checkpoints are text-only Llama fine-tunes of the tiny base (``--format llama``), written here
from tensors: copies of the base's directory with their own ``model.safetensors``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ray_helpers import version_arrays
from safetensors.torch import load_file, save_file
from store_helpers import run_cli, status_json

from mmer_dist.method import MergeSettings
from mmer_dist.method.masks import unpack_bits
from mmer_dist.method.reference import reference_merge
from mmer_dist.store import layout
from mmer_dist.store.store import Store

N_MANY = 32


def llama_variant(base_dir: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """The base's checkpoint directory (config, tokenizer) with these weights."""
    shutil.copytree(base_dir, out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def assert_version_is_the_reference(store: str | Path, version: int, ref) -> None:
    """tau* bit for bit and every packed mask as the oracle's, for every tensor."""
    st = Store.open(str(store))
    catalog = st.catalog()
    record = catalog.version(version)
    for t in catalog.tensors:
        want = ref.tau_star[t.name].reshape(t.rows, t.cols)
        got = st.read_rows(f"{layout.version_tau_star(version)}/{t.name}", 0, t.rows)
        assert torch.equal(got.view(torch.int32), want.contiguous().view(torch.int32)), t.name
        masks = st.read(f"{layout.version_masks(version)}/{t.name}")
        for i, m in enumerate(record.models):
            assert torch.equal(unpack_bits(masks[i], t.cols), ref.masks[i][t.name].reshape(t.rows, t.cols)), (m, t.name)


@pytest.fixture(scope="module")
def many(tmp_path_factory, ckpts):
    """The bf16 tiny base and 32 fine-tunes of it (a few bf16 steps of delta each)."""
    root = tmp_path_factory.mktemp("many")
    base_dir = ckpts.base("bf16")
    base = load_file(base_dir / "model.safetensors")
    g = torch.Generator().manual_seed(32)
    models = {}
    for i in range(N_MANY):
        weights = {k: (v.float() + 0.05 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
                   for k, v in base.items()}
        llama_variant(base_dir, root / f"m{i:02d}", weights)
        models[f"m{i:02d}"] = weights
    return root, base_dir, base, models


def test_32_models_with_one_damaged_checkpoint(many, tmp_path):
    root, base_dir, base, models = many
    damaged = llama_variant(base_dir, tmp_path / "damaged", {k: v.clone() for k, v in base.items()})
    weights = damaged / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-64:] = b"\xff\x7f" * 32  # bf16 NaNs where the last tensor's data ends: found while streaming it
    weights.write_bytes(bytes(raw))
    entries = [{"id": m, "path": str(root / m), "modality": "text", "format": "llama"} for m in models]
    entries.insert(N_MANY // 2, {"id": "damaged", "path": str(damaged), "modality": "text", "format": "llama"})
    manifest = tmp_path / "models.yaml"
    manifest.write_text(yaml.safe_dump({"base": str(base_dir), "models": entries}))
    store = tmp_path / "store"

    r = run_cli("ingest", "--store", store, "--manifest", manifest, "--quiet", ok=False)
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "'damaged'" in r.err and "non-finite" in r.err and f"the other {N_MANY} new model(s) were ingested" in r.err
    assert [m["id"] for m in status_json(store)["models"]] == list(models)
    assert not (store / "models" / "damaged").exists()
    # a re-run (the damaged entry dropped) has nothing left to do
    manifest.write_text(yaml.safe_dump({"base": str(base_dir), "models": [e for e in entries if e["id"] != "damaged"]}))
    assert "ingested nothing new" in run_cli("ingest", "--store", store, "--manifest", manifest).out

    run_cli("merge", "--store", store, "--quiet", "--device", "cpu")
    version = status_json(store)["versions"][0]
    assert version["models"] == list(models)
    settings = MergeSettings.from_record(version)
    ref = reference_merge(base, [models[m] for m in models], settings, list(models))
    assert_version_is_the_reference(store, 1, ref)
    assert version["details"]["majority"] == ref.majority
    # the status table: one line of mask densities for the version, not one per model
    table = run_cli("status", "--store", store).out
    assert f"{N_MANY} models:" in table and "median" in table and "(lambda" not in table


def flipping_checkpoints(root: Path, base_dir: Path, exact_ties: bool):
    """An fp32 base on a 2**-6 grid, three models leaning + and a fourth leaning - hard enough to
    flip the majority. ``exact_ties``: deltas are whole multiples of 2**-8, so some sign sums are
    exactly 0; else float noise, where none is."""
    g = torch.Generator().manual_seed(5)
    base = {k: v.float().mul(64).round().div(64) for k, v in load_file(base_dir / "model.safetensors").items()}
    base_dir = llama_variant(base_dir, root / "base", base)
    paths, weights = {}, {}
    for name, (lo, hi) in (("m0", (-2, 4)), ("m1", (-2, 4)), ("m2", (-2, 4)), ("new", (-12, 2))):
        w = {}
        for k, b in base.items():
            if exact_ties:
                delta = torch.randint(lo, hi, b.shape, generator=g).float() / 256
            else:
                delta = (torch.rand(b.shape, generator=g) * (hi - lo) + lo) / 256
            w[k] = b + delta
        paths[name], weights[name] = llama_variant(base_dir, root / name, w), w
    return base_dir, base, paths, weights


@pytest.mark.parametrize("exact_ties", [True, False], ids=["zero-sums", "no-zero-sum"])
def test_an_add_that_flips_the_majority_equals_a_from_scratch_merge(ckpts, tmp_path, exact_ties):
    base_dir, base, paths, weights = flipping_checkpoints(tmp_path, ckpts.base("fp32"), exact_ties)
    store = tmp_path / "store"
    run_cli("ingest", "--store", store, "--base", base_dir, "--quiet")
    for m in ("m0", "m1", "m2"):
        run_cli("ingest", "--store", store, "--model", m, "--path", paths[m], "--format", "llama", "--modality",
                "text", "--quiet")
    run_cli("merge", "--store", store, "--quiet", "--device", "cpu")
    scratch = shutil.copytree(store, tmp_path / "scratch")

    run_cli("add", "--store", store, "--model", "new", "--path", paths["new"], "--format", "llama", "--modality",
            "text", "--quiet", "--device", "cpu")
    run_cli("ingest", "--store", scratch, "--model", "new", "--path", paths["new"], "--format", "llama",
            "--modality", "text", "--quiet")
    run_cli("merge", "--store", scratch, "--quiet", "--device", "cpu")

    served, added = status_json(store)["versions"]
    assert served["details"]["majority"] != added["details"]["majority"]  # the new model flipped it
    assert added["details"]["majority"] == status_json(scratch)["versions"][1]["details"]["majority"]
    got, want = version_arrays(str(store), 2), version_arrays(str(scratch), 2)
    assert got.keys() == want.keys() and [k for k in got if not np.array_equal(got[k], want[k])] == []
    decided = added["details"]["decided_by_majority"]["*"]
    if exact_ties:
        assert decided > 0 and added["passes"] == ["FinalPass", "ZeroSumPass"]
        assert added["details"]["majority_rewritten"] == decided
    else:
        assert decided == 0 and added["passes"] == ["FinalPass"]
    ref = reference_merge(base, [weights[m] for m in ("m0", "m1", "m2", "new")],
                          MergeSettings.from_record(added), added["models"])
    assert_version_is_the_reference(store, 2, ref)
