"""The mask-native linear (``mmer_dist.model.masked_linear``) against the plain loop of its docstring.

The loop is written out here again, independently of ``masked_linear_reference`` (unpack each
model's mask entry by entry from the packed bytes, compose, round, multiply), and every path is
held to it: the compiled CPU kernel (vector and scalar builds), the row-block reference path for
large groups, and the fused expression the CUDA path compiles (run eagerly here: no GPU on CI).
Shapes are random, columns odd as well as even, 1 to 16 models in one call, groups of 1 to 7
tokens (across the kernel's 4-token blocks) and one prefill-sized group, with and without bias,
and the fused q/k/v block of a GQA layer.
"""

from __future__ import annotations

import pytest
import torch

from mmer_dist.method.masks import pack_bits
from mmer_dist.model import masked_linear as ml
from mmer_dist.model import native

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def plain_loop(x, groups, base, tau_star, packed, round_to, biases=None):
    """out[t] = x[t] . round(theta_pre + m_i * tau*)^T (+ bias_i), mask bits read one by one."""
    rows, cols = base.shape
    out = torch.full((x.shape[0], rows), float("nan"))
    for g, (start, stop, i) in enumerate(groups):
        bits = torch.tensor([[(int(packed[i, r, c // 8]) >> (c % 8)) & 1 for c in range(cols)] for r in range(rows)],
                            dtype=torch.bool)
        w = (base.float() + torch.where(bits, tau_star.float(), torch.zeros(()))).to(round_to).float()
        out[start:stop] = x[start:stop].double().matmul(w.double().t()).float()
        if biases is not None and biases[g] is not None:
            out[start:stop] += biases[g].float()
    return out


def case(seed: int, rows: int, cols: int, n_models: int, group_sizes: list[int], base_dtype=torch.bfloat16,
         tau_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = (0.05 * torch.randn((rows, cols), generator=g)).to(base_dtype)
    tau = (0.01 * torch.randn((rows, cols), generator=g)).to(tau_dtype)
    tau[torch.rand((rows, cols), generator=g) < 0.3] = 0  # tau* has zeros (trimmed entries)
    packed = pack_bits(torch.rand((n_models, rows, cols), generator=g) < 0.6)
    models = torch.randint(0, n_models, (len(group_sizes),), generator=g).tolist()
    groups, start = [], 1  # row 0 belongs to no group: it must stay untouched
    for size, m in zip(group_sizes, models):
        groups.append((start, start + size, m))
        start += size
    x = torch.randn((start + 1, cols), generator=g)
    return x, groups, base, tau, packed


def run(path, x, groups, base, tau, packed, round_to, biases=None):
    out = torch.full((x.shape[0], base.shape[0]), float("nan"))
    path(x, ml.MaskGroups.build(groups), base, tau, packed, round_to, out, *([biases] if biases is not None else []))
    return out


def check(got, want, groups, x):
    for start, stop, _ in groups:
        # float32 summation order: a few ulps of the sum of |x| |w| per output
        torch.testing.assert_close(got[start:stop], want[start:stop], atol=2e-5 * x.shape[1] ** 0.5, rtol=1e-5)
    assert torch.isnan(got[0]).all() and torch.isnan(got[-1]).all(), "rows outside the groups were written"


@pytest.fixture(scope="module", params=["vector", "scalar"])
def kernel(request):
    # the engine's own cache directory: the vector build is the one the engine tests use too
    lib = native.load(vector=request.param == "vector")
    assert lib is not None, "the CPU kernel did not build (g++ is part of the test environment)"
    assert lib.vectorized == (request.param == "vector") or not native.can_vectorize()
    return lib


@pytest.mark.parametrize("seed", range(6))
def test_kernel_equals_the_plain_loop(kernel, seed):
    g = torch.Generator().manual_seed(100 + seed)
    rows, cols = int(torch.randint(1, 40, (), generator=g)), int(torch.randint(1, 70, (), generator=g))
    n_models = [1, 2, 5, 16, 9, 16][seed]
    sizes = torch.randint(1, 8, (min(n_models, 6) + seed % 3,), generator=g).tolist()
    base_dtype, tau_dtype = DTYPES[seed % 3], [torch.float32, torch.bfloat16][seed % 2]
    for round_to in DTYPES:
        x, groups, base, tau, packed = case(seed, rows, cols, n_models, sizes, base_dtype, tau_dtype)
        got = torch.full((x.shape[0], rows), float("nan"))
        kernel.run(x, base, tau, packed, *[torch.tensor(c, dtype=torch.int64) for c in zip(*groups)], round_to, got)
        check(got, plain_loop(x, groups, base, tau, packed, round_to), groups, x)


@pytest.mark.parametrize("cols", [7, 8, 33, 64])
def test_every_path_equals_the_plain_loop_with_bias_and_a_prefill(cols):
    """``masked_linear`` as the stage calls it: 16 models, a 60-token group (the row-block path),
    per-group biases, bf16 weights rounded to bf16."""
    sizes = [1, 3, 4, 5, 2, 1, 7, 1, 60, 2, 1, 1, 6, 1, 2, 3]
    x, groups, base, tau, packed = case(cols, 24, cols, 16, sizes)
    biases = [None if i % 3 else torch.randn(24) for i in range(len(groups))]
    want = plain_loop(x, groups, base, tau, packed, torch.bfloat16, biases)
    check(run(ml.masked_linear, x, groups, base, tau, packed, torch.bfloat16, biases), want, groups, x)
    check(run(ml.masked_linear_reference, x, groups, base, tau, packed, torch.bfloat16, biases), want, groups, x)
    assert ml.PREFILL_TOKENS <= 60, "the 60-token group should take the row-block path"


def test_the_cuda_expression_equals_the_plain_loop():
    """``_fused`` (what ``torch.compile`` turns into one kernel on CUDA), evaluated eagerly."""
    x, groups, base, tau, packed = case(7, 12, 21, 5, [2, 1, 3])
    want = plain_loop(x, groups, base, tau, packed, torch.bfloat16)
    rows = torch.cat([torch.arange(a, b) for a, b, _ in groups])
    token_model = torch.cat([torch.full((b - a,), m) for a, b, m in groups])
    got = ml._fused(x[rows], token_model, base, tau, packed, torch.bfloat16)
    torch.testing.assert_close(got, want[rows], atol=1e-5, rtol=1e-5)


def test_gqa_qkv_block_of_a_real_layer(kernel):
    """A fused q/k/v block of 4 query and 2 key/value heads (rows 4d + 2d + 2d), 8 models."""
    d, hidden = 8, 32
    x, groups, base, tau, packed = case(11, 8 * d, hidden, 8, [1] * 8)
    want = plain_loop(x, groups, base, tau, packed, torch.bfloat16)
    got = torch.full_like(want, float("nan"))
    kernel.run(x, base, tau, packed, *[torch.tensor(c, dtype=torch.int64) for c in zip(*groups)], torch.bfloat16, got)
    check(got, want, groups, x)


def test_composed_weights_are_the_exports_bit_for_bit():
    """One token whose input is a unit vector reads one column of W: the kernel's composed weight,
    exactly, which must be ``compose``'s float32 weight rounded to bf16 (what export writes)."""
    from mmer_dist.method.masks import unpack_bits
    from mmer_dist.method.reconstruct import reconstruct

    _, _, base, tau, packed = case(5, 16, 24, 3, [1])
    x = torch.eye(24)
    groups = [(0, 24, 2)]
    got = run(ml.masked_linear, x, groups, base, tau, packed, torch.bfloat16)
    want = reconstruct(base, unpack_bits(packed[2], 24), tau).bfloat16().float()
    assert torch.equal(got, want.t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_kernel_equals_torch_linear(kernel, dtype):
    """The dense path's bf16 / fp16 matmul on the CPU (``layers.linear``): float32 accumulation of
    the weights' exact values, so it equals a float64 matmul to float32 summation order."""
    g = torch.Generator().manual_seed(3)
    for rows, cols, tokens in [(5, 7, 1), (33, 64, 4), (16, 53, 9), (40, 8, 2)]:
        w = (0.1 * torch.randn((rows, cols), generator=g)).to(dtype)
        x = torch.randn((tokens, cols), generator=g)
        want = (x.double() @ w.double().t()).float()
        torch.testing.assert_close(kernel.dense(x, w), want, atol=1e-5 * cols ** 0.5, rtol=1e-5)
