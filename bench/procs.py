"""Running a benchmarked command as a whole process: wall time, CPU time and memory of its process
tree (Ray starts its own processes, inductor its compile workers), sampled with psutil.

``run_timed(cmd)`` returns wall seconds, the exit code, the kernel's max RSS of the command and
its waited-for descendants (``wait4`` ru_maxrss: what ``/usr/bin/time -v`` prints as maximum
resident set size), and from 0.1 s samples of the whole tree: the peak of the summed RSS (an upper
bound: shared library pages count once per process) and of its anonymous part (RSS less file-backed
pages: mapped chunk files are page cache), the largest single process RSS, and the CPU
seconds of every process seen (the last sample of each, so a process living less than one period
is missed).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class Measured:
    cmd: list[str]
    rc: int
    wall_s: float
    maxrss: int  # wait4 ru_maxrss of the command (+ waited descendants), bytes
    rusage_cpu_s: float  # user + sys of the command and its waited descendants
    tree_peak_rss: int = 0  # peak of the summed RSS over the process tree
    tree_peak_single: int = 0  # largest RSS of one process of the tree
    tree_peak_anon: int = 0  # peak of the summed anonymous RSS (RSS less file-backed and shared pages)
    tree_cpu_s: float = 0.0  # CPU seconds of every process seen in the tree
    tree_processes: int = 0
    tree_read_bytes: int = 0  # bytes the tree's processes read through system calls (rchar: page cache hits too)
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)


class TreeSampler(threading.Thread):
    def __init__(self, pid: int, period: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak_sum = self.peak_single = self.peak_anon = 0
        self.cpu: dict[int, float] = {}
        self.read: dict[int, int] = {}
        self.done = threading.Event()

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = anon = 0
        for p in procs:
            try:
                with p.oneshot():
                    mem = p.memory_info()
                    rss = mem.rss
                    anon += rss - getattr(mem, "shared", 0)  # mapped chunk files are page cache, not the merge's
                    t = p.cpu_times()
                    io = p.io_counters() if hasattr(p, "io_counters") else None
                total += rss
                self.peak_single = max(self.peak_single, rss)
                if io is not None:
                    self.read[p.pid] = getattr(io, "read_chars", io.read_bytes)
                self.cpu[p.pid] = t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
            except psutil.Error:
                continue
        self.peak_sum = max(self.peak_sum, total)
        self.peak_anon = max(self.peak_anon, anon)

    def run(self) -> None:
        while not self.done.is_set():
            self._sample()
            self.done.wait(self.period)

    def stop(self) -> None:
        self.done.set()
        self.join()


def run_timed(cmd: list[str], env: dict | None = None, sample: bool = True, timeout: float | None = None,
              capture: bool = True) -> Measured:
    """Run ``cmd`` to completion; wall time, its wait4 rusage (max RSS, CPU) and tree samples."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, text=True)
    sampler = TreeSampler(proc.pid) if sample else None
    if sampler:
        sampler.start()
    stdout_chunks: list[str] = []
    stderr_chunks: list[str] = []
    readers = []
    if capture:
        for stream, sink in ((proc.stdout, stdout_chunks), (proc.stderr, stderr_chunks)):
            th = threading.Thread(target=lambda s=stream, k=sink: k.append(s.read()), daemon=True)
            th.start()
            readers.append(th)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for th in readers:
        th.join()
    if sampler:
        sampler.stop()
    m = Measured(cmd, proc.returncode, wall, ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime,
                 stdout="".join(stdout_chunks), stderr="".join(stderr_chunks))
    if sampler:
        m.tree_peak_rss, m.tree_peak_single, m.tree_peak_anon = sampler.peak_sum, sampler.peak_single, sampler.peak_anon
        m.tree_cpu_s, m.tree_processes = sum(sampler.cpu.values()), len(sampler.cpu)
        m.tree_read_bytes = sum(sampler.read.values())
    return m
