"""`mmer add` against what a user would do without it: ingest the new model and re-merge all of them.

    python bench/add_bench.py                      # N = 8, 32 served models of ~25M params; local backend
    python bench/add_bench.py --quick              # ~20M params, N = 2, 4
    python bench/add_bench.py --models 4 --params 100e6 --backend ray --workers 2 --repeats 3

Inputs: synthetic Llama-shaped bf16 HF checkpoints (``bench/checkpoints.py``). For each N a store
holds the base and m0 .. m{N-1} merged and served as version 1 (built once, then cloned with its
chunk files hard-linked for every timed run). The kernel cache is a new directory per run of the
bench, filled by one untimed ``mmer merge`` of the N served models: warm for N only (the kernels
take the number of models as a run-time size, so an add of the (N+1)-th model compiles nothing;
a run that did is flagged). Timed, each the real CLI in its own process:

- ``add``: ``mmer add --model mK`` (ingest mK, then the derived version: mK's trim threshold only,
  the served version's thresholds and majority reused, one final pass that counts the sign sums;
  if the counted majority differs where a sum is exactly 0, a ZeroSumPass rewrites just those
  entries from values the final pass kept). It runs once for each of ``--new-models`` different
  new models mN, mN+1, ...: how often the majority flips, and how often a rewrite is needed;
- ``re-merge``: ``mmer ingest --model mN`` then ``mmer merge --models m0 .. mN`` (every threshold,
  the sign counts and the final pass over all N + 1 models);
- ``merge only``: the re-merge's ``mmer merge`` alone (mN already ingested), the compute a
  re-merge needs beyond the ingest.

Both give bit-identical versions (``tests/test_live_versions.py``, ``tests/test_many_models.py``);
here each run's tau* density is printed next to the other's as a check. Reported: wall seconds
(median), bytes read by the process tree (rchar: reads through system calls, page-cache hits
too), the passes (F = FinalPass, Z = ZeroSumPass, L = LowPass), the entries whose sign sum is
exactly 0 (decided by the majority), and what the add leaves in the store: the new model's chunks
and the new version's tau* and masks (one bit per parameter per model). The endpoint side of an
add (the switch of a running server to the new version, without a failed request) is measured
by ``mmer demo`` and ``tests/test_serve_live.py``.

Results go to ``bench/out/add_bench.json``.
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

from bench.checkpoints import MMER, STORE_DIR, STORE_FORMAT, clone_store, ensure_checkpoints, ensure_store, model_id  # noqa: E402
from bench.common import OUT_DIR, environment, fmt_bytes, write_json  # noqa: E402
from bench.procs import run_timed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=25e6, help="parameters per model (default 25M)")
    p.add_argument("--models", default="8,32", help="served model counts N, comma-separated (default 8,32)")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=int, default=1, help="shard workers (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed re-merge and merge-only runs per N (default 2; "
                   "the median is shown)")
    p.add_argument("--new-models", type=int, default=3, help="different (N+1)-th models to add, one timed add each "
                   "(default 3): how often the majority flips and a rewrite is needed")
    p.add_argument("--quick", action="store_true", help="~20M params, N = 2, 4, one run each")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", type=Path, default=OUT_DIR / "add_bench.json")
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.models, args.repeats, args.new_models = 20e6, "2,4", 1, 1
    args.model_counts = [int(x) for x in args.models.split(",")]
    return args


KERNEL_CACHE: dict[str, str] = {}  # MMER_KERNEL_CACHE for every command of this run of the bench


def mmer(*args: str, timeout: float):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "RAY_DEDUP_LOGS": "0", "TQDM_DISABLE": "1", **KERNEL_CACHE}
    m = run_timed([str(MMER), *args], env=env, timeout=timeout)
    if m.rc != 0:
        raise RuntimeError(f"mmer {' '.join(args)} failed ({m.rc}):\n{m.stderr[-3000:]}")
    return m


def status(store: Path) -> dict:
    return json.loads(mmer("status", "--store", str(store), "--json", timeout=600).stdout)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def served_template(cs, n: int, args, log) -> Path:
    """base + m0..m{n-1} with version 1 merged and served, built once per (checkpoints, n)."""
    path = STORE_DIR / f"{cs.root.name}-n{n}-served"
    marker = path / ".bench-complete"
    if marker.exists() and marker.read_text() == STORE_FORMAT:
        return path
    ingested = ensure_store(cs, n, log=log)
    clone_store(ingested, path)
    mmer("merge", "--store", str(path), "--quiet", "--models", *[model_id(i) for i in range(n)], timeout=args.timeout)
    marker.write_text(STORE_FORMAT)
    return path


def run_case(template: Path, cs, n: int, case: str, args, new_index: int | None = None) -> dict:
    store = clone_store(template, STORE_DIR / f"add-bench-{os.getpid()}")
    k = n if new_index is None else new_index
    new, path = model_id(k), str(cs.model(k))
    backend = ["--backend", args.backend, "--workers", str(args.workers)]
    try:
        before = du(store)
        if case == "add":
            runs = [mmer("add", "--store", str(store), "--model", new, "--path", path, "--modality", "text",
                         "--format", "llama", "--quiet", *backend, timeout=args.timeout)]
        elif case == "warm-up merge":
            runs = [mmer("merge", "--store", str(store), "--quiet", *backend, "--models",
                         *[model_id(i) for i in range(n)], timeout=args.timeout)]
        else:
            ingest = mmer("ingest", "--store", str(store), "--model", new, "--path", path, "--modality", "text",
                          "--format", "llama", "--quiet", timeout=args.timeout)
            merge = mmer("merge", "--store", str(store), "--quiet", *backend,
                         "--models", *[model_id(i) for i in range(n)], new, timeout=args.timeout)
            runs = [merge] if case == "merge only" else [ingest, merge]
        st = status(store)
        served, version = st["versions"][0], st["versions"][-1]
        details = version["details"]
        decided = details.get("decided_by_majority", {})
        model_bytes = du(store / "models" / new) if (store / "models" / new).exists() else 0
        version_bytes = du(store / "versions" / f"{version['version']:06d}")
        masks = store / "versions" / f"{version['version']:06d}" / "masks"
        tau_star = store / "versions" / f"{version['version']:06d}" / "tau_star"
        codecs = tau_star_codecs(store, version["version"]) if case == "add" and new_index == n else None
        return {"case": case, "n": n, "new": new, "wall_s": sum(r.wall_s for r in runs), "tau_star_codecs": codecs,
                "read_bytes": sum(r.tree_read_bytes for r in runs), "store_growth": du(store) - before,
                "model_bytes": model_bytes, "version_bytes": version_bytes,
                "mask_bytes": du(masks) if masks.exists() else 0, "tau_star_bytes": du(tau_star) if tau_star.exists() else 0,
                "passes": version["passes"], "tau_star_density": version["tau_star_density"],
                "serving": (st.get("serving") or {}).get("version"), "params": st["parameters"],
                "compiled": any("mmer: compiling" in r.stderr for r in runs),
                "majority_flipped": served["details"]["majority"] != details["majority"],
                "decided_by_majority": sum(decided.values()) if isinstance(decided, dict) else decided,
                "rewritten": details.get("majority_rewritten", 0)}
    finally:
        shutil.rmtree(store, ignore_errors=True)


def tau_star_codecs(store: Path, version: int) -> dict:
    """tau*'s bytes as stored (float32, uncompressed) against what two lossless codecs would make of
    them, with their decode speed (a server reads tau* once per version it loads)."""
    from numcodecs import Blosc, Zstd

    from mmer_dist.store import layout
    from mmer_dist.store.store import Store

    st = Store.open(str(store))
    raw = b"".join(st.read_rows(f"{layout.version_tau_star(version)}/{t.name}", 0, t.rows).numpy().tobytes()
                   for t in st.catalog().tensors)
    out = {"raw": len(raw)}
    for name, codec in (("zstd-1", Zstd(level=1)), ("zstd-3", Zstd(level=3)),
                        ("shuffle+zstd-1", Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE, typesize=4)),
                        ("bitshuffle+zstd-1", Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE, typesize=4))):
        t0 = time.perf_counter()
        encoded = codec.encode(raw)
        t1 = time.perf_counter()
        codec.decode(encoded)
        t2 = time.perf_counter()
        out[name] = {"bytes": len(encoded), "encode_s": t1 - t0, "decode_s": t2 - t1}
    return out


def print_codecs(codecs: dict, params: int) -> None:
    raw = codecs["raw"]
    parts = [f"{name} {c['bytes'] / raw:.0%} ({8 * c['bytes'] / params:.1f} bits/param, decode "
             f"{raw / c['decode_s'] / 1e6:.0f} MB/s)" for name, c in codecs.items() if name != "raw"]
    print(f"tau* stored as float32: {fmt_bytes(raw)} ({8 * raw / params:.0f} bits/param, 2x a bf16 checkpoint); "
          f"compressed: {'; '.join(parts)}")


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["n"], r["case"]) for r in rows}, key=lambda k: (k[0], ("add", "re-merge", "merge only").index(k[1]))):
        group = [r for r in rows if (r["n"], r["case"]) == key]
        out.append({**group[-1], "wall_s": statistics.median(r["wall_s"] for r in group),
                    "read_bytes": statistics.median(r["read_bytes"] for r in group), "runs": len(group),
                    "compiled": any(r["compiled"] for r in group), "passes_seen": sorted({"+".join(r["passes"]) for r in group}),
                    "flipped": sum(r["majority_flipped"] for r in group),
                    "rewrites": sum("ZeroSumPass" in r["passes"] for r in group)})
    return out


SHORT = {"FinalPass": "F", "ZeroSumPass": "Z", "LowPass": "L", "SignPass": "S", "HighPass": "H"}


def print_table(summary: list[dict], args, params: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mmer add vs ingest + re-merge ({params / 1e6:.0f}M params per model, {args.backend} "
                  f"x{args.workers}; add: median of {args.new_models} new models, others of {args.repeats})")
    for col in ("N served", "case", "runs", "seconds", "vs re-merge", "read", "passes", "compiled", "majority flipped",
                "zero sums", "tau* density", "store +", "of which masks"):
        table.add_column(col, justify="right" if col not in ("case", "passes") else "left")
    remerge = {r["n"]: r for r in summary if r["case"] == "re-merge"}
    for r in summary:
        ratio = r["wall_s"] / remerge[r["n"]]["wall_s"] if r["n"] in remerge else float("nan")
        passes = ", ".join("+".join(SHORT.get(p, p) for p in ps.split("+")) for ps in r["passes_seen"])
        flips = f"{r['flipped']}/{r['runs']}" if r["case"] == "add" else ""
        zero = f"{r['decided_by_majority'] / r['params']:.2%}" if r["case"] == "add" else ""
        table.add_row(str(r["n"]), r["case"], str(r["runs"]), f"{r['wall_s']:.1f}", f"{ratio:.2f}x",
                      fmt_bytes(r["read_bytes"]), passes, "yes" if r["compiled"] else "no", flips, zero,
                      f"{r['tau_star_density']:.4f}", fmt_bytes(r["store_growth"]), fmt_bytes(r["mask_bytes"]))
    Console(width=180).print(table)
    for r in (x for x in summary if x["case"] == "add"):
        n = r["n"]
        print(f"N={n}: the majority flipped in {r['flipped']} of {r['runs']} adds and {r['rewrites']} needed a "
              f"ZeroSumPass (a rewrite of the {r['decided_by_majority'] / r['params']:.2%} of entries whose sign sum is "
              f"exactly 0, from values kept by the final pass: no model read twice). One more model costs the store "
              f"{fmt_bytes(r['model_bytes'])} of its own chunks + {fmt_bytes(r['mask_bytes'] / (n + 1))} of mask "
              f"({8 * r['mask_bytes'] / (n + 1) / r['params']:.2f} bits/param); tau* is {fmt_bytes(r['tau_star_bytes'])} "
              f"({8 * r['tau_star_bytes'] / r['params']:.1f} bits/param)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    log = Console(stderr=True).print
    nmax = max(args.model_counts)
    cs = ensure_checkpoints(args.params, nmax + args.new_models, log=log)
    cache = Path(tempfile.mkdtemp(prefix="kernel-cache-", dir=OUT_DIR))
    KERNEL_CACHE["MMER_KERNEL_CACHE"] = str(cache)
    rows = []
    try:
        for n in args.model_counts:
            template = served_template(cs, n, args, log)
            log(f"N={n} warm-up: a merge of the {n} served models (fills the kernel cache, the page cache)")
            run_case(template, cs, n, "warm-up merge", args)
            for i in range(args.new_models):
                log(f"N={n} add m{n + i} ({i + 1}/{args.new_models})")
                rows.append(run_case(template, cs, n, "add", args, new_index=n + i))
            for rep in range(args.repeats):
                for case in ("re-merge", "merge only"):
                    log(f"N={n} {case} (run {rep + 1}/{args.repeats})")
                    rows.append(run_case(template, cs, n, case, args))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    summary = summarize(rows)
    print_table(summary, args, cs.params)
    codecs = next((r["tau_star_codecs"] for r in rows if r.get("tau_star_codecs")), None)
    if codecs:
        print_codecs(codecs, cs.params)
    write_json(args.out, {"benchmark": "add_bench", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "argv": sys.argv[1:], "environment": environment(), "params": cs.params,
                          "settings": {k: v for k, v in vars(args).items() if k != "out"}, "summary": summary,
                          "runs": rows})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
