"""Named pause points: a test stops a command at a known step (to start another command beside
it, or to SIGKILL it there). Tests only: nothing sets these outside them.

With ``MMER_PAUSE_AT=<point>[,<point>...]`` and ``MMER_PAUSE_DIR=<dir>`` in a command's
environment, the command, on reaching one of those points, creates ``<dir>/<point>.paused`` and
waits until ``<dir>/<point>.resume`` exists (at most ``MAX_PAUSE_S``, so a command whose test died
does not wait forever). Without them a point costs one environment lookup.

Points (where they are, in the order a command passes them):
- ``add-ingested``: ``mmer add``, its model ingested (committed), its merge not started; no lock held.
- ``remove-read``: ``mmer remove``, the served version read and checked; no lock held.
- ``merge-locked``: any merge (merge, add, remove), the writer lock held, its models decided, nothing written.
- ``merge-staged``: its version's arrays created (staging), no pass run.
- ``merge-computed``: every pass done, nothing published.
- ``merge-published``: the version committed, its staging not yet removed; the lock still held.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT, PAUSE_DIR = "MMER_PAUSE_AT", "MMER_PAUSE_DIR"
MAX_PAUSE_S = 600.0


def pause_point(name: str) -> None:
    points = os.environ.get(PAUSE_AT)
    if not points or name not in points.split(","):
        return
    folder = Path(os.environ[PAUSE_DIR])
    (folder / f"{name}.paused").write_text(str(os.getpid()))
    deadline = time.monotonic() + MAX_PAUSE_S
    while not (folder / f"{name}.resume").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
