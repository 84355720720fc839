"""The routed forward (mmer_dist/routing.py) against straightforward references.

- every token in one group g == the plain HF model loaded with group g's weights (its text
  embedding and LM head from theta_bar, group 0, as DESIGN.md says), bit for bit;
- mixed groups == a dense-select oracle: every group's layer computed for every token, then each
  token's row picked by its group (y_t = W_{g(t)} x_t written out literally);
- bad input names the problem.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from method_helpers import TEST_DEVICE
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mmer_dist.errors import InvalidInputError
from mmer_dist.routing import (
    RoutedEmbedding,
    RoutedLinear,
    RoutedRMSNorm,
    embedding_modules,
    groups_by_token_range,
    route_model,
)

TEXT_ONLY = ("model.embed_tokens", "lm_head")

VOCAB = 48


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_bias=True, mlp_bias=True)  # biases: the addmm path
    return LlamaForCausalLM(cfg).eval().to(TEST_DEVICE)


def group_states(model: nn.Module, n_groups: int, scale: float = 0.05) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    base = model.state_dict()
    return [{k: v + scale * torch.randn(v.shape, generator=g).to(v.device) for k, v in base.items()}
            for _ in range(n_groups)]


def plain_logits(state, ids, attention_mask=None) -> torch.Tensor:
    model = tiny_llama()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask).logits


def dense_select(routed_model: nn.Module) -> None:
    """Turn a routed model into the oracle: each routed layer computes every group's output for
    every token and keeps, per token, the one of its group."""

    def pick(outs: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:  # outs (G, ..., d), groups (...)
        index = groups.unsqueeze(0).unsqueeze(-1).expand(1, *outs.shape[1:])
        return outs.gather(0, index).squeeze(0)

    def linear(self, x):
        groups = self.context.plan(x.shape[:-1]).groups
        outs = torch.stack([nn.functional.linear(x, self.weight[g], None if self.bias is None else self.bias[g])
                            for g in range(self.weight.shape[0])])
        return pick(outs, groups)

    def embedding(self, ids):
        groups = self.context.plan(ids.shape).groups
        return pick(torch.stack([nn.functional.embedding(ids, w) for w in self.weight]), groups)

    def norm(self, h):
        groups = self.context.plan(h.shape[:-1]).groups
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return pick(torch.stack([w * x.to(h.dtype) for w in self.weight]), groups)

    for module in routed_model.modules():
        for cls, fn in ((RoutedLinear, linear), (RoutedEmbedding, embedding), (RoutedRMSNorm, norm)):
            if isinstance(module, cls):
                module.forward = types.MethodType(fn, module)


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    states = group_states(model, 3)
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(2)).to(TEST_DEVICE)
    return model, states, ids


def test_text_embedding_and_lm_head_are_found():
    assert embedding_modules(tiny_llama()) == TEXT_ONLY


@pytest.mark.parametrize("group", [0, 1, 2])
def test_one_group_is_the_plain_model_with_its_weights(setup, group):
    model, states, ids = setup
    routed = route_model(copy.deepcopy(model), states)
    with torch.no_grad():
        got = routed(torch.full_like(ids, group), ids).logits
    text = {k: v for k, v in states[0].items() if k.startswith(tuple(m + "." for m in TEXT_ONLY))}
    assert set(text) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert torch.equal(got, plain_logits({**states[group], **text}, ids))
    # everything routed (text_only=()): exactly model g
    everything = route_model(copy.deepcopy(model), states, text_only=())
    with torch.no_grad():
        assert torch.equal(everything(torch.full_like(ids, group), ids).logits, plain_logits(states[group], ids))


@pytest.mark.parametrize("text_only", [None, ()], ids=["embeddings-on-text", "all-routed"])
def test_mixed_groups_equal_the_dense_select_oracle(setup, text_only):
    model, states, ids = setup
    groups = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(3)).to(TEST_DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on one row
    routed = route_model(copy.deepcopy(model), states, text_only=text_only)
    oracle = route_model(copy.deepcopy(model), states, text_only=text_only)
    dense_select(oracle.model)
    with torch.no_grad():
        got = routed(groups, ids, attention_mask=mask).logits
        want = oracle(groups, ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and routing matters: every group's plain model differs from the routed pass
    for state in states:
        assert not torch.allclose(got, plain_logits(state, ids, mask), atol=1e-3)


def test_a_token_only_changes_what_attends_to_it(setup):
    """Causal attention: moving the last token to another group leaves every earlier position's
    logits untouched and changes the last one's."""
    model, states, ids = setup
    routed = route_model(copy.deepcopy(model), states)
    groups = torch.zeros_like(ids)
    moved = groups.clone()
    moved[:, -1] = 2
    with torch.no_grad():
        a, b = routed(groups, ids).logits, routed(moved, ids).logits
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_groups_by_token_range():
    ids = torch.tensor([[1, 5, 6, 9, 10, 3]])
    got = groups_by_token_range(ids, {1: (5, 7), 2: (9, 11)})
    assert got.tolist() == [[0, 1, 1, 2, 2, 0]]


def test_bad_input_names_the_problem(setup):
    model, states, ids = setup
    routed = route_model(copy.deepcopy(model), states)
    with pytest.raises(InvalidInputError, match=r"\[0, 3\)"):
        routed(torch.full_like(ids, 3), ids)
    with pytest.raises(InvalidInputError, match="one group per token"):
        routed(torch.zeros(4, 5, dtype=torch.long), ids)
    with pytest.raises(InvalidInputError, match="integers"):
        routed(torch.zeros(ids.shape), ids)
    with pytest.raises(RuntimeError, match="outside"):
        routed.model(ids)

    missing = [dict(s) for s in states]
    del missing[1]["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(InvalidInputError, match=r"group\(s\) \[1\].*down_proj"):
        route_model(copy.deepcopy(model), missing)
    bad_shape = [dict(s) for s in states]
    bad_shape[2]["model.norm.weight"] = torch.ones(7)
    with pytest.raises(InvalidInputError, match="model.norm.weight.*different shapes"):
        route_model(copy.deepcopy(model), bad_shape)
    extra = [dict(s, **{"vision_tower.w": torch.ones(2)}) for s in states]
    with pytest.raises(InvalidInputError, match="vision_tower.w"):
        route_model(copy.deepcopy(model), extra)
    with pytest.raises(InvalidInputError, match="does not have.*vision"):
        route_model(copy.deepcopy(model), states, text_only=("vision",))
    with pytest.raises(InvalidInputError, match="at least one group"):
        route_model(copy.deepcopy(model), [])
    other = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(InvalidInputError, match="LayerNorm"):
        route_model(other, [other.state_dict()])


def test_tied_embeddings_and_nothing_changed_on_error():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval().to(TEST_DEVICE)
    states = group_states(model, 2)
    assert "lm_head.weight" in states[0]  # state_dict lists the tied head too
    with pytest.raises(InvalidInputError, match="tied"):  # independent noise untied them
        route_model(copy.deepcopy(model), states)
    for s in states:
        s["lm_head.weight"] = s["model.embed_tokens.weight"]
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4)).to(TEST_DEVICE)
    routed = route_model(copy.deepcopy(model), states)
    with torch.no_grad():
        got = routed(torch.ones_like(ids), ids).logits
        want = LlamaForCausalLM(cfg).eval().to(TEST_DEVICE)
        want.load_state_dict({**states[1], "model.embed_tokens.weight": states[0]["model.embed_tokens.weight"],
                              "lm_head.weight": states[0]["model.embed_tokens.weight"]})
        assert torch.equal(got, want(ids).logits)

    # an invalid group set leaves the model as it was: plain modules, original weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [dict(s) for s in states]
    bad[1]["unknown.weight"] = torch.ones(1)
    with pytest.raises(InvalidInputError, match="unknown.weight"):
        route_model(model, bad)
    assert not any(isinstance(m, (RoutedLinear, RoutedRMSNorm)) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
