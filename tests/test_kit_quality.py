"""The kit quality benchmark's code paths on the kit's test size (``python bench/kit_quality.py --quick``).

Structure and sanity that can fail: the originals rebuilt from the store reproduce the kit's own
numbers, the serving engine's retention answers and the bench's rewritten-routing path agree with
their references, single-modality ``request-modality`` expansion builds retention's prompt and
gives its answers, MMER keeps more than the base floor, every text policy and table is there, and
the plots are PNGs. Engine and transformers answers are compared by ``mmer_dist.demo.agreement``: equal, or
parting only at a near-tie within float rounding (the kit trained on another CPU differs in its
low bits, and so do its near-ties).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `bench` is a package there

from bench import kit_quality, kit_report  # noqa: E402
from mmer_dist.demo.agreement import holds  # noqa: E402
from mmer_dist.model import TEXT_POLICIES  # noqa: E402


@pytest.fixture(scope="module")
def bench(tmp_path_factory, kit):
    out = tmp_path_factory.mktemp("kit-quality")
    result = kit_quality.main(["--quick", "--out", str(out), "--kit-cache", str(kit.root.parent)])
    return out, result


def by_key(rows):
    return {(r if isinstance(r, dict) else r.as_dict())["key"]: (r if isinstance(r, dict) else r.as_dict())
            for r in rows}


def test_the_references_hold(bench):
    _, result = bench
    checks = result["checks"]
    for m, (rebuilt, recorded) in checks["originals_reproduce_kit_accuracy"].items():
        assert rebuilt == recorded, m
    # the engine's retention answers are transformers' on the same theta_hat: log-probabilities
    # within the stated tolerance, and an answer differs only at a near-tie (mmer_dist/demo/agreement.py)
    for m, check in checks["engine_retention_equals_hf"].items():
        assert holds(check), (m, check)
    same, n = checks["engine_routed_path_equals_server"]
    assert same == n > 0


def test_retention_rows(bench):
    _, result = bench
    rows = by_key(result["retention"])
    assert set(rows["original"]["retention"].values()) == {100.0}
    assert rows["mmer-lam1"]["mean_retention"] >= rows["base"]["mean_retention"]
    assert {"naive", "ties", "ties+dare", "neuro", "mmer-lam1", "mmer-tuned", "mmer-neuro"} <= set(rows)  # --quick
    assert rows["mmer-tuned"]["lams"] == result["calibration"]["lams"]
    assert set(result["calibration"]["lams"].values()) <= set(result["plan"]["lam_grid"])
    for r in rows.values():
        assert all(0.0 <= a <= 100.0 for a in r["accuracy"].values())


def test_expansion_covers_every_text_policy_and_request_modality_is_retention(bench):
    _, result = bench
    single, mixed = by_key(result["expansion_single"]), by_key(result["expansion_mixed"])
    for variant in ("mmer-lam1", "mmer-tuned"):
        for policy in TEXT_POLICIES:
            assert f"{variant}:{policy}" in single and f"{variant}:{policy}" in mixed
        # one model's media: request-modality runs theta_hat_k on every token of the very prompt
        # retention builds (the kit's models keep the base's chat template), so its answers are
        # retention's (transformers' on theta_hat), up to near-ties within float rounding
        same, n = result["checks"]["request_modality_prompt_is_retention_prompt"][variant]
        assert same == n > 0, variant
        for m, check in result["checks"]["request_modality_equals_retention"][variant].items():
            assert holds(check), (variant, m, check)
    assert {"naive", "ties", "originals-routed"} <= set(single) & set(mixed)
    pairs = next(iter(mixed.values()))["pairs"]
    assert len(pairs) == 6 and all(0.0 <= v <= 100.0 for v in pairs.values())


def test_ablations_sensitivity_and_forgetting(bench):
    _, result = bench
    assert [r.key for r in result["ablations"]] == ["mmer-tuned", "no-sign", "no-magnitude", "no-lam"]
    assert [e["lam"] for e in result["sensitivity"]["lambda"]] == list(result["plan"]["lam_grid"])
    assert [e["K"] for e in result["sensitivity"]["K"]] == list(result["plan"]["k_grid"])
    forgetting = by_key(result["forgetting"])
    assert "parity" in forgetting["mmer-tuned:5"]["retention"] and "parity" not in forgetting["mmer-tuned:4"]["retention"]
    assert forgetting["original"]["old_mean_retention"] == 100.0
    assert all(isinstance(c["agrees"], bool) for c in result["claims"]) and len(result["claims"]) >= 8


def test_outputs_are_written(bench):
    out, result = bench
    for path in result["plots"].values():
        data = Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    doc = json.loads((out / "kit_quality.json").read_text())
    assert {"retention", "expansion_mixed", "sensitivity", "forgetting", "claims", "seconds"} <= set(doc)
    assert not list(out.glob("kit-quality-*"))  # the temporary store is removed
    report = kit_report.markdown(result, result["plots"])
    for title in ("Retention (paper Table 2)", "Expansion, mixed prompts", "Ablations (paper Table 5)",
                  "Sensitivity (paper Fig. 4b)", "Forgetting (paper Table 3)", "The paper's statements"):
        assert f"## {title}" in report
