"""Throughput of the streaming MMER core: the whole merge (every pass, tau* and packed masks written
to files) for N models of a ~100M-parameter Llama-shaped bf16 checkpoint, read chunk by chunk
from disk.

    python bench/core_throughput.py                      # N = 2, 4, 8 at 100M, compiled kernels
    python bench/core_throughput.py --no-compile --params 20e6
    python bench/core_throughput.py --models 8 --chunk-elems 1048576 --repeats 3

Each N runs in a fresh subprocess, so torch.compile warm-up and peak RSS belong to that
configuration. In the child: one cold merge (includes compilation), then ``--repeats`` steady
merges; the table reports the best steady merge, the compile/warm-up cost as cold - steady, and a
bytes-read bound (reading the same chunks from the page cache into the reader's buffer, no compute,
times the number of passes). Results also go to bench/out/core_throughput.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `mmer_dist` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    OUT_DIR,
    BF16_BYTES,
    CacheSpec,
    FileChunkReader,
    FileChunkWriter,
    Layout,
    LlamaShape,
    ensure_cache,
    environment,
    fmt_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    temp_output_dir,
    write_json,
)

DEFAULT_CHUNK_ELEMS = 1 << 22  # the store's default (mmer_dist/store/layout.py): 4M entries


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the streaming MMER merge core (MergeDriver + run_pass) on synthetic "
                    "bf16 Llama-shaped checkpoints read from disk, one subprocess per model count.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", type=float, default=100e6, help="approximate LLM parameters per model")
    p.add_argument("--layers", type=int, default=12, help="decoder layers of the synthetic model")
    p.add_argument("--models", default="2,4,8", help="comma-separated model counts N to benchmark")
    p.add_argument("--chunk-elems", type=lambda s: int(float(s)), default=DEFAULT_CHUNK_ELEMS,
                   help="entries per chunk (row blocks of whole rows, at least one row)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="ChunkKernels(compile=...): torch.compile (inductor) or eager kernels")
    p.add_argument("--repeats", type=int, default=2, help="steady-state merges after the cold one")
    p.add_argument("--topk", type=float, default=0.8, help="TIES K (fraction kept)")
    p.add_argument("--scope", default="global", choices=["global", "per-tensor"])
    p.add_argument("--cached-high", action="store_true",
                   help="give the driver the high-digit histograms up front, as a store caches them at ingest "
                        "(computed untimed before the merges): the merge then skips HighPass")
    p.add_argument("--reuse-compile-cache", action="store_true",
                   help="let children use the user's inductor cache (default: a fresh one per child, so the "
                        "cold merge pays a real first compile)")
    p.add_argument("--device", default="auto",
                   help="where the kernels run: auto (cuda when visible), cpu, cuda; chunks are read on the host")
    p.add_argument("--block-elems", type=lambda s: int(float(s)), default=1 << 20,
                   help="entries per model in one kernel call (run_pass row blocks)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the child (0: torch default)")
    p.add_argument("--delta-std", type=float, default=2e-4, help="std of fine-tune deltas before bf16 rounding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=OUT_DIR / "core-cache",
                   help="synthetic checkpoints, generated once and reused (one subdirectory per model shape / seed)")
    p.add_argument("--regenerate", action="store_true", help="rebuild the cache even if it matches")
    p.add_argument("--out", type=Path, default=OUT_DIR / "core_throughput.json", help="JSON results")
    p.add_argument("--keep-outputs", action="store_true", help="keep the written tau*/mask files")
    p.add_argument("--child-timeout", type=float, default=3600, help="seconds allowed per N")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model_counts = sorted({int(x) for x in args.models.split(",") if x.strip()})
    if not args.model_counts or min(args.model_counts) < 1:
        p.error("--models needs positive integers")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def cache_spec(args, n_models: int) -> CacheSpec:
    return CacheSpec(LlamaShape.for_params(args.params, args.layers), n_models, seed=args.seed,
                     delta_std=args.delta_std)


# -- the child: one N ---------------------------------------------------------------------------


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def compile_seconds() -> float:
    """Wall seconds torch.compile has spent in this process so far (dynamo + inductor)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("entire_frame_compile", 0.0))
    except Exception:  # noqa: BLE001 - private API; the column just reads 0 without it
        return 0.0


def one_merge(args, layout, chunks, reader, kernels, out_dir: Path, n_models: int, cached_high=None) -> dict:
    """The whole merge, pass by pass (what ``run_local`` does, with a clock around each pass)."""
    from mmer_dist.method import MergeDriver, run_pass

    settings = kernels.settings
    driver = MergeDriver(settings, layout.sizes(), n_models, cached_high=cached_high)
    writer = FileChunkWriter(out_dir, layout, n_models)
    passes = []
    graphs0, comp0 = compiled_graphs(), compile_seconds()
    t_all, c_all = time.perf_counter(), time.process_time()
    try:
        while (request := driver.next_pass()) is not None:
            r0, w0, g0, k0 = reader.seconds, writer.seconds, compiled_graphs(), compile_seconds()
            c0, t0 = time.process_time(), time.perf_counter()
            result = run_pass(request, chunks, reader, kernels, writer=writer, device=args.device,
                              block_elems=args.block_elems)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            driver.accept(result)
            passes.append({"pass": type(request).__name__, "seconds": dt, "cpu_s": cpu, "read_s": reader.seconds - r0,
                           "write_s": writer.seconds - w0, "new_graphs": compiled_graphs() - g0,
                           "compile_s": compile_seconds() - k0})
    finally:
        writer.close()
    wall, cpu = time.perf_counter() - t_all, time.process_time() - c_all
    stats = driver.stats
    assert [p["pass"] for p in passes] == driver.passes_run
    thr = {g: [float(x) for x in t] for g, t in driver.thresholds().items()} if settings.trims else {}
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "passes": passes,
        "passes_run": list(driver.passes_run),
        "new_graphs": compiled_graphs() - graphs0,
        "compile_s": compile_seconds() - comp0,
        "mask_density": [int(c) / max(1, stats.entries) for c in stats.mask_counts],
        "tau_star_nonzero": stats.nonzero / max(1, stats.entries),
        "entries": stats.entries,
        "majority": dict(driver.majority or {}),
        "thresholds": thr,
        "written_bytes": writer.bytes,
    }


def child_main(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mmer_dist.method import MergeSettings
    from mmer_dist.method.kernels import ChunkKernels

    from mmer_dist.merge.options import resolve_device

    args.device = resolve_device(args.device)
    n = args.child
    t_setup = time.perf_counter()
    rss_start = rss_bytes()
    spec = cache_spec(args, n)
    layout = Layout(spec.shape)
    chunks = layout.chunks(args.chunk_elems)
    max_chunk = max(c.numel for c in chunks)
    model_ids = [f"model-{i}" for i in range(n)]
    settings = MergeSettings(topk=args.topk, scope=args.scope, lams=tuple([1.0] * n)).validated(model_ids)
    kernels = ChunkKernels(settings, model_ids, compile=args.compile)
    reader = FileChunkReader(args.cache_dir / spec.tag(), layout, n, max_chunk)
    out_dir = temp_output_dir(f"core-n{n}-")
    reader.buffer.fill_(0)  # touch the buffer so it counts in the baseline RSS
    rss_setup = rss_bytes()
    input_bytes = (n + 1) * layout.numel * BF16_BYTES
    cached_high, high_s = None, 0.0
    try:
        if args.cached_high:  # what ingest would have stored: the high-digit histograms (untimed)
            from mmer_dist.method import run_pass
            from mmer_dist.method.streaming import HighPass

            t0 = time.perf_counter()
            cached_high = run_pass(HighPass(), chunks, reader, kernels, device=args.device,
                                   block_elems=args.block_elems)
            high_s = time.perf_counter() - t0
        # bytes-read bound: the first read also warms the page cache for everyone after it
        reader.read_all(chunks)
        read_once = min(reader.read_all(chunks) for _ in range(2))

        reset_peak_rss()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for r in range(args.repeats + 1):
            reader.seconds = 0.0
            reader.bytes = 0
            res = one_merge(args, layout, chunks, reader, kernels, out_dir, n, cached_high)
            res["read_bytes"] = reader.bytes
            res["peak_rss"] = peak_rss_bytes()
            if r == 0:
                reset_peak_rss()  # steady-state peak separately from the cold run's
            runs.append(res)
            print(f"[N={n}] run {r} ({'cold' if r == 0 else 'steady'}): {res['wall_s']:.2f}s (cpu {res['cpu_s']:.2f}s)  "
                  + "  ".join(f"{p['pass']} {p['seconds']:.2f}s" for p in res["passes"]), file=sys.stderr, flush=True)
        cold, steady = runs[0], runs[1:]
        best = min(steady, key=lambda x: x["wall_s"])
        n_passes = len(best["passes"])
        return {
            "n_models": n,
            "params": layout.numel,
            "shape": dataclasses.asdict(spec.shape),
            "chunks": len(chunks),
            "chunk_elems": args.chunk_elems,
            "max_chunk_elems": max_chunk,
            "compile": args.compile,
            "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "block_elems": args.block_elems,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0,
            "torch_threads": torch.get_num_threads(),
            "cold_wall_s": cold["wall_s"],
            "steady_wall_s": best["wall_s"],
            "steady_walls_s": [x["wall_s"] for x in steady],
            "steady_cpu_s": best["cpu_s"],
            "cold_cpu_s": cold["cpu_s"],
            "warmup_s": cold["wall_s"] - best["wall_s"],
            "compile_s": cold["compile_s"] + sum(x["compile_s"] for x in steady),
            "cold_compile_s": cold["compile_s"],
            "cached_high": bool(args.cached_high),
            "cached_high_s": high_s,
            "cold_new_graphs": cold["new_graphs"],
            "steady_new_graphs": sum(x["new_graphs"] for x in steady),
            "passes_run": best["passes_run"],
            "passes": best["passes"],
            "cold_passes": cold["passes"],
            "param_models_per_s": layout.numel * n / best["wall_s"],
            "input_bytes_per_pass": input_bytes,
            "input_gb_per_s": input_bytes * n_passes / best["wall_s"] / 1e9,
            "read_once_s": read_once,
            "read_bound_s": read_once * n_passes,
            "read_once_gb_per_s": input_bytes / read_once / 1e9,
            "read_in_merge_s": sum(p["read_s"] for p in best["passes"]),
            "write_in_merge_s": sum(p["write_s"] for p in best["passes"]),
            "written_bytes": best["written_bytes"],
            "rss_start": rss_start,
            "rss_after_setup": rss_setup,
            "peak_rss_cold": cold["peak_rss"],
            "peak_rss_steady": best["peak_rss"] if len(steady) == 1 else max(x["peak_rss"] for x in steady),
            "peak_rss": max(x["peak_rss"] for x in runs),
            "setup_s": time.perf_counter() - t_setup,
            "mask_density": best["mask_density"],
            "tau_star_nonzero": best["tau_star_nonzero"],
            "majority": best["majority"],
            "thresholds": best["thresholds"],
        }
    finally:
        reader.close()
        if not args.keep_outputs:
            shutil.rmtree(out_dir, ignore_errors=True)


# -- the parent: cache, one child per N, table ------------------------------------------------------


def run_child(args, n: int) -> dict:
    import resource

    out = temp_output_dir(f"result-n{n}-") / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--child-out", str(out),
           "--params", repr(args.params), "--layers", str(args.layers), "--chunk-elems", str(args.chunk_elems),
           "--compile" if args.compile else "--no-compile", "--repeats", str(args.repeats),
           "--topk", repr(args.topk), "--scope", args.scope, "--threads", str(args.threads),
           "--device", args.device, "--block-elems", str(args.block_elems),
           "--delta-std", repr(args.delta_std), "--seed", str(args.seed), "--cache-dir", str(args.cache_dir)]
    if args.keep_outputs:
        cmd.append("--keep-outputs")
    if args.cached_high:
        cmd.append("--cached-high")
    env = dict(os.environ)
    if not args.reuse_compile_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(out.parent / "inductor-cache")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, timeout=args.child_timeout, env=env)
    elapsed = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            return {"n_models": n, "error": f"child exited with {proc.returncode}"}
        result = json.loads(out.read_text())
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    result["child_s"] = elapsed
    # the largest waited-for descendant (child or its compile workers): an upper bound on the child
    result["peak_rss_children_max"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


SHORT = {"HighPass": "H", "LowPass": "L", "SignPass": "S", "FinalPass": "F"}


def print_table(results: list[dict], args, spec: CacheSpec) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, Console().width))
    layout = Layout(spec.shape)
    mode = "compiled (inductor)" if args.compile else "eager"
    devices = sorted({r.get("device_name", "cpu") for r in results if "error" not in r}) or ["?"]
    title = (f"MMER streaming core on {', '.join(devices)}: {layout.numel / 1e6:.1f}M params/model, bf16, {mode}, "
             f"chunks of {args.chunk_elems:,} entries, K={args.topk}, scope={args.scope}"
             + (", high histograms cached (as after ingest)" if args.cached_high else ""))
    t = Table(title=title)
    ok = [r for r in results if "error" not in r]
    on_gpu = any(r.get("peak_gpu_bytes") for r in ok)
    columns = ("N", "passes", "merge s", "cpu s", "Mparam·models/s", "input GB/s", "read bound s", "x bound",
               "cold s", "compile s", "warm-up s", "peak RSS", "RSS base") + (("peak GPU mem",) if on_gpu else ())
    for name in columns:
        t.add_column(name, justify="left" if name == "passes" else "right", no_wrap=True)
    for r in results:
        if "error" in r:
            t.add_row(str(r["n_models"]), f"[red]{r['error']}[/red]", *[""] * (len(columns) - 2))
            continue
        t.add_row(
            str(r["n_models"]), "+".join(SHORT.get(p, p) for p in r["passes_run"]), f"{r['steady_wall_s']:.2f}",
            f"{r['steady_cpu_s']:.2f}",
            f"{r['param_models_per_s'] / 1e6:.0f}", f"{r['input_gb_per_s']:.2f}",
            f"{r['read_bound_s']:.2f}", f"{r['steady_wall_s'] / r['read_bound_s']:.1f}",
            f"{r['cold_wall_s']:.2f}", f"{r['compile_s']:.2f}", f"{r['warmup_s']:.2f}",
            fmt_bytes(r["peak_rss_steady"]), fmt_bytes(r["rss_after_setup"]),
            *((fmt_bytes(r["peak_gpu_bytes"]),) if on_gpu else ()),
        )
    console.print(t)

    pt = Table(title="per pass (best steady merge; cold = first merge in the process)")
    for name in ("N", "pass", "steady s", "cpu s", "read s", "write s", "engine s", "cold s", "compile s (cold)",
                 "graphs (cold)"):
        pt.add_column(name, justify="left" if name == "pass" else "right", no_wrap=True)
    for r in ok:
        for p, c in zip(r["passes"], r["cold_passes"]):
            pt.add_row(str(r["n_models"]), p["pass"], f"{p['seconds']:.2f}", f"{p['cpu_s']:.2f}", f"{p['read_s']:.2f}",
                       f"{p['write_s']:.2f}", f"{p['seconds'] - p['read_s'] - p['write_s']:.2f}",
                       f"{c['seconds']:.2f}", f"{c['compile_s']:.2f}", str(c["new_graphs"]))
    console.print(pt)
    console.print(
        "merge s: best of the steady merges (all passes, tau* + packed masks written to files). "
        "Mparam·models/s = params x N / merge s. input GB/s = (N + 1) x params x 2 B x passes / merge s. "
        "read bound = passes x one plain read of the same chunks (N models + base) from the page cache "
        "into the reader's buffer; x bound = merge s / read bound. cold = first merge in a fresh "
        "process; compile s = time torch.compile spent compiling (dynamo's own account, all merges); "
        "warm-up = cold - steady. peak RSS: the child's "
        "high-water RSS during the steady merges (RSS base: after imports and the chunk buffer). "
        "engine s = pass time - reader - writer time (kernels + driver + selection bookkeeping). "
        "cpu s = process CPU time (all threads) of the same merge/pass: compare it with wall time "
        "to see whether the machine was shared.")
    for r in ok:
        dens = ", ".join(f"{d:.3f}" for d in r["mask_density"])
        console.print(f"N={r['n_models']}: steady merges {', '.join(f'{w:.2f}' for w in r['steady_walls_s'])} s; "
                      f"graphs compiled in steady merges {r['steady_new_graphs']}; "
                      + (f"high histograms (ingest, untimed) {r['cached_high_s']:.2f} s; " if r["cached_high"] else "")
                      + "peak RSS cold "
                      f"{fmt_bytes(r['peak_rss_cold'])}; tau* nonzero {r['tau_star_nonzero']:.3f}; "
                      f"mask density [{dens}]")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = child_main(args)
        write_json(args.child_out, result)
        return 0
    from rich.console import Console

    console = Console(stderr=True)
    want = cache_spec(args, max(args.model_counts))
    spec = ensure_cache(args.cache_dir / want.tag(), want, regenerate=args.regenerate,
                        log=console.print)
    layout = Layout(spec.shape)
    console.print(f"model: {spec.shape} -> {layout.numel / 1e6:.2f}M params; "
                  f"{len(layout.chunks(args.chunk_elems))} chunks; cache {args.cache_dir / spec.tag()}")
    results = []
    for n in args.model_counts:
        console.print(f"[bold]N = {n}[/bold] ({'compiled' if args.compile else 'eager'}) ...")
        results.append(run_child(args, n))
    print_table(results, args, spec)
    payload = {
        "benchmark": "core_throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("child", "child_out")},
        "shape": dataclasses.asdict(spec.shape),
        "params": layout.numel,
        "cache": spec.as_json(),
        "environment": environment(),
        "results": results,
    }
    write_json(args.out, payload)
    Console(stderr=True).print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
