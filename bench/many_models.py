"""Serving speed when the traffic spans more models than dense slots (issue 26): one table.

    python bench/many_models.py                 # N = 4, 16, 64 models of ~31M parameters
    python bench/many_models.py --quick         # N = 4, 16 toy models, 8 clients, fewer tokens
    python bench/many_models.py --checkout DIR  # the same against another checkout (the baseline)

Builds (once, cached under ``bench/out/many-models/``) a Llama base with a tokenizer and chat
template and N text fine-tunes of it (random task vectors of a fine-tune's size, bf16), ingests
and merges them. Then, for each N, it starts the real endpoint, ``mmer serve --slot-budget`` of
two models' dense weights (one stage, CPU), as a subprocess, and drives it with the official
``openai`` client from C concurrent client threads (C = 8 and 32), each sending streamed greedy
chat requests back to back for ``--seconds``, the model of each request drawn from the traffic:

- ``one``: every request to one model (the reference the ratio is taken against);
- ``uniform``: each model equally likely;
- ``zipf``: model k (1-based) with probability proportional to 1 / k (Zipf, s = 1.0).

Per row (each measured ``--repeats`` times, the traffic patterns interleaved so that the load of
a shared machine drifting moves them alike): aggregate completion tokens/s in the measured window
(median), the ratio to ``one`` at the same N and C (median of the per-repeat ratios), p50 / p99
time to first token and inter-token latency over every repeat's requests. Then the stage's resident bytes by
part for each N (``DecoderStage.memory`` of the same store loaded in-process, as the endpoint's
stage actor loads it) and the bytes per model beyond the smallest N, in bits per parameter
(slots and KV caches apart). ``--checkout`` runs ``mmer serve`` from another source tree (e.g. a
worktree of the commit before issue 26: the baseline) against the same stores and clients.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `mmer_dist` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import OUT_DIR, environment, write_json  # noqa: E402

CACHE = OUT_DIR / "many-models"
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="4,16,64", help="N values (model counts)")
    p.add_argument("--clients", default="8,32", help="concurrent client counts")
    p.add_argument("--traffic", default="one,uniform,zipf", help="traffic patterns")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--slot-models", type=float, default=2.0, help="slot budget, in dense weight sets")
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per row (after a warm-up)")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds of the same traffic before measuring")
    p.add_argument("--repeats", type=int, default=2, help="each row measured this many times, patterns interleaved")
    p.add_argument("--max-tokens", type=int, default=24, help="completion tokens per request")
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--checkout", type=Path, default=None, help="run `mmer serve` from this source tree")
    p.add_argument("--quick", action="store_true", help="toy models, N = 4 and 16, 8 clients, short rows")
    p.add_argument("--json", type=Path, default=OUT_DIR / "many_models.json")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.clients, args.hidden, args.layers, args.intermediate, args.vocab = "4,16", "8", 128, 2, 256, 1024
        args.seconds, args.warmup, args.max_tokens, args.repeats = 8.0, 3.0, 12, 1
    return args


# -- the stores ---------------------------------------------------------------------------------


def build_store(args, ns: list[int]) -> tuple[str, dict[int, int]]:
    """One store with max(ns) text fine-tunes of one base ingested, and for each N a version
    merged over the first N of them; cached. Returns (url, N -> version)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmer_dist.demo.tiny_models import build_tokenizer
    from mmer_dist.ingest import ingest_base, ingest_model
    from mmer_dist.merge.engine import MergeRequest, merge
    from mmer_dist.merge.local import LocalBackend
    from mmer_dist.store.store import Store

    root = CACHE / f"h{args.hidden}-l{args.layers}-i{args.intermediate}-v{args.vocab}"
    store = root / "store"
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    tokenizer = build_tokenizer(args.vocab)
    base_dir = root / "base"
    if not (base_dir / ".complete").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        (base_dir / ".complete").write_text("")
    if not (store / ".base").exists():
        shutil.rmtree(store, ignore_errors=True)
        ingest_base(str(store), base_dir, progress=False)
        (store / ".base").write_text("")
    base_state = None
    ingested = {m.id for m in Store.open(str(store)).catalog().models}
    for i in range(max(ns)):
        model_dir = root / "models" / f"m{i}"
        if not (model_dir / ".complete").exists():
            if base_state is None:
                base_state = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).state_dict()
            g = torch.Generator().manual_seed(1000 + i)
            # a fine-tune's task vector: ~1% of each weight's spread, every entry moved
            tuned = {k: (v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=g)).bfloat16()
                     for k, v in base_state.items()}
            model = LlamaForCausalLM(config).to(torch.bfloat16)
            model.load_state_dict(tuned)
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            (model_dir / ".complete").write_text("")
        if f"m{i}" not in ingested:
            ingest_model(str(store), f"m{i}", model_dir, "text", fmt="llama", progress=False)
            print(f"  ingested m{i}", flush=True)
    versions_file = root / "versions.json"
    versions = {int(k): v for k, v in json.loads(versions_file.read_text()).items()} if versions_file.exists() else {}
    for n in ns:
        if n not in versions:
            record = merge(str(store), MergeRequest(models=tuple(f"m{i}" for i in range(n))), LocalBackend(),
                           workers=1, progress=False)
            versions[n] = record.version
            versions_file.write_text(json.dumps(versions))
            print(f"  merged N={n} as version {record.version}", flush=True)
    return str(store), {n: versions[n] for n in ns}


def params_of(args) -> int:
    h, i, v, L = args.hidden, args.intermediate, args.vocab, args.layers
    kv = max(1, h // 256) * 64
    return 2 * v * h + h + L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)


# -- the endpoint -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """``mmer serve`` as a subprocess (from ``checkout`` when given), until ``stop``."""

    def __init__(self, store: str, version: int, slot_budget: int, checkout: Path | None, log: Path):
        self.port = free_port()
        root = checkout or REPO
        env = {**os.environ, "PYTHONPATH": str(root), "MMER_API_TOKEN": ""}
        cmd = [sys.executable, "-m", "mmer_dist.cli", "serve", "--store", store, "--version", str(version),
               "--port", str(self.port),
               "--slot-budget", str(slot_budget), "--device", "cpu"]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mmer serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"mmer serve was not ready within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# -- the clients --------------------------------------------------------------------------------


def traffic(pattern: str, n_models: int, rng: random.Random):
    models = [f"m{i}" for i in range(n_models)]
    if pattern == "one":
        return lambda: models[0]
    if pattern == "uniform":
        return lambda: rng.choice(models)
    if pattern == "zipf":
        weights = [1.0 / (k + 1) for k in range(n_models)]
        return lambda: rng.choices(models, weights)[0]
    raise ValueError(f"unknown traffic {pattern!r}")


def prompt_text(i: int, words: int) -> str:
    from mmer_dist.demo.tiny_models import WORDS

    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words))


def drive(url: str, clients: int, pattern: str, n_models: int, args) -> dict:
    """``clients`` threads asking back to back for warm-up + measured seconds; the measured
    window's completion tokens, TTFTs and inter-token gaps. At the window's end each client stops
    reading its stream (the endpoint aborts that request), once it has its first token, so the
    TTFT of every request sent in the window is counted."""
    import openai

    t_start = time.perf_counter()
    t_measure, t_end = t_start + args.warmup, t_start + args.warmup + args.seconds
    lock = threading.Lock()
    tokens_in_window, ttfts, gaps, errors = [0], [], [], []

    def client(c: int) -> None:
        rng = random.Random(c * 7919 + int(t_start))
        pick = traffic(pattern, n_models, rng)
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
        i = 0
        while time.perf_counter() < t_end:
            sent = time.perf_counter()
            times = []
            try:
                stream = api.chat.completions.create(
                    model=pick(), messages=[{"role": "user", "content": prompt_text(c * 1000 + i, args.prompt_words)}],
                    temperature=0, max_tokens=args.max_tokens, stream=True)
                with stream:
                    for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            times.append(time.perf_counter())
                            if times[-1] >= t_end:
                                break
            except openai.OpenAIError as e:
                with lock:
                    errors.append(str(e)[:200])
                continue
            i += 1
            with lock:
                tokens_in_window[0] += sum(t_measure <= t < t_end for t in times)
                if times and t_measure <= sent < t_end:
                    ttfts.append(times[0] - sent)
                gaps.extend(b - a for a, b in zip(times, times[1:]) if t_measure <= a < t_end)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"tok_s": tokens_in_window[0] / args.seconds, "ttfts": ttfts, "gaps": gaps, "errors": errors[:5],
            "n_errors": len(errors)}


def summarise(runs: list[dict], one_runs: list[dict]) -> dict:
    """Repeats of one row: median tokens/s, median of the per-repeat ratios to ``one`` (each
    repeat of ``one`` ran right before it, so load drifting on a shared machine cancels), latency
    percentiles over every repeat's requests."""
    ttfts = [t for r in runs for t in r["ttfts"]]
    gaps = [g for r in runs for g in r["gaps"]]
    ratios = [r["tok_s"] / o["tok_s"] for r, o in zip(runs, one_runs) if o["tok_s"] > 0]
    return {"tok_s": statistics.median(r["tok_s"] for r in runs), "tok_s_runs": [round(r["tok_s"], 2) for r in runs],
            "ratio": statistics.median(ratios) if ratios else float("nan"),
            "ttft_p50_ms": 1000 * _pct(ttfts, 50), "ttft_p99_ms": 1000 * _pct(ttfts, 99),
            "itl_p50_ms": 1000 * _pct(gaps, 50), "itl_p99_ms": 1000 * _pct(gaps, 99), "requests": len(ttfts),
            "n_errors": sum(r["n_errors"] for r in runs), "errors": [e for r in runs for e in r["errors"]][:5]}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# -- the table ----------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    ns = [int(x) for x in args.models.split(",")]
    client_counts = [int(x) for x in args.clients.split(",")]
    patterns = args.traffic.split(",")
    params = params_of(args)
    slot_bytes = 2 * params  # a dense set in bf16 (the store's dtype, which the endpoint computes in)
    budget = int((args.slot_models + 0.05) * slot_bytes)
    print(f"models of {params / 1e6:.1f}M parameters; slot budget {budget / 1e6:.0f} MB "
          f"({args.slot_models:g} dense sets); endpoint from {args.checkout or REPO}", flush=True)
    store, versions = build_store(args, ns)
    rows = []
    CACHE.mkdir(parents=True, exist_ok=True)
    for n in ns:
        endpoint = Endpoint(store, versions[n], budget, args.checkout, CACHE / f"serve-n{n}.log")
        try:
            endpoint.wait_ready()
            for clients in client_counts:
                runs: dict[str, list[dict]] = {p: [] for p in patterns}
                for repeat in range(args.repeats):  # patterns interleaved: a load change hits them alike
                    for pattern in patterns:
                        run = drive(endpoint.url, clients, pattern, n, args)
                        runs[pattern].append(run)
                        print(f"  N={n:3d} C={clients:3d} {pattern:8s} #{repeat} {run['tok_s']:8.1f} tok/s"
                              + (f"  {run['n_errors']} errors" if run["n_errors"] else ""), flush=True)
                for pattern in patterns:
                    rows.append({"models": n, "clients": clients, "traffic": pattern,
                                 **summarise(runs[pattern], runs.get("one", runs[pattern]))})
        finally:
            endpoint.stop()
    memory = {n: stage_memory(store, versions[n], budget) for n in ns}
    result = {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()},
              "params_per_model": params, "slot_budget_bytes": budget, "rows": rows, "memory": memory,
              "bits_per_extra_model": bits_per_extra_model(memory, params)}
    write_json(args.json, result)
    print_table(result)
    return result


def stage_memory(store: str, version: int, budget: int) -> dict[str, int]:
    """What the endpoint's stage holds for this store, by part (``DecoderStage.memory``; the same
    code loads it in-process, in the endpoint's dtype), before any request: no slots, no KV."""
    from mmer_dist.model.engine import LocalPipeline
    from mmer_dist.store.weights import VersionWeights

    pipe = LocalPipeline.build(VersionWeights.open(store, version), 1, slot_budget_bytes=budget)
    try:
        return pipe.stages[0].memory()
    finally:
        pipe.stages[0].close()


def bits_per_extra_model(memory: dict[int, dict[str, int]], params: int) -> dict[int, float]:
    """Resident bytes (theta_pre, tau*, masks, extra rows, per-model vectors, pinned theta_bar; the
    slots and KV caches apart) per model beyond the smallest N, per parameter, in bits."""
    totals = {n: sum(v for k, v in m.items() if k not in ("slots", "kv_caches")) for n, m in memory.items()}
    if len(totals) < 2:
        return {}
    n0 = min(totals)
    return {n: 8 * (b - totals[n0]) / ((n - n0) * params) for n, b in totals.items() if n != n0}


def print_table(result: dict) -> None:
    print("\n| N | clients | traffic | tok/s | ratio | TTFT p50 / p99 ms | ITL p50 / p99 ms | requests |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        print(f"| {r['models']} | {r['clients']} | {r['traffic']} | {r['tok_s']:.1f} | {r['ratio']:.2f} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} | "
              f"{r['requests']}{' (' + str(r['n_errors']) + ' errors)' if r['n_errors'] else ''} |")
    print("\nresident bytes per stage (MB): " + "; ".join(
        f"N={n}: " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in m.items()) for n, m in result["memory"].items()))
    if result["bits_per_extra_model"]:
        print("resident bits per parameter per extra model (slots and KV apart): " +
              ", ".join(f"N={n}: {b:.3f}" for n, b in result["bits_per_extra_model"].items()))


if __name__ == "__main__":
    main()
