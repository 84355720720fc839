"""`mmer add` against what a user would do without it: ingest the new model and re-merge all of them.

    python bench/add_bench.py                      # N = 2, 4, 8 served models of ~100M params; local backend
    python bench/add_bench.py --quick              # ~20M params, N = 2, 4
    python bench/add_bench.py --models 4 --backend ray --workers 2 --repeats 3

Inputs: synthetic Llama-shaped bf16 HF checkpoints (``bench/checkpoints.py``). For each N a store
holds the base and m0 .. m{N-1} merged and served as version 1 (built once, then cloned with its
chunk files hard-linked for every timed run). Timed, each the real CLI in its own process:

- ``add``: ``mmer add --model mN`` (ingest mN, then the derived version: mN's trim threshold only,
  the served version's thresholds and majority reused, one final pass with its sign check);
- ``re-merge``: ``mmer ingest --model mN`` then ``mmer merge --models m0 .. mN`` (every threshold,
  the sign pass and the final pass over all N + 1 models);
- ``merge only``: the re-merge's ``mmer merge`` alone (mN already ingested), the compute a
  re-merge needs beyond the ingest.

Both give bit-identical versions (``tests/test_live_versions.py``); here each run's τ* density is
printed next to the other's as a check. Reported: wall seconds (median), bytes read by the
process tree (rchar: reads through system calls, page-cache hits too), and what the add leaves
in the store: the new model's chunks and the new version's τ* and masks (one bit per parameter per
model). The endpoint side of an add (the switch of a running server to the new version, without a
failed request) is measured by ``mmer demo`` and ``tests/test_serve_live.py``.

Results go to ``bench/out/add_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.checkpoints import MMER, STORE_DIR, STORE_FORMAT, clone_store, ensure_checkpoints, ensure_store, model_id  # noqa: E402
from bench.common import OUT_DIR, environment, fmt_bytes, write_json  # noqa: E402
from bench.procs import run_timed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=100e6, help="parameters per model (default 100M)")
    p.add_argument("--models", default="2,4,8", help="served model counts N, comma-separated (default 2,4,8)")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=int, default=1, help="shard workers (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per case (default 2; the median is shown)")
    p.add_argument("--warmup", type=int, default=1, help="untimed merges over the N + 1 models first (default 1): "
                   "the first process to need the kernels for a model count compiles them into the kernel cache")
    p.add_argument("--quick", action="store_true", help="~20M params, N = 2, 4, one run each")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", type=Path, default=OUT_DIR / "add_bench.json")
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.models, args.repeats, args.warmup = 20e6, "2,4", 1, 1
    args.model_counts = [int(x) for x in args.models.split(",")]
    return args


def mmer(*args: str, timeout: float):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "RAY_DEDUP_LOGS": "0", "TQDM_DISABLE": "1"}
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


def run_case(template: Path, cs, n: int, case: str, args) -> dict:
    store = clone_store(template, STORE_DIR / f"add-bench-{os.getpid()}")
    new, path = model_id(n), str(cs.model(n))
    backend = ["--backend", args.backend, "--workers", str(args.workers)]
    try:
        before = du(store)
        if case == "add":
            runs = [mmer("add", "--store", str(store), "--model", new, "--path", path, "--modality", "text",
                         "--format", "llama", "--quiet", *backend, timeout=args.timeout)]
        else:
            ingest = mmer("ingest", "--store", str(store), "--model", new, "--path", path, "--modality", "text",
                          "--format", "llama", "--quiet", timeout=args.timeout)
            merge = mmer("merge", "--store", str(store), "--quiet", *backend,
                         "--models", *[model_id(i) for i in range(n + 1)], timeout=args.timeout)
            runs = [merge] if case == "merge only" else [ingest, merge]
        st = status(store)
        version = st["versions"][-1]
        model_bytes = du(store / "models" / new) if (store / "models" / new).exists() else 0
        version_bytes = du(store / "versions" / f"{version['version']:06d}")
        masks = store / "versions" / f"{version['version']:06d}" / "masks"
        return {"case": case, "n": n, "wall_s": sum(r.wall_s for r in runs),
                "read_bytes": sum(r.tree_read_bytes for r in runs), "store_growth": du(store) - before,
                "model_bytes": model_bytes, "version_bytes": version_bytes,
                "mask_bytes": du(masks) if masks.exists() else 0, "passes": version["passes"],
                "tau_star_density": version["tau_star_density"], "serving": (st.get("serving") or {}).get("version")}
    finally:
        shutil.rmtree(store, ignore_errors=True)


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["n"], r["case"]) for r in rows}, key=lambda k: (k[0], ("add", "re-merge", "merge only").index(k[1]))):
        group = [r for r in rows if (r["n"], r["case"]) == key]
        out.append({**group[-1], "wall_s": statistics.median(r["wall_s"] for r in group),
                    "read_bytes": statistics.median(r["read_bytes"] for r in group), "runs": len(group)})
    return out


def print_table(summary: list[dict], args, params: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mmer add vs ingest + re-merge ({params / 1e6:.0f}M params per model, {args.backend} "
                  f"x{args.workers}, median of {args.repeats})")
    for col in ("N served", "case", "seconds", "vs add", "read", "passes", "tau* density", "store +", "of which masks"):
        table.add_column(col, justify="right" if col not in ("case", "passes") else "left")
    adds = {r["n"]: r for r in summary if r["case"] == "add"}
    for r in summary:
        ratio = r["wall_s"] / adds[r["n"]]["wall_s"] if r["n"] in adds else float("nan")
        table.add_row(str(r["n"]), r["case"], f"{r['wall_s']:.1f}", f"{ratio:.2f}x", fmt_bytes(r["read_bytes"]),
                      "+".join(p[0] for p in r["passes"]), f"{r['tau_star_density']:.4f}", fmt_bytes(r["store_growth"]),
                      fmt_bytes(r["mask_bytes"]))
    Console(width=160).print(table)
    for n, r in adds.items():
        per_model = r["mask_bytes"] / (n + 1)
        print(f"N={n}: one more model costs the store {fmt_bytes(r['model_bytes'])} of its own chunks (its task "
              f"vector's source) + {fmt_bytes(per_model)} of mask; a version over {n + 1} models is "
              f"{fmt_bytes(r['version_bytes'])} (tau* + masks)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    log = Console(stderr=True).print
    nmax = max(args.model_counts)
    cs = ensure_checkpoints(args.params, nmax + 1, log=log)
    rows = []
    for n in args.model_counts:
        template = served_template(cs, n, args, log)
        for _ in range(args.warmup):
            log(f"N={n} warm-up (a merge over {n + 1} models)")
            run_case(template, cs, n, "merge only", args)
        for rep in range(args.repeats):
            for case in ("add", "re-merge", "merge only"):
                log(f"N={n} {case} (run {rep + 1}/{args.repeats})")
                rows.append(run_case(template, cs, n, case, args))
    summary = summarize(rows)
    print_table(summary, args, cs.params)
    write_json(args.out, {"benchmark": "add_bench", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "argv": sys.argv[1:], "environment": environment(), "params": cs.params,
                          "settings": {k: v for k, v in vars(args).items() if k != "out"}, "summary": summary,
                          "runs": rows})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
