"""The measured child of ingest_bench.py: runs one ``mmer`` CLI call in this process and writes its
timings and memory (VmHWM, sampled RssAnon / RssFile peaks) as JSON. Imports only the standard
library before the CLI does, so 'RSS after imports' is what ``mmer ingest`` itself loads."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in FIELDS:
            out[k] = int(v.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak RssAnon / RssFile / VmRSS of this process, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.01):
        super().__init__(daemon=True)
        self.period = period
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.done = threading.Event()

    def _take(self) -> None:
        s = status()
        for k in self.peak:
            self.peak[k] = max(self.peak[k], s.get(k, 0))

    def run(self) -> None:
        while not self.done.is_set():
            self._take()
            time.sleep(self.period)

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join()
        self._take()
        return dict(self.peak)


def main() -> None:
    argv, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    t_start = time.perf_counter()
    from mmer_dist import cli
    import mmer_dist.ingest  # noqa: F401  (what the CLI imports on its first ingest call)

    after = status()
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    rc = cli.main(argv)
    seconds = time.perf_counter() - t0
    peaks = sampler.stop()
    final = status()
    out.write_text(json.dumps({
        "rc": rc, "seconds": seconds, "import_s": t0 - t_start, "rss_after_imports": after["VmRSS"],
        "anon_after_imports": after["RssAnon"], "vm_hwm": final["VmHWM"], "peak_anon": peaks["RssAnon"],
        "peak_file": peaks["RssFile"], "peak_rss_sampled": peaks["VmRSS"]}))


if __name__ == "__main__":
    main()
