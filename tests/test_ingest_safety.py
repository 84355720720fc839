"""Ingest never touches a committed model, and copies only what a model needs (issue 18, items
3 and 4's ingest side).

- Two ingests of one model id at once: the loser is refused under the writer lock, before it
  removes or writes anything, so the winner's committed weights stay bit for bit.
- A checkpoint's links out of it are refused; nested folders (``checkpoint-*/``, logs) and
  training state are left out of the store and of every export.
"""

from __future__ import annotations

import shutil
import threading
import time

from store_helpers import assert_state_dicts_identical, aux_files, load_dir, run_cli, status_json

from mmer_dist.errors import MmerError
from mmer_dist.ingest import ingest_model
from mmer_dist.store.store import Store


def test_a_losing_concurrent_ingest_never_touches_the_committed_model(stores, ckpts, tmp_path):
    """Ingest B of id 'x' checks the catalog (x absent) and waits for the writer lock while the
    holder commits x; B then gets the lock. B must refuse there, leaving x's data intact."""
    store = stores.fresh(tmp_path / "store")
    donor = stores.fresh(tmp_path / "donor")
    winner, loser = ckpts.finetuned("llava-hf", "bf16"), ckpts.finetuned("llava", "bf16")
    run_cli("ingest", "--store", donor, "--model", "x", "--path", winner, "--modality", "image", "--quiet")
    result: dict = {}

    def ingest_b():
        try:
            ingest_model(str(store), "x", loser, "image", progress=False)
            result["rc"] = 0
        except MmerError as e:
            result["error"] = str(e)

    s = Store.open(str(store))
    record = Store.open(str(donor)).catalog().model("x")
    with s.writer_lock():  # the winner: its data written, about to commit x
        shutil.copytree(donor / "models" / "x", store / "models" / "x")
        b = threading.Thread(target=ingest_b)
        b.start()
        time.sleep(0.3)  # B has read the catalog (x absent) and waits for the lock (up to 1 s)
        catalog = s.catalog()
        s.commit(catalog.replace(models=(record,)), catalog.seq)
    b.join(timeout=120)
    # refused under the lock ("already in the store"), or, on a machine so loaded that B's wait
    # ran out first, at the lock; either way before touching anything
    assert "already in the store" in result.get("error", "") or "another writer" in result.get("error", ""), result
    assert [m["id"] for m in status_json(store)["models"]] == ["x"]
    run_cli("export", "original", "--store", store, "--model", "x", "--out", tmp_path / "x", "--quiet")
    assert_state_dicts_identical(load_dir(tmp_path / "x"), load_dir(winner), "the committed x")


def _with_clutter(src, dest):
    """A copy of checkpoint ``src`` with training leftovers: nested folders, logs, trainer state."""
    shutil.copytree(src, dest)
    (dest / "checkpoint-500").mkdir()
    (dest / "checkpoint-500" / "optimizer.pt").write_bytes(b"\0" * 1000)
    (dest / "checkpoint-500" / "config.json").write_text("{}")
    (dest / "runs").mkdir()
    (dest / "runs" / "events.out.tfevents.1").write_bytes(b"log")
    (dest / "trainer_state.json").write_text('{"global_step": 500}')
    (dest / "train.log").write_text("loss 0.1")
    return dest


def test_ingest_copies_only_what_the_model_needs(stores, ckpts, tmp_path):
    src = ckpts.finetuned("llava-hf", "bf16")
    ckpt = _with_clutter(src, tmp_path / "ckpt")
    store = stores.fresh(tmp_path / "store")
    r = run_cli("ingest", "--store", store, "--model", "m", "--path", ckpt, "--modality", "image")
    assert "not copied" in r.out and "checkpoint-500/" in r.out
    stored = {p.relative_to(store / "models" / "m").as_posix() for p in (store / "models" / "m").rglob("*")
              if p.is_file()}
    assert not [f for f in stored if "checkpoint-500" in f or "runs/" in f or "trainer_state" in f or "train.log" in f]
    run_cli("export", "original", "--store", store, "--model", "m", "--out", tmp_path / "out", "--quiet")
    assert aux_files(tmp_path / "out") == aux_files(src)  # exactly the model's own files


def test_a_link_out_of_the_checkpoint_is_refused(stores, ckpts, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the store")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts.finetuned("llava-hf", "bf16"), ckpt)
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").symlink_to(secret)
    store = stores.fresh(tmp_path / "store")
    r = run_cli("ingest", "--store", store, "--model", "m", "--path", ckpt, "--modality", "image", "--quiet",
                ok=False)
    assert r.rc == 2 and "tokenizer.json is a link" in r.err and "outside the checkpoint" in r.err
    assert status_json(store)["models"] == [] and not (store / "models" / "m").exists()


def test_a_link_inside_the_checkpoint_is_followed(stores, ckpts, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts.finetuned("llava-hf", "bf16"), ckpt)
    (ckpt / "real").mkdir()
    (ckpt / "tokenizer.json").rename(ckpt / "real" / "tokenizer.json")
    (ckpt / "tokenizer.json").symlink_to(ckpt / "real" / "tokenizer.json")
    store = stores.fresh(tmp_path / "store")
    run_cli("ingest", "--store", store, "--model", "m", "--path", ckpt, "--modality", "image", "--quiet")
    run_cli("export", "original", "--store", store, "--model", "m", "--out", tmp_path / "out", "--quiet")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (ckpt / "real" / "tokenizer.json").read_bytes()
    assert not (tmp_path / "out" / "real").exists()


def test_base_ingest_copies_only_what_the_model_needs(ckpts, tmp_path):
    ckpt = _with_clutter(ckpts.base("bf16"), tmp_path / "base")
    store = tmp_path / "store"
    run_cli("ingest", "--store", store, "--base", ckpt, "--quiet")
    assert sorted(p.name for p in (store / "base" / "files").iterdir()) == sorted(aux_files(ckpts.base("bf16")))
