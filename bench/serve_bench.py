"""The endpoint's latency and throughput, with the HTTP + Serve overhead shown against the engine.

    python bench/serve_bench.py               # ~100M Llama (+ tokenizer), 2 fine-tunes merged
    python bench/serve_bench.py --quick       # a toy size

Builds (once, cached under bench/out/serve-bench/) a ~100M-parameter Llama base with a tokenizer
and chat template, two text fine-tunes (random task vectors), ingests and merges them, exports
model ``m0``. Then, on the same prompts (chat messages of ``--prompt-words`` words; greedy,
``--new-tokens`` tokens), for concurrency 1, 4 and 16:

- plain transformers ``generate`` on the exported theta_hat_0, the concurrent prompts as one batch;
- the engine in-process (``Engine`` over a ``LocalPipeline``), the prompts as concurrent requests;
- the endpoint (``serve.app:build`` on an embedded Ray, streaming through the ``openai`` client)
  with 1 and 2 pipeline stages;

reporting per-token latency (p50 / p99 of the gaps between streamed tokens; for transformers and
the in-process engine, one decode step) and throughput (completion tokens / wall second), and the
hop cost per stage per token (2 stages minus 1 stage, per token, at concurrency 1) next to a bare
Ray actor call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `mmer_dist` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import OUT_DIR, environment, write_json  # noqa: E402

CACHE = OUT_DIR / "serve-bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy model, concurrency 1 and 4, few tokens")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=OUT_DIR / "serve_bench.json")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.concurrency = 64, 2, 512, "1,4"
        args.prompt_words, args.new_tokens = 12, 8
    return args


# -- the store ----------------------------------------------------------------------------------


def build(args) -> tuple[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmer_dist.demo.tiny_models import build_tokenizer
    from mmer_dist.export import export_model
    from mmer_dist.ingest import ingest_base, ingest_model
    from mmer_dist.merge.engine import MergeRequest, merge
    from mmer_dist.merge.local import LocalBackend

    root = CACHE / f"h{args.hidden}-l{args.layers}-v{args.vocab}"
    store, export = root / "store", root / "export-m0"
    if (root / ".complete").exists():
        return str(store), export
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    tokenizer = build_tokenizer(args.vocab)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    ingest_base(str(store), root / "base", progress=False)
    for i in range(2):
        tuned = LlamaForCausalLM(config)
        tuned.load_state_dict({k: v.float() + 0.02 * v.float().std() * torch.randn_like(v.float())
                               for k, v in base.state_dict().items()})
        tuned.to(torch.bfloat16).save_pretrained(root / f"m{i}")
        tokenizer.save_pretrained(root / f"m{i}")
        ingest_model(str(store), f"m{i}", root / f"m{i}", "text", fmt="llama", progress=False)
    merge(str(store), MergeRequest(), LocalBackend(), workers=1, progress=False)
    export_model(str(store), "m0", export, progress=False)
    (root / ".complete").write_text("")
    return str(store), export


def prompt_text(i: int, words: int) -> str:
    from mmer_dist.demo.tiny_models import WORDS

    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words))


# -- the three ways -------------------------------------------------------------------------------


def run_transformers(export: Path, prompts: list[str], new_tokens: int) -> dict:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(export)
    model = LlamaForCausalLM.from_pretrained(export, dtype=torch.bfloat16).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    ids = torch.tensor([tok(t)["input_ids"] for t in texts])
    kw = dict(do_sample=False, pad_token_id=3, eos_token_id=None, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - t0
    step = (total - first) / (new_tokens - 1)
    return {"p50_ms": 1000 * step, "p99_ms": 1000 * step, "tok_s": len(prompts) * new_tokens / total}


def run_engine(store: str, prompts: list[str], new_tokens: int) -> dict:
    from mmer_dist.model import Engine, GenerationRequest, LocalPipeline, SamplingParams
    from mmer_dist.model.prompt import Retention, plan_prompt
    from mmer_dist.store.weights import VersionWeights
    from serve.chat import ChatAssets, retention_parts
    from serve.protocol import Message

    weights = VersionWeights.open(store)
    pipe = LocalPipeline.build(weights, 1, slot_budget_bytes=1 << 34)
    assets = ChatAssets.load(weights.fetch_files("m0", CACHE / "assets-m0", weights=False), "m0", "text")
    reqs = [GenerationRequest(f"r{i}", plan_prompt(retention_parts(assets, [Message(role="user", content=p)], []),
                                                   Retention("m0"), weights.vocabulary),
                              SamplingParams(max_tokens=new_tokens)) for i, p in enumerate(prompts)]
    Engine(pipe).generate(reqs[:1])  # warm-up
    engine = Engine(pipe)
    for r in reqs:
        engine.add(r)
    gaps, t0 = [], time.perf_counter()
    engine.step()
    last = time.perf_counter()
    tokens = len(reqs)
    while engine.has_work:
        tokens += len(engine.step())
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    wall = time.perf_counter() - t0
    return {"p50_ms": 1000 * statistics.median(gaps), "p99_ms": 1000 * _p99(gaps), "tok_s": tokens / wall}


def run_endpoint(url: str, prompts: list[str], new_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    gaps, counts = [], []
    lock = threading.Lock()

    def one(p: str) -> None:
        stream = client.chat.completions.create(model="m0", messages=[{"role": "user", "content": p}], temperature=0,
                                                max_tokens=new_tokens, stream=True)
        times = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
        with lock:
            gaps.extend(b - a for a, b in zip(times, times[1:]))
            counts.append(len(times))

    one(prompts[0])  # warm-up
    gaps.clear()
    counts.clear()
    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"p50_ms": 1000 * statistics.median(gaps), "p99_ms": 1000 * _p99(gaps), "tok_s": sum(counts) / wall}


def actor_call_ms(n: int = 200) -> float:
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        def f(self, x):
            return x

    echo = Echo.remote()
    payload = torch.zeros(1, 768)
    ray.get(echo.f.remote(payload))
    t0 = time.perf_counter()
    for _ in range(n):
        ray.get(echo.f.remote(payload))
    ray.kill(echo)
    return 1000 * (time.perf_counter() - t0) / n


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from serve.app import build as build_app

    store, export = build(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for c in levels:
        prompts = [prompt_text(i, args.prompt_words) for i in range(c)]
        rows.append({"what": "transformers generate (batch)", "concurrency": c,
                     **run_transformers(export, prompts, args.new_tokens)})
        rows.append({"what": "engine in-process", "concurrency": c, **run_engine(store, prompts, args.new_tokens)})
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    hop = actor_call_ms()
    try:
        for stages in [int(s) for s in args.stages.split(",")]:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app({"store": store, "stages": stages, "api_token_env": None,
                                 "limits": {"max_completion_tokens": 4096}}), name="bench", route_prefix="/")
            for c in levels:
                prompts = [prompt_text(i, args.prompt_words) for i in range(c)]
                rows.append({"what": f"endpoint, {stages} stage{'s' if stages > 1 else ''}", "concurrency": c,
                             **run_endpoint(f"http://127.0.0.1:{port}", prompts, args.new_tokens)})
            serve.shutdown()
    finally:
        ray.shutdown()
    one = {r["what"]: r for r in rows if r["concurrency"] == levels[0]}
    hop_cost = (one.get("endpoint, 2 stages", {}).get("p50_ms", float("nan"))
                - one.get("endpoint, 1 stage", {}).get("p50_ms", float("nan")))
    result = {"rows": rows, "actor_call_ms": hop, "hop_cost_per_stage_per_token_ms": hop_cost,
              "settings": vars(args) | {"json": str(args.json)}, "environment": environment()}
    write_json(args.json, result)
    print(f"\nendpoint vs engine vs transformers: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"bf16 on CPU, {args.new_tokens} greedy tokens")
    print("| what | concurrency | per-token p50 ms | p99 ms | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['concurrency']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['tok_s']:.1f} |")
    print(f"\nhop cost per extra stage per token (2 stages - 1 stage, concurrency {levels[0]}): {hop_cost:.2f} ms; "
          f"a bare Ray actor call: {hop:.2f} ms")
    print(f"results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
