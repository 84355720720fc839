"""mergekit's TIES vs `mmer merge` on the same checkpoints: time, peak memory, and how the results differ.

    python bench/mergekit_peer.py                     # N = 2, 4, 8 of ~100M params
    python bench/mergekit_peer.py --quick             # ~20M params, N = 2, one pair
    python bench/mergekit_peer.py --setup-only        # just create the mergekit venv

mergekit runs from its own virtual environment (``bench/.venvs/mergekit``, git-ignored; created on
first use with ``python3 -m venv``, then ``pip install torch==2.13.0`` first — the CPU wheel this
machine has, so pip does not pull a CUDA build — then ``pip install mergekit==0.1.5``). Its config:
``merge_method: ties``, ``base_model`` the base checkpoint, every model ``density: 0.8, weight:
1.0``, ``parameters: {normalize: true}``, ``dtype: bfloat16``; run as ``mergekit-yaml config.yml
OUT --lazy-unpickle --no-copy-tokenizer --quiet`` on CPU.

Timed, each as a whole process (A = mergekit, B = mmer; medians of ``--repeats`` interleaved pairs,
ratio pair by pair, > 1: mmer faster; peak RSS = the process's ``wait4`` max RSS, what
``/usr/bin/time -v`` prints, the largest process of a script):

- merge only: ``mergekit-yaml`` vs ``mmer merge --compile`` on a store ingested beforehand (local
  backend; the store keeps each version: tau* float32 + N packed masks);
- end to end: ``mergekit-yaml`` (it reads the checkpoints directly) vs a fresh store's ``mmer ingest
  --manifest`` (the base and the N models in one process) + ``mmer merge`` (one shell script,
  summed); ``--ingest per-model`` runs ``mmer ingest --base`` + N x ``mmer ingest --model`` instead;
- each warm (mmer's compiled kernels already in its on-disk cache, ``MMER_KERNEL_CACHE``, as on any
  machine after its first merge) and cold (an empty kernel cache: the first merge on a new machine
  compiles them; one pair, after the warm ones).

Outputs differ by design, not by error: mergekit keeps exactly k = int(0.8 n) entries per tensor (by
sort order, so ties at the threshold are cut arbitrarily) and elects + where the sign sum is >= 0;
mmer keeps every entry with |tau| >= the k-th magnitude (all ties) and elects the majority sign where
the sum is 0. ``--compare`` quantifies it: mergekit's theta* against ``mmer export --merged --method
ties --scope per-tensor`` (same K, per-tensor like mergekit), entry by entry in bf16.

Results go to ``bench/out/mergekit_peer.json``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.checkpoints import MMER, STORE_DIR, CheckpointSet, clone_store, ensure_checkpoints, ensure_store, model_id  # noqa: E402
from bench.common import BENCH_DIR, OUT_DIR, environment, fmt_bytes, write_json  # noqa: E402
from bench.procs import run_timed  # noqa: E402

VENV = BENCH_DIR / ".venvs" / "mergekit"
TORCH_PIN = "torch==2.13.0"
MERGEKIT_PIN = "mergekit==0.1.5"
WORK = OUT_DIR / "mergekit"


def ensure_venv(venv: Path, log=print) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    log(f"creating {venv} ({TORCH_PIN} first, then {MERGEKIT_PIN})")
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    subprocess.run(pip + [MERGEKIT_PIN], check=True)
    check = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True)
    log(f"pip check: {check.stdout.strip() or check.stderr.strip()}")
    return exe


def mergekit_config(cs: CheckpointSet, n: int, path: Path) -> Path:
    lines = ["merge_method: ties", f"base_model: {cs.base}", "models:"]
    for i in range(n):
        lines += [f"  - model: {cs.model(i)}", "    parameters: {density: 0.8, weight: 1.0}"]
    lines += ["parameters: {normalize: true}", "dtype: bfloat16", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def e2e_script(cs: CheckpointSet, n: int, store: Path, cache: Path, ingest: str = "manifest") -> str:
    """ingest base + N models + merge, the way a user runs it; ``cache`` is the kernel cache.
    ``ingest``: ``manifest`` (one ``mmer ingest --manifest`` process for the base and the N models)
    or ``per-model`` (one ``mmer ingest`` process each, N + 1 of them)."""
    q = shlex.quote
    mmer, at = q(str(MMER)), q(str(store))
    lines = ["set -e", f"rm -rf {at}"]
    if ingest == "manifest":
        manifest = store.parent / f"{store.name}-manifest.yaml"
        entries = [f"  - {{id: {model_id(i)}, path: {cs.model(i)}, modality: text, format: llama}}" for i in range(n)]
        manifest.write_text("\n".join([f"base: {cs.base}", "models:", *entries, ""]))
        lines.append(f"{mmer} ingest --store {at} --manifest {q(str(manifest))} --quiet")
    else:
        lines.append(f"{mmer} ingest --store {at} --base {q(str(cs.base))} --quiet")
        for i in range(n):
            lines.append(f"{mmer} ingest --store {at} --model {model_id(i)} --path {q(str(cs.model(i)))} "
                         f"--modality text --format llama --quiet")
    lines.append(f"{mmer} merge --store {at} --compile --quiet")
    return "\n".join([f"export MMER_KERNEL_CACHE={q(str(cache))} TORCHINDUCTOR_CACHE_DIR={q(str(cache))}/inductor",
                       *lines])


def measure(cmd: list[str], env=None, timeout=1800) -> dict:
    m = run_timed(cmd, env=env, sample=False, timeout=timeout)
    if m.rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {m.rc}:\n{m.stderr[-3000:]}")
    return {"wall_s": m.wall_s, "maxrss": m.maxrss, "cpu_s": m.rusage_cpu_s}


def pairs(a_cmd, b_cmd, repeats: int, warmup: int, a_env=None, b_env=None, log=print, label="") -> dict:
    for _ in range(warmup):
        measure(a_cmd, a_env)
        measure(b_cmd, b_env)
    a_runs, b_runs = [], []
    for r in range(repeats):
        a_runs.append(measure(a_cmd, a_env))
        b_runs.append(measure(b_cmd, b_env))
        log(f"  {label} pair {r}: A {a_runs[-1]['wall_s']:.2f}s ({fmt_bytes(a_runs[-1]['maxrss'])}), "
            f"B {b_runs[-1]['wall_s']:.2f}s ({fmt_bytes(b_runs[-1]['maxrss'])})")
    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(a_runs, b_runs)]
    med = lambda runs, k: statistics.median(x[k] for x in runs)  # noqa: E731
    return {"a": {"wall_s": med(a_runs, "wall_s"), "maxrss": max(x["maxrss"] for x in a_runs), "cpu_s": med(a_runs, "cpu_s"),
                  "walls": [x["wall_s"] for x in a_runs]},
            "b": {"wall_s": med(b_runs, "wall_s"), "maxrss": max(x["maxrss"] for x in b_runs), "cpu_s": med(b_runs, "cpu_s"),
                  "walls": [x["wall_s"] for x in b_runs]},
            "ratio_median": statistics.median(ratios), "ratios": ratios}


def compare(mergekit_out: Path, mmer_out: Path, base: Path) -> dict:
    """Entry-by-entry difference of two bf16 theta* checkpoints (and of their task vectors)."""
    from safetensors import safe_open

    def opener(d: Path):
        files = sorted(d.glob("*.safetensors"))
        handles = [safe_open(str(f), framework="pt") for f in files]
        return {k: h for h in handles for k in h.keys()}

    a, b, c = opener(mergekit_out), opener(mmer_out), opener(base)
    keys = sorted(set(a) & set(c))
    missing = sorted(set(c) - set(b))
    total = differ = 0
    abs_diff = tau_abs = 0.0
    worst = (0.0, "")
    for k in keys:
        if k not in b:
            continue
        x, y, z = a[k].get_tensor(k).float(), b[k].get_tensor(k).float(), c[k].get_tensor(k).float()
        d = (x != y)
        total += x.numel()
        differ += int(d.sum())
        abs_diff += float((x - y).abs().sum())
        tau_abs += float(((x - z).abs()).sum())
        frac = float(d.float().mean())
        if frac > worst[0]:
            worst = (frac, k)
    return {"entries": total, "differ": differ, "differ_frac": differ / max(1, total),
            "mean_abs_diff": abs_diff / max(1, total), "mean_abs_tau_mergekit": tau_abs / max(1, total),
            "rel_l1": abs_diff / max(tau_abs, 1e-30), "worst_tensor": worst[1], "worst_tensor_frac": worst[0],
            "tensors_missing_in_mmer_export": missing}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--params", type=float, default=100e6)
    p.add_argument("--models", default="2,4,8")
    p.add_argument("--repeats", type=int, default=2, help="A/B pairs per comparison (after --warmup of each); "
                   "0: no timing (with --compare: only the result comparison)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True, help="also ingest + merge vs mergekit")
    p.add_argument("--ingest", choices=["manifest", "per-model"], default="manifest",
                   help="end to end: one `mmer ingest --manifest` for the base and all models, or one process each")
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                   help="also one pair each with an empty kernel cache (the first merge on a new machine)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="quantify mergekit theta* vs `mmer export --merged --method ties --scope per-tensor`")
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--setup-only", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: ~20M params, N=2, 1 pair, no warm-up")
    p.add_argument("--out", type=Path, default=OUT_DIR / "mergekit_peer.json")
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.models, args.repeats, args.warmup = 20e6, "2", 1, 0
    args.model_counts = sorted({int(x) for x in args.models.split(",") if x.strip()})
    return args


def print_tables(results: list[dict], params: int, args) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(200, Console().width))
    t = Table(title=f"mergekit 0.1.5 TIES vs mmer (N x {params / 1e6:.1f}M-param bf16 models, CPU, whole processes; "
                    f"median of {args.repeats} interleaved pairs)")
    for c in ("N", "comparison", "mergekit s", "mmer s", "mergekit/mmer (pairs)", "mergekit Mpm/s", "mmer Mpm/s",
              "mergekit peak RSS", "mmer peak RSS", "mergekit CPU s", "mmer CPU s"):
        t.add_column(c, justify="left" if c == "comparison" else "right", no_wrap=True)
    for r in results:
        n = r["n"]
        for name, key in (("merge only, warm", "merge"), ("merge only, cold", "merge_cold"),
                          ("end to end (ingest + merge), warm", "e2e"), ("end to end (ingest + merge), cold", "e2e_cold")):
            x = r.get(key)
            if not x:
                continue
            t.add_row(str(n), name, f"{x['a']['wall_s']:.2f}", f"{x['b']['wall_s']:.2f}", f"{x['ratio_median']:.2f}x",
                      f"{params * n / x['a']['wall_s'] / 1e6:.1f}", f"{params * n / x['b']['wall_s'] / 1e6:.1f}",
                      fmt_bytes(x["a"]["maxrss"]), fmt_bytes(x["b"]["maxrss"]), f"{x['a']['cpu_s']:.1f}",
                      f"{x['b']['cpu_s']:.1f}")
    console.print(t)
    console.print("mergekit: `mergekit-yaml config.yml OUT --lazy-unpickle --no-copy-tokenizer` (writes theta*, bf16). "
                  "mmer merge: `mmer merge --compile` (local backend; writes tau* float32 + N packed masks as a new store "
                  f"version). end to end: a new store, `mmer ingest` of the base and N models ({args.ingest}), then the "
                  "merge (the peak RSS is the largest process). warm: mmer's compiled kernels are in its on-disk "
                  "cache (every merge after a machine's first); cold: an empty cache, so the run compiles them. "
                  "Mpm/s = params x N / s. Peak RSS: wait4 max RSS (= /usr/bin/time -v). Ratio > 1: mmer faster.")
    cmp_rows = [r for r in results if r.get("compare")]
    if cmp_rows:
        t = Table(title="mergekit theta* vs `mmer export --merged --method ties --scope per-tensor --topk 0.8` (bf16, entry by entry)")
        for c in ("N", "entries", "differ", "differ %", "mean |diff|", "mean |tau*| (mergekit)", "rel. L1 of diff",
                  "worst tensor", "its differ %"):
            t.add_column(c, justify="left" if c == "worst tensor" else "right", no_wrap=True)
        for r in cmp_rows:
            c = r["compare"]
            t.add_row(str(r["n"]), f"{c['entries']:,}", f"{c['differ']:,}", f"{100 * c['differ_frac']:.2f}",
                      f"{c['mean_abs_diff']:.2e}", f"{c['mean_abs_tau_mergekit']:.2e}", f"{c['rel_l1']:.3f}",
                      c["worst_tensor"], f"{100 * c['worst_tensor_frac']:.2f}")
        console.print(t)
        console.print("Expected, not errors (DESIGN.md): mergekit keeps exactly k entries per tensor by sort order and "
                      "elects + where the sign sum is >= 0; mmer keeps all entries tied at the threshold and elects the "
                      "majority sign where the sum is 0. rel. L1 = sum |mergekit - mmer| / sum |mergekit tau*|.")


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    log = Console(stderr=True).print
    exe = ensure_venv(args.venv, log)
    if args.setup_only:
        return 0
    nmax = max(args.model_counts)
    cs = ensure_checkpoints(args.params, nmax, log=log)
    src = ensure_store(cs, nmax, log=log)
    WORK.mkdir(parents=True, exist_ok=True)
    warm_cache = WORK / "kernel-cache"  # warm after the first mmer merge (kept across runs)

    def env_for(cache: Path) -> dict:
        return {**os.environ, "MMER_KERNEL_CACHE": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                "PYTHONWARNINGS": "ignore"}

    results = []
    for n in args.model_counts:
        log(f"[bold]N={n}[/bold]")
        row = {"n": n}
        cfg = mergekit_config(cs, n, WORK / f"config-n{n}.yml")
        mk_out = WORK / f"out-n{n}"
        mk_cmd = [str(exe), str(cfg), str(mk_out), "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"]
        store = clone_store(src, STORE_DIR / f"peer-n{n}")
        mmer_cmd = [str(MMER), "merge", "--store", str(store), "--compile", "--quiet",
                    "--models", *[model_id(i) for i in range(n)]]
        try:
            if args.repeats > 0 and not warm_cache.exists():  # fill the kernel cache once
                measure(mmer_cmd, env_for(warm_cache))
            if args.repeats > 0:
                row["merge"] = pairs(mk_cmd, mmer_cmd, args.repeats, args.warmup, None, env_for(warm_cache), log,
                                     "merge only, warm")
                if args.cold:
                    cold = Path(tempfile.mkdtemp(prefix="kernel-cache-cold-", dir=WORK))
                    row["merge_cold"] = pairs(mk_cmd, mmer_cmd, 1, 0, None, env_for(cold), log, "merge only, cold")
                    shutil.rmtree(cold, ignore_errors=True)
            elif args.compare and not (mk_out / "config.json").exists():
                measure(mk_cmd)
            if args.e2e and args.repeats > 0:
                e2e_store = STORE_DIR / f"peer-e2e-n{n}"
                runs = [("e2e", warm_cache, args.repeats)]
                if args.cold:
                    runs.append(("e2e_cold", Path(tempfile.mkdtemp(prefix="kernel-cache-cold-", dir=WORK)), 1))
                for key, cache, repeats in runs:
                    script = WORK / f"{key}-n{n}.sh"
                    script.write_text(e2e_script(cs, n, e2e_store, cache, args.ingest))
                    if cache == warm_cache and not any(cache.glob("high-*.pt2")):
                        measure(["bash", str(script)])  # ingest's kernel too, before timing "warm"
                    row[key] = pairs(mk_cmd, ["bash", str(script)], repeats, 0, None, None, log, key)
                    if cache != warm_cache:
                        shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(e2e_store, ignore_errors=True)
            if args.compare:
                # export merges every model of its store: use a store holding exactly these N
                exact = ensure_store(cs, n, log=log)
                exp = Path(tempfile.mkdtemp(prefix=f"export-n{n}-", dir=WORK))
                measure([str(MMER), "export", "merged", "--store", str(exact), "--method", "ties", "--scope", "per-tensor",
                         "--topk", "0.8", "--out", str(exp), "--overwrite", "--quiet"], env_for(warm_cache))
                row["compare"] = compare(mk_out, exp, cs.base)
                shutil.rmtree(exp, ignore_errors=True)
        finally:
            shutil.rmtree(store, ignore_errors=True)
        results.append(row)
    print_tables(results, cs.params, args)
    write_json(args.out, {"benchmark": "mergekit_peer", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "argv": sys.argv[1:], "environment": environment(), "params": cs.params,
                          "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results})
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
