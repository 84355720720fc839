"""Serving engine speed: the routed stage against plain transformers on the same weights.

    python bench/engine_bench.py                 # ~100M Llama, 3 merged models, batch 1 / 4 / 16
    python bench/engine_bench.py --quick         # a toy size (seconds)

One run builds (once, cached under bench/out/) a store of a ~100M-parameter Llama base and three
synthetic fine-tunes (``bench/checkpoints.py``), merges them, exports model m0, and then times,
on the same prompts (random token ids, ``--prompt-len`` each, ``--new-tokens`` greedy tokens):

- plain transformers ``generate`` on the exported theta_hat_0 (``LlamaForCausalLM``, KV cache);
- the engine (``mmer_dist.model``) in retention mode for m0 (theta_hat_0 for every token);
- the engine in expansion mode with 3 weight sets: each prompt's middle third split into media
  tokens of m1 and m2 (random encoder rows), the rest text through theta_bar — the routing cost;

reporting prefill latency (the step that takes the whole batch's prompts; time to first token)
and decode throughput (generated tokens per second over the following steps), medians of
``--repeats``; then the time to rebuild one theta_hat slot on the stage's device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `mmer_dist` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.checkpoints import ensure_checkpoints, ensure_store, run_mmer  # noqa: E402
from bench.common import OUT_DIR, environment, write_json  # noqa: E402
from mmer_dist.model import (  # noqa: E402
    Engine, EngineLimits, Expansion, GenerationRequest, LocalPipeline, MediaPart, Retention, SamplingParams,
    TextPart, plan_prompt,
)
from mmer_dist.store.store import Store  # noqa: E402
from mmer_dist.store.weights import VersionWeights  # noqa: E402
from mmer_dist.store.weightsets import WeightSet  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy model (~5M), batch 1 and 4, few tokens")
    p.add_argument("--params", type=float, default=100e6, help="LLM parameters of the synthetic base")
    p.add_argument("--batches", default="1,4,16", help="batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stages", type=int, default=1, help="pipeline stages of the engine (in this process)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype of both sides")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=OUT_DIR / "engine_bench.json")
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.batches, args.prompt_len, args.new_tokens, args.repeats = 5e6, "1,4", 16, 8, 2
    return args


def merged_store(params: float) -> Path:
    layers = 12 if params >= 50e6 else 4
    cs = ensure_checkpoints(params, 3, layers=layers)
    path = ensure_store(cs, 3)
    if Store.open(str(path)).catalog().latest_version() is None:
        run_mmer("merge", "--store", str(path), "--quiet", "--device", "cpu")
    return path


def export_m0(store: Path) -> Path:
    out = store.parent / f"{store.name}-export-m0"
    if not (out / "config.json").exists():
        run_mmer("export", "model", "--store", str(store), "--model", "m0", "--out", str(out), "--quiet")
    return out


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def time_hf(model, ids: torch.Tensor, new_tokens: int, device) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of ``generate`` on a batch of equal-length prompts."""
    ids = ids.to(device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(device)
        return time.perf_counter() - t0

    first = run(1)
    total = run(new_tokens)
    return first, ids.shape[0] * (new_tokens - 1) / max(1e-9, total - first)


def time_engine(engine: Engine, requests: list[GenerationRequest], device) -> tuple[float, float]:
    """(prefill seconds: the first step, which takes every prompt; decode tokens/s after it)."""
    for r in requests:
        engine.add(r)
    _sync(device)
    t0 = time.perf_counter()
    engine.step()
    _sync(device)
    prefill = time.perf_counter() - t0
    tokens = 0
    t1 = time.perf_counter()
    while engine.has_work:
        tokens += len(engine.step())
    _sync(device)
    return prefill, tokens / max(1e-9, time.perf_counter() - t1)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def expansion_parts(ids: torch.Tensor, hidden: int) -> list:
    """Prompt thirds: text, then media rows of m1 and m2 (half each), then text."""
    n = ids.numel()
    a, b = n // 3, 2 * n // 3
    mid = (b - a) // 2
    g = torch.Generator().manual_seed(int(ids.sum()))
    rows = lambda k: torch.randn((k, hidden), generator=g) * 0.02  # noqa: E731
    return [TextPart(tuple(ids[:a].tolist())), MediaPart("m1", rows(mid)), MediaPart("m2", rows(b - a - mid)),
            TextPart(tuple(ids[b:].tolist()))]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmer_dist.model.stage import resolve_device
    from transformers import LlamaForCausalLM

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    store = merged_store(args.params)
    weights = VersionWeights(Store.open(str(store)))
    hidden, vocab = int(weights.base_config["hidden_size"]), int(weights.base_config["vocab_size"])
    hf = LlamaForCausalLM.from_pretrained(export_m0(store), dtype=dtype).to(device).eval()
    t0 = time.perf_counter()
    pipe = LocalPipeline.build(weights, args.stages, device=device, dtype=dtype, slot_budget_bytes=1 << 40)
    load_seconds = time.perf_counter() - t0
    batches = [int(b) for b in args.batches.split(",")]
    sampling = SamplingParams(max_tokens=args.new_tokens)
    rows = []
    for batch in batches:
        ids = prompts(batch, args.prompt_len, vocab, seed=batch)
        runs = {"transformers": [], "engine retention": [], "engine expansion (3 sets)": []}
        for rep in range(args.repeats + 1):  # the first round warms up (allocator, threads, slots)
            hf_result = time_hf(hf, ids, args.new_tokens, device)
            engine = Engine(pipe, EngineLimits(max_running=batch, max_step_tokens=batch * args.prompt_len))
            ret = [GenerationRequest(f"r{i}", plan_prompt([TextPart(tuple(row.tolist()))], Retention("m0"),
                                                          weights.vocabulary), sampling) for i, row in enumerate(ids)]
            ret_result = time_engine(engine, ret, device)
            exp = [GenerationRequest(f"x{i}", plan_prompt(expansion_parts(row, hidden), Expansion(), weights.vocabulary),
                                     sampling) for i, row in enumerate(ids)]
            exp_result = time_engine(engine, exp, device)
            if rep:
                runs["transformers"].append(hf_result)
                runs["engine retention"].append(ret_result)
                runs["engine expansion (3 sets)"].append(exp_result)
        for name, results in runs.items():
            rows.append({"batch": batch, "what": name,
                         "prefill_ms": 1000 * statistics.median(r[0] for r in results),
                         "decode_tok_s": statistics.median(r[1] for r in results)})
    stage = pipe.stages[0]
    rebuild = []
    for _ in range(3):
        t0 = time.perf_counter()
        stage._build(WeightSet.hat("m1"))
        _sync(device)
        rebuild.append(time.perf_counter() - t0)
    result = {"rows": rows, "rebuild_seconds": statistics.median(rebuild), "load_seconds": round(load_seconds, 3),
              "slot_bytes": stage.slot_bytes, "resident_bytes": stage.resident.nbytes,
              "params": sum(t.numel for t in weights.tensors.values()), "device": str(device), "dtype": args.dtype,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "stages": args.stages,
              "threads": torch.get_num_threads(), "environment": environment()}
    write_json(args.json, result)
    print(f"\nengine vs transformers: {result['params'] / 1e6:.0f}M params, {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads, prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"medians of {args.repeats}")
    print(f"| batch | what | prefill ms | decode tok/s | vs transformers (decode) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ref = next(x for x in rows if x["batch"] == r["batch"] and x["what"] == "transformers")
        print(f"| {r['batch']} | {r['what']} | {r['prefill_ms']:.1f} | {r['decode_tok_s']:.1f} | "
              f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x |")
    print(f"\nslot rebuild (theta_hat_i from base + packed mask + tau*, all layers, on {device}): "
          f"{1000 * result['rebuild_seconds']:.1f} ms for {result['slot_bytes'] / 1e6:.1f} MB; "
          f"resident base + tau* + masks {result['resident_bytes'] / 1e6:.1f} MB; version load {load_seconds:.1f} s")
    print(f"results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
