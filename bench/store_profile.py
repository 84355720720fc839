"""Where the time of a store-backed merge goes, and what some changes to the store path would save.

    python bench/store_profile.py                    # N = 8 at ~100M params, local backend, compiled
    python bench/store_profile.py --models 2 --experiments none

In one process (so compiled kernels are warm after the first merge): builds (or reuses) a store of
the synthetic checkpoints, runs one warm-up merge, then ``--repeats`` timed merges per variant on a
fresh hard-linked clone of the store. Library functions are wrapped with timers (nothing in
``mmer_dist`` is modified on disk): zarr array creation / opening, chunk reads and writes (tau* and
masks separately), kernels, the tau* finiteness check, the ingest-histogram load, publication.

Variants (``--experiments``), each a monkeypatch of one piece of the store path, to measure what a
change there would buy before anyone makes it:

- ``no-prefetch`` the chunk reader without its one-chunk read-ahead thread (what it buys)

(Earlier variants measured here -- gathered zarr I/O, write-behind, concurrent array creation,
uncompressed masks, a columnar histogram load -- led to the current store path: masks of all
models stacked in one array per tensor, writes on a helper thread, zstd level 1, the columnar
load. They were removed once adopted or rejected.)
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.checkpoints import STORE_DIR, clone_store, ensure_checkpoints, ensure_store, model_id  # noqa: E402
from bench.common import OUT_DIR, write_json  # noqa: E402

TIMES: dict[str, float] = collections.defaultdict(float)
COUNTS: dict[str, int] = collections.defaultdict(int)


def timed(key_fn):
    """Wrap a function so its wall time accumulates under key_fn(*args)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                k = key_fn(*args, **kwargs) if callable(key_fn) else key_fn
                TIMES[k] += time.perf_counter() - t0
                COUNTS[k] += 1
        wrapper.__wrapped_original__ = fn
        return wrapper
    return deco


def _kind(path: str) -> str:
    for k in ("tau_star", "masks", "base/llm", "models/"):
        if k in path:
            return {"base/llm": "base", "models/": "model"}.get(k, k)
    return "other"


def instrument() -> None:
    from mmer_dist.merge import engine, passes
    from mmer_dist.method import streaming
    from mmer_dist.method.kernels import ChunkKernels
    from mmer_dist.store.store import Store

    Store.create_array = timed(lambda self, path, *a, **k: f"zarr create_array ({_kind(path)})")(Store.create_array)
    Store.read = timed(lambda self, path, *a, **k: f"zarr read ({_kind(path)})")(Store.read)
    Store.read_stacked = timed("Store.read_stacked (N+1 chunk files into one buffer)")(Store.read_stacked)
    Store.write_chunk = timed(lambda self, path, *a, **k: f"write_chunk ({_kind(path)})")(Store.write_chunk)
    Store.write = timed(lambda self, path, *a, **k: f"zarr write ({_kind(path)}) [incl. first open]")(Store.write)
    orig_array = Store.array

    def array(self, path):
        if path in self._arrays:
            return self._arrays[path]
        t0 = time.perf_counter()
        try:
            return orig_array(self, path)
        finally:
            TIMES[f"zarr open_array ({_kind(path)}) [nested in read/write]"] += time.perf_counter() - t0
            COUNTS[f"zarr open_array ({_kind(path)}) [nested in read/write]"] += 1
    Store.array = array
    passes.StoreChunkReader.read = timed("reader.read (waits for the read-ahead)")(passes.StoreChunkReader.read)
    passes.VersionWriter.write = timed("writer.write (queue tau* + masks; waits when 2 are pending)")(passes.VersionWriter.write)
    passes.VersionWriter._write_now = timed("writer thread: tau* + masks written")(passes.VersionWriter._write_now)
    ChunkKernels.final = timed("kernels.final")(ChunkKernels.final)
    ChunkKernels.sign_counts = timed("kernels.sign_counts")(ChunkKernels.sign_counts)
    ChunkKernels.low_counts = timed("kernels.low_counts")(ChunkKernels.low_counts)
    engine.cached_high_histogram = timed("cached_high_histogram")(engine.cached_high_histogram)
    engine.create_version_arrays = timed("create_version_arrays")(engine.create_version_arrays)
    engine.publish_version = timed("publish_version")(engine.publish_version)
    passes.ShardWorker.__init__ = timed("ShardWorker() (Store.open + ChunkKernels)")(passes.ShardWorker.__init__)
    streaming.run_pass = timed(lambda request, *a, **k: f"run_pass {type(request).__name__}")(streaming.run_pass)
    passes.streaming = streaming


# -- experiments ------------------------------------------------------------------------------------


def patch_no_prefetch() -> None:
    """The chunk reader without its read-ahead thread (what the prefetch commit buys)."""
    from mmer_dist.merge import passes

    orig_init = passes.StoreChunkReader.__init__

    def init(self, store, model_ids, prefetch=()):
        orig_init(self, store, model_ids, ())  # no read-ahead (and so no buffer ring)
    passes.StoreChunkReader.__init__ = init


EXPERIMENTS = {"no-prefetch": patch_no_prefetch}


# -- driver ----------------------------------------------------------------------------------------


def run_variant(name: str, args, src_store: Path) -> dict:
    """One child process per variant: warm-up merge, then timed merges with the breakdown."""
    import subprocess

    out = OUT_DIR / f"store-profile-child-{os.getpid()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-store", str(src_store),
           "--child-out", str(out), "--models", str(args.models), "--repeats", str(args.repeats)]
    if not args.compile:
        cmd.append("--no-compile")
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        return {"variant": name, "error": f"exit {proc.returncode}"}
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def child(args) -> dict:
    import torch  # noqa: F401

    from mmer_dist.merge.engine import MergeRequest, merge
    from mmer_dist.merge.local import LocalBackend

    instrument()
    for e in [x for x in args.child.split("+") if x != "baseline"]:
        EXPERIMENTS[e]()
    src = Path(args.child_store)
    req = MergeRequest(models=tuple(model_id(i) for i in range(args.models)))
    runs = []
    for r in range(args.repeats + 1):
        dst = clone_store(src, STORE_DIR / f"profile-clone-{os.getpid()}")
        os.sync()
        TIMES.clear()
        COUNTS.clear()
        t0 = time.perf_counter()
        rec = merge(str(dst), req, LocalBackend(), workers=1, compile=args.compile, progress=False)  # AOT kernels
        wall = time.perf_counter() - t0
        runs.append({"wall_s": wall, "details": json.loads(rec.details), "times": dict(TIMES), "counts": dict(COUNTS)})
        print(f"[{args.child}] merge {r} ({'warm-up' if r == 0 else 'timed'}): {wall:.2f}s "
              f"{runs[-1]['details']['pass_seconds']}", file=sys.stderr, flush=True)
        shutil.rmtree(dst, ignore_errors=True)
    timed_runs = runs[1:]
    best = min(timed_runs, key=lambda x: x["wall_s"])
    return {"variant": args.child, "walls": [x["wall_s"] for x in timed_runs], "best": best}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", type=float, default=100e6)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="timed merges per variant after one warm-up")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--experiments", default="baseline,no-prefetch",
                   help="comma-separated variants ('a+b' combines); 'none' for the breakdown only")
    p.add_argument("--out", type=Path, default=OUT_DIR / "store_profile.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-store", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        write_json(Path(args.child_out), child(args))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, Console().width))
    cs = ensure_checkpoints(args.params, max(args.models, 1), log=console.print)
    src = ensure_store(cs, args.models, log=console.print)
    variants = ["baseline"] if args.experiments == "none" else [v for v in args.experiments.split(",") if v]
    results = [run_variant(v, args, src) for v in variants]
    base = next((r for r in results if r.get("variant") == "baseline" and "error" not in r), None)
    if base is not None:
        b = base["best"]
        t = Table(title=f"store-path breakdown: local backend, N={args.models}, {cs.params / 1e6:.1f}M params, "
                        f"{'compiled' if args.compile else 'eager'} (best of {args.repeats} warm in-process merges, "
                        f"{b['wall_s']:.2f}s)")
        for c in ("what", "calls", "seconds", "share of merge"):
            t.add_column(c, justify="left" if c == "what" else "right")
        for k, v in sorted(b["times"].items(), key=lambda kv: -kv[1]):
            t.add_row(k, str(b["counts"].get(k, "")), f"{v:.3f}", f"{v / b['wall_s']:.0%}")
        console.print(t)
        console.print("Nested timers overlap (run_pass contains reader/kernels/writer; write_rows contains the "
                      "first open of each array).")
    t = Table(title="variants (monkeypatched store path; same merge, same process kind)")
    for c in ("variant", "merge s (best)", "all timed", "vs baseline", "passes"):
        t.add_column(c, justify="left" if c in ("variant", "passes") else "right")
    for r in results:
        if "error" in r:
            t.add_row(r["variant"], f"[red]{r['error']}[/red]", "", "", "")
            continue
        w = r["best"]["wall_s"]
        t.add_row(r["variant"], f"{w:.2f}", ", ".join(f"{x:.2f}" for x in r["walls"]),
                  f"{w / base['best']['wall_s']:.2f}x" if base else "",
                  json.dumps(r["best"]["details"]["pass_seconds"]))
    console.print(t)
    write_json(args.out, {"benchmark": "store_profile", "settings": {k: str(v) for k, v in vars(args).items()},
                          "params": cs.params, "results": results})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
