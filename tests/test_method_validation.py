"""Bad input to the method layer: a clear InvalidInputError naming the model, tensor or field.

Public entry points that validate: ``MergeSettings.validated``, ``ChunkKernels`` (settings, with
model ids), ``MergeDriver`` (settings), ``reference_merge`` (settings and the models), and the
streaming passes (non-finite values, named by model, tensor and index).
"""

from __future__ import annotations

import math

import pytest
import torch
from method_helpers import (  # noqa: F401 (one_thread is a fixture)
    TEST_DEVICE,
    MemoryReader,
    chunk_specs,
    one_thread,
    random_models,
    streaming_merge,
)

from mmer_dist.errors import InvalidInputError
from mmer_dist.method import MergeDriver, MergeSettings, run_pass
from mmer_dist.method.kernels import ChunkKernels
from mmer_dist.method.reference import reference_merge
from mmer_dist.method.streaming import FinalPass, HighPass

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = ["vision", "audio", "video"]


def ok(**kw) -> MergeSettings:
    return MergeSettings(**{"lams": (1.0, 1.0, 1.0), **kw})


BAD_SETTINGS = [
    (dict(topk=0.0), "top-K"),
    (dict(topk=1.5), "top-K"),
    (dict(topk=-0.2), "top-K"),
    (dict(topk=math.nan), "top-K"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=-1.0), "alpha"),
    (dict(alpha=math.inf), "alpha"),
    (dict(lams=(1.0, -0.5, 1.0)), "'audio'"),
    (dict(lams=(1.0, 1.0, math.nan)), "'video'"),
    (dict(lams=(math.inf, 1.0, 1.0)), "'vision'"),
    (dict(lams=(1.0, 1.0)), "2 lambda values for 3 models"),
    (dict(scope="per-layer"), "per-layer"),
    (dict(method="dare-ties"), "dare-ties"),
    (dict(mask_rule="magic"), "magic"),
    (dict(dare_rate=1.0), "drop rate"),
    (dict(dare_rate=-0.1), "drop rate"),
]


@pytest.mark.parametrize("kw,needle", BAD_SETTINGS)
def test_bad_settings_are_named(kw, needle):
    match = needle.replace("(", r"\(")
    if "lams" not in kw:  # a field is checked once, when the settings are built
        with pytest.raises(InvalidInputError, match=match):
            ok(**kw)
        return
    bad = ok(**kw)  # lambdas are checked against the models of the merge, by every entry point
    with pytest.raises(InvalidInputError, match=match) as e:
        bad.validated(IDS)
    assert str(e.value)
    with pytest.raises(InvalidInputError, match=needle):
        ChunkKernels(bad, IDS)
    base, models = random_models(3)
    with pytest.raises(InvalidInputError, match=needle):
        reference_merge(base, models, bad, IDS)
    with pytest.raises(InvalidInputError, match=needle):
        streaming_merge(base, models, bad, IDS)


def test_bad_setting_in_driver():
    with pytest.raises(InvalidInputError, match="top-K"):
        MergeDriver(ok(topk=2.0), {"w": 4}, 3)
    with pytest.raises(InvalidInputError, match="lambda"):
        MergeDriver(ok(), {"w": 4}, 2)


def test_zero_models():
    with pytest.raises(InvalidInputError, match="at least one"):
        MergeSettings(lams=()).validated([])
    with pytest.raises(InvalidInputError, match="at least one"):
        ChunkKernels(MergeSettings(lams=()), [])
    base, _ = random_models(1)
    with pytest.raises(InvalidInputError, match="at least one"):
        reference_merge(base, [], MergeSettings(lams=()), [])


def test_the_valid_extremes_pass():
    ok(topk=1.0, alpha=1e-9, lams=(0.0, 1e30, 1.0), dare_rate=0.0).validated(IDS)
    ok(topk=1e-9, dare_rate=0.999).validated(IDS)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["ties", "ta", "naive"])
@pytest.mark.parametrize("where", ["model", "base"])
def test_non_finite_values_name_model_and_tensor(bad, method, where):
    base, models = random_models(3, dtype=torch.bfloat16)
    if where == "model":
        models[1]["b.weight"][2, 3] = bad
        needle = r"model 'audio', tensor 'b\.weight'.*flat index 21"
    else:
        base["b.weight"][1, 0] = bad
        needle = r"'base', tensor 'b\.weight'.*flat index 9"
    ms = ok(method=method, topk=0.7)
    with pytest.raises(InvalidInputError, match=needle):
        reference_merge(base, models, ms, IDS)
    with pytest.raises(InvalidInputError, match=needle):
        streaming_merge(base, models, ms, IDS, rows_per_chunk=2)


def test_non_finite_found_by_the_pass_that_reads_it():
    """The HighPass (trim) and the FinalPass each stop on a non-finite value in their chunk."""
    base, models = random_models(3)
    models[2]["a.weight"][6, 4] = math.inf
    reader = MemoryReader(base, models)
    chunks = chunk_specs(base, 2)
    kernels = ChunkKernels(ok(method="ties"), IDS)
    with pytest.raises(InvalidInputError, match=r"'video', tensor 'a\.weight'.*flat index 34"):
        run_pass(HighPass(), chunks, reader, kernels, device=TEST_DEVICE)
    kernels = ChunkKernels(ok(method="ta"), IDS)
    request = FinalPass({"*": torch.zeros(3)}, {"*": 1.0})
    with pytest.raises(InvalidInputError, match=r"'video', tensor 'a\.weight'.*flat index 34"):
        run_pass(request, chunks, reader, kernels, device=TEST_DEVICE)


def test_overflowing_tau_star_is_reported():
    """Finite inputs whose task-arithmetic sum overflows float32 are refused, naming the tensor."""
    base = {"w": torch.zeros(2, 2)}
    models = [{"w": torch.full((2, 2), 3e38)}, {"w": torch.full((2, 2), 3e38)}]
    with pytest.raises(InvalidInputError, match=r"tensor 'w'.*overflows"):
        streaming_merge(base, models, MergeSettings(method="ta", lams=(1.0, 1.0)), ["a", "b"])


def test_shape_mismatch_names_model_and_tensor():
    base, models = random_models(3)
    models[2]["a.weight"] = torch.zeros(7, 6)
    with pytest.raises(InvalidInputError, match=r"model 'video', tensor 'a\.weight': shape \(7, 6\)"):
        reference_merge(base, models, ok(), IDS)


def test_mixed_float_dtypes_merge_as_float32_and_integers_are_refused():
    base, models = random_models(3)
    models[1] = {k: v.to(torch.float16) for k, v in models[1].items()}
    models[2] = {k: v.to(torch.bfloat16) for k, v in models[2].items()}
    as_fp32 = [{k: v.float() for k, v in m.items()} for m in models]
    got, want = reference_merge(base, models, ok(), IDS), reference_merge(base, as_fp32, ok(), IDS)
    assert all(torch.equal(got.tau_star[k], want.tau_star[k]) for k in base)
    ts, ms, _, _ = streaming_merge(base, models, ok(), IDS)
    assert all(torch.equal(ts[k], want.tau_star[k]) for k in base)
    models[1]["norm.weight"] = models[1]["norm.weight"].to(torch.int32)
    with pytest.raises(InvalidInputError, match=r"model 'audio', tensor 'norm\.weight'.*not floating"):
        reference_merge(base, models, ok(), IDS)


def test_missing_or_extra_tensor_names_model():
    base, models = random_models(3)
    del models[0]["b.weight"]
    with pytest.raises(InvalidInputError, match=r"model 'vision'.*missing \['b\.weight'\]"):
        reference_merge(base, models, ok(), IDS)
    base, models = random_models(3)
    models[2]["lm_head.weight"] = torch.zeros(2, 2)
    with pytest.raises(InvalidInputError, match=r"model 'video'.*unexpected \['lm_head\.weight'\]"):
        reference_merge(base, models, ok(), IDS)


def test_model_and_name_count_mismatch():
    base, models = random_models(3)
    with pytest.raises(InvalidInputError, match="3 models but 2 names"):
        reference_merge(base, models, MergeSettings(lams=(1.0, 1.0)), IDS[:2])


def test_invalid_input_error_is_a_value_error():
    assert issubclass(InvalidInputError, ValueError)
