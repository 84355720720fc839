"""Retention quality: how much of each fine-tuned model's task accuracy each merge method keeps.

    python bench/quality.py              # default size (~1-2 min training the first time, cached)
    python bench/quality.py --quick      # toy size (the smoke test's)
    python bench/quality.py --retrain    # ignore the cached checkpoints

A tiny Llama base is pre-trained on a synthetic language and four copies are really fine-tuned on
four synthetic "modality" tasks (``bench/quality_tasks.py`` explains the tasks and why they look
the way they do). The checkpoints (bf16, ``save_pretrained``) are cached under
``bench/out/quality-cache/``. Each run then ingests them into a fresh mmer-dist store; every
method, the baselines included, is a published version of it (``merge``), and its weights are
read straight from the store (``mmer_dist.store.weights.VersionWeights``: theta_hat_i, theta_bar,
theta* in float32, cast to the checkpoints' bf16 as an export would write them; no exports on
disk). Retention is next-token accuracy of plain HF models on held-out task sequences (answer
positions only; weights bf16, compute float32). Every method is evaluated with model i's own
extra vocabulary rows (its prefix and modality tokens, the stand-in for its encoder + connector,
never merged), as NaiveMC keeps each MLLM's own encoder.

Retention (the paper's Eq. 8) = accuracy / the fine-tuned model's accuracy, per model, and the mean
over the four. The base LLM (with model i's own rows) is the floor.

Expansion (the paper's one-pass multimodal answer) runs through the serving engine
(``mmer_dist.model``; ``bench/quality_expansion.py``): mixed prompts hold two task segments of
different models; model k's prefix + modality tokens are its media (its own extra embedding rows),
routed through theta_hat_k, and the text tokens through each text policy's weights
(``mean-mask`` = theta_bar, the paper; ``request-modality``; ``present-mean``), teacher-forced in
one prefill, scored on each model's segments against fine-tuned model k on the same prompts. The
engine's expansion LM head is the base vocabulary only. The merged baselines, one set of weights,
appear there as single-weights rows (theta* of their version for every token, through the engine;
the proxy table has the same weights in plain HF models). A second table runs the single-model
retention test sets as expansion requests, where the policies differ most (``request-modality``
then equals retention).

Results: printed tables and ``bench/out/quality.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `mmer_dist` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench.common import OUT_DIR, environment, write_json  # noqa: E402
from bench.quality_expansion import Sequences  # noqa: E402
from bench.quality_expansion import pipeline as engine_pipeline  # noqa: E402
from bench.quality_tasks import (  # noqa: E402
    RULES, TASKS, VOCAB_TENSORS, Evaluator, Size, Suite, build_checkpoints, cache_key,
)
from mmer_dist.demo.expansion import originals_pipeline, text_through, through  # noqa: E402
from mmer_dist.model import TEXT_POLICIES  # noqa: E402
from mmer_dist.store import layout  # noqa: E402
from mmer_dist.store.catalog import VersionRecord  # noqa: E402
from mmer_dist.store.store import Store  # noqa: E402
from mmer_dist.store.weights import VersionWeights, compose  # noqa: E402
from mmer_dist.store.weightsets import WeightSet  # noqa: E402

CACHE_DIR = OUT_DIR / "quality-cache"
LAM_GRID = (0.5, 0.7, 0.9, 1.0, 1.2, 1.5)
# The paper's retention on accuracy (Table 2 "Trimmed Avg" Acc.; Table 5 ablations), for reference.
PAPER = {
    "naive": 88.3, "naive+dare": 89.8, "ta-0.3": 91.0, "ta+dare": 91.4, "ties": 90.6, "ties+dare": 91.4,
    "mmer-tuned": 99.4, "mmer-lam1": 93.9, "no-sign": 16.7, "no-magnitude": 57.1,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Retention quality benchmark: really fine-tuned tiny Llamas on four synthetic modality tasks, "
                    "merged by every method mmer-dist offers; task accuracy and retention per model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy size (seconds; what the smoke test runs)")
    p.add_argument("--retrain", action="store_true", help="retrain the checkpoints even if cached")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks, the training and the held-out sets")
    p.add_argument("--topk", type=float, default=0.8, help="K, the fraction of each task vector TIES keeps")
    p.add_argument("--dare-rate", type=float, default=0.5, help="DARE drop rate p for the '+ DARE' rows")
    p.add_argument("--tall-lam", type=float, default=0.4, help="TALL-masks lambda")
    p.add_argument("--lam-grid", default=",".join(map(str, LAM_GRID)),
                   help="lambda values swept per model on the validation split for 'MMER, lambda tuned'")
    p.add_argument("--hidden", type=int, help="override the model width (default 64; --quick 32)")
    p.add_argument("--layers", type=int, help="override the number of decoder layers (default 4; --quick 2)")
    p.add_argument("--finetune-steps", type=int, help="override the fine-tuning steps (default 400; --quick 150)")
    p.add_argument("--finetune-lr", type=float,
                   help="override the fine-tuning learning rate (default 6e-4; --quick 2e-3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (keep it light on shared machines)")
    p.add_argument("--device", default="cpu",
                   help="device of the serving engine's stages (expansion tables): cpu, cuda, or auto")
    p.add_argument("--cache", type=Path, default=CACHE_DIR, help="where trained checkpoints are kept")
    p.add_argument("--json", type=Path, default=OUT_DIR / "quality.json", help="where results go")
    p.add_argument("--keep-store", action="store_true", help="keep the temporary store")
    return p.parse_args(argv)


# -- weights ----------------------------------------------------------------------------------------


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    if not state:
        raise RuntimeError(f"no safetensors in {path}")
    return state


class Weights:
    """The fine-tuned checkpoints, and every way of giving model i's rows to a base-vocab state."""

    def __init__(self, cache: Path, suite: Suite):
        self.vocab = suite.vocab
        self.base = load_dir(cache / "base")
        self.ft = {t: load_dir(cache / f"ft-{t}") for t in TASKS}
        vb = self.vocab.base_size
        self.extra = {t: {k: self.ft[t][k][vb:] for k in VOCAB_TENSORS} for t in TASKS}

    def with_rows(self, state: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
        """A base-vocabulary state plus model ``task``'s own extra rows."""
        vb = self.vocab.base_size
        return {k: torch.cat([v[:vb], self.extra[task][k]]) if k in VOCAB_TENSORS else v for k, v in state.items()}

    def with_all_rows(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All four models' extra rows, model k's in slot k (the mixed prompts' vocabulary)."""
        vb = self.vocab.base_size
        return {k: torch.cat([v[:vb]] + [self.extra[t][k] for t in TASKS]) if k in VOCAB_TENSORS else v
                for k, v in state.items()}

    def scaled(self, task: str, scale: float) -> dict[str, torch.Tensor]:
        """theta_pre + scale * tau_i on the shared rows (float32, then bf16 like an export)."""
        vb = self.vocab.base_size
        out = {}
        for k, b in self.base.items():
            theta = self.ft[task][k][:vb] if k in VOCAB_TENSORS else self.ft[task][k]
            out[k] = (b.float() + scale * (theta.float() - b.float())).to(torch.bfloat16)
        return self.with_rows(out, task)

    def trimmed(self, task: str, topk: float) -> dict[str, torch.Tensor]:
        """theta_pre + trim_K(tau_i), the global top-K trim alone (DESIGN.md's threshold rule)."""
        vb = self.vocab.base_size
        tau = {k: (self.ft[task][k][:vb] if k in VOCAB_TENSORS else self.ft[task][k]).float() - b.float()
               for k, b in self.base.items()}
        flat = torch.cat([v.abs().reshape(-1) for v in tau.values()])
        k_small = flat.numel() - int(flat.numel() * topk)
        thr = torch.kthvalue(flat, k_small).values if k_small > 0 else torch.tensor(0.0)
        out = {k: (self.base[k].float() + torch.where(v.abs() >= thr, v, 0.0)).to(torch.bfloat16)
               for k, v in tau.items()}
        return self.with_rows(out, task)


class Producer:
    """Every method's weights, through mmer-dist's public API, in one temporary store: each method
    is a published version (``merge``), and its weights are read straight from the store with
    ``VersionWeights`` (the reader the exports and the serving engine share), never through
    exports on disk."""

    def __init__(self, work: Path, cache: Path):
        from mmer_dist.ingest import ingest_base, ingest_model

        self.url = str(work / "store")
        self.seconds = {"ingest": 0.0, "merge": 0.0, "read": 0.0}
        self._versions: dict[int, VersionWeights] = {}
        self._read: tuple[int | None, dict] = (None, {})
        t0 = time.perf_counter()
        ingest_base(self.url, cache / "base", progress=False)
        for task in TASKS:
            ingest_model(self.url, task, cache / f"ft-{task}", task, fmt="llama", progress=False)
        self.seconds["ingest"] += time.perf_counter() - t0

    def merge(self, **fields) -> VersionRecord:
        from mmer_dist.merge.engine import MergeRequest, merge
        from mmer_dist.merge.local import LocalBackend

        t0 = time.perf_counter()
        record = merge(self.url, MergeRequest.of(**fields), LocalBackend(), workers=1, compile=False, progress=False)
        self.seconds["merge"] += time.perf_counter() - t0
        return record

    def weights(self, version: int) -> VersionWeights:
        if version not in self._versions:
            self._versions[version] = VersionWeights(Store.open(self.url), version)
        return self._versions[version]

    def _arrays(self, version: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """theta_pre, tau* and the packed masks of every tensor of a version, read once for all
        its weight sets (the last version read is kept: its models are read one after another)."""
        if self._read[0] != version:
            w = self.weights(version)
            self._read = (version, {n: (w.base(n), w.tau_star(n), w.packed_masks(n)) for n in w.tensors})
        return self._read[1]

    def _state(self, version: int, key: WeightSet, dtype: torch.dtype,
               task: str | None = None) -> dict[str, torch.Tensor]:
        """Weight set ``key`` of a version, every LLM tensor in float32 by ``compose`` (the one
        reconstruction path of exports and the serving engine), cast to ``dtype`` as an export
        writes it; with ``task``, that model's own extra vocabulary rows appended."""
        t0 = time.perf_counter()
        w = self.weights(version)
        state = {}
        for name, (base, tau, packed) in self._arrays(version).items():
            value = compose(key, base, tau, packed, w.tensors[name].cols, w.model_index, w.record.alpha)
            value = w.as_shape(name, value.to(dtype))
            extra = w.extra_rows(name, task) if task is not None else None
            state[name] = value if extra is None else torch.cat([value, extra])
        self.seconds["read"] += time.perf_counter() - t0
        return state

    def reconstructed(self, version: int, task: str) -> dict[str, torch.Tensor]:
        """theta_hat_i in model i's checkpoint dtype, with its own extra rows (``export --model``)."""
        dtype = layout.torch_dtype(self.weights(version).catalog.model(task).dtype)
        return self._state(version, WeightSet.hat(task), dtype, task)

    def merged(self, version: int) -> dict[str, torch.Tensor]:
        """theta* = theta_pre + alpha * tau* in the base's dtype (``export --merged``)."""
        return self._state(version, WeightSet.star(), self.weights(version).dtype)

    def text(self, version: int) -> dict[str, torch.Tensor]:
        """theta_bar = theta_pre + mean_i(m_i) * tau* in the base's dtype (``export --text``)."""
        return self._state(version, WeightSet.bar(), self.weights(version).dtype)

    def baseline(self, method: str, **fields) -> tuple[VersionRecord, dict[str, torch.Tensor]]:
        """A baseline merge published as a version of the store, and its theta*."""
        record = self.merge(method=method, **fields)
        return record, self.merged(record.version)


# -- the benchmark ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    key: str
    name: str
    group: str
    acc: dict[str, float]
    ref: dict[str, float]
    note: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def retention(self) -> dict[str, float]:
        return {t: 100.0 * self.acc[t] / self.ref[t] if self.ref[t] > 0 else float("nan") for t in TASKS}

    @property
    def mean_retention(self) -> float:
        return sum(self.retention.values()) / len(TASKS)

    @property
    def mean_acc(self) -> float:
        return 100.0 * sum(self.acc.values()) / len(TASKS)

    def as_dict(self) -> dict:
        return {"key": self.key, "name": self.name, "group": self.group, "note": self.note,
                "accuracy": {t: round(100 * a, 3) for t, a in self.acc.items()},
                "retention": {t: round(r, 3) for t, r in self.retention.items()},
                "mean_accuracy": round(self.mean_acc, 3), "mean_retention": round(self.mean_retention, 3),
                "paper_retention": PAPER.get(self.key), **self.extra}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    size = Size.quick() if args.quick else Size()
    overrides = {"hidden": args.hidden, "layers": args.layers, "finetune_steps": args.finetune_steps,
                 "finetune_lr": args.finetune_lr}
    size = dataclasses.replace(size, **{k: v for k, v in overrides.items() if v is not None})
    if args.hidden is not None:
        size = dataclasses.replace(size, intermediate=2 * args.hidden)
    suite = Suite(size, args.seed)
    cache = Path(args.cache) / f"{'quick' if args.quick else 'default'}-{cache_key(size, args.seed)}"
    if args.retrain and cache.exists():
        shutil.rmtree(cache)
    if not (cache / "meta.json").exists():
        if cache.exists():
            shutil.rmtree(cache)  # an interrupted training run
        build_checkpoints(suite, cache, args.seed)
        trained_now = True
    else:
        trained_now = False
        print(f"using cached checkpoints in {cache} (--retrain to rebuild)")
    meta = json.loads((cache / "meta.json").read_text())
    evaluator = Evaluator(suite, args.seed)
    weights = Weights(cache, suite)
    lam_grid = [float(x) for x in args.lam_grid.split(",") if x]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="quality-work-", dir=Path(args.json).parent))  # the store
    try:
        result = _evaluate(args, suite, evaluator, weights, Producer(work, cache), lam_grid)
    finally:
        if args.keep_store:
            print(f"store kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result.update(
        size=dataclasses.asdict(size), seed=args.seed, checkpoints=str(cache), checkpoint_dtype=meta["dtype"],
        train_seconds=meta.get("train_seconds"), finetunes=meta.get("finetunes"), trained_now=trained_now, environment=environment(),
        wall_seconds=round(time.perf_counter() - started, 2))
    return result


def _evaluate(args, suite: Suite, ev: Evaluator, w: Weights, prod: Producer, lam_grid: list[float]) -> dict:
    t_eval = 0.0

    def acc_of(states: dict[str, dict], split: str = "test") -> dict[str, float]:
        nonlocal t_eval
        t0 = time.perf_counter()
        out = {t: ev.task_accuracy(states[t], t, split) for t in TASKS}
        t_eval += time.perf_counter() - t0
        return out

    def per_model(state):  # one merged state, each model with its own rows
        return {t: w.with_rows(state, t) for t in TASKS}

    ft_acc = acc_of(w.ft)
    rows: list[Row] = []

    def add(key, name, group, acc, note="", **extra):
        rows.append(Row(key, name, group, acc, ft_acc, note, extra))

    add("finetuned", "Fine-tuned models (original)", "reference", ft_acc, "upper bound")
    add("base", "Base LLM (+ own modality rows)", "reference", acc_of(per_model(w.base)), "floor")
    add("half-tau", "θ_pre + ½·τ_i (diagnostic)", "diagnostic", acc_of({t: w.scaled(t, 0.5) for t in TASKS}),
        "delta-scale sensitivity")
    add("trim-only", "θ_pre + trim_K(τ_i) (diagnostic)", "diagnostic",
        acc_of({t: w.trimmed(t, args.topk) for t in TASKS}), f"TIES trim alone, K={args.topk}")

    # -- one merged set of weights for every model (NaiveMC framework); each a version of the store --
    K, p = args.topk, args.dare_rate
    merged_states, merged_versions = {}, {}

    def baseline(key, name, method, note="", **fields):
        record, state = prod.baseline(method, topk=K, **fields)
        merged_states[key], merged_versions[key] = state, record
        add(key, name, "merged", acc_of(per_model(state)), note, version=record.version)

    baseline("naive", "NaiveMC (average)", "naive")
    baseline("naive+dare", "NaiveMC w/ DARE", "naive", f"p={p}", dare_rate=p)
    baseline("ta-0.3", "Task Arithmetic α=0.3", "ta", "α=0.3", alpha=0.3)
    baseline("ta", "Task Arithmetic α=1.0", "ta", "α=1.0", alpha=1.0)
    baseline("ta+dare", "Task Arithmetic α=0.3 w/ DARE", "ta", f"α=0.3, p={p}", alpha=0.3, dare_rate=p)
    baseline("ties", "TIES (θ*)", "ties", f"K={K}, α=1")  # also MMER over TIES, λ=1
    baseline("ties+dare", "TIES w/ DARE", "ties", f"K={K}, p={p}", dare_rate=p)
    baseline("neuro", "NeuroMerging (θ*)", "neuro", f"K={K}")  # also MMER over NeuroMerging
    ties, neuro = merged_versions["ties"], merged_versions["neuro"]

    # -- per-model reconstruction --
    versions = {}
    vb = suite.vocab.base_size

    def own_rows_kept(state, task):  # model i keeps its own, unmerged extra rows
        for k in VOCAB_TENSORS:
            if not torch.equal(state[k][vb:], w.extra[task][k]):
                raise AssertionError(f"model {task!r}: {k} extra rows in the store differ from the fine-tuned model's")
        return state

    def reconstruct(key, name, group, record, note=""):
        versions[key] = record
        acc = acc_of({t: own_rows_kept(prod.reconstructed(record.version, t), t) for t in TASKS})
        density = {t: round(100 * d, 2) for t, d in zip(record.models, record.mask_density)}
        add(key, name, group, acc, note, mask_density_pct=density, version=record.version,
            lams=dict(zip(record.models, record.lams)))

    reconstruct("mmer-lam1", "MMER (TIES), λ=1", "mmer", ties, f"K={K}; paper default")
    reconstruct("mmer-lam0.9", "MMER (TIES), λ=0.9", "mmer", prod.merge(topk=K, lam={t: 0.9 for t in TASKS}),
                "paper Fig. 4b: λ·50% = 45%")
    # the paper's protocol: lambda per modality by validation accuracy
    sweep = {}
    for lam in lam_grid:
        rec = prod.merge(topk=K, lam={t: lam for t in TASKS})
        sweep[lam] = acc_of({t: prod.reconstructed(rec.version, t) for t in TASKS}, split="val")
    tuned = {t: max(lam_grid, key=lambda lam: (round(sweep[lam][t], 6), -abs(lam - 1.0))) for t in TASKS}
    reconstruct("mmer-tuned", "MMER (TIES), λ tuned on val", "mmer", prod.merge(topk=K, lam=tuned),
                "λ " + " ".join(f"{t[0]}={tuned[t]:g}" for t in TASKS))
    reconstruct("mmer-neuro", "MMER (NeuroMerging), λ=1", "mmer", neuro, f"K={K}")
    reconstruct("tall", "TALL-masks (TA)", "mmer",
                prod.merge(method="ta", mask_rule="tall", lam={t: args.tall_lam for t in TASKS}),
                f"λ={args.tall_lam}; τ = Σ τ_i, θ̂_i = θ_pre + m_i∘τ")
    reconstruct("no-sign", "MMER − Directional Congruence", "ablation",
                prod.merge(topk=K, mask_rule="mmer-no-sign"), "mask rule mmer-no-sign, λ=1")
    reconstruct("no-magnitude", "MMER − Dominant Significance", "ablation",
                prod.merge(topk=K, mask_rule="mmer-no-magnitude"), "mask rule mmer-no-magnitude, λ=1")

    # -- single-weights proxy on mixed prompts (NOT the routed forward; plain HF models) --
    t0 = time.perf_counter()
    proxy_ref = {t: ev.mixed_accuracy(w.with_all_rows(w.ft[t]))[t] for t in TASKS}
    proxy_states = {
        "base": ("Base LLM", w.base),
        "naive": ("NaiveMC", merged_states["naive"]),
        "ta-0.3": ("Task Arithmetic α=0.3", merged_states["ta-0.3"]),
        "ties": ("TIES θ*", merged_states["ties"]),
        "ties+dare": ("TIES w/ DARE θ*", merged_states["ties+dare"]),
        "neuro": ("NeuroMerging θ*", merged_states["neuro"]),
        "mmer-lam1": ("MMER (TIES) λ=1: θ̄", prod.text(versions["mmer-lam1"].version)),
        "mmer-tuned": ("MMER (TIES) λ tuned: θ̄", prod.text(versions["mmer-tuned"].version)),
        "mmer-neuro": ("MMER (NeuroMerging): θ̄", prod.text(versions["mmer-neuro"].version)),
    }
    proxy = [Row("finetuned", "Fine-tuned model i, its weights for all tokens", "reference", proxy_ref, proxy_ref)]
    for key, (name, state) in proxy_states.items():
        proxy.append(Row(key, name, "single-weights", ev.mixed_accuracy(w.with_all_rows(state)), proxy_ref))
    t_eval += time.perf_counter() - t0

    t0 = time.perf_counter()
    expansion, single = _expansion(args, suite, ev, prod, versions, merged_versions, rows, ft_acc, proxy_ref)
    t_engine = time.perf_counter() - t0

    return {
        "rows": [r.as_dict() for r in rows],
        "proxy": [r.as_dict() for r in proxy],
        "expansion": [r.as_dict() for r in expansion],
        "expansion_single_model": [r.as_dict() for r in single],
        "lambda_sweep_val_accuracy": {str(lam): {t: round(100 * a, 3) for t, a in v.items()}
                                      for lam, v in sweep.items()},
        "lambda_tuned": tuned,
        "settings": {"topk": K, "dare_rate": p, "tall_lam": args.tall_lam, "lam_grid": lam_grid,
                     "rules": RULES,
                     "expansion": "serving engine (mmer_dist.model), teacher-forced prefill with logits at every "
                                  "position: model k's prefix + modality tokens as MediaPart(k, its own extra "
                                  "embedding rows) through theta_hat_k, text tokens by the text policy; LM head "
                                  "on the base vocabulary (request-modality with one model: that model's); scored "
                                  "on task-k segments of mixed prompts against fine-tuned model k on the same "
                                  "prompts", "device": args.device},
        "seconds": {**{k: round(v, 2) for k, v in prod.seconds.items()}, "evaluate": round(t_eval, 2),
                    "engine": round(t_engine, 2)},
        "_rows": rows, "_proxy": proxy, "_expansion": expansion, "_single": single,
    }


POLICY_NOTES = {"mean-mask": "text via θ̄ (the paper)", "request-modality": "text via θ̂_k if one model, else θ̄",
                "present-mean": "text via mean of present models' masks",
                "follow-media": "text via the θ̂ of the media before it"}


def _expansion(args, suite: Suite, ev: Evaluator, prod: Producer, versions: dict, merged_versions: dict,
               rows: list[Row], ft_acc: dict, proxy_ref: dict) -> tuple[list[Row], list[Row]]:
    """The expansion tables, through the serving engine: mixed prompts, then single-model ones."""
    any_version = prod.weights(merged_versions["ties"].version)  # the media rows are the same in every version
    mixed = Sequences(*ev.mixed, TASKS, any_version, suite.vocab)
    pipes = {}

    def acc(version: int, prompts, sequences=mixed, originals=False) -> dict[str, float]:
        if (version, originals) not in pipes:
            build = originals_pipeline if originals else engine_pipeline
            pipes[version, originals] = build(prod.weights(version), args.device)
        return sequences.accuracy(pipes[version, originals], prompts)

    v = merged_versions["ties"].version
    base_text = [text_through(q, WeightSet.base()) for q in mixed.expansion("mean-mask", prod.weights(v))]
    expansion = [Row("finetuned", "Fine-tuned model i, its weights for all tokens", "reference", proxy_ref, proxy_ref),
                 Row("originals-routed", "Originals routed: modality k via θ_k, text via θ_pre", "reference",
                     acc(v, base_text, originals=True), proxy_ref, "no merge: the routing itself")]
    variants = (("mmer-lam1", "MMER (TIES), λ=1", TEXT_POLICIES),
                ("mmer-tuned", "MMER (TIES), λ tuned", TEXT_POLICIES),
                ("mmer-neuro", "MMER (NeuroMerging), λ=1", ("mean-mask",)),
                ("tall", "TALL-masks (TA)", ("mean-mask",)),
                ("no-sign", "MMER − Directional Congruence", ("mean-mask",)),
                ("no-magnitude", "MMER − Dominant Significance", ("mean-mask",)))
    for key, name, policies in variants:
        v = versions[key].version
        for policy in policies:
            expansion.append(Row(key if policy == "mean-mask" else f"{key}:{policy}",
                                 name if len(policies) == 1 else f"{name}, {policy}", "routed",
                                 acc(v, mixed.expansion(policy, prod.weights(v))), proxy_ref,
                                 "modality k via θ̂_k, " + POLICY_NOTES[policy], {"text_policy": policy}))
    for key, name in (("naive", "NaiveMC"), ("ties", "TIES θ*"), ("neuro", "NeuroMerging θ*")):
        v = merged_versions[key].version
        one = [through(q, WeightSet.star()) for q in mixed.expansion("mean-mask", prod.weights(v))]
        expansion.append(Row(key, name, "single-weights", acc(v, one), proxy_ref, "one θ* for every token"))

    # the retention test sets as expansion requests (one model's media each): where the policies differ most
    tests = {t: Sequences(ev.test[t][0], {t: ev.test[t][1]}, (t,), any_version, suite.vocab) for t in TASKS}
    single = []
    for key, name in (("mmer-lam1", "MMER (TIES), λ=1"), ("mmer-tuned", "MMER (TIES), λ tuned")):
        v = versions[key].version
        retention = next(r for r in rows if r.key == key)
        single.append(Row(key, f"{name}: retention (θ̂_k for every token, HF)", "reference", retention.acc, ft_acc))
        for policy in TEXT_POLICIES:
            got = {}
            for t, seqs in tests.items():
                got.update(acc(v, seqs.expansion(policy, prod.weights(v)), seqs))
            single.append(Row(f"{key}:{policy}", f"{name}, {policy}", "routed", got, ft_acc, POLICY_NOTES[policy],
                              {"text_policy": policy}))
    return expansion, single


# -- output -----------------------------------------------------------------------------------------


def _table(title: str, rows: list[Row], paper: bool, caption: str):
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("method", no_wrap=True)
    for t in TASKS:
        table.add_column(t, justify="right")
    table.add_column("mean", justify="right", style="bold")
    if paper:
        table.add_column("paper", justify="right", style="dim")
    table.add_column("settings", style="dim")
    group = None
    for r in rows:
        if group is not None and r.group != group:
            table.add_section()
        group = r.group
        cells = [f"{r.retention[t]:6.1f} ({100 * r.acc[t]:5.1f})" for t in TASKS]
        row = [r.name, *cells, f"{r.mean_retention:6.1f}"]
        if paper:
            row.append(f"{PAPER[r.key]:.1f}" if r.key in PAPER else "")
        table.add_row(*row, r.note)
    return table


def report(result: dict) -> None:
    from rich.console import Console

    console = Console(width=max(172, Console().width))
    size = result["size"]
    console.print(
        f"[bold]Retention quality[/bold]: Llama hidden {size['hidden']}, {size['layers']} layers, "
        f"{len(TASKS)} fine-tunes ({size['finetune_steps']} steps, lr {size['finetune_lr']:g}) from a base pre-trained "
        f"{size['pretrain_steps']} steps; checkpoints {result['checkpoint_dtype']}; test: {size['eval_sequences']} "
        f"sequences per task. Tasks: " + "; ".join(f"{t}: {r}" for t, r in RULES.items()))
    if result.get("finetunes"):
        console.print("fine-tunes, saved in bf16 (shared LLM rows): " + "; ".join(
            f"{t}: acc fp32 {f['accuracy_fp32']:.1f}% -> bf16 {f['accuracy_bf16']:.1f}%, {f['zero_delta_pct']:.1f}% "
            f"deltas exactly 0, |τ|/|θ_pre| {f['relative_delta']:.3f}" for t, f in result["finetunes"].items()))
    console.print(_table(
        "Retention: retention % (accuracy %) per fine-tuned model, each with its own modality rows",
        result["_rows"], True,
        "retention = accuracy / fine-tuned accuracy (paper Eq. 8). 'paper': the paper's retention on accuracy "
        "(Table 2 trimmed avg, whose TA scale is not stated; Table 5 ablations; MMER λ=1 row = Table 5 "
        "'− Scaling Factor λ').\n"
        "MMER rows are theta_hat_i = theta_pre + m_i∘τ* of their version per model; merged rows use one theta for "
        "all models (θ* of the baseline's version); weights read from the store (VersionWeights), bf16."))
    console.print("mask density (% of the shared LLM parameters): " + "; ".join(
        f"{r.name}: " + " ".join(f"{t[0]}={r.extra['mask_density_pct'][t]:.1f}" for t in TASKS)
        for r in result["_rows"] if "mask_density_pct" in r.extra))
    lam = result["lambda_sweep_val_accuracy"]
    console.print("λ sweep (validation accuracy %, MMER over TIES): " + "; ".join(
        f"λ={k}: " + " ".join(f"{t[0]}={v[t]:.1f}" for t in TASKS) for k, v in lam.items()))
    console.print(_table(
        "Expansion: mixed prompts (two task segments of different models each), ONE routed prefill through the "
        "serving engine; retention % (accuracy %) on each model's segments",
        result["_expansion"], False,
        "routed rows: model k's prefix + modality tokens are its media (own extra embedding rows) through θ̂_k, "
        "text tokens through the text policy's weights (mmer_dist.model). With two models' media in every prompt, "
        "request-modality is θ̄ (= mean-mask) and present-mean is θ_pre + mean of the two models' masks ∘ τ*.\n"
        "Engine rows score over the base vocabulary (its expansion LM head); reference: fine-tuned model k's own "
        "weights for every token (plain HF, whole vocabulary), scored on task-k segments."))
    console.print(_table(
        "Expansion on single-model prompts (the retention test sets, one model's media each) through the serving "
        "engine; retention % (accuracy %)",
        result["_single"], False,
        "one model present: request-modality and present-mean run θ̂_k for every token (request-modality answers "
        "with model k's vocabulary, present-mean with the base's), mean-mask runs the text through θ̄."))
    console.print(_table(
        "PROXY, not expansion: mixed prompts (two task segments each), ONE set of LLM weights for every token; "
        "retention % (accuracy %)",
        result["_proxy"], False,
        "reference: fine-tuned model i's own LLM weights on the mixed prompts, scored on task-i segments. "
        "Each model's modality rows are present in every row."))
    secs = result["seconds"]
    console.print(
        f"wall {result['wall_seconds']:.1f}s (training {result['train_seconds']}s, "
        f"{'this run' if result['trained_now'] else 'cached from an earlier run'}; ingest {secs['ingest']}s, "
        f"merges {secs['merge']}s, weights read from the store {secs['read']}s, HF evaluation {secs['evaluate']}s, "
        f"engine (expansion) {secs['engine']}s on {result['settings']['device']}); JSON: {result.get('json_path')}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    result["json_path"] = str(args.json)
    payload = {k: v for k, v in result.items() if not k.startswith("_")}
    write_json(Path(args.json), payload)
    report(result)
    return result


if __name__ == "__main__":
    main()
