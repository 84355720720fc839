"""The mask-native path on the demo kit (really trained multimodal models, test size; conftest
``kit``): served through the engine in-process with no dense slot at all (``serve.llm.LLMServer``
over a ``LocalPipeline``, the real encoders and chat templates: ``mmer_dist.demo.expansion.Served``),
every greedy answer equals plain transformers' on the model's theta_hat_i as ``mmer export``
writes it, with tau* as stored (float32) and with tau* held in the serving dtype (bf16: half the
stage's largest tensor). And the logits of the mask-native path against the slot path (the
export's weights as dense tensors) differ by float32 summation order only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `bench` is a package there

from mmer_dist.demo.expansion import Encoders, Payloads, Served, request, single  # noqa: E402
from bench.kit_lab import Lab  # noqa: E402
from mmer_dist.demo.kit import get_task  # noqa: E402
from mmer_dist.model.batch import RequestSlice, StepBatch  # noqa: E402
from mmer_dist.model.engine import LocalPipeline  # noqa: E402
from mmer_dist.model.prompt import Retention, TextPart, plan_prompt  # noqa: E402
from mmer_dist.store.weightsets import WeightSet  # noqa: E402

N_TEST = None  # every sample of the report half of each task


@pytest.fixture(scope="module")
def merged_kit(kit, tmp_path_factory):
    lab = Lab(kit, tmp_path_factory.mktemp("kit-lab"), n_test=N_TEST)
    initial = [m.id for m in kit.initial]
    record = lab.merge(initial)
    return lab, record, initial, lab.score(lab.hats(record)).replies


@pytest.mark.parametrize("tau_dtype", [None, torch.bfloat16], ids=["tau-float32", "tau-bf16"])
def test_kit_answers_without_slots_are_the_exports(merged_kit, tmp_path, tau_dtype):
    lab, record, initial, exported = merged_kit
    served = Served(lab.url, record.version, Encoders(lab.url, tmp_path / "encoders"), "cpu", slot_budget=0,
                    tau_dtype=tau_dtype)
    payloads = Payloads()
    try:
        for m in initial:
            got = served.chat([request(single(payloads, get_task(m), i, s, m), m) for i, s in enumerate(lab.test[m])])
            assert got == exported[m], m
        stage = served.server.versions.current.pipeline.stages[0]
        assert stage.stats()["slot_capacity"] == 0
        assert all(stage.stats()["models"][m]["mask_native_tokens"] > 0 for m in initial)
    finally:
        served.close()


def test_kit_logits_mask_native_against_the_export_weights(merged_kit):
    """Every kit model's prompt through a stage with no slot and one with every model in a slot,
    full-sequence logits: the measured difference is float32 summation order (documented in
    ``mmer_dist.model.masked_linear``)."""
    lab, record, initial, _ = merged_kit
    weights = lab.weights(record.version)
    native = LocalPipeline.build(weights, 1, dtype=torch.float32, slot_budget_bytes=0)
    dense = LocalPipeline.build(weights, 1, dtype=torch.float32, slot_budget_bytes=1 << 30)
    for m in initial:
        dense.stages[0].slots.take([WeightSet.hat(m)])
    worst = 0.0
    for i, m in enumerate(initial):
        prompt = plan_prompt([TextPart(tuple(range(5, 40)))], Retention(m), weights.vocabulary)
        batch = StepBatch((RequestSlice("p", 0, prompt.route, prompt.text, prompt.vocab_model, reserve=len(prompt),
                                        logits="all"),), prompt.token_ids, prompt.embed_route)
        a, b = native.forward(batch)[0], dense.forward(batch)[0]
        native.release(["p"])
        dense.release(["p"])
        worst = max(worst, float((a - b).abs().max()))
        assert torch.equal(a.argmax(-1), b.argmax(-1)), m
    print(f"max |logit difference| mask-native vs slot on the kit: {worst:.2e}")
    assert worst < 1e-4
