"""What export and demo may write and replace (issue 18, items 1, 2 and 4's export side).

``--overwrite`` replaces only a previous export (its marker lists every file in it), never the
store, a directory holding the store, ``.``, or a directory with anything export did not write;
``mmer demo --workdir`` empties only a previous demo's workdir; file names read from a store are
joined onto ``--out`` only when they stay inside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest
from conftest import copy_store, ingest_args
from store_helpers import StoreState, load_dir, run_cli

EXPORT_MARKER, DEMO_MARKER = ".mmer-export.json", ".mmer-demo.json"  # what export and demo leave behind


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def work(merged_store, tmp_path):
    """tmp/work/ holding a copy of the merged store and a file of the user's."""
    root = tmp_path / "work"
    store = copy_store(merged_store, root / "store")
    (root / "notes.txt").write_text("the user's own file")
    return root, store


def test_overwrite_never_deletes_the_store_its_parent_or_cwd(work, monkeypatch):
    root, store = work
    before, files_before = StoreState.capture(store), _tree(root)
    for out in (store, root, store / "models"):
        r = run_cli("export", "merged", "--store", store, "--out", out, "--overwrite", "--quiet", ok=False)
        assert "replaces only a previous export" in r.err, r.err
    monkeypatch.chdir(root)
    r = run_cli("export", "merged", "--store", "store", "--out", ".", "--overwrite", "--quiet", ok=False)
    assert "replaces only a previous export" in r.err
    assert StoreState.capture(store) == before and _tree(root) == files_before
    run_cli("export", "original", "--store", store, "--model", "llava-hf", "--out", root / "model", "--quiet")


def test_overwrite_replaces_a_previous_export_and_nothing_else(work):
    root, store = work
    out = root / "export"
    run_cli("export", "text", "--store", store, "--out", out, "--quiet")
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert sorted(marker["files"]) == sorted(p for p in _tree(out) if p != EXPORT_MARKER)
    text = load_dir(out)
    run_cli("export", "merged", "--store", store, "--out", out, "--overwrite", "--quiet")
    merged = load_dir(out)
    assert merged.keys() == text.keys() and any(not (merged[k] == text[k]).all() for k in merged)
    assert not [p for p in root.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]
    # a previous export the user added a file to is no longer only what export wrote
    (out / "my-eval.json").write_text("{}")
    r = run_cli("export", "text", "--store", store, "--out", out, "--overwrite", "--quiet", ok=False)
    assert "not one" in r.err and (out / "my-eval.json").exists()
    assert load_dir(out).keys() == merged.keys()


def test_out_naming_a_file_is_refused(work):
    root, store = work
    r = run_cli("export", "merged", "--store", store, "--out", root / "notes.txt", "--quiet", ok=False)
    assert r.rc == 2 and "names a file" in r.err and "Traceback" not in r.err
    assert (root / "notes.txt").read_text() == "the user's own file"


def test_staging_of_a_killed_export_is_removed_by_the_next(work):
    """A staging directory whose lock nobody holds (its export was killed) goes; a live one stays."""
    from filelock import FileLock

    root, store = work
    dead = root / ".export.partial-deadbeef"
    dead.mkdir()
    (dead / ".mmer-staging.lock").touch()
    (dead / "model.safetensors").write_bytes(b"half")
    live = root / ".export.partial-0badf00d"
    live.mkdir()
    lock = FileLock(live / ".mmer-staging.lock")
    lock.acquire()
    try:
        run_cli("export", "merged", "--store", store, "--out", root / "export", "--quiet")
        assert not dead.exists() and live.exists()
    finally:
        lock.release()
    assert (root / "notes.txt").exists()


def test_a_store_file_name_never_escapes_out(stores, ckpts, tmp_path):
    """A component file named with '..' (as a shared bucket can hold) is refused, nothing written
    outside --out; on memory://, whose keys can hold any name, like S3's."""
    url = f"memory://issue18-{os.getpid()}/store"
    fs = fsspec.filesystem("memory")
    try:
        run_cli("ingest", "--store", url, "--base", ckpts.base("bf16"), "--quiet")
        run_cli(*ingest_args(url, "m", ckpts.finetuned("llava-hf", "bf16"), "llava-hf"))
        escape = tmp_path / "escaped.txt"
        hops = "/".join([".."] * (len(Path(tmp_path / "out").parts) + 6))
        name = f"{hops}{escape}"
        root = f"/issue18-{os.getpid()}/store/models/m"
        fs.pipe_file(f"{root}/component/files/{name}", b"planted")
        manifest_path = f"{root}/MANIFEST.json"
        if fs.exists(manifest_path):  # a hostile store lists the name too
            manifest = json.loads(fs.cat_file(manifest_path))
            manifest[f"component/files/{name}"] = {"size": 7, "sha256": "0" * 64}
            fs.pipe_file(manifest_path, json.dumps(manifest).encode())
        r = run_cli("export", "original", "--store", url, "--model", "m", "--out", tmp_path / "out", "--quiet",
                    ok=False)
        assert "not a plain relative name" in r.err, r.err
        assert not escape.exists() and not (tmp_path / "out").exists()
    finally:
        fs.rm(f"/issue18-{os.getpid()}", recursive=True)


def test_demo_refuses_a_workdir_it_did_not_make(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = run_cli("demo", "--workdir", mine, "--quiet", ok=False)
    assert r.rc == 2 and "was not made by `mmer demo`" in r.err
    monkeypatch.chdir(mine)
    r = run_cli("demo", "--workdir", ".", "--quiet", ok=False)
    assert "was not made by `mmer demo`" in r.err
    assert _tree(mine) == {"thesis.tex": b"years of work"}


def test_demo_workdir_of_a_previous_run_loses_only_the_demo_files(tmp_path):
    from mmer_dist.demo.run import WORKDIR_ENTRIES
    from mmer_dist.outputs import prepare_workdir

    workdir = prepare_workdir(tmp_path / "w", WORKDIR_ENTRIES)
    assert (workdir / DEMO_MARKER).is_file()
    for entry in WORKDIR_ENTRIES:
        (workdir / entry).mkdir()
        (workdir / entry / "f").write_text(entry)
    (workdir / "user.txt").write_text("kept")
    prepare_workdir(workdir, WORKDIR_ENTRIES)
    assert sorted(p.name for p in workdir.iterdir()) == sorted([DEMO_MARKER, "user.txt"])
