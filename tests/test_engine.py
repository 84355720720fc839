"""The serving engine (``mmer_dist.model``) on a real merged store (conftest ``merged_store``, v1:
four tiny bf16 models, GQA 4/2 heads, two with 3 and 2 extra vocabulary rows), held to:

- plain transformers on ``mmer export model`` (retention: the reconstructed model, alone);
- ``engine_reference.routed_reference`` (expansion: a per-token-weights forward written plainly),
  with each weight set taken from the exports (``export model``, ``export text``);
- itself: a KV-cached decode equals a full forward, a mixed batch equals each request alone,
  two chained stages equal one, one slot serving three models equals ample slots.

Stages compute in float32 over weights rounded to the checkpoints' bf16 (as exports are), so
agreement is to float32 rounding, not to bf16's.
"""

from __future__ import annotations

import pytest
import torch
from engine_reference import routed_reference
from store_helpers import load_dir, run_cli, split_checkpoint
from transformers import LlamaConfig, LlavaForConditionalGeneration, VideoLlavaForConditionalGeneration

from mmer_dist.errors import InvalidInputError, StoreError
from mmer_dist.model.batch import RequestSlice, StepBatch
from mmer_dist.model.engine import Engine, GenerationRequest, LocalPipeline
from mmer_dist.model.prompt import Expansion, MediaPart, Retention, TextPart, plan_prompt
from mmer_dist.model.sampling import SamplingParams
from mmer_dist.model.stage import DecoderStage
from mmer_dist.store.store import Store
from mmer_dist.store.weights import VersionWeights
from mmer_dist.store.weightsets import WeightSet

FMT = {"llava-hf": "llava-hf", "video-llava-hf": "video-llava-hf", "llava": "llava", "generic": "generic"}
V = 256
ATOL = 2e-5
F32 = torch.float32
TEXT = (1, 5, 30, 31, 32, 40, 41, 50)


@pytest.fixture(scope="module")
def weights(merged_store) -> VersionWeights:
    return VersionWeights(Store.open(str(merged_store)), 1)


@pytest.fixture(scope="module")
def exported(merged_store, tmp_path_factory, ckpts):
    """Version 1's weight sets as written by the exports, canonical names, float32."""
    out = tmp_path_factory.mktemp("exports")
    sets = {}
    for model in FMT:
        run_cli("export", "model", "--store", merged_store, "--model", model, "--version", "1", "--out", out / model, "--quiet")
        llm, _ = split_checkpoint(out / model, FMT[model])
        sets[WeightSet.hat(model)] = {k: v.float() for k, v in llm.items()}
    run_cli("export", "text", "--store", merged_store, "--version", "1", "--out", out / "text", "--quiet")
    sets[WeightSet.bar()] = {k: v.float() for k, v in load_dir(out / "text").items()}
    return out, sets


def pipeline(weights, stages=1, budget=1 << 30):
    return LocalPipeline.build(weights, stages, dtype=F32, slot_budget_bytes=budget)


def media(n, seed, hidden=32):
    return torch.randn((n, hidden), generator=torch.Generator().manual_seed(seed))


def full_logits(stage_or_pipe, prompt, rid="full"):
    """All-position logits of one prompt run as one prefill."""
    batch = StepBatch((RequestSlice(rid, 0, prompt.route, prompt.text, prompt.vocab_model, reserve=len(prompt),
                                    logits="all"),), prompt.token_ids, prompt.embed_route, prompt.embeds)
    out = stage_or_pipe.forward(batch)[0]
    stage_or_pipe.release([rid])
    return out


def expansion_prompt(policy="mean-mask"):
    """Text, an image model's 4 media tokens, an audio model's 3, and wrapper tokens of the two
    models with extra vocabulary rows (local ids V.. of their own tokenizers)."""
    return [TextPart(TEXT[:3]), TextPart((V, V + 2), tokenizer="video-llava-hf", embed_model="video-llava-hf"),
            MediaPart("llava-hf", media(4, 1)), TextPart((V + 1,), tokenizer="llava", embed_model="llava"),
            MediaPart("generic", media(3, 2)), TextPart(TEXT[3:])]


# -- weights ----------------------------------------------------------------------------------


def test_served_weights_are_the_exported_ones_bit_for_bit(weights, exported):
    _, sets = exported
    stage = DecoderStage(weights, 0, 4, dtype=torch.bfloat16, slot_budget_bytes=1 << 30)
    for key, want in sets.items():
        dense = stage.slots.take([key])[key]
        assert torch.equal(dense.embed, want["model.embed_tokens.weight"][:V].bfloat16()), key
        assert torch.equal(dense.head, want["lm_head.weight"][:V].bfloat16()), key
        for layer, lw in dense.layers.items():
            p = f"model.layers.{layer}."
            qkv = torch.cat([want[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]).bfloat16()
            assert torch.equal(lw.wqkv, qkv), (key, layer)
            assert torch.equal(lw.w_down, want[p + "mlp.down_proj.weight"].bfloat16()), (key, layer)
            assert torch.equal(lw.attn_norm, want[p + "input_layernorm.weight"].bfloat16()), (key, layer)


def test_vocabulary_layout_puts_extra_rows_after_the_base(weights):
    vocab = weights.vocabulary
    assert vocab.base == V and vocab.extra_of("video-llava-hf") == 3 and vocab.extra_of("llava") == 2
    g = vocab.to_global("llava", torch.tensor([7, V, V + 1]))
    assert g.tolist()[0] == 7 and vocab.owner(int(g[1])) == "llava" == vocab.owner(int(g[2]))
    assert vocab.to_local("llava", g).tolist() == [7, V, V + 1]
    with pytest.raises(InvalidInputError, match="outside the vocabulary of model 'llava'"):
        vocab.to_global("llava", torch.tensor([V + 2]))


# -- exactness -------------------------------------------------------------------------------------


def test_retention_equals_transformers_on_the_export_with_an_image(weights, exported):
    out, _ = exported
    hf = LlavaForConditionalGeneration.from_pretrained(out / "llava-hf", dtype=F32).eval()
    cfg = hf.config
    pixels = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 5, 30] + [cfg.image_token_index] * cfg.image_seq_length + [31, 32, 40]])
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits[0]
        feats = hf.model.get_image_features(pixels, vision_feature_layer=cfg.vision_feature_layer,
                                            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    image = torch.cat(list(feats.pooler_output))
    prompt = plan_prompt([TextPart((1, 5, 30)), MediaPart("llava-hf", image), TextPart((31, 32, 40))],
                         Retention("llava-hf"), weights.vocabulary)
    got = full_logits(pipeline(weights), prompt)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_retention_with_extra_vocabulary_equals_transformers(weights, exported):
    out, _ = exported
    hf = VideoLlavaForConditionalGeneration.from_pretrained(out / "video-llava-hf", dtype=F32).eval()
    ids = (1, 5, V, 30, V + 2, 31)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits[0]
    prompt = plan_prompt([TextPart(ids, tokenizer="video-llava-hf")], Retention("video-llava-hf"), weights.vocabulary)
    got = full_logits(pipeline(weights), prompt)
    assert got.shape == (len(ids), V + 3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("policy", ["mean-mask", "present-mean", "follow-media"])
def test_expansion_equals_the_per_token_reference(weights, exported, policy):
    _, sets = exported
    prompt = plan_prompt(expansion_prompt(policy), Expansion(policy), weights.vocabulary)
    got = full_logits(pipeline(weights), prompt)
    if policy == "follow-media":  # text before the image: theta_bar; after each media part: its model
        bar, image, audio = WeightSet.bar(), WeightSet.hat("llava-hf"), WeightSet.hat("generic")
        assert list(prompt.route) == [(bar, 5), (image, 5), (audio, 3 + len(TEXT) - 3)], prompt.route
        assert prompt.text == audio and prompt.vocab_model is None
        embed = [k for k, n in prompt.embed_route for _ in range(n)]
        assert embed[9] == WeightSet.hat("llava") and embed[-1] == audio  # wrapper rows stay their model's
    if policy == "present-mean":  # llava-hf and generic have media: their two masks' mean
        assert prompt.text == WeightSet.mean(["llava-hf", "generic"])
        mean = {n: weights.theta_mean(n, ["llava-hf", "generic"]).bfloat16().float().reshape(weights.tensors[n].shape)
                for n in weights.tensors}
        sets = {**sets, prompt.text: mean}
    # the reference's inputs: which weight set each token runs through, and its embedding row
    route = [k for k, n in prompt.route for _ in range(n)]
    rows, media_rows = [], iter(prompt.embeds)
    for gid, key in zip(prompt.token_ids.tolist(), [k for k, n in prompt.embed_route for _ in range(n)]):
        if gid == -1:
            rows.append(next(media_rows))
        elif gid < V:
            rows.append(sets[key]["model.embed_tokens.weight"][gid])
        else:  # a model's extra row, in its own export
            owner = weights.vocabulary.owner(gid)
            local = gid - weights.vocabulary.offsets[owner]
            rows.append(sets[WeightSet.hat(owner)]["model.embed_tokens.weight"][local])
    config = LlamaConfig.from_dict(weights.base_config)
    want = routed_reference(config, torch.stack(rows), [sets[k] for k in route], sets[prompt.text]["lm_head.weight"][:V])
    assert got.shape == want.shape == (len(prompt), V)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", [Retention("llava"), Expansion("mean-mask")], ids=["retention", "expansion"])
def test_prefill_then_cached_decode_equals_one_full_forward(weights, mode):
    pipe = pipeline(weights)
    parts = ([TextPart(TEXT + (V, V + 1), tokenizer="llava")] if isinstance(mode, Retention)
             else expansion_prompt())
    prompt = plan_prompt(parts, mode, weights.vocabulary)
    want = full_logits(pipe, prompt)
    split = len(prompt) - 4
    ids = prompt.token_ids
    first = StepBatch((RequestSlice("r", 0, _head(prompt.route, split), prompt.text, prompt.vocab_model,
                                    reserve=len(prompt), logits="all"),),
                      ids[:split], _head(prompt.embed_route, split),
                      prompt.embeds[: int((ids[:split] == -1).sum())] if prompt.embeds is not None else None)
    got = [pipe.forward(first)[0]]
    routes, embeds = _expand(prompt.route), _expand(prompt.embed_route)
    for pos in range(split, len(prompt)):
        step = StepBatch((RequestSlice("r", pos, ((routes[pos], 1),), prompt.text, prompt.vocab_model),),
                         ids[pos:pos + 1], ((embeds[pos], 1),))
        got.append(pipe.forward(step)[0])
    torch.testing.assert_close(torch.cat(got), want, atol=ATOL, rtol=0)


def _expand(runs):
    return [k for k, n in runs for _ in range(n)]


def _head(runs, n):
    from mmer_dist.model.batch import run_lengths
    return run_lengths(_expand(runs)[:n])


def test_mixed_batch_gives_each_request_what_it_gets_alone(weights):
    vocab = weights.vocabulary
    requests = [
        GenerationRequest("a", plan_prompt([TextPart(TEXT)], Retention("llava-hf"), vocab), SamplingParams(8, logprobs=True)),
        GenerationRequest("b", plan_prompt([TextPart(TEXT[:5] + (V,), tokenizer="llava")], Retention("llava"), vocab),
                          SamplingParams(8, temperature=0.9, top_p=0.9, seed=3)),
        GenerationRequest("x", plan_prompt(expansion_prompt(), Expansion(), vocab), SamplingParams(8)),
        GenerationRequest("y", plan_prompt(expansion_prompt(), Expansion("present-mean"), vocab), SamplingParams(6)),
    ]
    together = Engine(pipeline(weights)).generate(requests)
    for r in requests:
        alone = Engine(pipeline(weights)).generate([r])[r.request_id]
        assert [e.token for e in together[r.request_id]] == [e.token for e in alone], r.request_id
        for a, b in zip(together[r.request_id], alone):
            assert abs(a.logprob - b.logprob) < 1e-4
    assert together["a"][-1].finish_reason == "length" and len(together["y"]) == 6


def test_requests_join_and_leave_between_steps(weights):
    """Continuous batching: a request added while others decode gets what it gets alone, and a
    finished one frees its caches at once."""
    vocab = weights.vocabulary
    pipe = pipeline(weights, stages=2)
    engine = Engine(pipe)
    early = GenerationRequest("early", plan_prompt([TextPart(TEXT)], Retention("generic"), vocab), SamplingParams(3))
    late = GenerationRequest("late", plan_prompt(expansion_prompt(), Expansion(), vocab), SamplingParams(5))
    engine.add(early)
    events = {"early": [], "late": []}
    for e in engine.step() + engine.step():
        events[e.request_id].append(e)
    engine.add(late)  # joins while "early" decodes
    while engine.has_work:
        for e in engine.step():
            events[e.request_id].append(e)
            if e.finish_reason:
                assert all(e.request_id not in s.caches for s in pipe.stages)
    for r in (early, late):
        assert [e.token for e in events[r.request_id]] == [e.token for e in Engine(pipeline(weights)).generate([r])[r.request_id]]
    assert all(len(s.caches) == 0 for s in pipe.stages)


def test_two_stages_equal_one(weights):
    prompt = plan_prompt(expansion_prompt(), Expansion(), weights.vocabulary)
    torch.testing.assert_close(full_logits(pipeline(weights, 2), prompt), full_logits(pipeline(weights, 1), prompt),
                               atol=1e-6, rtol=0)
    three = pipeline(weights, 3)
    assert [(s.first, s.stop) for s in three.stages] == [(0, 2), (2, 3), (3, 4)]
    torch.testing.assert_close(full_logits(three, prompt), full_logits(pipeline(weights, 1), prompt), atol=1e-6, rtol=0)


def test_one_slot_serving_three_models_in_turn_and_at_once_is_exact(weights):
    """One slot for three models: the ones without it run mask-native, builds run off the step
    loop (no step waits for one), and three models at once run in one step each, never split."""
    vocab = weights.vocabulary
    slot = DecoderStage(weights, 0, 4, dtype=F32).slot_bytes
    one = pipeline(weights, budget=slot)
    assert one.slot_capacity() == 1
    ample = pipeline(weights)
    models = ["llava-hf", "video-llava-hf", "generic", "llava-hf"]
    for i, m in enumerate(models):
        r = GenerationRequest(f"r{i}", plan_prompt([TextPart(TEXT)], Retention(m), vocab), SamplingParams(4))
        assert ([e.token for e in Engine(one).generate([r])[r.request_id]]
                == [e.token for e in Engine(ample).generate([r])[r.request_id]])
    stats = one.stats()[0]
    assert stats["blocking_builds"] == 0 and stats["transient"] == 0
    assert stats["resident_sets"][0] == "bar" and len(stats["resident_sets"]) <= 2
    rs = [GenerationRequest(m, plan_prompt([TextPart(TEXT)], Retention(m), vocab), SamplingParams(3))
          for m in models[:3]]
    engine = Engine(one)
    together = engine.generate(rs)
    assert engine.steps == 3
    for r in rs:
        assert [e.token for e in together[r.request_id]] == [e.token for e in Engine(ample).generate([r])[r.request_id]]


def test_two_models_with_different_extra_rows_in_one_batch(weights, exported):
    """Retention of the 3-row and the 2-row model and an expansion using both models' extra rows,
    in one step: each gets its own vocabulary and the export's logits."""
    out, _ = exported
    vocab = weights.vocabulary
    pipe = pipeline(weights)
    a = plan_prompt([TextPart((1, 5, V + 2, 30), tokenizer="video-llava-hf")], Retention("video-llava-hf"), vocab)
    b = plan_prompt([TextPart((1, V + 1, 30, 31), tokenizer="llava")], Retention("llava"), vocab)
    x = plan_prompt(expansion_prompt(), Expansion(), vocab)
    slices, ids, embed, embeds = [], [], [], []
    for rid, p in (("a", a), ("b", b), ("x", x)):
        slices.append(RequestSlice(rid, 0, p.route, p.text, p.vocab_model, reserve=len(p), logits="all"))
        ids.append(p.token_ids)
        embed += list(p.embed_route)
        if p.embeds is not None:
            embeds.append(p.embeds)
    got = pipe.forward(StepBatch(tuple(slices), torch.cat(ids), tuple(embed), torch.cat(embeds)))
    assert [g.shape[-1] for g in got] == [V + 3, V + 2, V]
    hf = VideoLlavaForConditionalGeneration.from_pretrained(out / "video-llava-hf", dtype=F32).eval()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([[1, 5, V + 2, 30]])).logits[0]
    torch.testing.assert_close(got[0], want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[2], full_logits(pipeline(weights), x), atol=1e-5, rtol=0)


# -- sampling -------------------------------------------------------------------------------------


def test_sampling_is_seeded_per_request_and_stops(weights):
    vocab = weights.vocabulary
    prompt = plan_prompt([TextPart(TEXT)], Retention("llava-hf"), vocab)

    def run(params, rid="r", others=0):
        reqs = [GenerationRequest(rid, prompt, params)]
        reqs += [GenerationRequest(f"o{i}", prompt, SamplingParams(5, temperature=1.0, seed=i)) for i in range(others)]
        return Engine(pipeline(weights)).generate(reqs)[rid]

    hot = SamplingParams(12, temperature=1.5, top_p=0.95, seed=7)
    a, b, c = run(hot), run(hot, others=2), run(SamplingParams(12, temperature=1.5, top_p=0.95, seed=8))
    assert [e.token for e in a] == [e.token for e in b] != [e.token for e in c]
    greedy = run(SamplingParams(6, top_logprobs=3))
    assert [e.token for e in run(SamplingParams(6, temperature=1.0, top_p=1e-6, seed=1))] == [e.token for e in greedy]
    assert all(e.top_logprobs[0][0] == e.token and abs(e.top_logprobs[0][1] - e.logprob) < 1e-6 for e in greedy)
    stop = greedy[2].token
    stopped = run(SamplingParams(6, stop_token_ids=(stop,)))
    assert [e.token for e in stopped] == [e.token for e in greedy[:3]] and stopped[-1].finish_reason == "stop"
    with pytest.raises(InvalidInputError, match="max_tokens"):
        SamplingParams(0)
    with pytest.raises(InvalidInputError, match="top_p"):
        SamplingParams(4, top_p=0)


# -- bad input --------------------------------------------------------------------------------------


def test_bad_requests_are_refused_and_the_stage_keeps_serving(weights, merged_store):
    vocab = weights.vocabulary
    pipe = pipeline(weights)
    engine = Engine(pipe)
    good = GenerationRequest("good", plan_prompt([TextPart(TEXT)], Retention("llava"), vocab), SamplingParams(4))
    engine.add(good)
    engine.step()
    with pytest.raises(InvalidInputError, match="'nope' is not part of the served version"):
        plan_prompt([TextPart(TEXT)], Retention("nope"), vocab)
    with pytest.raises(InvalidInputError, match="'nope' is not part of the served version"):
        plan_prompt([MediaPart("nope", media(2, 0))], Expansion(), vocab)
    with pytest.raises(InvalidInputError, match="context is 256"):
        engine.add(GenerationRequest("long", plan_prompt([TextPart((5,) * 250)], Retention("llava"), vocab),
                                     SamplingParams(10)))
    with pytest.raises(InvalidInputError, match="text_policy"):
        Expansion("vibes")
    with pytest.raises(InvalidInputError, match="outside the vocabulary of the base"):
        plan_prompt([TextPart((V + 4,))], Expansion(), vocab)
    # a step the stage cannot serve is refused whole, before any cache changes
    stage = pipe.stages[0]
    bad = StepBatch((RequestSlice("new", 0, ((WeightSet.hat("ghost"), 2),), WeightSet.bar(), reserve=4),),
                    torch.tensor([5, 6]), ((WeightSet.bar(), 2),))
    with pytest.raises(InvalidInputError, match="'ghost' is not part of version 1"):
        stage.forward(bad)
    assert "new" not in stage.caches
    unknown = StepBatch((RequestSlice("gone", 3, ((WeightSet.bar(), 1),), WeightSet.bar()),), torch.tensor([5]),
                        ((WeightSet.bar(), 1),))
    with pytest.raises(InvalidInputError, match="'gone' has no KV cache"):
        stage.forward(unknown)
    with pytest.raises(StoreError, match="no version 99"):
        VersionWeights(Store.open(str(merged_store)), 99)
    events = []
    while engine.has_work:
        events += engine.step()
    assert [e.token for e in events] == [e.token for e in Engine(pipeline(weights)).generate([good])["good"][1:]]
