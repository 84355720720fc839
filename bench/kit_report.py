"""The kit quality benchmark's output: markdown tables, PNG plots, the JSON, and the paper check.

``write(result, out)`` writes ``kit_quality.json`` and the plots (``kit_quality_sensitivity.png``:
Fig. 4b, mean retention and mixed-prompt accuracy against K and lambda; ``kit_quality_masks.png``:
Fig. 4a, mask density per model with NaiveMC's and MMER's retention; ``kit_quality_retention.png``:
Table 2's mean retention per method) and returns their paths. ``markdown(result, paths)`` is the
printed report. ``claims(result)`` sets the paper's statements beside ours, each marked as agreeing
or not: the small scale is allowed to disagree, and says so.
"""

from __future__ import annotations

import math
from pathlib import Path

from mmer_dist.demo.agreement import TOLERANCE
from mmer_dist.demo.agreement import summary as agreement_summary
from bench.common import write_json

# The paper's numbers (arXiv 2505.17110): Table 2 "Trimmed Avg" retention on accuracy (its TA scale is
# not stated), Table 5 (MMER row = tuned lambda; "- Scaling Factor" = lambda 1), Table 1 average accuracy.
PAPER_RETENTION = {"naive": 88.3, "naive+dare": 89.8, "ta-0.3": 91.0, "ta+dare": 91.4, "ties": 90.6,
                   "ties+dare": 91.4, "mmer-tuned": 99.4, "mmer-lam1": 93.9, "no-sign": 16.7, "no-magnitude": 57.1,
                   "no-lam": 93.9}
PAPER_EXPANSION = {"naive": 53.23, "ties": 54.10, "mmer-tuned:mean-mask": 56.82, "mmer-tuned": 56.82,
                   "no-sign": 7.20, "no-magnitude": 33.87, "no-lam": 54.02}
FILES = {"sensitivity": "kit_quality_sensitivity.png", "masks": "kit_quality_masks.png",
         "retention": "kit_quality_retention.png"}


def _f(x: float, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _rows(result: dict, name: str) -> list[dict]:
    return [r if isinstance(r, dict) else r.as_dict() for r in result[name]]


def _models(result: dict) -> list[str]:
    return list(_rows(result, "retention")[0]["accuracy"])


# -- tables -------------------------------------------------------------------------------------------


def retention_table(result: dict) -> str:
    models = _models(result)
    rows = [[r["name"], *[f"{_f(r['retention'][m])} ({_f(r['accuracy'][m])})" for m in models],
             f"**{_f(r['mean_retention'])}**", _f(PAPER_RETENTION.get(r["key"])), r["note"]]
            for r in _rows(result, "retention")]
    return table(["method", *models, "mean retention", "paper", "settings"], rows)


def expansion_single_table(result: dict) -> str:
    models = _models(result)
    rows = [[r["name"], *[f"{_f(r['retention'][m])} ({_f(r['accuracy'][m])})" for m in models],
             f"**{_f(r['mean_retention'])}**"] for r in _rows(result, "expansion_single")]
    return table(["method (model `merged`)", *models, "mean retention"], rows)


def expansion_mixed_table(result: dict) -> str:
    mixed = result["expansion_mixed"]
    pairs = list(mixed[0]["pairs"])
    rows = [[r["name"], *[_f(r["pairs"][p]) for p in pairs], _f(r["both_right"]), f"**{_f(r['mean'])}**",
             _f(_mean(r["retention"])), _f(PAPER_EXPANSION.get(r["key"]), 2)]
            for r in mixed]
    return table(["method", *pairs, "both right", "mean acc", "mean retention", "paper avg acc"], rows)


def ablation_table(result: dict) -> str:
    rows = [[r["name"], _f(r.get("mixed_accuracy")), _f(PAPER_EXPANSION.get(r["key"]), 2),
             _f(r["mean_retention"]), _f(PAPER_RETENTION.get(r["key"])), r["note"]]
            for r in _rows(result, "ablations")]
    return table(["method", "mixed-prompt acc", "paper (3 expansion tasks)", "mean retention",
                  "paper (retention, acc)", "settings"], rows)


def _mean(d: dict) -> float:
    """Mean of the values that are numbers (a retention over an original that scored 0 is NaN)."""
    values = [v for v in d.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def sensitivity_tables(result: dict) -> str:
    s = result["sensitivity"]
    k = table(["K", "MMER θ̂ mean retention", "TIES θ* mean retention", "mixed acc (mean-mask)", "mean mask density"],
              [[f"{e['K']:g}", _f(_mean(e["retention"])), _f(_mean(e["ties_retention"])), _f(e.get("mixed_accuracy")),
                _f(_mean(e["mask_density"]), 3)] for e in s["K"]])
    lam = table(["λ", "λ·50%", "validation acc (mean)", "test mean retention", "rel-L1 (mean)", "mean mask density",
                 "mixed acc (mean-mask)"],
                [[f"{e['lam']:g}", f"{50 * e['lam']:g}%", _f(100 * _mean(e["validation_accuracy"])),
                  _f(_mean(e["retention"])), _f(_mean(e["rel_l1"]), 3), _f(_mean(e["mask_density"]), 3),
                  _f(e.get("mixed_accuracy"))] for e in s["lambda"]])
    return k + "\n\n" + lam


def forgetting_table(result: dict) -> str:
    rows = result["forgetting"]
    models = list(rows[0]["accuracy"])
    old = [m for m in models if m in _models(result)]
    new = [m for m in models if m not in old]
    out = [[r["name"], *[_f(r["retention"].get(m)) for m in old], f"**{_f(r['old_mean_retention'])}**",
            *[_f(r["retention"].get(m)) for m in new], _f(r.get("mixed_accuracy")), r["note"]] for r in rows]
    return table(["method", *old, "old mean", *[f"{m} (new)" for m in new], "old mixed acc", "settings"], out)


def calibration_table(result: dict) -> str:
    cal = result["calibration"]
    rows = [[m, f"**{cal['lams'][m]:g}**", *[_f(100 * r["score"]) for r in cal["results"][m]]] for m in cal["results"]]
    return table(["model", "chosen λ", *[f"val acc λ={x:g}" for x in cal["grid"]]], rows)


# -- the paper's statements beside ours -------------------------------------------------------------------


def claims(result: dict) -> list[dict]:
    ret = {r["key"]: r for r in _rows(result, "retention")}
    abl = {r["key"]: r for r in _rows(result, "ablations")}
    mixed = {r["key"]: r for r in result["expansion_mixed"]}
    forget = {r["key"]: r for r in result["forgetting"]}
    tuned, lam1 = ret["mmer-tuned"]["mean_retention"], ret["mmer-lam1"]["mean_retention"]
    merges = {k: r["mean_retention"] for k, r in ret.items() if r["group"] == "merged"}
    best_merge = max(merges, key=merges.get)
    floor = ret["base"]["mean_retention"]
    out = []

    def claim(paper: str, ours: str, agrees: bool):
        out.append({"paper": paper, "ours": ours, "agrees": bool(agrees)})

    claim("MMER θ̂ (λ tuned) keeps 99.4% of the originals' accuracy (Table 2)",
          f"{tuned:.1f}% (λ=1: {lam1:.1f}%; base floor {floor:.1f}%)", tuned >= 97.0)
    claim("MMER retains more than every merge (NaiveMC 88.3%, TA 91.0%, TIES 90.6%, +DARE ≤ 91.4%)",
          f"MMER {tuned:.1f}% vs best merge {ret[best_merge]['name']} {merges[best_merge]:.1f}%",
          tuned > merges[best_merge])
    claim("tuning λ adds ≈5.5 points over λ=1 (Table 5: 99.4 vs 93.9)", f"{tuned - lam1:+.1f} points", tuned - lam1 > 1.0)
    claim("without Directional Congruence retention collapses (16.7%)",
          f"{abl['no-sign']['mean_retention']:.1f}%", abl["no-sign"]["mean_retention"] < tuned - 20)
    claim("without Dominant Significance retention drops to 57.1%", f"{abl['no-magnitude']['mean_retention']:.1f}%",
          abl["no-magnitude"]["mean_retention"] < tuned - 10)
    mm = mixed["mmer-tuned:mean-mask"]["mean"]
    claim("on mixed inputs MMER (θ̄ text) beats NaiveMC and TIES θ* (Table 1: 56.8 vs 53.2 / 54.1)",
          f"MMER {mm:.1f} vs NaiveMC {mixed['naive']['mean']:.1f}, TIES {mixed['ties']['mean']:.1f} (mixed acc)",
          mm > max(mixed["naive"]["mean"], mixed["ties"]["mean"]))
    policies = {k.split(":")[1]: r["mean"] for k, r in mixed.items() if k.startswith("mmer-tuned:")}
    best_policy = max(policies, key=policies.get)
    claim("text tokens through θ̄ (mean-mask) are the paper's choice", f"best policy on mixed prompts here: "
          f"{best_policy} ({policies[best_policy]:.1f} vs mean-mask {policies['mean-mask']:.1f})",
          best_policy == "mean-mask")
    before, after = forget["mmer-tuned:4"]["old_mean_retention"], forget["mmer-tuned:5"]["old_mean_retention"]
    new = [m for m in forget["mmer-tuned:5"]["retention"] if m not in forget["mmer-tuned:4"]["retention"]][0]
    replaced = forget["replace"]["retention"]["digits"]
    claim("adding a new-task model barely changes the old tasks (Table 3: ≤ 0.6 points), unlike fine-tuning the "
          "old model on it", f"MMER old tasks {before:.1f}% → {after:.1f}%; {new} {forget['mmer-tuned:5']['retention'][new]:.1f}%; "
          f"replacing the image LLM: digits {replaced:.1f}%", abs(after - before) <= 2.0 and replaced < before - 5)
    lam = result["sensitivity"]["lambda"]
    lam_best = max(lam, key=lambda e: _mean(e["retention"]))
    high = [e for e in lam if e["lam"] >= 1.5]
    if high:
        claim("a too-high λ (λ·50% = 75%) collapses (Fig. 4b)", f"λ=1.5: {_mean(high[0]['retention']):.1f}% vs best "
              f"λ={lam_best['lam']:g}: {_mean(lam_best['retention']):.1f}%",
              _mean(high[0]["retention"]) < _mean(lam_best["retention"]) - 10)
    ks = result["sensitivity"]["K"]
    k_best = max(ks, key=lambda e: _mean(e["retention"]))
    claim("K = 0.8 is near the best K; very sparse K (0.2–0.4) hurts (Fig. 4b)",
          "K: " + ", ".join(f"{e['K']:g} → {_mean(e['retention']):.1f}%" for e in ks),
          abs(_mean(k_best["retention"]) - _mean(next((e for e in ks if e["K"] == 0.8), k_best)["retention"])) < 2.0)
    return out


# -- plots ----------------------------------------------------------------------------------------------------


def plots(result: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {k: str(out / v) for k, v in FILES.items()}
    s = result["sensitivity"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ks = [e["K"] for e in s["K"]]
    a.plot(ks, [_mean(e["retention"]) for e in s["K"]], "o-", label="MMER θ̂ (λ=1): mean retention %")
    a.plot(ks, [_mean(e["ties_retention"]) for e in s["K"]], "s--", label="TIES θ*: mean retention %")
    pts = [(e["K"], e["mixed_accuracy"]) for e in s["K"] if "mixed_accuracy" in e]
    a.plot(*zip(*pts), "^:", label="MMER mixed-prompt accuracy %")
    a.set_xlabel("Top K (fraction kept by the trim)")
    a.set_title("(b) sensitivity to K")
    lams = [50 * e["lam"] for e in s["lambda"]]
    b.plot(lams, [_mean(e["retention"]) for e in s["lambda"]], "o-", label="MMER θ̂: test mean retention %")
    b.plot(lams, [100 * _mean(e["validation_accuracy"]) for e in s["lambda"]], "s--",
           label="validation accuracy % (calibration)")
    pts = [(50 * e["lam"], e["mixed_accuracy"]) for e in s["lambda"] if "mixed_accuracy" in e]
    b.plot(*zip(*pts), "^:", label="mixed-prompt accuracy %")
    b.set_xlabel("Dominant Significance λ·50%")
    b.set_title("(b) sensitivity to λ (K=%g)" % result["settings"]["topk"])
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["sensitivity"], dpi=110)
    plt.close(fig)

    ret = {r["key"]: r for r in _rows(result, "retention")}
    models = _models(result)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    xs = range(len(models))
    for j, key in enumerate(("mmer-lam1", "mmer-tuned")):
        ax.bar([x + (j - 0.5) * width for x in xs], [100 * result["mask_density"][key][m] for m in models], width,
               label=f"mask density % ({ret[key]['name']})", alpha=0.6)
    ax.set_ylabel("parameters selected by the mask (%)")
    ax.set_xticks(list(xs), models)
    twin = ax.twinx()
    for key, style in (("naive", "k--o"), ("mmer-tuned", "r-s")):
        twin.plot(list(xs), [ret[key]["retention"][m] for m in models], style, label=f"retention %: {ret[key]['name']}")
    twin.set_ylabel("retention %")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    ax.set_title("(a) mask density per model and retention")
    fig.tight_layout()
    fig.savefig(paths["masks"], dpi=110)
    plt.close(fig)

    rows = _rows(result, "retention")
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1))
    ax.barh([r["name"] for r in rows][::-1], [r["mean_retention"] for r in rows][::-1], color="tab:blue")
    ax.axvline(100, color="k", lw=0.8)
    ax.set_xlabel("mean retention % (accuracy / original's)")
    ax.set_title("Retention on the kit (Table 2)")
    fig.tight_layout()
    fig.savefig(paths["retention"], dpi=110)
    plt.close(fig)
    return paths


def write(result: dict, out: Path) -> dict[str, str]:
    paths = plots(result, out)
    result["claims"] = claims(result)
    result["plots"] = paths
    result["json_path"] = str(out / "kit_quality.json")
    payload = {k: ([r.as_dict() for r in v] if isinstance(v, list) and v and hasattr(v[0], "as_dict") else v)
               for k, v in result.items()}
    write_json(Path(result["json_path"]), payload)
    return paths


def _first(n: int | None) -> str:
    return "" if n is None else f", its first {n} samples"


def markdown(result: dict, paths: dict[str, str]) -> str:
    kit, plan, secs = result["kit"], result["plan"], result["seconds"]
    accs = ", ".join(f"{m} {100 * a:.1f}%" for m, a in kit["accuracy"].items())
    checks = result["checks"]
    orig = checks["originals_reproduce_kit_accuracy"]
    eng = checks["engine_retention_equals_hf"]
    parts = [
        f"# MMER on the demo kit ({kit['size']} size)",
        f"Kit held-out accuracy (all of each held-out set): {accs}. Retention is scored on the report half "
        f"(odd positions) of each held-out set{_first(plan['n_test'])}; λ is "
        f"calibrated on the validation half (even positions). Cells: retention % (accuracy %).",
        "## Retention (paper Table 2)", retention_table(result),
        "## λ calibration (`mmer_dist.calibrate`, hook `kit_accuracy` on the validation half)", calibration_table(result),
        "## Expansion, single-modality prompts (paper Table 1 protocol, each task's report half sent to `merged`)",
        expansion_single_table(result),
        f"## Expansion, mixed prompts: two media of different models, both questions ({plan['n_mixed']} pairs each)",
        expansion_mixed_table(result),
        "## Ablations (paper Table 5)", ablation_table(result),
        "## Sensitivity (paper Fig. 4b)", sensitivity_tables(result),
        "## Forgetting (paper Table 3): the new-task model added as a fifth", forgetting_table(result),
        "## The paper's statements and ours",
        table(["paper", "here", "agrees"], [[c["paper"], c["ours"], "yes" if c["agrees"] else "**no**"]
                                            for c in result["claims"]]),
        "## Checks",
        "- originals rebuilt from the store reproduce the kit's recorded accuracy: "
        + ", ".join(f"{m} {a:.3f}={b:.3f}" if a == b else f"{m} {a:.3f}≠{b:.3f}" for m, (a, b) in orig.items()),
        "- serving engine in retention mode (model = its id) vs plain transformers on the same θ̂ (λ=1), answers "
        f"(a near-tie: the two tokens within 2×{TOLERANCE:g} in log-probability; mmer_dist/demo/agreement.py): "
        + "; ".join(f"{m} {agreement_summary(c)}" for m, c in eng.items()),
        *[f"- expansion, `request-modality`, single-modality prompts ({v}): the retention prompt in "
          f"{same[0]}/{same[1]}; answers vs transformers on θ̂: "
          + "; ".join(f"{m} {agreement_summary(c)}" for m, c in checks["request_modality_equals_retention"][v].items())
          for v, same in checks["request_modality_prompt_is_retention_prompt"].items()],
        f"- rewritten-routing path with no rewrite vs the server: {checks['engine_routed_path_equals_server'][0]}/"
        f"{checks['engine_routed_path_equals_server'][1]} same answers",
        "## Plots", *[f"- {k}: {v}" for k, v in paths.items()],
        f"wall {result['wall_seconds']:.0f} s: kit {kit['seconds_here']:.1f} s (built in {kit['build_seconds']:.0f} s), "
        f"ingest {secs['ingest']} s, merges {secs['merge']} s, reads {secs['read']} s, HF scoring {secs['hf']} s, "
        f"calibration {secs['calibration']} s, serving engine {secs['engine']} s on {result['settings']['device']}; "
        f"JSON {result['json_path']}",
    ]
    return "\n\n".join(parts)
