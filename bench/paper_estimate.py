"""On paper: what a cluster of GPU nodes would give for a merge of N 7B models, from measured rates.

    python bench/paper_estimate.py                         # 8 nodes, N = 8, Llama-2-7B shapes
    python bench/paper_estimate.py --nodes 4 --nic-gbit 100 --store-gbyte 20

Reads the measured per-worker throughput from ``bench/out/merge_bench.json`` (one worker, warm,
largest N, the faster backend; ``--cpu-rate`` overrides) and prints, per node: parameters owned (a shard of
consecutive decoder layers; the embedding goes with the first shard, the LM head with the last),
bytes read per pass ((N + 1) models x params x 2 bytes), passes, bytes written (tau* float32 + N
packed masks), and the time each resource would need: the node's network link, its share of the
object store's aggregate bandwidth, CPU compute at the measured rate, and GPU compute (the fused
per-chunk chain is memory-bound: about ``--gpu-bytes-per-entry`` bytes of device traffic per
parameter x model at ``--gpu-tbyte`` TB/s). The slowest resource bounds the merge.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import OUT_DIR  # noqa: E402

# Llama-2-7B: hidden 4096, 32 layers, MLP 11008, vocab 32000, untied head
HIDDEN, LAYERS, INTER, VOCAB = 4096, 32, 11008, 32000
LAYER_PARAMS = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
EMBED = VOCAB * HIDDEN


def measured_rate(path: Path) -> tuple[float | None, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, "no merge_bench.json"
    rows = [r for r in data.get("summary", []) if "error" not in r and r.get("method") == "ties" and r.get("cache") == "warm"]
    cand = [r for r in rows if r["workers"] == 1]
    if not cand:
        return None, "no warm single-worker row in merge_bench.json"
    nmax = max(r["n"] for r in cand)
    # the fastest single-worker backend at the largest N: on a shared machine noise only slows runs down
    best = max((r for r in cand if r["n"] == nmax), key=lambda r: r["throughput_passes"])
    return best["throughput_passes"], (f"{best['backend']} x1, N={best['n']}, {data['params'] / 1e6:.0f}M params, warm, "
                                       f"over the passes ({best['passes_s']:.2f}s), 2-core machine")


def measured_gpu_rate(path: Path, passes: int) -> tuple[float | None, str]:
    """Param x models / s per pass of the streaming core on a GPU (bench/gpu_check.sh's
    core_throughput JSON), over the passes a store merge runs: LowPass + FinalPass when ingest
    cached the high histograms, as ``--passes`` assumes."""
    try:
        results = json.loads(path.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return None, f"no {path}"
    rows = [r for r in results if "error" not in r and r.get("device", "cpu") != "cpu"]
    if not rows:
        return None, f"no GPU row in {path}"
    r = max(rows, key=lambda r: r["n_models"])
    timed = [p for p in r["passes"] if p["pass"] in ("LowPass", "FinalPass")]
    rate = r["params"] * r["n_models"] * len(timed) / sum(p["seconds"] for p in timed)
    return rate, (f"{r['device_name']}, N={r['n_models']}, {r['params'] / 1e6:.0f}M params, steady L+F passes, "
                  f"chunks read from the page cache")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--models", type=int, default=8, help="N")
    p.add_argument("--passes", type=int, default=2, help="passes reading the inputs (LowPass + FinalPass with "
                   "cached ingest histograms; +1 SignPass when a majority sign is undecided, +1 HighPass with DARE)")
    p.add_argument("--nic-gbit", type=float, default=25.0, help="each node's network link, Gbit/s")
    p.add_argument("--store-gbyte", type=float, default=10.0, help="object store's aggregate bandwidth, GB/s")
    p.add_argument("--host-gbyte", type=float, default=2.0,
                   help="host-side zarr chunk path of one worker (one read-ahead thread: fetch + decode + copy), GB/s; "
                   "2.0 measured here for 8 MB bf16 chunks from the page cache (4.0 ms per chunk, np.fromfile 1.6 ms)")
    p.add_argument("--pcie-gbyte", type=float, default=25.0, help="host-to-GPU copy bandwidth, GB/s")
    p.add_argument("--gpu-tbyte", type=float, default=2.0, help="GPU memory bandwidth, TB/s (H100 PCIe ~2)")
    p.add_argument("--gpu-bytes-per-entry", type=float, default=12.0,
                   help="device bytes moved per parameter x model by the fused chain (bf16 in, f32 temporaries)")
    p.add_argument("--cpu-rate", type=float, default=None, help="param x models / s of one CPU worker "
                   "(default: measured, from bench/out/merge_bench.json)")
    p.add_argument("--bench-json", type=Path, default=OUT_DIR / "merge_bench.json")
    p.add_argument("--gpu-json", type=Path, default=OUT_DIR / "gpu" / "core_throughput_cuda.json",
                   help="core_throughput results from a GPU (bench/gpu_check.sh)")
    args = p.parse_args(argv)

    rate, source = (args.cpu_rate, "--cpu-rate") if args.cpu_rate else measured_rate(args.bench_json)
    if rate is None:
        rate, source = 150e6, f"assumed 150M param x models/s ({source})"
    gpu_rate, gpu_source = measured_gpu_rate(args.gpu_json, args.passes)
    n, nodes = args.models, args.nodes
    per = [LAYERS // nodes + (1 if i < LAYERS % nodes else 0) for i in range(nodes)]
    shard = [k * LAYER_PARAMS + (EMBED if i == 0 else 0) + (EMBED + HIDDEN if i == nodes - 1 else 0)
             for i, k in enumerate(per)]
    total = sum(shard)
    big = max(shard)
    read_pass = (n + 1) * big * 2
    reads = args.passes * read_pass
    writes = big * 4 + n * big / 8
    nic = args.nic_gbit / 8 * 1e9
    store_share = args.store_gbyte * 1e9 / nodes
    t_nic = (reads + writes) / nic
    t_store = (reads + writes) / store_share
    t_cpu = args.passes * big * n / rate
    t_gpu_measured = args.passes * big * n / gpu_rate if gpu_rate else None
    t_gpu = args.passes * big * n * args.gpu_bytes_per_entry / (args.gpu_tbyte * 1e12)
    t_host = (reads + writes) / (args.host_gbyte * 1e9)
    t_pcie = (reads + writes) / (args.pcie_gbyte * 1e9)
    t_read_once = (read_pass + writes) / min(nic, store_share)

    gpu_node = [(t_nic, "network link"), (t_store, "object store share"), (t_host, "host zarr path"),
                (t_pcie, "host-GPU copies"), (t_gpu, "GPU")]
    if t_gpu_measured:
        gpu_node.append((t_gpu_measured, "measured GPU worker"))
    lines = [
        f"# {nodes} GPU nodes, N = {n} models of 7B (Llama-2-7B shapes: {total / 1e9:.2f}B LLM params), bf16",
        f"- shard per node: {per[0]}-{per[-1]} decoder layers, largest shard {big / 1e9:.3f}B params "
        f"(first/last carry the embedding / LM head: +{EMBED / 1e6:.0f}M)",
        f"- bytes read per node per pass: (N + 1) x {big / 1e9:.3f}B x 2 B = {read_pass / 1e9:.1f} GB; passes: {args.passes} "
        f"-> {reads / 1e9:.1f} GB; written: tau* {big * 4 / 1e9:.2f} GB + masks {n * big / 8 / 1e9:.2f} GB",
        f"- whole cluster: {args.passes * (n + 1) * total * 2 / 1e9:.0f} GB read (the inputs, {(n + 1) * total * 2 / 1e9:.0f} GB, "
        f"{args.passes}x), {(total * 4 + n * total / 8) / 1e9:.0f} GB written",
        "",
        "| resource (per node) | assumption | seconds |",
        "| --- | --- | --- |",
        f"| network link | {args.nic_gbit:g} Gbit/s | {t_nic:.1f} |",
        f"| object store share | {args.store_gbyte:g} GB/s aggregate / {nodes} nodes | {t_store:.1f} |",
        f"| CPU worker: kernels + store path | {rate / 1e6:.0f}M param x models/s measured ({source}) | {t_cpu:.1f} |",
        f"| host zarr path (1 read-ahead thread) | {args.host_gbyte:g} GB/s | {t_host:.1f} |",
        f"| host -> GPU copies | {args.pcie_gbyte:g} GB/s | {t_pcie:.1f} |",
        *([f"| GPU worker: core measured (host reads + copies + kernels) | {gpu_rate / 1e6:.0f}M param x models/s "
           f"({gpu_source}) | {t_gpu_measured:.1f} |"] if gpu_rate else []),
        f"| GPU compute (memory-bound) | {args.gpu_bytes_per_entry:g} B/entry at {args.gpu_tbyte:g} TB/s | {t_gpu:.2f} |",
        "",
        f"Bound: the slowest resource, {max(gpu_node)[0]:.1f} s on GPU nodes ({max(gpu_node)[1]}"
        f" bound; GPU compute is {t_gpu:.2f} s), "
        f"{max(t_nic, t_store, t_cpu):.1f} s if the nodes computed on CPU at the measured rate. "
        f"Keeping each node's shard in GPU/host memory between passes (read once: {read_pass / 1e9:.1f} GB, fits an "
        f"80 GB GPU) would cut the I/O to {t_read_once:.1f} s. Fixed costs on top: Ray start-up and actor placement "
        f"(seconds), and torch.compile per worker process unless the inductor cache is shared (cold compile measured "
        f"at tens of seconds on CPU).",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
