"""Cost of MMER's routed forward: one Llama decoder layer (7B shapes by default) with every token
on one set of weights vs tokens split over G groups (mmer_dist.routing: one matmul per group).

    python bench/routed_forward.py                       # cuda when visible, else cpu (use --small there)
    python bench/routed_forward.py --small --device cpu

Prints, per token count and G: milliseconds per layer forward (median of --iters after warm-up)
and the ratio to the plain layer. Groups get equal shares of the tokens, interleaved in runs of
--run tokens (a modality segment), as in a mixed prompt.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding  # noqa: E402

from mmer_dist.merge.options import resolve_device  # noqa: E402
from mmer_dist.routing import route_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--small", action="store_true", help="hidden 1024 / MLP 2752 instead of 7B's 4096 / 11008")
    p.add_argument("--tokens", default="1,128,1024", help="comma-separated token counts (one sequence)")
    p.add_argument("--groups", default="1,2,4,5", help="comma-separated G (G=1: the routed module on one group)")
    p.add_argument("--run", type=int, default=64, help="tokens per contiguous segment of one group")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return p.parse_args(argv)


def timed(fn, iters: int, device: str) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    hidden, inter = (1024, 2752) if args.small else (4096, 11008)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=hidden // 128,
                      num_key_value_heads=hidden // 128, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    plain = LlamaDecoderLayer(cfg, layer_idx=0).to(device, dtype).eval()
    rope = LlamaRotaryEmbedding(cfg).to(device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    table = Table(title=f"one Llama decoder layer (hidden {hidden}, MLP {inter}, {args.dtype}) on {name}: "
                        f"ms per forward, routed over G groups vs plain")
    for col in ("tokens", "G", "plain ms", "routed ms", "routed / plain"):
        table.add_column(col, justify="right")
    groups_list = [int(g) for g in args.groups.split(",")]
    with torch.no_grad():
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(1, n, hidden, device=device, dtype=dtype)
            pos = torch.arange(n, device=device).unsqueeze(0)
            emb = rope(x, pos)
            t_plain = timed(functools.partial(plain, x, position_embeddings=emb, position_ids=pos), args.iters, device)
            for g in groups_list:
                # G perturbed copies of the layer's weights; route_model swaps in the routed modules
                states = [{k: v + 0.01 * i for k, v in plain.state_dict().items()} for i in range(g)]
                layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device, dtype).eval()
                routed = route_model(layer, states, text_only=())
                ids = (torch.arange(n, device=device) // args.run) % g
                t_routed = timed(functools.partial(routed, ids.unsqueeze(0), x, position_embeddings=emb, position_ids=pos),
                                 args.iters, device)
                table.add_row(str(n), str(g), f"{t_plain:.3f}", f"{t_routed:.3f}", f"{t_routed / t_plain:.2f}")
                del layer, routed, states
            table.add_section()
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
