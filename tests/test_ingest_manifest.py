"""``mmer ingest --manifest FILE``: the base and many models in one command.

The store it builds is the store that one ``mmer ingest`` per model builds (same records, same
chunk bytes, same histograms); a re-run skips what is there; every mistake in the manifest, or in
any of its models, is refused before the first model is written, naming the entry and field.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import FORMATS, MODALITY, copy_store
from store_helpers import StoreState, run_cli, status_json

from mmer_dist.demo import tiny_models
from mmer_dist.ingest import read_histograms
from mmer_dist.store import layout
from mmer_dist.store.store import Store

# what differs between two ingests of the same checkpoints by design
TIMING_FIELDS = ("ingested_at", "ingest_seconds")


def entry(fmt: str, path: Path, **extra) -> dict:
    e = {"id": fmt, "path": str(path), "modality": MODALITY[fmt], **extra}
    if fmt == "generic":
        e |= {"format": "generic", "mapping": str(path / tiny_models.GENERIC_MAPPING_FILE)}
    return e


def write_manifest(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def records(store: Path) -> dict[str, dict]:
    return {m["id"]: {k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in status_json(store)["models"]}


def llm_files(store: Path, model_id: str) -> dict[str, bytes]:
    root = store / layout.model_llm(model_id)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_manifest_builds_the_store_that_one_command_per_model_builds(stores, ckpts, tmp_path):
    want = stores.ingested("bf16")  # base, then `mmer ingest --model` per format (conftest)
    manifest = write_manifest(tmp_path / "models.yaml", {
        "base": str(ckpts.base("bf16")),
        "models": [entry(fmt, ckpts.finetuned(fmt, "bf16")) for fmt in FORMATS]})
    got = tmp_path / "store"
    out = run_cli("ingest", "--store", got, "--manifest", manifest).out
    assert "ingested the base and 4 models" in out

    assert records(got) == records(want)
    assert list(records(got)) == list(FORMATS)  # committed in manifest order
    cat_got, cat_want = Store.open(str(got)).catalog(), Store.open(str(want)).catalog()
    assert cat_got.store.base_sha256 == cat_want.store.base_sha256 and cat_got.store.base_config == cat_want.store.base_config
    assert cat_got.tensors == cat_want.tensors
    for fmt in FORMATS:
        files = llm_files(got, fmt)
        assert files and files == llm_files(want, fmt), fmt
        h_got, h_want = read_histograms(Store.open(str(got)), fmt), read_histograms(Store.open(str(want)), fmt)
        assert h_got.keys() == h_want.keys()
        for name in h_got:
            assert h_got[name].keys.tolist() == h_want[name].keys.tolist(), (fmt, name)
            assert h_got[name].counts.tolist() == h_want[name].counts.tolist(), (fmt, name)
    run_cli("verify", "--store", got)


def test_relative_paths_lam_and_task_and_a_rerun_skips_what_is_there(stores, ckpts, tmp_path):
    """Paths are relative to the manifest's folder; a re-run (as after an interruption) ingests
    only the models not yet there and changes nothing else."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for fmt in ("llava-hf", "generic"):
        shutil.copytree(ckpts.finetuned(fmt, "bf16"), folder / fmt)
    store = stores.fresh(tmp_path / "store")
    first = [{"id": "img", "path": "llava-hf", "modality": "image", "lam": 0.7, "task": "vqa"}]
    manifest = write_manifest(folder / "m.yaml", {"models": first})
    run_cli("ingest", "--store", store, "--manifest", manifest, "--quiet")
    seq = Store.open(str(store)).catalog().seq

    both = first + [{"id": "aud", "path": "generic", "modality": "audio", "format": "generic",
                     "mapping": f"generic/{tiny_models.GENERIC_MAPPING_FILE}"}]
    # the store's own base may stay in the manifest: it is not ingested again
    write_manifest(manifest, {"base": str(ckpts.base("bf16")), "models": both})
    out = run_cli("ingest", "--store", store, "--manifest", manifest).out
    assert "skipped: img" in out and "ingested 1 models" in out
    got = records(store)
    assert list(got) == ["img", "aud"]
    assert got["img"]["source"] == str(folder / "llava-hf") and got["img"]["lam"] == 0.7 and got["img"]["task"] == "vqa"
    assert got["aud"]["format"] == records(stores.ingested("bf16"))["generic"]["format"] and got["aud"]["lam"] == 1.0
    assert Store.open(str(store)).catalog().seq == seq + 1  # one commit: the new model only

    before = StoreState.capture(store)
    assert "ingested nothing new" in run_cli("ingest", "--store", store, "--manifest", manifest).out
    assert StoreState.capture(store) == before


def refused(store: Path, manifest: Path, *expect: str) -> None:
    before = StoreState.capture(store)
    r = run_cli("ingest", "--store", store, "--manifest", manifest, ok=False)
    assert r.rc == 2, (r.rc, r.err)
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r.err
    for word in expect:
        assert word in r.err, f"{word!r} not in: {r.err}"
    assert StoreState.capture(store) == before, "the store changed"


def test_a_bad_model_anywhere_in_the_manifest_writes_nothing(stores, ckpts, tmp_path):
    """The fourth model's architecture differs from the base: refused naming it, before the
    three good ones are written."""
    other_base = tiny_models.save_base(tmp_path / "other-base", seed=1, num_hidden_layers=2)
    odd = tiny_models.save_finetuned(other_base, tmp_path / "odd", "llava-hf", modality="image", seed=3)
    store = stores.fresh(tmp_path / "store")
    good = [entry(fmt, ckpts.finetuned(fmt, "bf16")) for fmt in ("llava-hf", "video-llava-hf", "generic")]
    manifest = write_manifest(tmp_path / "m.yaml", {"models": good + [{"id": "odd", "path": str(odd), "modality": "image"}]})
    refused(store, manifest, "'odd'", "architecture differs from the base", "num_hidden_layers")
    # a missing checkpoint is found before anything too
    manifest = write_manifest(tmp_path / "m.yaml", {"models": good + [{"id": "gone", "path": "nowhere", "modality": "x"}]})
    refused(store, manifest, "manifest", "'gone'", "nowhere")


def test_an_id_in_the_store_from_another_path_is_refused(stores, ckpts, tmp_path):
    store = copy_store(stores.ingested("bf16"), tmp_path / "store")
    manifest = write_manifest(tmp_path / "m.yaml", {"models": [
        {"id": "llava-hf", "path": str(ckpts.finetuned("llava", "bf16")), "modality": "image"}]})
    refused(store, manifest, "'llava-hf'", "already in the store", str(ckpts.finetuned("llava-hf", "bf16")))
    # and a manifest base over a store that has another one
    manifest = write_manifest(tmp_path / "m.yaml", {"base": str(tmp_path), "models": []})
    refused(store, manifest, "already has a base", str(ckpts.base("bf16")))


@pytest.mark.parametrize("doc, expect", [
    ("models: [", ("not valid YAML",)),
    ("- a\n- b\n", ("expected a mapping",)),
    ({"models": [{"id": "a", "path": "p", "modality": "image", "lamda": 0.5}]}, ("models[0] ('a')", "'lamda'", "allowed")),
    ({"modles": []}, ("unknown field", "'modles'")),
    ({"models": [{"id": "a", "path": "p"}]}, ("models[0] ('a')", "'modality' is required")),
    ({"models": [{"id": "a", "path": "p", "modality": "m"}, {"id": "a", "path": "q", "modality": "m"}]},
     ("'a'", "listed twice")),
    ({"models": [{"id": "a", "path": "p", "modality": "m", "lam": "high"}]}, ("'lam' must be a number",)),
    ({"models": [{"id": "a", "path": "p", "modality": "m", "format": "gguf"}]}, ("unknown format 'gguf'",)),
    ({"models": [{"id": "../x", "path": "p", "modality": "m"}]}, ("'../x'",)),
    ({"models": [{"id": "a", "path": "p", "modality": "m", "lam": -1}]}, ("'a'", "lam")),
    ({"chunk_elems": 1024, "models": []}, ("'chunk_elems'", "goes with 'base'")),
    ({"models": []}, ("nothing to ingest",)),
    ({"models": {"a": "p"}}, ("'models' must be a list",)),
])
def test_manifest_mistakes_are_one_line_naming_the_field(stores, tmp_path, doc, expect):
    store = stores.fresh(tmp_path / "store")
    refused(store, write_manifest(tmp_path / "m.yaml", doc), *expect)


def test_manifest_flags_and_missing_file(stores, tmp_path):
    store = stores.fresh(tmp_path / "store")
    refused(store, tmp_path / "absent.yaml", "absent.yaml", "no such file")
    manifest = write_manifest(tmp_path / "m.yaml", {"models": [{"id": "a", "path": "p", "modality": "m"}]})
    r = run_cli("ingest", "--store", store, "--manifest", manifest, "--modality", "image", ok=False)
    assert r.rc == 2 and "--modality goes in the manifest" in r.err
    r = run_cli("ingest", "--store", store, "--manifest", manifest, "--model", "a", ok=False)
    assert r.rc == 2 and "not allowed with argument" in r.err  # argparse: one of --base/--model/--manifest
    json.loads(run_cli("status", "--store", store, "--json").out)  # still a readable store
