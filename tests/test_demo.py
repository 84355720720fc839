"""``mmer demo`` as a newcomer runs it (README's first command), on the test-size kit: the real
CLI in its own process, embedded Ray, Ray Serve on loopback, the openai client, a live add."""

from __future__ import annotations

import json
import re

import pytest
from store_helpers import mmer_subprocess

from mmer_dist.store.store import Store

pytestmark = pytest.mark.slow


def test_mmer_demo_runs_end_to_end_quietly(kit, tmp_path):
    workdir = tmp_path / "demo"
    proc = mmer_subprocess("demo", "--size", "test", "--kit-cache", kit.root.parent, "--workdir", workdir,
                           "--questions", "3")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"{err}\n{out}"
    for heading in ("retention", "expansion", "a model for a new task joins the live endpoint", "done in"):
        assert heading in out, heading
    added = next(m for m in kit.models.values() if m.added)
    assert re.search(rf"`mmer add` of '{added.id}' .* made version 2", out.replace("\n", " ")), out
    # quiet: no Ray start-up banner, no progress bars, no tracebacks between the tables
    for noise in ("Started a local Ray instance", "it/s]", "Traceback", "INFO"):
        assert noise not in out + err, noise
    catalog = Store.open(str(workdir / "store")).catalog()
    assert catalog.serving_version() == 2
    assert set(catalog.version(2).models) == {m.id for m in kit.models.values()}
    assert json.loads((workdir / ".mmer-demo.json").read_text())["entries"] == ["store"]
