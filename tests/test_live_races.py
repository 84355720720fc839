"""Live operations at once, and killed, through real ``mmer`` processes on real stores.

A command is stopped at a named step by ``mmer_dist.pause_points`` (``MMER_PAUSE_AT``): the test
then runs another command beside it, or SIGKILLs it there. What must hold: two adds at once
both end in the served version (or one fails cleanly and nothing is lost), an add and a remove
at once both take effect, one id added twice at once is added once, and a remove killed between
any two of its steps leaves the store as it was, and its rerun gives what an uninterrupted remove
gives (catalog, served version, arrays, gc).
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_store
from ray_helpers import version_arrays
from store_helpers import CliResult, StoreState, mmer_subprocess, run_cli, status_json

from mmer_dist.pause_points import PAUSE_AT, PAUSE_DIR
from mmer_dist.store.store import Store

pytestmark = pytest.mark.slow

RUN = ("--quiet", "--device", "cpu")
SERVED = ("llava-hf", "generic")  # version 1 of every store here


class Paused:
    """``mmer ARGS`` in a process of its own, stopped at pause point ``point``."""

    def __init__(self, tmp_path: Path, point: str, *args):
        self.folder = tmp_path / f"pause-{uuid.uuid4().hex[:8]}"
        self.folder.mkdir()
        self.point = point
        self.proc = mmer_subprocess(*args, env={PAUSE_AT: point, PAUSE_DIR: str(self.folder)})
        deadline = time.monotonic() + 300  # bounds a hang only: the command gets there in seconds
        while not (self.folder / f"{point}.paused").exists():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                pytest.fail(f"mmer {' '.join(map(str, args))} ended (rc {self.proc.returncode}) before {point}:\n{err}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"mmer {' '.join(map(str, args))} did not reach {point}")
            time.sleep(0.01)

    def resume(self) -> CliResult:
        (self.folder / f"{self.point}.resume").touch()
        out, err = self.proc.communicate(timeout=300)
        return CliResult(self.proc.returncode, out, err)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=60)
        assert self.proc.returncode == -signal.SIGKILL


def served_models(store) -> list[str]:
    status = status_json(store)
    return next(v["models"] for v in status["versions"] if v["version"] == status["serving"]["version"])


def add_args(store, model_id: str, path, *extra) -> list:
    return ["add", "--store", store, "--model", model_id, "--modality", "image", "--path", path, *RUN, *extra]


def one_line_error(r: CliResult, *words: str) -> None:
    assert r.rc == 2 and "Traceback" not in r.err, r.err
    line = r.err.strip().splitlines()[-1]
    assert line.startswith("mmer ") and all(w in line for w in words), r.err


@pytest.fixture()
def served(tmp_path, stores):
    """Base + the four fine-tunes ingested; version 1 over llava-hf and generic, served."""
    store = stores.fresh(tmp_path / "store", models=True)
    run_cli("merge", "--store", store, "--models", *SERVED, *RUN)
    return store


def test_two_adds_at_once_both_end_in_the_served_version(served, ckpts, tmp_path):
    """The first add has read version 1 and ingested its model when the second publishes
    version 2: the first's version is derived from version 2, not from the one it read."""
    first = Paused(tmp_path, "add-ingested", *add_args(served, "new-a", ckpts.finetuned("llava")))
    run_cli(*add_args(served, "new-b", ckpts.finetuned("video-llava-hf")))
    assert served_models(served) == [*SERVED, "new-b"]
    r = first.resume()
    assert r.rc == 0, r.err
    assert served_models(served) == [*SERVED, "new-b", "new-a"]
    assert "version 2 was promoted meanwhile" in r.err and "reused the served version's thresholds" in r.out
    # and it is the merge of those models, bit for bit (the thresholds came from version 2)
    run_cli("merge", "--store", served, "--models", *SERVED, "new-b", "new-a", *RUN, "--no-promote")
    a, b = version_arrays(str(served), 3), version_arrays(str(served), 4)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_add_fails_at_once_or_waits_its_turn_while_another_holds_the_lock(served, ckpts, tmp_path):
    """The lock held open between the two adds' ingests (the first paused in its merge): without
    --wait the second fails with one line and changes nothing; with --wait it waits, then
    ingests and derives its version from the first's."""
    first = Paused(tmp_path, "merge-locked", *add_args(served, "new-a", ckpts.finetuned("llava")))
    before = StoreState.capture(served)
    one_line_error(run_cli(*add_args(served, "new-b", ckpts.finetuned("video-llava-hf")), ok=False),
                   "another writer", ".writer.lock", "--wait")
    assert StoreState.capture(served) == before
    second = mmer_subprocess(*add_args(served, "new-b", ckpts.finetuned("video-llava-hf"), "--wait", "300"))
    waiting = ""
    while "waiting up to 300s" not in waiting:
        line = second.stderr.readline()
        assert line, f"the second add ended without waiting: {second.communicate()}"
        waiting += line
    r = first.resume()
    assert r.rc == 0, r.err
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert served_models(served) == [*SERVED, "new-a", "new-b"]


def test_an_add_and_a_remove_at_once_both_take_effect(served, ckpts, tmp_path):
    removal = Paused(tmp_path, "remove-read", "remove", "--store", served, "--model", "generic", *RUN)
    run_cli(*add_args(served, "new-a", ckpts.finetuned("llava")))
    r = removal.resume()
    assert r.rc == 0, r.err
    assert served_models(served) == ["llava-hf", "new-a"]
    assert "version 2 was promoted meanwhile" in r.err
    models = {m["id"]: m for m in status_json(served)["models"]}
    assert models["generic"]["removed_at"] and not models["new-a"]["removed_at"]


def test_one_id_added_twice_at_once_is_added_once(served, ckpts, tmp_path):
    first = Paused(tmp_path, "add-ingested", *add_args(served, "new-a", ckpts.finetuned("llava")))
    # another checkpoint under the same id: refused, the id exists
    one_line_error(run_cli(*add_args(served, "new-a", ckpts.finetuned("video-llava-hf")), ok=False),
                   "'new-a' is already in the store")
    # the same checkpoint: this one wins (the model is there: it merges it) ...
    run_cli(*add_args(served, "new-a", ckpts.finetuned("llava")))
    before = StoreState.capture(served)
    # ... and the first, resumed, says the id is served by the version promoted meanwhile
    one_line_error(first.resume(), "'new-a' is already in the served version 2", "promoted meanwhile",
                   "nothing was published")
    assert StoreState.capture(served) == before
    assert served_models(served) == [*SERVED, "new-a"]


def test_remove_refuses_bad_input_leaving_the_store_unchanged(served):
    run_cli("merge", "--store", served, "--models", "llava-hf", *RUN)  # version 2: one model, served
    before = StoreState.capture(served)
    for model, words in (("nope", ("no model 'nope' in the store",)),
                         ("generic", ("'generic' is not in the served version 2",)),
                         ("llava-hf", ("'llava-hf' is the only model of the served version 2",))):
        one_line_error(run_cli("remove", "--store", served, "--model", model, *RUN, ok=False), *words)
        assert StoreState.capture(served) == before


# -- a remove killed between any two of its steps ---------------------------------------------------

KILL_POINTS = ("merge-locked", "merge-staged", "merge-computed", "merge-published")


@pytest.fixture(scope="module")
def three(tmp_path_factory, stores):
    """Template: the four fine-tunes ingested, version 1 over three of them, served."""
    store = stores.fresh(tmp_path_factory.mktemp("three") / "store", models=True)
    run_cli("merge", "--store", store, "--models", "llava-hf", "generic", "llava", *RUN)
    return store


@pytest.fixture(scope="module")
def removed_uninterrupted(three, tmp_path_factory):
    """``mmer remove generic`` run start to finish, then ``gc --keep 1``: (store, gc output)."""
    store = copy_store(three, tmp_path_factory.mktemp("uninterrupted") / "store")
    run_cli("remove", "--store", store, "--model", "generic", *RUN)
    return store, _visible(store), run_cli("gc", "--store", store, "--keep", "1").out


def _visible(store) -> dict:
    """The catalog as a reader sees it, without what differs run to run: times, timings, and the
    passes a run made (a resumed one lists only those it ran itself)."""
    catalog = Store.open(str(store)).catalog()
    return {"models": [(m.id, m.removed_at is not None) for m in catalog.models],
            "versions": [dataclasses.replace(v, created_at="", seconds=0.0, details="", passes=[])
                         for v in catalog.versions],
            "serving": catalog.serving_stack()}


def _files(store) -> set[str]:
    """Every file of the store but the catalog's (snapshot folders have random names)."""
    return {f for f in StoreState.capture(store).files if not f.startswith("catalog/")}


def _retired(gc_out: str) -> set[str]:
    """What ``mmer gc`` reports it removed (``removed PATH (N bytes): why``), staging aside."""
    found = (re.match(r"removed (\S+) \(", line) for line in gc_out.splitlines())
    return {m[1] for m in found if m and "_staging" not in m[1]}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_killed_remove_leaves_the_store_as_it_was_and_its_rerun_finishes(three, removed_uninterrupted, tmp_path,
                                                                           point):
    reference, visible_after, gc_reference = removed_uninterrupted
    store = copy_store(three, tmp_path / "store")
    before = _visible(store)
    Paused(tmp_path, point, "remove", "--store", store, "--model", "generic", *RUN).kill()
    published = point == "merge-published"
    assert _visible(store) == (visible_after if published else before)  # all of the remove, or none of it

    rerun = run_cli("remove", "--store", store, "--model", "generic", *RUN, ok=not published)
    if published:  # it had finished: the rerun says so
        one_line_error(rerun, "'generic' is not in the served version 2", "removed at")
    else:
        resumed = json.loads(Store.open(str(store)).catalog().version(2).details)["resumed"]
        assert resumed == (point != "merge-locked")  # staging, once made, is continued
    assert _visible(store) == visible_after
    a, b = version_arrays(str(store), 2), version_arrays(str(reference), 2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    gc_out = run_cli("gc", "--store", store, "--keep", "1").out
    assert _retired(gc_out) == _retired(gc_reference) == {"versions/000001", "models/generic"}, gc_out
    assert ("versions/000002/_staging" in gc_out) == published  # what the kill left after the commit
    assert _visible(store)["models"] == _visible(reference)["models"] == [
        ("llava-hf", False), ("video-llava-hf", False), ("llava", False)]
    assert _files(store) == _files(reference)
