"""Bad input and a refusing machine: one clear line, a non-zero exit, the store unchanged (issue 18,
item 8). Every case runs through the real CLI (``mmer_dist.cli.main``, or the ``mmer`` script in
a subprocess where the process itself matters: a missing package, Ctrl-C).

The full disk and the read-only store are real filesystems: a small tmpfs mounted for the test
(remounted read-only for the second). Mounting needs root, which CI has; elsewhere these two are
reported as skipped with the reason.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import copy_store, ingest_args
from store_helpers import StoreState, mmer_subprocess, run_cli, status_json

from mmer_dist.demo import tiny_models
from mmer_dist.store.store import Store


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "warn(" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unknown_url_scheme():
    r = run_cli("status", "--store", "nosuch://bucket/store", ok=False)
    assert r.rc == 2 and "unknown URL scheme 'nosuch'" in _one_line(r.err)


def test_s3_without_s3fs_installed(tmp_path):
    """The same ``mmer`` entry point, in a process where ``import s3fs`` fails (as without the extra)."""
    code = ("import sys; sys.modules['s3fs'] = None\n"
            "from mmer_dist.cli import main\n"
            "sys.exit(main(['status', '--store', 's3://bucket/store']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "pip install 'mmer-dist[s3]'" in _one_line(r.stderr), r.stderr


@pytest.fixture(scope="module")
def store_template(stores):
    return stores.ingested("bf16")


def test_bad_numbers_and_devices(store_template, tmp_path):
    store = copy_store(store_template, tmp_path / "store")
    before = StoreState.capture(store)
    r = run_cli("merge", "--store", store, "--workers", "-3", "--quiet", ok=False)
    assert r.rc == 2 and "--workers: must be at least 1, got -3" in r.err and "Traceback" not in r.err
    r = run_cli("merge", "--store", store, "--device", "foo", "--quiet", "--no-compile", ok=False)
    assert r.rc == 2 and "--device 'foo' is not a torch device" in _one_line(r.err)
    r = run_cli("merge", "--store", store, "--device", "tpu", "--quiet", "--no-compile", ok=False)
    assert r.rc == 2 and "Traceback" not in r.err
    assert StoreState.capture(store) == before


def test_non_utf8_mapping_file(stores, ckpts, tmp_path):
    store = stores.fresh(tmp_path / "store")
    ckpt = ckpts.finetuned("generic", "bf16")
    mapping = tmp_path / "mapping.json"
    mapping.write_bytes((ckpt / tiny_models.GENERIC_MAPPING_FILE).read_bytes().replace(b'"name"', b'"n\xe4me"'))
    args = ingest_args(store, "g", ckpt, "generic")
    args[args.index("--mapping") + 1] = mapping
    before = StoreState.capture(store)
    r = run_cli(*args, ok=False)
    assert r.rc == 2 and "is not UTF-8" in _one_line(r.err)
    assert StoreState.capture(store) == before


def test_garbled_catalog_pointer(store_template, tmp_path):
    store = copy_store(store_template, tmp_path / "store")
    (store / "catalog" / "CURRENT").write_bytes(b"\x00\xffgarbage")
    before = StoreState.capture(store)
    for args in (("status", "--store", store), ("merge", "--store", store, "--quiet", "--no-compile"),
                 ("export", "original", "--store", store, "--model", "llava", "--out", tmp_path / "o", "--quiet")):
        r = run_cli(*args, ok=False)
        assert r.rc == 2 and "CURRENT is damaged" in _one_line(r.err)
    assert StoreState.capture(store) == before and not (tmp_path / "o").exists()


# -- real filesystems: a full disk, a read-only store --------------------------------------------


@contextlib.contextmanager
def _tmpfs(path: Path, size_bytes: int):
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _du(path: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 + 4096 for p in path.rglob("*"))


def test_full_disk_leaves_the_store_as_it_was(stores, ckpts, tmp_path):
    template = stores.fresh(tmp_path / "template")
    with _tmpfs(tmp_path / "disk", _du(template) + 1024 * 1024) as disk:
        store = copy_store(template, disk / "store")
        used = shutil.disk_usage(disk).used
        # shrink the disk to what the store uses + 32 KiB: the model (~200 KiB) cannot fit
        subprocess.run(["mount", "-o", f"remount,size={used + 32 * 1024}", str(disk)], check=True)
        before = StoreState.capture(store)
        r = run_cli(*ingest_args(store, "m", ckpts.finetuned("llava-hf", "bf16"), "llava-hf"), ok=False)
        assert r.rc == 1 and "No space left on device" in _one_line(r.err)
        assert StoreState.capture(store) == before  # the failed ingest removed its staging
        assert status_json(store)["models"] == []  # and the store answers as before
        assert "OK" in run_cli("verify", "--store", store, "--quiet").out


def test_read_only_store(stores, ckpts, tmp_path):
    template = stores.fresh(tmp_path / "template", models=True)
    with _tmpfs(tmp_path / "ro", _du(template) + 1024 * 1024) as ro:
        store = copy_store(template, ro / "store")
        before = StoreState.capture(store)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        r = run_cli(*ingest_args(store, "m", ckpts.finetuned("llava-hf", "bf16"), "llava-hf"), ok=False)
        assert r.rc == 2 and "writer lock" in _one_line(r.err) and "Read-only file system" in r.err
        r = run_cli("merge", "--store", store, "--quiet", "--no-compile", ok=False)
        assert r.rc == 2 and "Traceback" not in r.err
        # reading works: status, verify, export to elsewhere
        assert len(status_json(store)["models"]) == 4
        run_cli("export", "original", "--store", store, "--model", "llava-hf", "--out", tmp_path / "o", "--quiet")
        assert StoreState.capture(store) == before


# -- Ctrl-C ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(ckpts, tmp_path_factory):
    # 32 layers in chunks of 256 entries: the ingest writes chunks for ~1 s after its arrays exist
    # (they are created in one batch), time enough for the interrupt on a loaded machine
    base = ckpts.custom("int-base", lambda p: tiny_models.save_base(p, dtype=torch.bfloat16, num_hidden_layers=32))
    a = ckpts.custom("int-a", lambda p: tiny_models.save_finetuned(base, p, "llava", dtype=torch.bfloat16, seed=41))
    store = tmp_path_factory.mktemp("int") / "store"
    run_cli("ingest", "--store", store, "--base", base, "--chunk-elems", 256, "--quiet")
    return type("Slow", (), dict(store=store, a=a))


def _interrupt_when(start, condition, what, finished) -> tuple[int, str]:
    """Start a command, and once ``condition()`` holds, Ctrl-C it; returns (exit status, stderr).

    The command is frozen (SIGSTOP) when the condition is seen, and only interrupted if it has not
    finished its work meanwhile (``finished()``, read while it is frozen): on a loaded machine this
    poller can see the condition late. Then the attempt is repeated, never judged."""
    for _ in range(3):
        proc = start()
        deadline = time.monotonic() + 120
        while not condition():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the command ended or hung before {what}: {proc.communicate()[1][-2000:]}")
            time.sleep(0.002)
        proc.send_signal(signal.SIGSTOP)
        late = proc.poll() is not None or finished()
        if not late:
            proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        if not late:
            return proc.returncode, err
    pytest.fail(f"the command finished before it could be interrupted, three times ({what})")


def _sigint_here() -> str:
    """This process's SIGINT disposition and mask (what a child would inherit without
    ``mmer_subprocess``'s reset), for the failure message."""
    return f"SIGINT here: {signal.getsignal(signal.SIGINT)!r}, blocked: {signal.pthread_sigmask(signal.SIG_BLOCK, [])}"


def test_ctrl_c_exits_130_and_cleans_its_staging(slow, tmp_path):
    store = tmp_path / "store"
    before = StoreState.capture(copy_store(slow.store, tmp_path / "pristine"))
    llm = store / "models" / "a" / "llm"

    def start_ingest():
        shutil.rmtree(store, ignore_errors=True)
        copy_store(slow.store, store)
        return mmer_subprocess("ingest", "--store", store, "--model", "a", "--path", slow.a, "--modality", "image",
                               "--quiet")

    rc, err = _interrupt_when(start_ingest, lambda: llm.is_dir() and len(list(llm.glob("*/zarr.json"))) >= 3,
                              "ingest writes", lambda: Store.open(str(store)).catalog().has_model("a"))
    assert rc == 130 and "interrupted" in _one_line(err), (rc, err[-3000:], _sigint_here())
    assert StoreState.capture(store) == before

    run_cli("ingest", "--store", store, "--model", "a", "--path", slow.a, "--modality", "image", "--quiet")
    template = tmp_path / "ingested"
    shutil.copytree(store, template)
    before = StoreState.capture(store)
    shard = store / "versions" / "000001" / "_staging" / "shards" / "00000.json"

    def start_merge():
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(template, store)
        return mmer_subprocess("merge", "--store", store, "--quiet", "--no-compile", "--device", "cpu", "--workers", "4")

    rc, err = _interrupt_when(start_merge, shard.exists, "a merge shard is done",
                              lambda: Store.open(str(store)).catalog().latest_version() is not None)
    assert rc == 130 and "interrupted" in _one_line(err), (rc, err[-3000:], _sigint_here())
    assert StoreState.capture(store) == before
    assert status_json(store)["versions"] == []
