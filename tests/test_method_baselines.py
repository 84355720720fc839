"""Baselines on the streaming code path: Task Arithmetic, NaiveMC, DARE (DESIGN.md, "Baselines")."""

from __future__ import annotations

import math

import pytest
import torch
from method_helpers import bits, one_thread, random_models, streaming_merge  # noqa: F401 (fixture)

from mmer_dist.method import MergeSettings
from mmer_dist.method import baselines as bl
from mmer_dist.method.reconstruct import merged_weights
from mmer_dist.method.reference import reference_naive_mc

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"a.weight": (9, 7), "b.weight": (5, 13), "norm.weight": (11,)}


def ids(n):
    return [f"task-{i}" for i in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_arithmetic_is_base_plus_scaled_sum(dtype):
    base, models = random_models(4, SHAPES, dtype=dtype, seed=1)
    ms = MergeSettings(method="ta", alpha=0.3, lams=(1.0,) * 4)
    ts, _, _, _ = streaming_merge(base, models, ms, ids(4), rows_per_chunk=2)
    for k, b in base.items():
        taus = [m[k].float() - b.float() for m in models]
        total = ((taus[0] + taus[1]) + taus[2]) + taus[3]  # model order, as the contract fixes it
        assert torch.equal(bits(ts[k]), bits(total))
        theta = merged_weights(b, ts[k], ms.alpha)
        torch.testing.assert_close(theta, b.float() + 0.3 * total, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_naive_mc_is_the_plain_average(dtype):
    base, models = random_models(5, SHAPES, dtype=dtype, seed=2, scale=0.05)
    ms = MergeSettings(method="naive", lams=(1.0,) * 5)
    ts, _, _, _ = streaming_merge(base, models, ms, ids(5), rows_per_chunk=4)
    average = reference_naive_mc(models)
    for k, b in base.items():
        hand = sum(m[k].double() for m in models) / 5  # the average in float64
        theta = merged_weights(b, ts[k], 1.0)
        # base + mean(theta_i - base) vs mean(theta_i): equal up to float32 rounding (a few ulps of |theta|)
        scale = b.abs().double().max().item() + 1.0
        torch.testing.assert_close(theta.double(), hand, rtol=0, atol=16 * scale * 2**-24)
        torch.testing.assert_close(theta.double(), average[k].double(), rtol=0, atol=16 * scale * 2**-24)
        tau_mean = sum(m[k].float() - b.float() for m in models) / 5
        torch.testing.assert_close(ts[k], tau_mean, rtol=0, atol=1e-7)


# -- DARE -----------------------------------------------------------------------------------------


def fmix32_py(x: int) -> int:
    """MurmurHash3's fmix32, in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash_matches_plain_python():
    g = torch.Generator().manual_seed(0)
    xs = torch.cat([torch.tensor([0, 1, 2**31, 2**32 - 1]), torch.randint(0, 2**32, (200,), generator=g)])
    assert bl._fmix32(xs).tolist() == [fmix32_py(int(x)) for x in xs]
    for c in (0x85EBCA6B, 0xC2B2AE35, 1, 0xFFFFFFFF):
        assert bl._mul32(xs, c).tolist() == [(int(x) * c) % 2**32 for x in xs]
    seed, mk, tk = 12345, bl.stable_key("model-x"), bl.stable_key("layers.0.w")
    idx = torch.tensor([0, 5, 2**33 + 7])
    expect = []
    for i in idx.tolist():
        h = fmix32_py((seed ^ mk) & 0xFFFFFFFF)
        h = fmix32_py(h ^ tk)
        h = fmix32_py(h ^ (i & 0xFFFFFFFF))
        h = fmix32_py(h ^ (i >> 32))
        expect.append(h >= int(0.3 * 2**32))
    assert bl.dare_keep(seed, mk, tk, idx, 0.3).tolist() == expect


def test_stable_key_is_crc32():
    import zlib

    assert bl.stable_key("vision") == zlib.crc32(b"vision")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_drop_rate_and_rescale(p):
    n = 200_000
    tau = torch.randn(2, n, generator=torch.Generator().manual_seed(3)) + 5.0  # never exactly 0
    out = bl.dare(tau, p, seed=7, model_keys=(bl.stable_key("a"), bl.stable_key("b")), tensor_key=1, flat_offset=0)
    dropped = out == 0
    sigma = math.sqrt(p * (1 - p) / n)
    for i in range(2):
        assert abs(dropped[i].double().mean().item() - p) < 5 * sigma
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.equal(out[~dropped], tau[~dropped] * scale)
    # the two models drop different entries (independent keys)
    assert (dropped[0] != dropped[1]).double().mean().item() == pytest.approx(2 * p * (1 - p), abs=0.01)


def test_dare_zero_rate_is_identity():
    tau = torch.randn(3, 10)
    assert bl.dare(tau, 0.0, 1, (1, 2, 3), 4, 0) is tau


def test_dare_independent_of_chunking_and_model_order():
    g = torch.Generator().manual_seed(4)
    tau = torch.randn(3, 12, 10, generator=g)
    keys = tuple(bl.stable_key(m) for m in ("x", "y", "z"))
    whole = bl.dare(tau, 0.4, 99, keys, 17, 0)
    pieces = [bl.dare(tau[:, a:b], 0.4, 99, keys, 17, a * 10) for a, b in [(0, 1), (1, 5), (5, 12)]]
    assert torch.equal(torch.cat(pieces, 1), whole)
    perm = [2, 0, 1]
    permuted = bl.dare(tau[perm], 0.4, 99, tuple(keys[i] for i in perm), 17, 0)
    assert torch.equal(permuted, whole[perm])
    # a model alone (as when it is added later) gets the same drops as in the group
    alone = bl.dare(tau[1:2], 0.4, 99, keys[1:2], 17, 0)
    assert torch.equal(alone, whole[1:2])


def test_dare_seeds_and_tensors_differ():
    tau = torch.ones(1, 4096)
    base = bl.dare(tau, 0.5, 1, (5,), 6, 0) == 0
    # another seed, another tensor key, another model key
    for other in (bl.dare(tau, 0.5, 2, (5,), 6, 0), bl.dare(tau, 0.5, 1, (5,), 7, 0),
                  bl.dare(tau, 0.5, 1, (8,), 6, 0)):
        frac = ((other == 0) != base).double().mean().item()
        assert 0.4 < frac < 0.6  # about half the decisions change, as for independent draws


def test_dare_in_streaming_same_for_any_chunking_and_model_order():
    base, models = random_models(3, SHAPES, dtype=torch.bfloat16, seed=5)
    names = ["p", "q", "r"]
    ms = MergeSettings(method="ta", dare_rate=0.5, dare_seed=11, lams=(1.0,) * 3)
    ts1, m1, _, _ = streaming_merge(base, models, ms, names, rows_per_chunk=1)
    ts2, m2, _, _ = streaming_merge(base, models, ms, names, rows_per_chunk=100)
    # model order reversed: the sum runs in a different order, so compare within rounding,
    # and each model's mask (computed per entry) must follow its model
    ts3, m3, _, _ = streaming_merge(base, models[::-1], ms, names[::-1], rows_per_chunk=2)
    for k in base:
        assert torch.equal(bits(ts1[k]), bits(ts2[k]))
        torch.testing.assert_close(ts1[k], ts3[k], rtol=1e-6, atol=1e-7)
        for i in range(3):
            assert torch.equal(m1[i][k], m2[i][k])
    # each model's survivors: tau_i rescaled where kept, 0 elsewhere, with the same keep-mask
    # whatever its position (the mask of DARE itself, not the MMER mask)
    keys = tuple(bl.stable_key(n) for n in names)
    for k, b in base.items():
        tau = torch.stack([m[k].float() - b.float() for m in models])
        d = bl.dare(tau, 0.5, 11, keys, bl.stable_key(k), 0)
        d_rev = bl.dare(tau.flip(0), 0.5, 11, keys[::-1], bl.stable_key(k), 0)
        assert torch.equal(d_rev.flip(0), d)
        total = (d[0] + d[1]) + d[2]
        assert torch.equal(bits(ts1[k]), bits(total))
