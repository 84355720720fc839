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


PROBE = """
import os, sys
sys.argv = ["mmer", *{argv!r}]
loaded_before = "torch" in sys.modules
import mmer_dist.cli  # loads torch, whose OpenMP runtime reads the policy once, now
print(loaded_before, os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OPENBLAS_NUM_THREADS"))
"""


@pytest.mark.parametrize("argv, user, want", [
    (["merge", "--store", "s"], None, "PASSIVE"),
    (["ingest", "--store", "s"], None, "PASSIVE"),
    (["merge", "--store", "s"], "ACTIVE", "ACTIVE"),  # the user's setting is kept
    (["serve", "--store", "s"], None, "None"),  # decode keeps OpenMP's spinning workers
])
def test_bulk_commands_let_idle_openmp_workers_sleep(argv, user, want):
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")}
    if user:
        env["OMP_WAIT_POLICY"] = user
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded_before, policy, blas = out.stdout.split()
    assert loaded_before == "False" and policy == want
    assert blas == ("1" if want != "None" else "None")
