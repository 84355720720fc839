"""``ChunkKernels(compile=True)`` (torch.compile, inductor's C++ backend on CPU) against eager.

Results must be bit-identical: tau*, masks, thresholds, majority, pass sequence. Compiling costs
seconds per graph on CPU, so this runs two configurations with one chunk shape each.
"""

from __future__ import annotations

import pytest
import torch
from method_helpers import assert_bit_identical, bits, streaming_merge

from mmer_dist.method import MergeSettings, select
from mmer_dist.method.reference import reference_merge

CONFIGS = [
    # TIES through every pass: fp32 noise deltas, so the trim needs the low digit
    ("ties", MergeSettings(topk=0.6, lams=(0.5, 1.0, 2.0)), None, torch.float32),
    # DARE's integer hash and task arithmetic with the TALL mask rule (one graph: FinalPass only)
    ("ta-dare-tall", MergeSettings(method="ta", mask_rule="tall", lams=(1.0, 0.5, 3.0), dare_rate=0.3,
                                   dare_seed=5), 1.0 / 64, torch.bfloat16),
]


def models_for(quantum, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(9)
    shapes = {"a.weight": (8, 16)}  # one tensor, one chunk shape (4, 16): one graph per kernel
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    models = []
    for _ in range(3):
        if quantum:
            models.append({k: (b.float() + torch.randint(-2, 3, b.shape, generator=g) * quantum).to(dtype)
                           for k, b in base.items()})
        else:
            models.append({k: (b.float() + torch.randn(b.shape, generator=g) * 0.01).to(dtype)
                           for k, b in base.items()})
    return base, models


@pytest.mark.slow
@pytest.mark.parametrize("name,ms,quantum,dtype", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_compiled_equals_eager(name, ms, quantum, dtype):
    base, models = models_for(quantum, dtype)
    ids = ["img", "aud", "vid"]
    eager = streaming_merge(base, models, ms, ids, rows_per_chunk=4, compile=False)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    compiled = streaming_merge(base, models, ms, ids, rows_per_chunk=4, compile=True)
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo really captured the kernels
    ts_e, m_e, drv_e, st_e = eager
    ts_c, m_c, drv_c, st_c = compiled
    assert drv_c.passes_run == drv_e.passes_run
    if ms.method == "ties":
        assert drv_e.passes_run == ["HighPass", "LowPass", "FinalPass"]
        # the thresholds are not bin floors, so the LowPass ran the (compiled) low-digit counts
        tau = torch.stack([m["a.weight"].float() - base["a.weight"].float() for m in models])
        high = select.GroupHistogram({"*": select.high_digit_counts(tau)})
        assert not select.locate_high(high, {"*": tau[0].numel()}, ms.topk).is_exact()
    for k in base:
        assert torch.equal(bits(ts_c[k]), bits(ts_e[k])), k
        for i in range(3):
            assert torch.equal(m_c[i][k], m_e[i][k]), (k, i)
    assert torch.equal(st_c.mask_counts, st_e.mask_counts)
    if ms.method == "ties":
        assert drv_c.majority == drv_e.majority
        assert {g: t.tolist() for g, t in drv_c.thresholds().items()} == \
               {g: t.tolist() for g, t in drv_e.thresholds().items()}
    # and both equal the oracle
    assert_bit_identical(ts_c, m_c, reference_merge(base, models, ms, ids))
