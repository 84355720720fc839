"""Kernels run on row blocks of a storage chunk; the result must not depend on the blocking."""

from __future__ import annotations

import pytest
import torch

from method_helpers import assert_bit_identical, one_thread, random_models, streaming_merge  # noqa: F401
from mmer_dist.method import MergeSettings
from mmer_dist.method.reference import reference_merge
from mmer_dist.method.streaming import ChunkSpec, row_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_row_blocks_cover_the_chunk_once():
    chunk = ChunkSpec("w", 3, 10, 27, 5)
    blocks = row_blocks(chunk, block_elems=12)  # 2 rows per block
    assert [(a, b) for _, a, b in blocks] == [(a, min(17, a + 2)) for a in range(0, 17, 2)]
    assert [s.row_start for s, _, _ in blocks] == list(range(10, 27, 2))
    assert all(s.tensor == "w" and s.cols == 5 for s, _, _ in blocks)
    # a block is at least one row, even when a row is longer than the block size
    assert len(row_blocks(chunk, block_elems=1)) == 17


@pytest.mark.parametrize("settings", [
    MergeSettings(topk=0.7, lams=(1.0, 0.5, 2.0)),
    MergeSettings(method="ta", mask_rule="tall", dare_rate=0.3, dare_seed=4, lams=(0.4, 0.4, 0.4)),
    MergeSettings(method="neuro", topk=0.9, scope="per-tensor", lams=(1.0, 1.0, 1.0)),
], ids=["ties", "ta-dare-tall", "neuro"])
@pytest.mark.parametrize("block_elems", [1, 7, 20, 1 << 20])
def test_blocking_does_not_change_the_result(settings, block_elems):
    ids = ["a", "b", "c"]
    base, models = random_models(3, dtype=torch.bfloat16, seed=9, shapes={"w": (13, 6), "v": (5, 11), "n": (17,)})
    ref = reference_merge(base, models, settings, ids)
    tau_star, masks, _, _ = streaming_merge(base, models, settings, ids, rows_per_chunk=13, block_elems=block_elems)
    assert_bit_identical(tau_star, masks, ref)
