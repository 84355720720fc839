"""`mmer merge` on a store: wall time and throughput vs N, backend and workers, compiled kernels cold
and warm, and NeuroMerging vs TIES.

    python bench/merge_bench.py                       # N = 2, 4, 8 of ~100M params; local, ray x1, ray x2
    python bench/merge_bench.py --quick               # ~20M params, N = 2, one warm run
    python bench/merge_bench.py --models 8 --configs ray:2 --repeats 3 --no-neuro
    python bench/merge_bench.py --scale               # many models: N = 8, 16, 32, 64 at ~25M, 16 at ~100M

Inputs: synthetic Llama-shaped bf16 HF checkpoints (``bench/checkpoints.py``), ingested once into a
store holding the base and max(N) models; every merge runs on a fresh clone of that store (chunk
files hard-linked) and merges the first N models (``--models m0 .. m{N-1}``), so each timed merge
starts from the same catalog. Each merge is the real CLI (``mmer merge --compile --quiet``) in its
own process:

- cold: ``MMER_KERNEL_CACHE`` (and ``TORCHINDUCTOR_CACHE_DIR``) is a new empty directory: the
  process compiles the kernels ahead of time, as the first merge on a fresh node does;
- warm: the same directory again: the process (and each Ray actor) loads the compiled kernels.

With ``--peer`` (default when ``bench/.venvs/mergekit`` exists) the same run ends with
``mergekit_peer.py``'s comparison for the same N: mergekit's TIES vs ``mmer merge`` and vs
ingest + merge end to end, warm and cold, as ratios with peak RSS.

Reported per merge: the whole process wall time; ``in merge()`` = the version's ``seconds`` (from
``mmer status --json``: catalog, array creation, backend start-up — Ray's ``init`` and its actors —,
passes, publication); the passes (the version's ``details.pass_seconds``: LowPass / SignPass /
FinalPass, HighPass when histograms are not cached); set-up = in merge() - passes; throughput
= params x N / seconds (over the passes, and over the whole process); peak RSS summed over the
process tree (driver, Ray's raylet / GCS / workers, compile workers: an upper bound) and the
largest single process; CPU seconds of the tree. Ray start-up alone (``ray.init`` +
``ray.shutdown`` in a fresh process) is measured separately.

With ``--scale`` it measures how a merge grows with N instead: ``mmer merge --compile`` (local, one
worker) at N = 8, 16, 32, 64 of ~25M-parameter models and N = 16 of ~100M, each on a store holding
the largest N, all with one kernel cache (compiled by the first merge only: the kernels take N as a
run-time size, and a merge that compiled says so). Reported per N: seconds (process, merge(),
passes), seconds per model, peak RSS of the tree and its anonymous part (RSS less file-backed
pages: the chunk files a merge maps are page cache), and the bound on the reader's stacked chunks
(two stacked chunks of N + 1 arrays: the only memory that grows with N).

Results go to ``bench/out/merge_bench.json`` (``merge_scale.json`` with ``--scale``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.checkpoints import MMER, STORE_DIR, clone_store, ensure_checkpoints, ensure_store, model_id  # noqa: E402
from bench.common import OUT_DIR, environment, fmt_bytes, write_json  # noqa: E402
from bench.procs import run_timed  # noqa: E402

SHORT = {"HighPass": "H", "LowPass": "L", "SignPass": "S", "FinalPass": "F"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", type=float, default=100e6, help="approximate LLM parameters per model (bf16)")
    p.add_argument("--models", default="2,4,8", help="comma-separated model counts N")
    p.add_argument("--configs", default="local:1,ray:1,ray:2", help="backend:workers pairs")
    p.add_argument("--repeats", type=int, default=2, help="warm merges per configuration (after the cold one)")
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                   help="one merge with a fresh inductor cache first (else: a warm-up merge, not reported)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="mmer merge --compile")
    p.add_argument("--neuro", action=argparse.BooleanOptionalAction, default=True,
                   help="also --merge neuro vs --merge ties (local, 1 worker)")
    p.add_argument("--neuro-params", type=float, default=None,
                   help="model size for the neuro comparison (default: --params)")
    p.add_argument("--merge-args", default="", help="extra `mmer merge` arguments for every merge (e.g. '--scope per-tensor')")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                   help="end with mergekit_peer.py's comparison for the same N (default: if its venv exists)")
    p.add_argument("--quick", action="store_true", help="smoke run: ~20M params, N=2, 1 warm merge")
    p.add_argument("--scale", action="store_true", help="merges of many models: seconds, seconds per model and "
                   "peak RSS at N = 8, 16, 32, 64 of ~25M params and N = 16 of ~100M (local, one kernel cache)")
    p.add_argument("--scale-sets", default="25e6:8,16,32,64;100e6:16",
                   help="with --scale: PARAMS:N,N,...;PARAMS:N,... (one store per model size)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per merge")
    p.add_argument("--out", type=Path, default=OUT_DIR / "merge_bench.json")
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.models, args.repeats = 20e6, "2", 1
    if args.out == OUT_DIR / "merge_bench.json" and args.scale:
        args.out = OUT_DIR / "merge_scale.json"
    args.scale_list = [(float(size), [int(n) for n in counts.split(",")])
                       for size, counts in (part.split(":") for part in args.scale_sets.split(";"))]
    args.model_counts = sorted({int(x) for x in args.models.split(",") if x.strip()})
    args.config_list = []
    for c in args.configs.split(","):
        backend, _, workers = c.strip().partition(":")
        if backend not in ("local", "ray"):
            p.error(f"--configs: unknown backend {backend!r}")
        args.config_list.append((backend, int(workers or 1)))
    return args


def version_of(store: Path) -> dict:
    proc = run_timed([str(MMER), "status", "--store", str(store), "--json"], sample=False)
    if proc.rc != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout)["versions"][-1]


def one_merge(src: Path, n: int, backend: str, workers: int, cache_dir: Path, args, method: str = "ties") -> dict:
    store = clone_store(src, STORE_DIR / f"merge-bench-{os.getpid()}")
    os.sync()
    cmd = [str(MMER), "merge", "--store", str(store), "--quiet", "--backend", backend, "--workers", str(workers),
           "--compile" if args.compile else "--no-compile", "--merge", method,
           "--models", *[model_id(i) for i in range(n)], *args.merge_args.split()]
    env = {**os.environ, "MMER_KERNEL_CACHE": str(cache_dir), "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
           "PYTHONWARNINGS": "ignore", "RAY_DEDUP_LOGS": "0"}
    try:
        m = run_timed(cmd, env=env, timeout=args.timeout)
        if m.rc != 0:
            return {"error": f"exit {m.rc}: {m.stderr.strip().splitlines()[-1] if m.stderr.strip() else ''}",
                    "stderr": m.stderr[-3000:]}
        v = version_of(store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    d = v["details"]
    passes = d.get("pass_seconds", {})
    pass_s = sum(passes.values())
    params = v.get("params") or None
    return {"wall_s": m.wall_s, "merge_s": v["seconds"], "pass_seconds": passes, "passes_s": pass_s,
            "setup_s": v["seconds"] - pass_s, "outside_s": m.wall_s - v["seconds"], "shard_seconds": d.get("shard_seconds"),
            "passes": v["passes"], "tree_peak_rss": m.tree_peak_rss, "tree_peak_single": m.tree_peak_single,
            "tree_peak_anon": m.tree_peak_anon, "compiled": "mmer: compiling" in m.stderr,
            "maxrss": m.maxrss, "tree_cpu_s": m.tree_cpu_s, "processes": m.tree_processes,
            "mask_density": v["mask_density"], "tau_star_density": v["tau_star_density"], "params_field": params}


def ray_startup(repeats: int = 2) -> dict:
    code = ("import time; t0 = time.perf_counter(); import ray; t1 = time.perf_counter(); "
            "ray.init(include_dashboard=False, log_to_driver=False); t2 = time.perf_counter(); "
            "ray.shutdown(); t3 = time.perf_counter(); print(t1 - t0, t2 - t1, t3 - t2)")
    runs = []
    for _ in range(repeats):
        m = run_timed([sys.executable, "-c", code], env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if m.rc == 0:
            imp, init, shut = (float(x) for x in m.stdout.split()[-3:])
            runs.append({"import_s": imp, "init_s": init, "shutdown_s": shut, "wall_s": m.wall_s})
    if not runs:
        return {}
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def bench_config(src: Path, n: int, backend: str, workers: int, params: int, args, log, method: str = "ties") -> list[dict]:
    rows = []
    cache = Path(tempfile.mkdtemp(prefix="kernel-cache-", dir=OUT_DIR))
    try:
        kinds = (["cold"] if args.cold else ["warm-up"]) + ["warm"] * args.repeats
        for kind in kinds:
            r = one_merge(src, n, backend, workers, cache, args, method)
            r.update(n=n, backend=backend, workers=workers, cache=kind, method=method, params=params)
            if "error" not in r:
                r["throughput_passes"] = params * n / r["passes_s"] if r["passes_s"] else 0.0
                r["throughput_wall"] = params * n / r["wall_s"]
                log(f"  N={n} {method} {backend} x{workers} {kind}: wall {r['wall_s']:.1f}s, merge() {r['merge_s']:.1f}s, "
                    f"passes {json.dumps(r['pass_seconds'])}, tree RSS {fmt_bytes(r['tree_peak_rss'])}")
            else:
                log(f"  N={n} {method} {backend} x{workers} {kind}: [red]{r['error']}[/red]")
            if kind != "warm-up":
                rows.append(r)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (N, method, backend, workers, cache): the median of its runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" in r:
            groups.setdefault((r["n"], r["method"], r["backend"], r["workers"], r["cache"], "error"), []).append(r)
            continue
        groups.setdefault((r["n"], r["method"], r["backend"], r["workers"], r["cache"]), []).append(r)
    out = []
    for key, rs in groups.items():
        if len(key) == 6:
            out.append({"n": key[0], "method": key[1], "backend": key[2], "workers": key[3], "cache": key[4],
                        "error": rs[0]["error"]})
            continue
        med = lambda k: statistics.median(x[k] for x in rs)  # noqa: E731
        passes = {}
        for name in rs[0]["pass_seconds"]:
            passes[name] = statistics.median(x["pass_seconds"].get(name, 0.0) for x in rs)
        out.append({"n": key[0], "method": key[1], "backend": key[2], "workers": key[3], "cache": key[4], "runs": len(rs),
                    "wall_s": med("wall_s"), "merge_s": med("merge_s"), "passes_s": med("passes_s"), "setup_s": med("setup_s"),
                    "outside_s": med("outside_s"), "pass_seconds": passes, "passes": rs[0]["passes"],
                    "throughput_passes": med("throughput_passes"), "throughput_wall": med("throughput_wall"),
                    "tree_peak_rss": max(x["tree_peak_rss"] for x in rs), "tree_peak_single": max(x["tree_peak_single"] for x in rs),
                    "tree_cpu_s": med("tree_cpu_s"), "walls": [x["wall_s"] for x in rs]})
    return out


def print_tables(summary: list[dict], ray: dict, args, params: int, neuro_params: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(200, Console().width))
    t = Table(title=f"mmer merge (TIES/MMER, K=0.8, global) of N x {params / 1e6:.1f}M-param bf16 models, "
                    f"{'compiled' if args.compile else 'eager'} kernels; median of runs")
    cols = ("N", "backend", "w", "cache", "runs", "wall s", "merge() s", "set-up s", "passes", "passes s",
            "Mpm/s passes", "Mpm/s wall", "RSS tree", "RSS max proc", "CPU s")
    for c in cols:
        t.add_column(c, justify="left" if c in ("backend", "cache", "passes") else "right", no_wrap=True)
    for r in [x for x in summary if x["method"] == "ties"]:
        if "error" in r:
            t.add_row(str(r["n"]), r["backend"], str(r["workers"]), r["cache"], "", f"[red]{r['error'][:80]}[/red]",
                      *[""] * (len(cols) - 6))
            continue
        ps = " ".join(f"{SHORT.get(k, k)} {v:.2f}" for k, v in r["pass_seconds"].items())
        t.add_row(str(r["n"]), r["backend"], str(r["workers"]), r["cache"], str(r["runs"]), f"{r['wall_s']:.2f}",
                  f"{r['merge_s']:.2f}", f"{r['setup_s']:.2f}", ps, f"{r['passes_s']:.2f}",
                  f"{r['throughput_passes'] / 1e6:.0f}", f"{r['throughput_wall'] / 1e6:.0f}", fmt_bytes(r["tree_peak_rss"]),
                  fmt_bytes(r["tree_peak_single"]), f"{r['tree_cpu_s']:.1f}")
    console.print(t)
    console.print("wall: the whole `mmer merge` process; merge(): the version's recorded seconds; set-up = merge() - "
                  "passes (catalog, array creation, cached histograms, backend start: Ray init + actors, publish); "
                  "passes from details.pass_seconds (L = LowPass, S = SignPass, F = FinalPass; a cold run's first "
                  "pass includes compiling). cold: empty kernel cache (MMER_KERNEL_CACHE); warm: the cold run's compiled "
                  "kernels loaded from disk. Mpm/s = "
                  "million params x models per second (params x N / seconds). RSS tree: peak of the summed RSS of the "
                  "process tree (an upper bound); RSS max proc: the largest single process; CPU s: the tree's CPU time.")
    if ray:
        console.print(f"Ray start-up alone (fresh process): import ray {ray['import_s']:.2f}s, ray.init() "
                      f"{ray['init_s']:.2f}s, ray.shutdown() {ray['shutdown_s']:.2f}s, process {ray['wall_s']:.2f}s.")
    by = {(r["n"], r["method"], r["backend"], r["workers"], r["cache"]): r for r in summary if "error" not in r}
    lines = []
    for n in args.model_counts:
        loc = by.get((n, "ties", "local", 1, "warm"))
        for w in (1, 2):
            ray_r = by.get((n, "ties", "ray", w, "warm"))
            if loc and ray_r:
                lines.append(f"N={n} ray x{w} vs local (warm): set-up +{ray_r['setup_s'] - loc['setup_s']:.2f}s "
                             f"(Ray start-up + actors), passes {ray_r['passes_s'] / loc['passes_s']:.2f}x, "
                             f"wall {ray_r['wall_s'] / loc['wall_s']:.2f}x")
    for line in lines:
        console.print(line)
    neuro = [r for r in summary if r["method"] == "neuro" and "error" not in r]
    if neuro:
        t = Table(title=f"--merge neuro vs --merge ties: local, 1 worker, {(neuro_params or params) / 1e6:.1f}M params, "
                        f"warm (neuro's final pass runs eager kernels; its LowPass is compiled like TIES's)")
        for c in ("N", "ties passes s", "neuro passes s", "ties wall s", "neuro wall s", "ties Mpm/s",
                  "neuro Mpm/s", "neuro/ties (passes)", "neuro per pass"):
            t.add_column(c, justify="left" if c == "neuro per pass" else "right", no_wrap=True)
        for n in args.model_counts:
            nr = by.get((n, "neuro", "local", 1, "warm"))
            tr = by.get((n, "ties-n", "local", 1, "warm")) or by.get((n, "ties", "local", 1, "warm"))
            if not (nr and tr):
                continue
            t.add_row(str(n), f"{tr['passes_s']:.2f}", f"{nr['passes_s']:.2f}", f"{tr['wall_s']:.2f}", f"{nr['wall_s']:.2f}",
                      f"{tr['throughput_passes'] / 1e6:.0f}", f"{nr['throughput_passes'] / 1e6:.0f}",
                      f"{nr['passes_s'] / tr['passes_s']:.2f}x",
                      " ".join(f"{SHORT.get(k, k)} {v:.2f}" for k, v in nr["pass_seconds"].items()))
        console.print(t)


def largest_chunk_elems(store: Path) -> int:
    """The most entries of one chunk of any tensor of the store (what one stacked read holds per array)."""
    from mmer_dist.store.store import Store

    return max(t.rows_per_chunk * t.cols if t.rows > t.rows_per_chunk else t.rows * t.cols
               for t in Store.open(str(store)).catalog().tensors)


def run_scale(args, log) -> list[dict]:
    """Warm merges at each N of each model size, one kernel cache for all (the first merge fills it)."""
    rows = []
    cache = Path(tempfile.mkdtemp(prefix="kernel-cache-", dir=OUT_DIR))
    try:
        for size, counts in args.scale_list:
            nmax = max(counts)
            cs = ensure_checkpoints(size, nmax, log=log)
            src = ensure_store(cs, nmax, log=log)
            chunk = largest_chunk_elems(src)
            for n in counts:
                kinds = (["first"] if not rows else []) + ["warm"] * args.repeats
                for kind in kinds:
                    r = one_merge(src, n, "local", 1, cache, args)
                    r.update(n=n, params=cs.params, cache=kind, chunk_elems=chunk)
                    if "error" in r:
                        log(f"  {cs.params / 1e6:.0f}M N={n} {kind}: [red]{r['error']}[/red]")
                    else:
                        log(f"  {cs.params / 1e6:.0f}M N={n} {kind}: wall {r['wall_s']:.1f}s, merge() {r['merge_s']:.1f}s, "
                            f"passes {json.dumps(r['pass_seconds'])}, RSS {fmt_bytes(r['tree_peak_rss'])} "
                            f"(anon {fmt_bytes(r['tree_peak_anon'])}){', compiled' if r['compiled'] else ''}")
                    rows.append(r)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def print_scale_table(rows: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    from mmer_dist.merge.passes import StoreChunkReader

    t = Table(title="mmer merge of many models (TIES/MMER, K=0.8, global; local, 1 worker, compiled kernels from one "
                    f"cache; median of {args.repeats} warm runs)")
    for c in ("params", "N", "runs", "compiled", "wall s", "merge() s", "passes s", "s/model (wall)",
              "s/model (passes)", "CPU s/model", "RSS tree", "RSS anon", "stacked chunks"):
        t.add_column(c, justify="right", no_wrap=True)
    keys = sorted({(r["params"], r["n"]) for r in rows if "error" not in r})
    for params, n in keys:
        warm = [r for r in rows if (r["params"], r["n"]) == (params, n) and "error" not in r and r["cache"] == "warm"]
        first = [r for r in rows if (r["params"], r["n"]) == (params, n) and "error" not in r and r["cache"] == "first"]
        if not warm:
            continue
        med = lambda k: statistics.median(x[k] for x in warm)  # noqa: E731
        stacked = StoreChunkReader.RING * (n + 1) * warm[0]["chunk_elems"] * 2  # bf16
        t.add_row(f"{params / 1e6:.0f}M", str(n), str(len(warm)), "no" if not any(r["compiled"] for r in warm) else "yes",
                  f"{med('wall_s'):.2f}", f"{med('merge_s'):.2f}", f"{med('passes_s'):.2f}", f"{med('wall_s') / n:.3f}",
                  f"{med('passes_s') / n:.3f}", f"{med('tree_cpu_s') / n:.3f}", fmt_bytes(max(x["tree_peak_rss"] for x in warm)),
                  fmt_bytes(max(x["tree_peak_anon"] for x in warm)), fmt_bytes(stacked))
        for r in first:
            t.add_row(f"{params / 1e6:.0f}M", str(n), "first", "yes" if r["compiled"] else "no", f"{r['wall_s']:.2f}",
                      f"{r['merge_s']:.2f}", f"{r['passes_s']:.2f}", "", "", "", fmt_bytes(r["tree_peak_rss"]),
                      fmt_bytes(r["tree_peak_anon"]), "")
    Console(width=200).print(t)
    print("CPU s/model: the process tree's CPU seconds per model (on a shared machine less noisy than wall time). "
          "RSS tree: peak of the process tree's summed RSS; RSS anon: its anonymous part (file-backed pages, the "
          "chunk files the reader maps, are page cache). stacked chunks: the reader's bound, "
          f"{StoreChunkReader.RING} x (N + 1) x the largest chunk x 2 bytes (bf16), mapped from the page cache; the "
          "only memory that grows with N. first: the merge that filled the empty kernel cache (every later N loads it).")


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    log = Console(stderr=True).print
    if args.scale:
        rows = run_scale(args, log)
        print_scale_table(rows, args)
        write_json(args.out, {"benchmark": "merge_scale", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "argv": sys.argv[1:], "environment": environment(), "runs": rows})
        log(f"wrote {args.out}")
        return 0 if all("error" not in r for r in rows) else 1
    nmax = max(args.model_counts)
    cs = ensure_checkpoints(args.params, nmax, log=log)
    src = ensure_store(cs, nmax, log=log)
    params = cs.params
    rows = []
    ray = ray_startup() if any(b == "ray" for b, _ in args.config_list) else {}
    for n in args.model_counts:
        for backend, workers in args.config_list:
            log(f"[bold]N={n} {backend} x{workers}[/bold]")
            rows += bench_config(src, n, backend, workers, params, args, log)
    neuro_params = None
    if args.neuro:
        neuro_src, neuro_params = src, params
        if args.neuro_params and args.neuro_params != args.params:
            ncs = ensure_checkpoints(args.neuro_params, nmax, log=log)
            neuro_src, neuro_params = ensure_store(ncs, nmax, log=log), ncs.params
        warm_args = argparse.Namespace(**{**vars(args), "cold": False, "repeats": max(1, args.repeats)})
        for n in args.model_counts:
            log(f"[bold]N={n} neuro vs ties (local x1)[/bold]")
            rows += bench_config(neuro_src, n, "local", 1, neuro_params, warm_args, log, method="neuro")
            if neuro_src is not src:
                for r in bench_config(neuro_src, n, "local", 1, neuro_params, warm_args, log, method="ties"):
                    r["method"] = "ties-n"
                    rows.append(r)
    summary = summarize(rows)
    print_tables(summary, ray, args, params, neuro_params)
    write_json(args.out, {"benchmark": "merge_bench", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "argv": sys.argv[1:], "environment": environment(), "params": params,
                          "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
                          "ray_startup": ray, "summary": summary, "runs": rows})
    log(f"wrote {args.out}")
    ok = all("error" not in r for r in rows)
    from bench.mergekit_peer import VENV

    if args.peer or (args.peer is None and (VENV / "bin" / "mergekit-yaml").exists()):
        from bench import mergekit_peer

        peer = ["--params", str(args.params), "--models", args.models, "--repeats", str(max(1, args.repeats - 1)),
                "--warmup", "0", "--no-compare"] + (["--quick"] if args.quick else [])
        ok = mergekit_peer.main(peer) == 0 and ok
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
