"""Smoke test of the retention quality benchmark (bench/quality.py) at its toy size: real training,
ingest, every method as a published store version, weights read from the store, HF evaluation, the
expansion tables through the serving engine, JSON output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import quality  # noqa: E402
from bench.quality_tasks import TASKS  # noqa: E402


def test_quality_quick(tmp_path, capsys):
    out = tmp_path / "quality.json"
    result = quality.main(["--quick", "--cache", str(tmp_path / "cache"), "--json", str(out)])
    assert result["trained_now"] is True
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {r["key"]: r for r in data["rows"]}

    expected = {"finetuned", "base", "naive", "naive+dare", "ta-0.3", "ta", "ta+dare", "ties", "ties+dare", "neuro",
                "mmer-lam1", "mmer-lam0.9", "mmer-tuned", "mmer-neuro", "tall", "no-sign", "no-magnitude"}
    assert expected <= set(rows)
    assert all(rows["finetuned"]["retention"][t] == 100.0 for t in TASKS)
    # the fine-tunes really learned their task: far above the base (with the same modality rows)
    for t in TASKS:
        assert rows["finetuned"]["accuracy"][t] >= rows["base"]["accuracy"][t] + 25.0, t
    # reconstruction keeps more than one shared set of weights does (large margin at this size)
    assert rows["mmer-lam1"]["mean_retention"] > rows["naive"]["mean_retention"] + 20.0
    assert rows["mmer-lam1"]["mean_retention"] > rows["ties"]["mean_retention"] + 20.0
    for key in ("mmer-lam1", "mmer-tuned", "tall", "no-sign"):
        assert set(rows[key]["mask_density_pct"]) == set(TASKS)
        assert all(0.0 < d < 100.0 for d in rows[key]["mask_density_pct"].values())
    assert set(data["lambda_tuned"]) == set(TASKS)
    assert {r["key"] for r in data["proxy"]} >= {"finetuned", "mmer-lam1", "ties"}
    assert "serving engine" in data["settings"]["expansion"]
    assert "PROXY" in printed and "Expansion" in printed
    expansion = {r["key"]: r for r in data["expansion"]}
    policies = [f"{v}:{p}" for v in ("mmer-lam1", "mmer-tuned") for p in ("request-modality", "present-mean")]
    assert {"finetuned", "originals-routed", "mmer-lam1", "mmer-tuned", "mmer-neuro", "tall", "no-sign",
            "no-magnitude", "naive", "ties", "neuro", *policies} <= set(expansion)
    assert {r["group"] for r in data["expansion"]} == {"reference", "routed", "single-weights"}
    proxy = {r["key"]: r for r in data["proxy"]}
    for key in ("naive", "ties", "neuro"):
        # the same theta* through the engine (base-vocabulary head) and through plain HF (whole vocabulary)
        for t in TASKS:
            assert abs(expansion[key]["accuracy"][t] - proxy[key]["accuracy"][t]) <= 1.0, (key, t)
    # routing is a different computation from one set of weights for every token
    assert expansion["mmer-lam1"]["accuracy"] != proxy["mmer-lam1"]["accuracy"]
    for v in ("mmer-lam1", "mmer-tuned"):
        # every mixed prompt has two models' media: request-modality falls back to theta_bar exactly
        assert expansion[f"{v}:request-modality"]["accuracy"] == expansion[v]["accuracy"]
        # present-mean: the text weights no longer carry the two absent models' task vectors
        assert expansion[f"{v}:present-mean"]["mean_retention"] > expansion[v]["mean_retention"] + 3.0
    single = {r["key"]: r for r in data["expansion_single_model"]}
    for v in ("mmer-lam1", "mmer-tuned"):
        for t in TASKS:  # one model present: request-modality is retention exactly, through the engine
            assert abs(single[f"{v}:request-modality"]["accuracy"][t] - rows[v]["accuracy"][t]) <= 0.5, (v, t)
        assert single[f"{v}:mean-mask"]["mean_retention"] < single[f"{v}:request-modality"]["mean_retention"]
    assert result["wall_seconds"] > 0
