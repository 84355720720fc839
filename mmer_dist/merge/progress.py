"""Progress for long commands: a tqdm bar on a terminal, plain lines otherwise.

A carriage-return bar written to a file or a CI log becomes one unreadable line; when stderr is
not a terminal, progress is a few plain lines instead (at each quarter and at the end). Ray shard
actors show their own bars through Ray's tqdm integration (``ray.experimental.tqdm_ray``), which
the Ray driver renders; see ``ray_backend``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator


def on_terminal() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(desc: str, total: int, enabled: bool, unit: str = "param") -> Iterator[Callable[[int], None]]:
    """Yields ``update(n)``; a no-op when not ``enabled``."""
    if not enabled or total <= 0:
        yield lambda n: None
        return
    if on_terminal():
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False) as bar:
            yield bar.update
        return
    lines = PlainLines(desc, total, unit)
    yield lines.update
    lines.finish()


class PlainLines:
    """Progress as plain lines on stderr: one at each quarter done, one at the end."""

    def __init__(self, desc: str, total: int, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self.next_quarter = 1
        self.started = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        reached = min(3, self.done * 4 // self.total)  # the quarters crossed (one line for several)
        if reached >= self.next_quarter:
            self._line(f"{25 * reached}%")
            self.next_quarter = reached + 1

    def finish(self) -> None:
        self._line("done")

    def _line(self, what: str) -> None:
        print(f"{self.desc}: {what} ({min(self.done, self.total):,}/{self.total:,} {self.unit}s, "
              f"{time.perf_counter() - self.started:.1f}s)", file=sys.stderr, flush=True)
