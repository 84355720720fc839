"""Ingest throughput and memory, and what the store costs per model.

    python bench/ingest_bench.py                      # ~250 MB and ~1 GB checkpoints, store bytes at N = 8
    python bench/ingest_bench.py --quick              # ~40 MB / ~100 MB, N = 2
    python bench/ingest_bench.py --sizes 500e6 --shard-bytes 4e8 --repeats 3

Part 1, ingest: for each size (approximate LLM parameters, bf16), synthetic Llama-shaped HF
checkpoints (``bench/checkpoints.py``: base + one fine-tune) are ingested with the real CLI entry
point (``mmer ingest --base`` into a new store, then ``mmer ingest --model --format llama``) in a
fresh child process per run. Reported: checkpoint bytes (the safetensors files), wall seconds of
the ingest call (after interpreter start and imports) and of the whole process, MB/s of checkpoint
bytes, and memory: the child's high-water RSS (VmHWM, what ``/usr/bin/time -v`` calls maximum
resident set size), its RSS after imports, and the peaks of anonymous (heap) and file-backed RSS
sampled every 10 ms (safetensors memory-maps the checkpoint: pages of it that the process has
touched count in RSS as file-backed pages, which the kernel can drop, unlike heap). Before each
run the checkpoint's pages are evicted from the page cache (``posix_fadvise DONTNEED``; disable
with ``--warm-cache``) and dirty pages are flushed, so a run reads from disk.

Part 2, store bytes: a store with the base and N fine-tunes of ~100M parameters (``--store-params``,
``--store-models``) is merged once (``mmer merge``, local backend); then the bytes on disk of each
model's LLM arrays, of tau* (float32), of one model's packed masks (raw: sum of rows x ceil(cols/8);
as stored: zstd chunks) are set against the raw checkpoint, and MMER's serving footprint (base +
tau* + 1 bit/param/model) against N + 1 full checkpoints.

Results go to ``bench/out/ingest_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.checkpoints import (  # noqa: E402
    DEFAULT_SHARD_BYTES,
    STORE_DIR,
    CheckpointSet,
    clone_store,
    ensure_checkpoints,
    ensure_store,
    model_id,
    run_mmer,
)
from bench.common import OUT_DIR, environment, fmt_bytes, write_json  # noqa: E402

MB = 1e6


# -- the parent --------------------------------------------------------------------------------------


def evict(paths: list[Path]) -> None:
    """Flush dirty pages, then drop these files' pages from the page cache."""
    os.sync()
    for p in paths:
        for f in (p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def ingest_once(argv: list[str], checkpoint: Path, warm: bool) -> dict:
    out = OUT_DIR / f"ingest-child-{os.getpid()}.json"
    if warm:
        os.sync()
    else:
        evict([checkpoint])
    # the child imports only what `mmer ingest` imports (not this benchmark's helpers)
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import _ingest_child; _ingest_child.main()"
    cmd = [sys.executable, "-c", code, json.dumps(argv), str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, _, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    try:
        res = json.loads(out.read_text())
    except (OSError, ValueError):
        raise RuntimeError(f"ingest child failed: {' '.join(argv)}\n{stdout[-2000:]}\n{stderr[-4000:]}") from None
    finally:
        out.unlink(missing_ok=True)
    if res["rc"] != 0:
        raise RuntimeError(f"mmer {' '.join(argv)} exited {res['rc']}:\n{stderr[-4000:]}")
    res.update(process_s=wall, maxrss=rusage.ru_maxrss * 1024, cpu_s=rusage.ru_utime + rusage.ru_stime)
    return res


def ingest_size(params: float, args, log) -> dict:
    cs = ensure_checkpoints(params, 1, shard_bytes=int(args.shard_bytes), log=log)
    work = STORE_DIR / f"ingest-bench-{cs.root.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = {}
    try:
        base_runs, model_runs = [], []
        for r in range(args.repeats):
            store = work / f"base-{r}"
            base_runs.append(ingest_once(["ingest", "--store", str(store), "--base", str(cs.base), "--quiet"],
                                         cs.base, args.warm_cache))
            target = clone_store(store, work / f"model-{r}")
            model_runs.append(ingest_once(["ingest", "--store", str(target), "--model", "m0", "--path", str(cs.model(0)),
                                           "--modality", "text", "--format", "llama", "--quiet"],
                                          cs.model(0), args.warm_cache))
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            log(f"  {cs.params / 1e6:.0f}M run {r}: base {base_runs[-1]['seconds']:.2f}s, "
                f"model {model_runs[-1]['seconds']:.2f}s, peak RSS {fmt_bytes(model_runs[-1]['vm_hwm'])}")
        for what, runs, path in (("base", base_runs, cs.base), ("fine-tune", model_runs, cs.model(0))):
            nbytes = cs.file_bytes(path)
            secs = statistics.median(x["seconds"] for x in runs)
            rows[what] = {
                "params": cs.params, "checkpoint_bytes": nbytes, "files": sorted(p.name for p in path.glob("*.safetensors")),
                "seconds_median": secs, "seconds": [x["seconds"] for x in runs],
                "process_s_median": statistics.median(x["process_s"] for x in runs),
                "cpu_s_median": statistics.median(x["cpu_s"] for x in runs),
                "mb_per_s": nbytes / secs / MB,
                "mb_per_s_process": nbytes / statistics.median(x["process_s"] for x in runs) / MB,
                "vm_hwm": max(x["vm_hwm"] for x in runs), "rss_after_imports": min(x["rss_after_imports"] for x in runs),
                "peak_anon": max(x["peak_anon"] for x in runs), "anon_after_imports": min(x["anon_after_imports"] for x in runs),
                "peak_file": max(x["peak_file"] for x in runs), "runs": runs,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"params_target": params, "shape": cs.shape.__dict__, "params": cs.params, "rows": rows}


# -- store bytes ------------------------------------------------------------------------------------


def disk_bytes(path: Path) -> tuple[int, int, int]:
    """(bytes on disk, apparent bytes, files) under path."""
    disk = apparent = files = 0
    for f in path.rglob("*"):
        if f.is_file():
            st = f.stat()
            disk += st.st_blocks * 512
            apparent += st.st_size
            files += 1
    return disk, apparent, files


def store_bytes(args, log) -> dict:
    cs: CheckpointSet = ensure_checkpoints(args.store_params, args.store_models, log=log)
    src = ensure_store(cs, args.store_models, log=log)
    store = clone_store(src, STORE_DIR / f"bytes-{cs.root.name}-n{args.store_models}")
    try:
        t0 = time.perf_counter()
        run_mmer("merge", "--store", str(store), "--quiet", "--compile" if args.compile else "--no-compile")
        merge_s = time.perf_counter() - t0
        status = json.loads(run_mmer("status", "--store", str(store), "--json").stdout)
        version = status["versions"][-1]
        vdir = store / "versions" / f"{version['version']:06d}"
        # raw packed size of one model's masks: rows x ceil(cols / 8) per tensor (2-D view)
        tensors = json.loads(run_mmer("status", "--store", str(store), "--json").stdout)["parameters"]
        from mmer_dist.store.store import Store

        catalog = Store.open(str(store)).catalog()
        packed_raw = sum(t.rows * ((t.cols + 7) // 8) for t in catalog.tensors)
        params = sum(t.numel for t in catalog.tensors)
        assert params == tensors
        ckpt = cs.file_bytes(cs.model(0))
        # the masks of all N models are stacked in one array per tensor: a model's share is 1/N
        masks_all = disk_bytes(vdir / "masks")
        masks = (masks_all[0] / args.store_models, masks_all[1] / args.store_models)
        per_model = []
        for i in range(args.store_models):
            m = model_id(i)
            llm = disk_bytes(store / "models" / m / "llm")
            meta = disk_bytes(store / "models" / m / "meta")
            per_model.append({"model": m, "llm_disk": llm[0], "llm_apparent": llm[1], "llm_files": llm[2],
                              "meta_disk": meta[0], "meta_apparent": meta[1],
                              "masks_disk": masks[0], "masks_apparent": masks[1], "mask_density": version["mask_density"][i]})
        tau = disk_bytes(vdir / "tau_star")
        base = disk_bytes(store / "base" / "llm")
        whole = disk_bytes(store)
        n = args.store_models
        mean_masks = statistics.mean(x["masks_apparent"] for x in per_model)
        serving = base[1] + tau[1] + sum(x["masks_apparent"] for x in per_model)
        return {
            "params": params, "n_models": n, "merge_s": merge_s, "checkpoint_bytes": ckpt,
            "checkpoint_weight_bytes": params * 2, "packed_mask_raw": packed_raw,
            "tau_star_disk": tau[0], "tau_star_apparent": tau[1], "base_disk": base[0], "base_apparent": base[1],
            "store_disk": whole[0], "store_apparent": whole[1], "per_model": per_model,
            "mask_zstd_ratio": mean_masks / packed_raw, "serving_bytes": serving,
            "n_plus_1_checkpoints": (n + 1) * ckpt, "version": version["version"],
            "tau_star_density": version["tau_star_density"],
        }
    finally:
        shutil.rmtree(store, ignore_errors=True)


# -- output -----------------------------------------------------------------------------------------


def print_tables(results: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(200, Console().width))
    t = Table(title=f"ingest (bf16 HF safetensors -> zarr store), median of {args.repeats}, "
                    f"{'warm' if args.warm_cache else 'cold'} page cache")
    for c in ("params", "what", "checkpoint", "files", "ingest s", "MB/s", "process s", "MB/s proc", "CPU s",
              "peak RSS", "RSS imports", "peak anon", "anon imports", "peak file"):
        t.add_column(c, justify="left" if c in ("what", "files") else "right", no_wrap=True)
    for size in results["ingest"]:
        for what, r in size["rows"].items():
            t.add_row(f"{r['params'] / 1e6:.0f}M", what, fmt_bytes(r["checkpoint_bytes"]), str(len(r["files"])),
                      f"{r['seconds_median']:.2f}", f"{r['mb_per_s']:.0f}", f"{r['process_s_median']:.2f}",
                      f"{r['mb_per_s_process']:.0f}", f"{r['cpu_s_median']:.2f}", fmt_bytes(r["vm_hwm"]),
                      fmt_bytes(r["rss_after_imports"]), fmt_bytes(r["peak_anon"]), fmt_bytes(r["anon_after_imports"]),
                      fmt_bytes(r["peak_file"]))
    console.print(t)
    console.print("ingest s: the `mmer ingest` call inside the child (after interpreter start + imports); process s: "
                  "the whole child (MB/s proc over it); CPU s: the child's user + sys. MB/s = checkpoint bytes / s. "
                  "peak RSS: the child's VmHWM (= max RSS of /usr/bin/time -v); RSS imports: after importing the CLI; "
                  "peak anon / peak file: RssAnon / RssFile peaks sampled every 10 ms (file = pages of the "
                  "memory-mapped checkpoint and of libraries; the kernel can drop them, unlike anon).")
    if len(results["ingest"]) >= 2:
        a, b = results["ingest"][0]["rows"]["fine-tune"], results["ingest"][-1]["rows"]["fine-tune"]
        console.print(f"fine-tune ingest, {fmt_bytes(a['checkpoint_bytes'])} -> {fmt_bytes(b['checkpoint_bytes'])} "
                      f"({b['checkpoint_bytes'] / a['checkpoint_bytes']:.1f}x): peak RSS {fmt_bytes(a['vm_hwm'])} -> "
                      f"{fmt_bytes(b['vm_hwm'])}, peak anon {fmt_bytes(a['peak_anon'])} -> {fmt_bytes(b['peak_anon'])}, "
                      f"anon above imports {fmt_bytes(a['peak_anon'] - a['anon_after_imports'])} -> "
                      f"{fmt_bytes(b['peak_anon'] - b['anon_after_imports'])}")
    s = results.get("store_bytes")
    if s:
        ck = s["checkpoint_bytes"]
        t = Table(title=f"store bytes after one merge of N={s['n_models']} models of {s['params'] / 1e6:.1f}M params (bf16)")
        for c in ("what", "bytes", "vs one checkpoint", "note"):
            t.add_column(c, justify="left" if c in ("what", "note") else "right")
        pm = s["per_model"]
        rows = [
            ("raw checkpoint (one model, safetensors)", ck, ""),
            ("base LLM arrays", s["base_apparent"], "zarr, bf16 as uint16, uncompressed"),
            ("one model's LLM arrays (m0)", pm[0]["llm_apparent"], f"mean over models {fmt_bytes(statistics.mean(x['llm_apparent'] for x in pm))}; kept for later merges / add / --original export"),
            ("one model's meta (histograms, keymap)", pm[0]["meta_apparent"], "ingest-time high-digit histograms"),
            ("tau* (float32, one per version)", s["tau_star_apparent"], f"nonzero {s['tau_star_density']:.3f}"),
            ("one model's packed masks, raw (params/8)", s["packed_mask_raw"], "1 bit/param"),
            ("one model's packed masks, stored (zstd-1, 1/N of the stacked arrays)", pm[0]["masks_apparent"],
             f"density {pm[0]['mask_density']:.3f}; zstd/raw = {s['mask_zstd_ratio']:.3f} (mean over models)"),
            (f"MMER serving footprint: base + tau* + {s['n_models']} masks", s["serving_bytes"],
             f"vs {s['n_models']} + 1 full checkpoints = {fmt_bytes(s['n_plus_1_checkpoints'])}: "
             f"{s['serving_bytes'] / s['n_plus_1_checkpoints']:.2f}x"),
            ("whole store (base + N models + meta + version)", s["store_apparent"], f"on disk {fmt_bytes(s['store_disk'])}"),
        ]
        for what, nbytes, note in rows:
            t.add_row(what, fmt_bytes(nbytes), f"{nbytes / ck:.3f}", note)
        console.print(t)
        n = s["n_models"]
        console.print(f"per added model: {fmt_bytes(pm[0]['llm_apparent'] + pm[0]['meta_apparent'])} of inputs "
                      f"(its LLM arrays + meta) plus {fmt_bytes(pm[0]['masks_apparent'])} of masks per version; "
                      f"serving N models costs {fmt_bytes(s['base_apparent'] + s['tau_star_apparent'])} + "
                      f"{fmt_bytes(statistics.mean(x['masks_apparent'] for x in pm))} x N "
                      f"(= {(s['base_apparent'] + s['tau_star_apparent']) / ck:.2f} + {s['mask_zstd_ratio'] * s['packed_mask_raw'] / ck:.3f} x N "
                      f"checkpoints) vs (N + 1) x 1.00; at N={n}: {s['serving_bytes'] / s['n_plus_1_checkpoints']:.2f}x. "
                      f"merge took {s['merge_s']:.1f}s (whole process).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="125e6,500e6",
                   help="comma-separated approximate LLM parameter counts (bf16: 2 bytes each)")
    p.add_argument("--repeats", type=int, default=2, help="ingest runs per size (median reported)")
    p.add_argument("--shard-bytes", type=float, default=DEFAULT_SHARD_BYTES,
                   help="checkpoint shard size (smaller than the model: sharded with an index.json)")
    p.add_argument("--warm-cache", action="store_true", help="leave the checkpoint in the page cache")
    p.add_argument("--store-params", type=float, default=100e6, help="model size for the store-bytes part")
    p.add_argument("--store-models", type=int, default=8, help="N for the store-bytes part (0: skip it)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="merge with --compile")
    p.add_argument("--quick", action="store_true", help="small smoke run: 20M/50M params, 1 repeat, N=2 at 20M")
    p.add_argument("--out", type=Path, default=OUT_DIR / "ingest_bench.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.store_params, args.store_models = "20e6,50e6", 1, 20e6, 2
        args.compile = False
    args.size_list = [float(x) for x in args.sizes.split(",") if x.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    log = Console(stderr=True).print
    results = {"benchmark": "ingest_bench", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
               "environment": environment(), "ingest": []}
    for params in args.size_list:
        log(f"[bold]ingest at ~{params / 1e6:.0f}M params[/bold]")
        results["ingest"].append(ingest_size(params, args, log))
    if args.store_models > 0:
        log(f"[bold]store bytes: N={args.store_models} at ~{args.store_params / 1e6:.0f}M[/bold]")
        results["store_bytes"] = store_bytes(args, log)
    print_tables(results, args)
    write_json(args.out, results)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
