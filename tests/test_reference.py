"""The eager reference decoder on tiny random models: dense equivalence, forced exits, KV policies."""

from __future__ import annotations

import copy

import pytest
import torch

from specee_compile.calibrate.draft import EagleDraft
from specee_compile.predictor import PredictorBank
from specee_compile.functional import key_value, layer_step
from specee_compile.reference import DecodeSettings, ReferenceDecoder
from specee_compile.schedule import Schedule
from tests.conftest import FAMILIES, TINY_VOCAB, make_tiny_model

PROMPT = [1, 40, 41, 42, 43, 7]


def _decoder(model, threshold=0.5, kv_policy="mask", rule="full", layers=None):
    torch.manual_seed(0)
    L = model.config.num_hidden_layers
    draft = EagleDraft(model, torch.arange(TINY_VOCAB), capacity=256)
    schedule = Schedule(L, tuple(layers if layers is not None else range(L - 1)))
    return ReferenceDecoder(model, draft, PredictorBank(L, hidden=16), schedule,
                            DecodeSettings(rule=rule, kv_policy=kv_policy, threshold=threshold), capacity=256)


def _hf_greedy(model, prefix, n):
    out = model.generate(torch.tensor([prefix]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(prefix):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", ["full", "reduced", "draft"])
def test_predictors_that_never_fire_give_dense_greedy(family, rule):
    model = make_tiny_model(family)
    result = _decoder(model, threshold=1.0, rule=rule).generate(PROMPT, max_new_tokens=12)
    assert result.tokens == _hf_greedy(model, PROMPT, 12)
    assert set(result.exit_layers) == {model.config.num_hidden_layers - 1}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [0, 1])
def test_exit_forced_at_layer_k_equals_model_truncated_at_k(family, k):
    model = make_tiny_model(family)
    result = _decoder(model).generate(PROMPT, max_new_tokens=10, force_exit_layer=k)
    truncated = copy.deepcopy(model)
    truncated.model.layers = truncated.model.layers[: k + 1]
    truncated.config.num_hidden_layers = k + 1
    # The first token comes from the dense prefill; every later step exits at k.
    assert result.tokens[1:] == _hf_greedy(truncated, PROMPT + result.tokens[:1], 9)
    assert result.exit_layers[1:] == [k] * 9


def test_threshold_zero_with_draft_rule_exits_at_the_first_active_layer():
    model = make_tiny_model("llama")
    result = _decoder(model, threshold=0.0, rule="draft", layers=[1]).generate(PROMPT, max_new_tokens=6)
    assert result.exit_layers[1:] == [1] * 5
    assert all(s.predictors == 1 and s.full_heads == 0 and s.layers == 2 for s in result.steps)


def _after_exit_at_0(kv_policy):
    """Prefill, one step forced to exit at layer 0, then the state and the exit hidden state."""
    model = make_tiny_model("llama")
    dec = _decoder(model, threshold=1.0, kv_policy=kv_policy)
    state = dec.prefill(PROMPT)
    h_in = model.model.embed_tokens(torch.tensor([[state.token]]))
    pos = torch.tensor([state.n])
    with torch.no_grad():
        h_exit, _, _ = layer_step(dec.specs[0], h_in, state.keys[0], state.values[0], pos)
        dec.step(state, force_exit_layer=0)
    return model, dec, state, h_exit, pos


def test_kv_masking_hides_skipped_positions_from_later_steps():
    model, dec, state, _, pos = _after_exit_at_0("mask")
    n = len(PROMPT)
    assert state.valid[0].tolist() == [True] * (n + 1)
    for j in (1, 2):
        assert state.valid[j].tolist() == [True] * n + [False]
    # Hand-computed next step at layer 1: the skipped position is simply absent.
    with torch.no_grad():
        h = model.model.embed_tokens(torch.tensor([[state.token]]))
        nxt = torch.tensor([state.n])
        h, _, _ = layer_step(dec.specs[0], h, state.keys[0], state.values[0], nxt)
        expected, _, _ = layer_step(dec.specs[1], h, state.keys[1][:, :, :n], state.values[1][:, :, :n], nxt)
        masked, _, _ = layer_step(dec.specs[1], h, state.keys[1], state.values[1], nxt,
                                  key_valid=torch.cat([state.valid[1], torch.tensor([True])]))
    torch.testing.assert_close(masked, expected, atol=1e-6, rtol=0)


def test_kv_propagation_fills_skipped_layers_from_the_exit_hidden_state():
    model, dec, state, h_exit, pos = _after_exit_at_0("propagate")
    n = len(PROMPT)
    for j in (1, 2):
        assert state.valid[j].tolist() == [True] * (n + 1)
        with torch.no_grad():
            k, v = key_value(dec.specs[j], h_exit, pos)
        torch.testing.assert_close(state.keys[j][:, :, n:], k, atol=1e-6, rtol=0)
        torch.testing.assert_close(state.values[j][:, :, n:], v, atol=1e-6, rtol=0)


def test_exit_history_is_per_request():
    model = make_tiny_model("llama")
    dec = _decoder(model, threshold=0.0, rule="draft", layers=[0])
    first = dec.generate(PROMPT, max_new_tokens=8)
    second = dec.generate(PROMPT, max_new_tokens=8)
    assert first.tokens == second.tokens and first.exit_layers == second.exit_layers


def test_unknown_rule_or_policy_raises():
    with pytest.raises(ValueError, match="exit rule"):
        DecodeSettings(rule="maybe")
    with pytest.raises(ValueError, match="KV policy"):
        DecodeSettings(kv_policy="forget")
