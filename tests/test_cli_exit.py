"""A command that printed its result exits with its own status, every time (issue 18, item 10).

The ``mmer`` script is run many times over, on commands that leave background threads behind
(zarr's I/O loop, tqdm's monitor, Arrow's readers of the catalog, a progress bar), on success and
on error paths; none may end in an abort at interpreter exit (exit 134, "terminate called").
"""

from __future__ import annotations

import subprocess

import pytest
from conftest import copy_store
from store_helpers import MMER

pytestmark = pytest.mark.slow
RUNS = 2


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*MMER, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_commands_exit_with_their_own_status(merged_store, tmp_path):
    store = copy_store(merged_store, tmp_path / "store")
    damaged = copy_store(merged_store, tmp_path / "damaged")
    snapshot = sorted((damaged / "catalog" / "snapshots").iterdir())[-1]
    (snapshot / "tensors.parquet").write_bytes((snapshot / "tensors.parquet").read_bytes()[:200])
    commands = [
        (0, ("status", "--store", store)),
        (0, ("export", "model", "--store", store, "--model", "llava", "--out", tmp_path / "out-{i}")),  # progress bars on
        (2, ("status", "--store", damaged)),
        (2, ("merge", "--store", store, "--models", "nosuch", "--quiet")),
    ]
    for i in range(RUNS):
        for want, args in commands:
            r = _run(*(str(a).format(i=i) for a in args))
            assert r.returncode == want and "terminate called" not in r.stderr, (args, r.returncode, r.stderr[-2000:])
