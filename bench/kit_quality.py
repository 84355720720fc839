"""The paper's tables and plots on the demo kit's really trained multimodal checkpoints.

    python bench/kit_quality.py                  # the demo kit (built once, ~4 min; cached)
    python bench/kit_quality.py --quick          # the kit's test size, few samples (the smoke test's)

The kit (``mmer_dist.demo.kit``): a small Llama base and LLaVA / Video-LLaVA fine-tunes of it on
digits (image), tones (audio), point-cloud shapes (point) and dot motion (video), plus parity (a
new task of the image modality, added later). They are ingested into a fresh store, and every
method is a published version of it. Weights are read straight from the store
(``VersionWeights``, ``mmer_dist.demo.kit_store``): nothing is exported to disk.

- Retention (paper Table 2): each model's own encoder + connector around the method's LLM
  (theta_hat_i for MMER, theta* for the merges, theta_pre for the floor, theta_i for the
  original), scored with plain transformers (greedy, exact match of the answer word) on the
  report half of its held-out set; retention = accuracy / the original's on the same samples.
  HF is the retention path because it is the kit's reference evaluator; the serving engine's
  retention answers (model = the model's id) are checked once against it on the same theta_hat.
- lambda: ``mmer_dist.calibrate`` with the kit's hook (``mmer_dist.demo.calibration:kit_accuracy``,
  the validation half), then ``calibrated_lams`` (what ``mmer merge --lam auto`` uses).
- Expansion (Table 1): chat requests through the serving engine in-process (``serve.llm.LLMServer``,
  real encoders and chat templates; ``mmer_dist/demo/expansion.py``) to model ``merged``, for every
  text policy: each task's report half alone (single-modality), and mixed prompts: two media of
  different models, then a question about one of them, both questions asked of the same pair.
  NaiveMC / TIES theta* (one set of weights for every token) and the originals routed (theta_k for
  model k's media, theta_pre for text: the routing with no merge) are reference rows.
- Ablations (Table 5), sensitivity to K and lambda (Fig. 4b, PNG), mask densities (Fig. 4a, PNG),
  forgetting (Table 3: parity added as a fifth model).

Prints markdown tables; writes ``bench/out/kit_quality.json`` and PNGs under ``bench/out/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `mmer_dist` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import kit_report  # noqa: E402
from bench.common import OUT_DIR, environment, write_json  # noqa: E402
from bench.kit_lab import Lab  # noqa: E402
from mmer_dist.calibrate import calibrate, calibrated_lams  # noqa: E402
from mmer_dist.demo.agreement import EngineAnswer, agreement  # noqa: E402
from mmer_dist.demo.calibration import kit_accuracy  # noqa: E402
from mmer_dist.demo.kit import build_kit, get_task  # noqa: E402
from mmer_dist.demo.kit.evaluate import quiet_transformers  # noqa: E402
from mmer_dist.demo.expansion import Encoders, Payloads, Served, mixed, request, single, text_through, through  # noqa: E402
from mmer_dist.model import TEXT_POLICIES  # noqa: E402
from mmer_dist.store.weightsets import WeightSet  # noqa: E402

HOOK = "mmer_dist.demo.calibration:kit_accuracy"
MODALITY_LETTER = {"image": "I", "audio": "A", "point": "P", "video": "V"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much each table runs: the demo size (default) or --quick."""

    size: str
    n_test: int | None  # report-half samples per task (None: all)
    n_mixed: int  # samples per model pair in the mixed prompts
    n_check: int  # samples per model of the engine-vs-HF retention check
    lam_grid: tuple[float, ...]
    k_grid: tuple[float, ...]
    dare_rate: float
    full_baselines: bool  # also NaiveMC + DARE, TA alpha=1, TA + DARE
    sweep_expansion: bool  # mixed-prompt accuracy at every K and lambda of the sweeps
    calibrate_added: bool  # calibrate the added model's lambda in the 5-model merge (else lambda 1)

    @classmethod
    def demo(cls) -> Plan:
        return cls("demo", None, 60, 48, (0.3, 0.5, 0.7, 0.9, 1.0, 1.2, 1.5), (0.2, 0.4, 0.6, 0.8, 1.0), 0.5, True, True, True)

    @classmethod
    def quick(cls, size: str = "test") -> Plan:
        return cls(size, 16, 4, 8, (0.7, 1.0), (0.6, 0.8), 0.5, False, False, False)


@dataclasses.dataclass
class Row:
    key: str
    name: str
    group: str
    acc: dict[str, float]  # per model, 0..1
    ref: dict[str, float]  # the original's accuracy on the same samples
    note: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def retention(self) -> dict[str, float]:
        return {m: 100.0 * a / self.ref[m] if self.ref[m] > 0 else float("nan") for m, a in self.acc.items()}

    @property
    def mean_retention(self) -> float:
        r = self.retention
        return sum(r.values()) / len(r)

    @property
    def mean_acc(self) -> float:
        return 100.0 * sum(self.acc.values()) / len(self.acc)

    def as_dict(self) -> dict:
        return {"key": self.key, "name": self.name, "group": self.group, "note": self.note,
                "accuracy": {m: round(100 * a, 3) for m, a in self.acc.items()},
                "retention": {m: round(r, 3) for m, r in self.retention.items()},
                "mean_accuracy": round(self.mean_acc, 3), "mean_retention": round(self.mean_retention, 3),
                **self.extra}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MMER's paper tables (retention, expansion, ablations, sensitivity, "
                                "forgetting) on the demo kit's real multimodal checkpoints.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the kit's test size and few samples (the smoke test)")
    p.add_argument("--size", choices=("demo", "test"), default=None, help="kit size (default: demo; --quick: test)")
    p.add_argument("--topk", type=float, default=0.8, help="K of every TIES / MMER merge outside the K sweep")
    p.add_argument("--device", default="cpu", help="device of the serving engine's stage: cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (keep it light on a shared machine)")
    p.add_argument("--kit-cache", type=Path, default=None, help="kit cache directory (default: $MMER_KIT_CACHE "
                   "or ~/.cache/mmer-dist/kit)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="where the JSON and the PNGs go")
    p.add_argument("--keep-store", action="store_true", help="keep the temporary store")
    return p.parse_args(argv)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    plan = Plan.quick(args.size or "test") if args.quick else dataclasses.replace(Plan.demo(), size=args.size or "demo")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    kit = build_kit(args.kit_cache, size=plan.size, log=print)
    kit_seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kit-quality-", dir=args.out))
    try:
        with quiet_transformers():
            lab = Lab(kit, work, plan.n_test)
            result = Bench(args, plan, kit, lab).run()
    finally:
        if args.keep_store:
            print(f"store kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result.update(plan=dataclasses.asdict(plan), kit={
        "size": kit.size, "root": str(kit.root), "build_seconds": kit.build_seconds, "seconds_here": round(kit_seconds, 2),
        "accuracy": {m.id: m.accuracy for m in kit.models.values()},
        "base_accuracy": {m.id: m.base_accuracy for m in kit.models.values()}},
        environment=environment(), wall_seconds=round(time.perf_counter() - started, 2))
    return result


class Bench:
    def __init__(self, args, plan: Plan, kit, lab: Lab):
        self.args, self.plan, self.kit, self.lab = args, plan, kit, lab
        self.initial = [m.id for m in kit.initial]
        self.added = [m.id for m in kit.added]
        self.encoders = Encoders(lab.url, lab.work / "encoders")
        self.payloads = Payloads()
        self.served: dict[tuple[int, bool], Served] = {}
        self.seconds = {"calibration": 0.0, "engine": 0.0}
        self.checks: dict[str, object] = {}

    # -- the serving engine ---------------------------------------------------------------------------

    def serve(self, version: int, originals: bool = False) -> Served:
        if (version, originals) not in self.served:
            self.served[version, originals] = Served(self.lab.url, version, self.encoders, self.args.device, originals)
        return self.served[version, originals]

    def answers(self, version: int, requests: list[dict], rewrite=None, originals: bool = False) -> list[str]:
        t0 = time.perf_counter()
        served = self.serve(version, originals)
        out = served.chat(requests) if rewrite is None else served.routed(requests, rewrite)
        self.seconds["engine"] += time.perf_counter() - t0
        return out

    def engine_answers(self, version: int, requests: list[dict]) -> list[EngineAnswer]:
        """Chat replies with their tokens' log-probabilities (``mmer_dist.demo.agreement`` judges them)."""
        t0 = time.perf_counter()
        out = self.serve(version).answers(requests)
        self.seconds["engine"] += time.perf_counter() - t0
        return out

    def single_requests(self, models, policy: str | None, model: str = "merged") -> tuple[list[dict], list[tuple]]:
        reqs, index = [], []
        for m in models:
            task = get_task(m)
            for i, s in enumerate(self.lab.test[m]):
                reqs.append(request(single(self.payloads, task, i, s, m), model, policy))
                index.append((m, s.answer))
        return reqs, index

    def mixed_requests(self, policy: str | None) -> tuple[list[dict], list[tuple]]:
        """Every pair of the initial models, ``n_mixed`` sample pairs each, both questions asked."""
        reqs, index = [], []
        for a, b in itertools.combinations(self.initial, 2):
            n = min(self.plan.n_mixed, len(self.lab.test[a]), len(self.lab.test[b]))
            for i in range(n):
                sa, sb = self.lab.test[a][i], self.lab.test[b][i]
                parts = ((get_task(a), i, sa, a), (get_task(b), i, sb, b))
                for ask, (m, s) in enumerate(((a, sa), (b, sb))):
                    reqs.append(request(mixed(self.payloads, *parts, ask), "merged", policy))
                    index.append(((a, b), m, i, s.answer))
        return reqs, index

    # -- the run --------------------------------------------------------------------------------------

    def run(self) -> dict:
        lab, plan, K = self.lab, self.plan, self.args.topk
        initial, every = self.initial, self.initial + self.added
        originals = lab.score(lab.originals(every))
        ref = originals.accuracy
        self.originals = originals
        full = lab.score(lab.originals(every), lab.held_out)
        self.checks["originals_reproduce_kit_accuracy"] = {
            m: [full.accuracy[m], self.kit.models[m].accuracy] for m in every}
        rows: list[Row] = []

        def add(key, name, group, scores, note="", models=initial, **extra):
            rows.append(Row(key, name, group, {m: scores.accuracy[m] for m in models}, {m: ref[m] for m in models},
                            note, extra))
            return scores

        add("original", "Original fine-tunes (θ_i)", "reference", originals, "upper bound")
        add("base", "Base LLM + own encoder (floor)", "reference", lab.score(lab.bases(initial)), "θ_pre")

        # -- lambda calibration on the validation half (the library, as `mmer calibrate` runs it) --
        ties = lab.merge(initial, topk=K)
        t0 = time.perf_counter()
        cal = calibrate(lab.url, kit_accuracy, hook_name=HOOK, grid=plan.lam_grid, models=initial,
                        base_version=ties.version, keep_versions=True)
        self.seconds["calibration"] = time.perf_counter() - t0
        lam_versions = {}
        for lam in plan.lam_grid:
            record = lab.weights(cal.models[initial[0]].results[plan.lam_grid.index(lam)].version).record
            lab.register(initial, {"topk": K, "lam": {m: lam for m in initial}}, record)
            lam_versions[lam] = lab.merge(initial, topk=K, lam={m: lam for m in initial})
        tuned_lams = calibrated_lams(lab.store, initial)  # what `mmer merge --lam auto` reads
        tuned = lab.merge(initial, topk=K, lam=tuned_lams)

        # -- Table 2: retention --
        p = plan.dare_rate
        baselines = [("naive", "NaiveMC (average)", {"method": "naive"}, ""),
                     ("naive+dare", "NaiveMC w/ DARE", {"method": "naive", "dare_rate": p}, f"p={p}"),
                     ("ta-0.3", "Task Arithmetic α=0.3", {"method": "ta", "alpha": 0.3}, "α=0.3"),
                     ("ta-1", "Task Arithmetic α=1", {"method": "ta", "alpha": 1.0}, "α=1"),
                     ("ta+dare", "Task Arithmetic α=0.3 w/ DARE", {"method": "ta", "alpha": 0.3, "dare_rate": p},
                      f"α=0.3, p={p}"),
                     ("ties", "TIES (θ*)", {}, f"K={K}"),
                     ("ties+dare", "TIES w/ DARE (θ*)", {"dare_rate": p}, f"K={K}, p={p}"),
                     ("neuro", "NeuroMerging (θ*)", {"method": "neuro"}, f"K={K}")]
        if not plan.full_baselines:  # --quick: one of each kind (average, TIES, DARE, NeuroMerging)
            baselines = [b for b in baselines if b[0] in ("naive", "ties", "ties+dare", "neuro")]
        merged = {}
        for key, name, fields, note in baselines:
            trims = fields.get("method", "ties") in ("ties", "neuro")
            merged[key] = lab.merge(initial, **({"topk": K} if trims else {}), **fields)
            add(key, name, "merged", lab.score(lab.merged(merged[key], initial)), note, version=merged[key].version)
        densities = {}

        def mmer_row(key, name, record, group="mmer", note=""):
            densities[key] = dict(zip(record.models, record.mask_density))
            return add(key, name, group, lab.score(lab.hats(record)), note, version=record.version,
                       lams=dict(zip(record.models, record.lams)), mask_density=densities[key])

        lam1 = mmer_row("mmer-lam1", "MMER θ̂_i (TIES), λ=1", ties, note=f"K={K}")
        mmer_tuned = mmer_row("mmer-tuned", "MMER θ̂_i (TIES), λ tuned on val", tuned,
                              note="λ " + " ".join(f"{m}={v:g}" for m, v in tuned_lams.items()))
        mmer_row("mmer-neuro", "MMER θ̂_i (NeuroMerging), λ=1", merged["neuro"], note=f"K={K}")

        # -- Table 5: ablations (the tuned lambdas, one step of the mask removed) --
        ablation_versions = {"no-sign": lab.merge(initial, topk=K, lam=tuned_lams, mask_rule="mmer-no-sign"),
                             "no-magnitude": lab.merge(initial, topk=K, lam=tuned_lams, mask_rule="mmer-no-magnitude")}
        ablation_rows = [r for r in rows if r.key == "mmer-tuned"]
        for key, name in (("no-sign", "− Directional Congruence"), ("no-magnitude", "− Dominant Significance")):
            record = ablation_versions[key]
            scores = lab.score(lab.hats(record))
            ablation_rows.append(Row(key, name, "ablation", scores.accuracy, {m: ref[m] for m in initial},
                                     f"mask rule mmer-{key}", {"version": record.version,
                                                                "mask_density": dict(zip(record.models, record.mask_density))}))
        ablation_rows.append(dataclasses.replace(next(r for r in rows if r.key == "mmer-lam1"),
                                                 key="no-lam", name="− Scaling Factor λ (λ=1)", group="ablation"))

        # -- retention: the engine's answers in retention mode equal HF's on the same theta_hat
        # (up to near-ties within float rounding: mmer_dist.demo.agreement) --
        n = plan.n_check
        check = {}
        for m in initial:
            reqs = [request(single(self.payloads, get_task(m), i, s, m), m)
                    for i, s in enumerate(lab.test[m][:n])]
            check[m] = agreement(self.engine_answers(ties.version, reqs), lam1.answers[m][:n])
        self.checks["engine_retention_equals_hf"] = check

        # -- Table 1: expansion --
        expansion_single, expansion_mixed = self.expansion(ties, tuned, merged, ref,
                                                           {"mmer-lam1": lam1, "mmer-tuned": mmer_tuned})

        # -- Fig. 4b: sensitivity (lambda from the calibration versions, K at lambda 1) --
        sweep = {"lambda": [], "K": []}
        mixed_mm, mixed_index = self.mixed_requests("mean-mask")
        for lam, record in lam_versions.items():
            acc = lab.score(lab.hats(record)).accuracy
            entry = {"lam": lam, "version": record.version, "retention": _retention(acc, ref),
                     "validation_accuracy": {m: next(r.score for r in cal.models[m].results if r.lam == lam)
                                             for m in initial},
                     "rel_l1": {m: next(r.rel_l1 for r in cal.models[m].results if r.lam == lam) for m in initial},
                     "mask_density": dict(zip(record.models, record.mask_density))}
            if plan.sweep_expansion or lam == 1.0:
                entry["mixed_accuracy"] = self.mixed_score(record.version, mixed_mm, mixed_index)["mean"]
            sweep["lambda"].append(entry)
        for k in plan.k_grid:
            record = lab.merge(initial, topk=k)
            entry = {"K": k, "version": record.version, "retention": _retention(lab.score(lab.hats(record)).accuracy, ref),
                     "ties_retention": _retention(lab.score(lab.merged(record, initial)).accuracy, ref),
                     "mask_density": dict(zip(record.models, record.mask_density))}
            if plan.sweep_expansion or k == K:
                entry["mixed_accuracy"] = self.mixed_score(record.version, mixed_mm, mixed_index)["mean"]
            sweep["K"].append(entry)

        # ablations in expansion: mixed prompts, mean-mask (the paper's expansion)
        for r in ablation_rows:
            r.extra["mixed_accuracy"] = self.mixed_score(r.extra["version"] if "version" in r.extra else ties.version,
                                                         mixed_mm, mixed_index)["mean"]

        forgetting = self.forgetting(ties, tuned, merged["naive"], tuned_lams, ref, mixed_mm, mixed_index)
        for s in self.served.values():
            s.close()
        self.checks["engine_routed_path_equals_server"] = self._routed_check
        self.checks["encoder_calls"] = self.encoders.calls
        return {
            "retention": rows, "ablations": ablation_rows, "expansion_single": expansion_single,
            "expansion_mixed": expansion_mixed, "sensitivity": sweep, "forgetting": forgetting,
            "calibration": {"lams": cal.lams, "grid": list(cal.grid), "seconds": cal.seconds,
                            "results": {m: [dataclasses.asdict(r) for r in c.results] for m, c in cal.models.items()}},
            "mask_density": densities, "checks": self.checks,
            "seconds": {**{k: round(v, 2) for k, v in lab.seconds.items()},
                        **{k: round(v, 2) for k, v in self.seconds.items()}},
            "settings": {"topk": K, "dare_rate": plan.dare_rate, "device": self.args.device, "hook": HOOK,
                         "retention": "plain transformers, greedy, exact match; report half of each held-out set",
                         "expansion": "serve.llm.LLMServer in-process (LocalPipeline float32), real encoders and chat "
                                      "templates; greedy, max_tokens 3"},
        }

    # -- Table 1 ----------------------------------------------------------------------------------------

    def expansion(self, ties, tuned, merged, ref, retention: dict) -> tuple[list[Row], list[dict]]:
        """``retention``: the HF scores of each variant's theta_hat, which single-modality
        ``request-modality`` reproduces: theta_hat_k on every token of the same prompt."""
        initial = self.initial
        single_rows: list[Row] = [Row("original", "Original fine-tunes (retention)", "reference",
                                      {m: ref[m] for m in initial}, {m: ref[m] for m in initial})]
        mixed_rows: list[dict] = []
        variants = (("mmer-lam1", "MMER, λ=1", ties), ("mmer-tuned", "MMER, λ tuned", tuned))
        same_prompt, as_retention = {}, {}
        for key, name, record in variants:
            for policy in TEXT_POLICIES:
                reqs, index = self.single_requests(initial, policy)
                if policy == "request-modality":
                    got = self.engine_answers(record.version, reqs)
                    as_retention[key] = {m: agreement([a for a, (owner, _) in zip(got, index) if owner == m],
                                                      retention[key].answers[m]) for m in initial}
                    replies = [a.text for a in got]
                    same_prompt[key] = self.serve(record.version).same_prompt_as_retention(reqs)
                else:
                    replies = self.answers(record.version, reqs)
                single_rows.append(self._single_row(f"{key}:{policy}", f"{name}, {policy}", "routed",
                                                    replies, index, ref,
                                                    {"text_policy": policy, "version": record.version}))
                mreqs, mindex = self.mixed_requests(policy)
                mixed_rows.append({"key": f"{key}:{policy}", "name": f"{name}, {policy}", "group": "routed",
                                   "text_policy": policy, "version": record.version,
                                   **self.mixed_score(record.version, mreqs, mindex)})
        star = lambda prompt: through(prompt, WeightSet.star())  # noqa: E731
        for key, name in (("naive", "NaiveMC θ*"), ("ties", "TIES θ*")):
            v = merged[key].version
            reqs, index = self.single_requests(initial, None)
            single_rows.append(self._single_row(key, name, "one weight set", self.answers(v, reqs, star), index, ref,
                                                {"version": v}))
            mreqs, mindex = self.mixed_requests(None)
            mixed_rows.append({"key": key, "name": name, "group": "one weight set", "version": v,
                               **self.mixed_score(v, mreqs, mindex, star)})
        text_base = lambda prompt: text_through(prompt, WeightSet.base())  # noqa: E731
        reqs, index = self.single_requests(initial, None)
        single_rows.append(self._single_row("originals-routed", "Originals routed (θ_k media, θ_pre text)", "reference",
                                            self.answers(ties.version, reqs, text_base, originals=True), index, ref))
        mreqs, mindex = self.mixed_requests(None)
        mixed_rows.insert(0, {"key": "originals-routed", "name": "Originals routed (θ_k media, θ_pre text)",
                              "group": "reference", **self.mixed_score(ties.version, mreqs, mindex, text_base,
                                                                        originals=True)})
        # the rewriting path builds the prompts the server builds: identical answers with no rewrite
        mreqs, _ = self.mixed_requests("mean-mask")
        n = min(len(mreqs), 64)
        same = self.answers(ties.version, mreqs[:n], lambda prompt: prompt)
        self._routed_check = [sum(a == b for a, b in zip(same, self.answers(ties.version, mreqs[:n]))), n]
        self.checks["request_modality_equals_retention"] = as_retention
        self.checks["request_modality_prompt_is_retention_prompt"] = same_prompt
        return single_rows, mixed_rows

    def _single_row(self, key, name, group, answers, index, ref, extra=None) -> Row:
        hits = {m: 0 for m in self.initial}
        total = {m: 0 for m in self.initial}
        for (m, answer), reply in zip(index, answers):
            hits[m] += reply == answer
            total[m] += 1
        return Row(key, name, group, {m: hits[m] / total[m] for m in self.initial}, {m: ref[m] for m in self.initial},
                   extra=extra or {})

    def mixed_score(self, version: int, requests, index, rewrite=None, originals: bool = False) -> dict:
        """Accuracy per pair (both questions), per model (the questions about it), both right, and
        retention per model against the original's single-modality accuracy on the same samples."""
        answers = self.answers(version, requests, rewrite, originals)
        right: dict[tuple, list[bool]] = {}
        for (pair, m, i, answer), reply in zip(index, answers):
            right.setdefault((pair, i), []).append(reply == answer)
            right.setdefault(("model", m), []).append(reply == answer)
            right.setdefault(("pair", pair), []).append(reply == answer)
        pairs = list(itertools.combinations(self.initial, 2))
        per_model = {m: _mean(right[("model", m)]) for m in self.initial}
        n = self.plan.n_mixed
        ref = {m: _mean([r == s.answer for r, s in zip(self.originals.replies[m][:n], self.lab.test[m][:n])])
               for m in self.initial}  # the mixed prompts use the first n_mixed report-half samples of each task
        return {"pairs": {self.pair_label(p): 100 * _mean(right[("pair", p)]) for p in pairs},
                "both_right": 100 * _mean([all(v) for k, v in right.items() if k[0] not in ("model", "pair")]),
                "per_model": {m: 100 * a for m, a in per_model.items()},
                "retention": {m: 100 * per_model[m] / ref[m] if ref[m] else float("nan") for m in self.initial},
                "mean": 100 * _mean([a for p in pairs for a in right[("pair", p)]])}

    def pair_label(self, pair) -> str:
        return "".join(MODALITY_LETTER[self.kit.models[m].modality] for m in pair) + "-T"

    # -- Table 3 ----------------------------------------------------------------------------------------

    def forgetting(self, ties4, tuned4, naive4, tuned_lams, ref, mixed_mm, mixed_index) -> list[dict]:
        lab, K = self.lab, self.args.topk
        every, new = self.initial + self.added, self.added[0]
        ties5 = lab.merge(every, topk=K)
        naive5 = lab.merge(every, method="naive") if self.plan.full_baselines else None
        new_lam = {new: 1.0}
        if self.plan.calibrate_added:
            t0 = time.perf_counter()
            new_lam = calibrate(lab.url, kit_accuracy, hook_name=HOOK, grid=self.plan.lam_grid, models=[new],
                                base_version=ties5.version).lams  # its masks depend on its own lambda alone
            self.seconds["calibration"] += time.perf_counter() - t0
        tuned5 = lab.merge(every, topk=K, lam={**tuned_lams, **new_lam})
        star = lambda prompt: through(prompt, WeightSet.star())  # noqa: E731
        out = []

        def row(key, name, acc: dict, record=None, rewrite=None, note=""):
            entry = {"key": key, "name": name, "note": note, "version": record.version if record else None,
                     "accuracy": {m: 100 * a for m, a in acc.items()},
                     "retention": {m: 100 * a / ref[m] for m, a in acc.items()}}
            old = [entry["retention"][m] for m in self.initial if m in acc]
            entry["old_mean_retention"] = sum(old) / len(old)
            if record is not None:
                entry["mixed_accuracy"] = self.mixed_score(record.version, mixed_mm, mixed_index, rewrite)["mean"]
            out.append(entry)

        row("original", "Original fine-tunes", self.originals.accuracy)
        # "fine-tune on the new task": the image modality's LLM becomes parity's (digits keeps its encoder)
        replaced = lab.score({"digits": lab.originals([new])[new]})
        row("replace", f"Replace the image LLM by {new}'s (fine-tuning style)",
            {**{m: self.originals.accuracy[m] for m in every}, "digits": replaced.accuracy["digits"]},
            note=f"digits' encoder around θ_{new}")
        methods = [("naive", "NaiveMC θ*", naive4, naive5, "merged", star),
                   ("ties", "TIES θ*", ties4, ties5, "merged", star),
                   ("mmer-lam1", "MMER θ̂, λ=1", ties4, ties5, "hats", None),
                   ("mmer-tuned", "MMER θ̂, λ tuned", tuned4, tuned5, "hats", None)]
        for key, name, four, five, states, rewrite in methods[0 if naive5 else 1:]:
            for label, record, models in (("4 models", four, self.initial), (f"+ {new}", five, every)):
                weights = lab.hats(record) if states == "hats" else lab.merged(record, models)
                row(f"{key}:{len(models)}", f"{name} ({label})", lab.score(weights).accuracy, record, rewrite,
                    note="λ " + " ".join(f"{m}={v:g}" for m, v in zip(record.models, record.lams)) if states == "hats"
                    else "")
        return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _retention(acc: dict, ref: dict) -> dict:
    return {m: 100 * a / ref[m] for m, a in acc.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    paths = kit_report.write(result, args.out)
    print(kit_report.markdown(result, paths))
    return result


if __name__ == "__main__":
    main()
