"""``mmer calibrate`` and ``mmer merge --lam auto`` on a tiny real store (conftest's checkpoints).

Hooks are deterministic functions of the version they are given (tests/calibration_hooks.py), so
the chosen lambda is known in advance; the data-free statistics are held against whole-tensor sums
over the source checkpoints and the reference merge (``mmer_dist.method.reference``).
"""

from __future__ import annotations

import json

import pytest
import torch
from calibration_hooks import TARGETS
from store_helpers import reference_for_version, run_cli, shared_rows, status_json

from mmer_dist.calibrate import calibrate, load_hook, read_calibration
from mmer_dist.errors import InvalidInputError
from mmer_dist.store import layout
from mmer_dist.store.store import Store

FIRST_MERGE = ("--topk", "0.7", "--lam", "llava=1.3")  # the base version every calibration merge repeats


@pytest.fixture()
def store(stores, tmp_path):
    path = stores.fresh(tmp_path / "store", models=True)
    run_cli("merge", "--store", path, "--quiet", "--no-compile", "--device", "cpu", *FIRST_MERGE)
    return path


def version_dirs(path) -> list[str]:
    return sorted(p.name for p in (path / "versions").iterdir() if p.is_dir())


def test_calibration_picks_the_hooks_best_lambda_and_merge_auto_uses_it(store):
    calibrated = ["llava-hf", "video-llava-hf", "llava"]
    before = status_json(store)["versions"]
    out = run_cli("calibrate", "--store", store, "--eval", "calibration_hooks:closest_to_target",
                  "--grid", "1.5,0.5,0.7,1.2", "--models", *calibrated).out
    record = json.loads((store / layout.CALIBRATION).read_text())
    assert record["lams"] == {m: TARGETS[m] for m in calibrated}
    assert record["grid"] == [0.5, 0.7, 1.2, 1.5] and record["base_version"] == 1
    assert record["settings"]["topk"] == 0.7
    assert "llava-hf=0.7, video-llava-hf=1.2, llava=0.5" in out
    # the calibration versions are gone again: catalog and arrays
    assert status_json(store)["versions"] == before and version_dirs(store) == ["000001"]

    refused = run_cli("merge", "--store", store, "--lam", "auto", "--quiet", "--no-compile", ok=False)
    assert refused.rc == 2 and "no calibrated lambda for model(s) generic" in refused.err
    done = run_cli("merge", "--store", store, "--lam", "auto", "--models", *calibrated, "--quiet", "--no-compile",
                   "--device", "cpu")
    assert "calibrated with other settings (topk 0.7 -> 0.8)" in done.err
    latest = status_json(store)["versions"][-1]
    assert latest["models"] == calibrated and latest["lams"] == [TARGETS[m] for m in calibrated]


def test_ties_go_to_the_lambda_closest_to_one(store):
    result = calibrate(str(store), load_hook("calibration_hooks:constant"), grid=(0.5, 0.9, 1.5),
                       models=["generic"])
    assert result.lams == {"generic": 0.9}
    assert [r.lam for r in result.models["generic"].results] == [0.5, 0.9, 1.5]
    assert read_calibration(Store.open(str(store))).lams == {"generic": 0.9}


def test_statistics_equal_a_whole_tensor_reference(store, sources):
    url = str(store)
    result = calibrate(url, load_hook("calibration_hooks:version_lam"), grid=(0.5, 1.0), keep_versions=True)
    versions = {v["version"]: v for v in status_json(store)["versions"]}
    base = sources.base("bf16")
    models = {m: sources.llm(m, "bf16") for m in versions[1]["models"]}
    params = sum(t.numel() for t in base.values())
    for m, c in result.models.items():
        assert c.best.lam == 1.0  # version_lam scores the lam itself: the largest wins
        for r in c.results:
            version = versions[r.version]
            # each calibration merge repeats version 1 but for the lam of every calibrated model
            assert version["topk"] == 0.7 and version["method"] == "ties" and version["lams"] == [r.lam] * 4
            ref = reference_for_version(version, base, models)
            i = version["models"].index(m)
            tau = {k: v.float() - base[k].float() for k, v in shared_rows(models[m], base).items()}
            err = sum(float((torch.where(ref.masks[i][k], ref.tau_star[k], 0.0) - tau[k]).abs().double().sum())
                      for k in base)
            norm = sum(float(t.abs().double().sum()) for t in tau.values())
            assert r.rel_l1 == pytest.approx(err / norm, rel=1e-9, abs=0)
            assert r.density == pytest.approx(sum(int(ref.masks[i][k].sum()) for k in base) / params, rel=1e-12)
            assert r.score == r.lam
    assert 0.0 < result.models["llava"].results[0].rel_l1 < 1.0  # the error is neither trivial nor total
    assert version_dirs(store) == ["000001", "000002", "000003"]  # kept on request
    assert Store.open(url).catalog().serving_version() == 1  # published, never served


def test_a_grid_value_the_base_version_has_reuses_it(store):
    run_cli("merge", "--store", store, "--quiet", "--no-compile", "--device", "cpu", "--topk", "0.7")  # v2, lam 1
    result = calibrate(str(store), load_hook("calibration_hooks:version_lam"), grid=(0.5, 1.0), models=["llava"])
    assert [r.version for r in result.models["llava"].results] == [3, 2]
    assert [v["version"] for v in status_json(store)["versions"]] == [1, 2] and version_dirs(store) == ["000001", "000002"]


def test_lam_auto_without_a_calibration_is_refused(store):
    r = run_cli("merge", "--store", store, "--lam", "auto", "--quiet", ok=False)
    assert r.rc == 2 and r.err.count("\n") == 1
    assert "no lambda calibration is recorded" in r.err and "mmer calibrate" in r.err
    r = run_cli("merge", "--store", store, "--lam", "auto", "--lam", "llava=0.5", "--quiet", ok=False)
    assert r.rc == 2 and "drop the ID=VALUE ones" in r.err
    assert version_dirs(store) == ["000001"]


@pytest.mark.parametrize("spec, message", [
    ("nohook", "expected module:function"),
    (":accuracy", "expected module:function"),
    ("calibration_hooks:", "expected module:function"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("calibration_hooks:missing", "has no attribute 'missing'"),
    ("calibration_hooks:NOT_CALLABLE", "is not a function"),
    ("calibration_hooks:raises", "raised RuntimeError: no validation data for llava-hf"),
    ("calibration_hooks:not_a_number", "returned nan"),
])
def test_bad_eval_hooks_give_one_clear_line_and_leave_the_store_as_it_was(store, spec, message):
    before = status_json(store)
    r = run_cli("calibrate", "--store", store, "--eval", spec, "--grid", "0.5,1", ok=False)
    assert r.rc == 2 and r.err.count("\n") == 1 and r.err.startswith("mmer calibrate: error: ")
    assert message in r.err
    assert status_json(store)["versions"] == before["versions"] and version_dirs(store) == ["000001"]
    assert not (store / layout.CALIBRATION).exists()


@pytest.mark.parametrize("grid, message", [("a,b", "comma-separated numbers"), ("1,1", "repeats"),
                                           ("-1", ">= 0"), (",", "empty")])
def test_bad_grids_are_refused(store, grid, message):
    r = run_cli("calibrate", "--store", store, "--eval", "calibration_hooks:constant", "--grid", grid, ok=False)
    assert r.rc == 2 and message in r.err


def test_calibrate_names_models_outside_the_base_version(store):
    with pytest.raises(InvalidInputError, match="model 'nope' is not part of version 1"):
        calibrate(str(store), load_hook("calibration_hooks:constant"), models=["nope"])
    assert version_dirs(store) == ["000001"]
