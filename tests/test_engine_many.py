"""Many models in one engine (issue 26): more models than dense slots, every one served.

A store of 16 tiny llava-hf fine-tunes (two with extra vocabulary rows), merged; each model's
``export_model`` checkpoint is the reference (plain transformers, float32, greedy). Held to:

- a 0-slot budget serves all 16 through the mask-native path, each greedy answer the export's;
- one step mixing slot and mask-native requests of 8 models gives each request its solo logits
  (float32 summation order: the composed weights are the export's, ``masked_linear``) and text;
- slots follow the traffic mix (the slot set that would have read the fewest bytes), a build runs
  on its thread while steps go on, and the model switches to its slot between steps, answers
  unchanged;
- a model with a trickle of requests among another's flood is admitted within its bound, and the
  waiting-time bound admits an old request whatever the fairness order says;
- the stage reports its memory by part, and tau* in the serving dtype halves tau*'s bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from mmer_dist.demo import tiny_models
from mmer_dist.errors import InvalidInputError
from mmer_dist.export import export_model
from mmer_dist.ingest import ingest_base, ingest_model
from mmer_dist.merge.engine import MergeRequest, merge
from mmer_dist.merge.local import LocalBackend
from mmer_dist.model.batch import RequestSlice, StepBatch
from mmer_dist.model.engine import Engine, EngineLimits, GenerationRequest, LocalPipeline
from mmer_dist.model.prompt import Retention, TextPart, plan_prompt
from mmer_dist.model.residency import StepBytes, Traffic, best_slots
from mmer_dist.model.sampling import SamplingParams
from mmer_dist.model.scheduler import Candidate, Scheduler
from mmer_dist.store.weights import VersionWeights
from mmer_dist.store.weightsets import WeightSet

F32 = torch.float32
ATOL = 2e-5  # float32 summation order (the weights are the export's on both paths)
N_MODELS = 16
EXTRA = {"m3": 2, "m11": 3}  # models with their own extra vocabulary rows
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """(VersionWeights of the merged 16-model store, model id -> its export directory)."""
    root = tmp_path_factory.mktemp("many")
    base = tiny_models.save_base(root / "base", dtype=torch.bfloat16, seed=0)
    url = str(root / "store")
    ingest_base(url, base, progress=False)
    models = [f"m{i}" for i in range(N_MODELS)]
    for i, m in enumerate(models):
        path = tiny_models.save_finetuned(base, root / m, "llava-hf", seed=100 + i, delta_scale=0.3,
                                          extra_vocab=EXTRA.get(m, 0))
        ingest_model(url, m, path, "image", fmt="llava-hf", progress=False)
    merge(url, MergeRequest(), LocalBackend(), workers=1, progress=False)
    exports = {m: export_model(url, m, root / f"export-{m}", progress=False) for m in models}
    return VersionWeights.open(url), exports


def pipeline(weights, budget_sets: float, **options) -> LocalPipeline:
    slot = LocalPipeline.build(weights, 1, dtype=F32, slot_budget_bytes=0).stages[0].slot_bytes
    return LocalPipeline.build(weights, 1, dtype=F32, slot_budget_bytes=int(budget_sets * slot), **options)


def prompt_ids(i: int, model: str) -> tuple[int, ...]:
    ids = (1, *(20 + (7 * i + 3 * k) % 200 for k in range(5 + i % 4)))  # <s> and words
    return ids + ((256,) if model in EXTRA else ())  # a model's own extra token, in its local ids


def request(weights, i: int, model: str, new_tokens: int = NEW_TOKENS) -> GenerationRequest:
    prompt = plan_prompt([TextPart(prompt_ids(i, model), tokenizer=model)], Retention(model), weights.vocabulary)
    return GenerationRequest(f"r{i}-{model}", prompt, SamplingParams(new_tokens))


def tokens(events) -> list[int]:
    return [e.token for e in events if e.token is not None]


def hf_greedy(export, ids: tuple[int, ...], n: int) -> list[int]:
    """Greedy continuation by plain transformers on the exported theta_hat_i (full forward each token)."""
    hf = LlavaForConditionalGeneration.from_pretrained(export, dtype=F32).eval()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def all_resident(weights, models) -> LocalPipeline:
    """A pipeline with every model of ``models`` in a dense slot (built now, synchronously)."""
    pipe = pipeline(weights, len(models))
    for m in models:
        pipe.stages[0].slots.take([WeightSet.hat(m)])
    assert pipe.stages[0].residency()[models[0]] == "slot"
    return pipe


# -- the mask-native path ----------------------------------------------------------------------


def test_zero_slot_budget_serves_16_models_as_their_exports(many, caplog):
    weights, exports = many
    with caplog.at_level(logging.WARNING, logger="mmer_dist.model.stage"):
        pipe = pipeline(weights, 0.5)  # half a model: no slot at all
    assert "every model is served through the mask-native path" in caplog.text
    stage = pipe.stages[0]
    assert stage.stats()["slot_capacity"] == 0
    models = list(weights.models)
    requests = [request(weights, i, m) for i, m in enumerate(models)]
    together = Engine(pipe).generate(requests)
    for i, (m, r) in enumerate(zip(models, requests)):
        assert tokens(together[r.request_id]) == hf_greedy(exports[m], prompt_ids(i, m), NEW_TOKENS), m
    stats = stage.stats()
    assert all(s["path"] == "mask-native" and s["slot_tokens"] == 0 and s["mask_native_tokens"] > 0
               for s in stats["models"].values())
    assert stats["rebuilds"] == 1 and stats["resident_sets"] == ["bar"]  # only the pinned theta_bar


def test_one_step_mixing_slot_and_mask_native_requests_of_8_models(many):
    weights, _ = many
    models = [f"m{i}" for i in (0, 3, 5, 8, 11, 12, 14, 15)]
    mixed = pipeline(weights, 3)
    for m in models[:3]:  # three models in slots, five without, for this step
        mixed.stages[0].slots.take([WeightSet.hat(m)])
    mixed.stages[0].slots.step_bytes = None  # no residency plan: the three stay for this test
    dense = all_resident(weights, models)
    prompts = [request(weights, i, m).prompt for i, m in enumerate(models)]
    slices = tuple(RequestSlice(f"r{i}", 0, p.route, p.text, p.vocab_model, reserve=len(p) + 4, logits="all")
                   for i, p in enumerate(prompts))
    batch = StepBatch(slices, torch.cat([p.token_ids for p in prompts]), tuple(k for p in prompts for k in p.embed_route))
    together = mixed.forward(batch)
    paths = mixed.stages[0].residency()
    assert [paths[m] for m in models] == ["slot"] * 3 + ["mask-native"] * 5
    for i, (m, p) in enumerate(zip(models, prompts)):
        alone = dense.forward(StepBatch((slices[i],), p.token_ids, p.embed_route))[0]
        dense.release([f"r{i}"])
        assert together[i].shape == alone.shape == (len(p), 256 + EXTRA.get(m, 0))
        torch.testing.assert_close(together[i], alone, atol=ATOL, rtol=0)
    # and whole greedy answers, decoded together on the mixed stage
    requests = [request(weights, i, m, 8) for i, m in enumerate(models)]
    answers = Engine(pipeline(weights, 3)).generate(requests)
    for r in requests:
        assert tokens(answers[r.request_id]) == tokens(Engine(dense).generate([r])[r.request_id]), r.label


def test_a_bf16_stage_gives_the_same_answers_on_both_paths(many):
    """The serving default (compute in the checkpoints' bf16): a model through its slot (the dense
    kernel for bf16 matrices) and through the mask-native kernel, with the same exported weights,
    agree to bf16 rounding of the activations and give the same greedy answer."""
    weights, _ = many
    bf16 = {"dtype": torch.bfloat16}
    slot = LocalPipeline.build(weights, 1, dtype=torch.bfloat16, slot_budget_bytes=0).stages[0].slot_bytes
    dense = LocalPipeline.build(weights, 1, slot_budget_bytes=4 * slot, **bf16)
    native = LocalPipeline.build(weights, 1, slot_budget_bytes=0, **bf16)
    models = ["m2", "m3", "m7"]
    for m in models:
        dense.stages[0].slots.take([WeightSet.hat(m)])
    dense.stages[0].slots.step_bytes = native.stages[0].slots.step_bytes = None
    for i, m in enumerate(models):
        r = request(weights, i, m, 6)
        slice_ = RequestSlice("p", 0, r.prompt.route, r.prompt.text, r.prompt.vocab_model, reserve=len(r.prompt),
                              logits="all")
        batch = StepBatch((slice_,), r.prompt.token_ids, r.prompt.embed_route)
        a, b = dense.forward(batch)[0], native.forward(batch)[0]
        dense.release(["p"])
        native.release(["p"])
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.02)
        assert tokens(Engine(dense).generate([r])[r.request_id]) == tokens(Engine(native).generate([r])[r.request_id])
    assert dense.stages[0].stats()["models"]["m2"]["slot_tokens"] > 0
    assert native.stages[0].stats()["models"]["m2"]["mask_native_tokens"] > 0


# -- residency by the traffic mix, off the step loop ------------------------------------------------------


class GatedBuild:
    """Wraps a stage's slot build: each build waits at the gate until the test opens it."""

    def __init__(self, stage):
        self.build, self.gate, self.started = stage.slots._build, threading.Event(), threading.Event()
        self.on_thread: list[str] = []
        stage.slots._build = self

    def __call__(self, key, background=False):
        self.on_thread.append(threading.current_thread().name)
        self.started.set()
        assert self.gate.wait(120), "the test never opened the gate"
        return self.build(key, background=background)


def test_steps_run_while_a_slot_build_is_in_flight_and_the_model_switches_between_steps(many):
    weights, _ = many
    pipe = pipeline(weights, 1)
    stage = pipe.stages[0]
    gated = GatedBuild(stage)
    engine = Engine(pipe)
    r = request(weights, 0, "m5", new_tokens=12)
    engine.add(r)
    events = engine.step()  # the prefill: m5's demand starts its slot's build on the builder thread
    assert gated.started.wait(60) and stage.slots.building == WeightSet.hat("m5")
    for _ in range(4):  # a step that waited for the gated build would never return
        events += engine.step()
    assert len(tokens(events)) == 5 and stage.residency()["m5"] == "building"
    assert not stage.slots._building.future.done(), "the build finished before the gate opened"
    assert gated.on_thread == ["mmer-slot-build_0"]
    gated.gate.set()
    stage.slots.wait_for_build(60)
    events += engine.step()  # installs the slot between steps
    assert stage.residency()["m5"] == "slot"
    while engine.has_work:
        events += engine.step()
    model_stats = stage.stats()["models"]["m5"]
    assert model_stats["mask_native_tokens"] > 0 and model_stats["slot_tokens"] > 0 and model_stats["builds"] == 1
    assert tokens(events) == tokens(Engine(all_resident(weights, ["m5"])).generate([r])[r.request_id])


def test_slots_follow_the_traffic_mix(many):
    """Two slots. One model's traffic: it gets a slot. Two models in every step: both do (each
    step then reads two dense sets and skips theta_pre + tau*). Traffic over six models: no slot
    set can cover a step, so both slots go (they would only add their own bytes). Answers stay
    exact throughout (the engine tests' reference: every model in a slot)."""
    weights, _ = many
    stage = pipeline(weights, 2).stages[0]
    engine = Engine(LocalPipeline([stage]))
    dense = Engine(all_resident(weights, [f"m{i}" for i in range(1, 7)]))
    k = iter(range(1000, 10_000))

    def run(models: list[str], rounds: int) -> None:
        for _ in range(rounds):
            requests = [request(weights, next(k), m, 6) for m in models]
            got = engine.generate(requests)
            stage.slots.wait_for_build(60)
            for r in requests[:1]:
                assert tokens(got[r.request_id]) == tokens(dense.generate([r])[r.request_id]), r.label

    def paths(models: list[str]) -> list[str]:
        run(models[:1], 1)  # one more step: a finished build is installed between steps
        return [stage.residency()[m] for m in models]

    run(["m1"] * 3, 3)
    assert paths(["m1", "m2"]) == ["slot", "mask-native"]
    run(["m1", "m2"] * 2, 4)
    assert paths(["m1", "m2"]) == ["slot", "slot"]
    run([f"m{i}" for i in range(1, 7)], 12)
    assert paths(["m1", "m2"]) == ["mask-native", "mask-native"]
    stats = stage.stats()
    assert stats["background_builds"] == 2 and stats["blocking_builds"] == 0 and stats["evictions"] == 2


def test_the_residency_plan_against_the_bytes_each_step_reads():
    """``best_slots`` on recorded model mixes: P = a model's dense bytes, theta_pre + tau* = 3P."""
    cost = StepBytes(native_bytes=300, dense_bytes=100, mask_bytes=6)
    a, b, c, d = (WeightSet.hat(m) for m in "abcd")

    def traffic(*steps):
        t = Traffic(window=64)
        for s in steps:
            t.add(s)
        return t

    one = traffic(*[[a]] * 20)
    assert best_slots(frozenset(), one, 2, cost, {}) == {a}
    assert best_slots(frozenset({a}), one, 2, cost, {}) is None  # already there
    both = traffic(*[[a, b]] * 20)
    assert best_slots(frozenset(), both, 1, cost, {}) is None  # one slot never covers a step
    assert best_slots(frozenset(), both, 2, cost, {}) == {a, b}  # found as a pair
    spread = traffic(*[[a, b, c], [b, c, d], [a, c, d], [a, b, d]] * 5)
    assert best_slots(frozenset({a, b}), spread, 2, cost, {}) == frozenset()  # the slots only cost bytes
    turns = traffic(*[[a], [b]] * 10)
    assert best_slots(frozenset({a}), turns, 1, cost, {b: 5.0}) is None  # b saves as much as a: no churn
    assert best_slots(frozenset(), turns, 1, cost, {}) in ({a}, {b})
    mostly_c = traffic(*[[a]] * 4, *[[c]] * 16)
    assert best_slots(frozenset({a}), mostly_c, 1, cost, {}) == {c}


# -- the scheduler ------------------------------------------------------------------------------


def test_a_trickle_among_a_flood_is_admitted_within_its_bound(many):
    """24 requests for m4 arrive at once (4 run at a time, 4 tokens each); then a request for m9
    every third step. FIFO would queue each m9 request behind the whole flood (~24 steps); fair
    admission takes it at the first free place: within one running request's life."""
    weights, _ = many
    engine = Engine(pipeline(weights, 1), EngineLimits(max_running=4, max_wait_s=1e9))
    for i in range(24):
        engine.add(request(weights, i, "m4", 4))
    added, first = {}, {}
    step = 0
    while engine.has_work:
        if step % 3 == 1 and len(added) < 4:
            r = request(weights, 500 + step, "m9", 4)
            engine.add(r)
            added[r.request_id] = step
        step += 1
        for e in engine.step():
            first.setdefault(e.request_id, step)
    waits = [first[rid] - added[rid] for rid in added]
    assert len(waits) == 4 and max(waits) <= 4 + 1, waits
    assert engine.stats()["models"]["m9"]["finished"] == 4 and engine.stats()["models"]["m4"]["finished"] == 24


def test_the_waiting_time_bound_admits_an_old_request_first():
    """m1 has had much service, so fairness prefers fresh models' requests; once m1's request has
    waited max_wait_s it goes first anyway."""
    scheduler = Scheduler(EngineLimits(max_running=1, max_step_tokens=100, max_wait_s=5.0))
    scheduler.record({"m1": 1000})
    waiting = {"old": Candidate("m1", 10, arrived=0.0)}
    for t in range(1, 8):
        waiting[f"new{t}"] = Candidate(f"x{t}", 10, arrived=float(t))
        admitted = scheduler.admit(waiting, running=0, now=float(t))
        assert admitted == (["old"] if t >= 5 else [f"new{t}"]), (t, admitted)
        for rid in admitted:
            del waiting[rid]
        if t >= 5:
            break


def test_fair_admission_alternates_between_models_and_keeps_arrival_order_within_one():
    scheduler = Scheduler(EngineLimits(max_running=6, max_step_tokens=1000, max_wait_s=60))
    waiting = {f"a{i}": Candidate("A", 10, float(i)) for i in range(6)}
    waiting |= {f"b{i}": Candidate("B", 10, 10.0 + i) for i in range(2)}
    assert scheduler.admit(waiting, running=0, now=20.0) == ["a0", "b0", "a1", "b1", "a2", "a3"]
    one_long = {"p": Candidate("A", 900, 0.0), "q": Candidate("B", 200, 1.0)}
    assert scheduler.admit(one_long, running=0, now=2.0) == ["p"]  # the prompt-token budget


# -- memory and bad input ----------------------------------------------------------------------


def test_memory_by_part_and_tau_in_the_serving_dtype(many):
    weights, _ = many
    stage = pipeline(weights, 2).stages[0]
    half = pipeline(weights, 2, tau_dtype=torch.bfloat16).stages[0]
    mem, mem_half = stage.memory(), half.memory()
    params = sum(t.rows * t.cols for t in weights.tensors.values())
    packed = sum(t.rows * -(-t.cols // 8) for t in weights.tensors.values())
    assert mem["base"] == 2 * params and mem["tau_star"] == 4 * params and mem_half["tau_star"] == 2 * params
    assert mem["masks"] == N_MODELS * packed  # one bit per parameter per model (rows padded to bytes)
    assert mem["pinned"] == stage.slot_bytes and mem["slots"] == 0 and mem["kv_caches"] == 0
    assert mem["extra_rows"] == 4 * 32 * 2 * sum(EXTRA.values())  # embedding + head rows, float32
    stage.slots.take([WeightSet.hat("m0")])
    r = request(weights, 0, "m0")
    events = Engine(LocalPipeline([stage])).generate([r])[r.request_id]
    assert stage.memory()["slots"] == stage.slot_bytes and len(tokens(events)) == NEW_TOKENS
    answer = Engine(LocalPipeline([half])).generate([r])[r.request_id]
    assert len(tokens(answer)) == NEW_TOKENS


def test_a_model_outside_the_served_version_is_refused_by_name(many):
    weights, _ = many
    engine = Engine(pipeline(weights, 1))
    with pytest.raises(InvalidInputError, match="'m99' is not part of the served version"):
        plan_prompt([TextPart((5, 6))], Retention("m99"), weights.vocabulary)
    ghost = GenerationRequest("ghost", dataclasses.replace(request(weights, 0, "m1").prompt, text=WeightSet.hat("m99")))
    with pytest.raises(InvalidInputError, match="model 'm99' is not part of version 1"):
        engine.add(ghost)
