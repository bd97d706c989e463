"""Lossless tree speculation (depth-1 trees of draft candidates) on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest

from specee_compile.config import CompileConfig
from specee_compile.errors import BundleError, ConfigError
from specee_compile.runtimes import load
from tests.test_specee_engine import PROMPTS, bundle, calibrations  # noqa: F401  (module fixtures)

NEW = 16


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tree_speculation_gives_the_dense_greedy_tokens_at_every_width(bundle, family):
    out = bundle(family, 0.3, "full", tree=True)
    dense = load(out, dense=True)
    engine = load(out, tree_width=1)
    for width in range(1, 5):
        engine.width = width
        for prompt in PROMPTS:
            got = engine.generate(prompt, max_new_tokens=NEW)
            assert got.token_ids == dense.generate(prompt, max_new_tokens=NEW).token_ids, (family, width)
            assert set(got.accepted_lengths) <= {1, 2}
            assert sum(got.accepted_lengths) >= len(got.token_ids) - 1  # every later token came from a tree step
            assert set(got.exit_layers) == {engine.num_layers - 1}


@pytest.mark.parametrize("slot", [0, 2])
def test_an_accepted_candidate_keeps_the_cache_on_the_accepted_path(bundle, slot):
    """A draft that always proposes the right token (in slot ``slot`` of 3): every step accepts
    two tokens, the accepted child's K/V moves to the path's row (slot 2: a real copy), and the
    output still equals dense greedy decoding."""
    out = bundle("llama", 0.3, "full", tree=True)
    dense = load(out, dense=True)
    engine = load(out, tree_width=3)
    verify = engine._verify
    for prompt in PROMPTS:
        want = dense.generate(prompt, max_new_tokens=NEW).token_ids
        sequence = list(prompt) + want

        def oracle(state, token, candidates, n):
            right = sequence[n + 1] if n + 1 < len(sequence) else None
            others = [c for c in candidates if c != right]
            candidates[:] = others[:slot] + [right] + others[slot:2] if right is not None else candidates
            return verify(state, token, candidates, n)

        engine._verify = oracle
        got = engine.generate(prompt, max_new_tokens=NEW)
        assert got.token_ids == want
        assert got.accepted_lengths[: len(want) // 2 - 1] == [2] * (len(want) // 2 - 1)


def test_tree_speculation_refuses_what_it_cannot_run(bundle):
    plain = bundle("llama", 0.3, "full")
    with pytest.raises(BundleError, match="recompile it with --specee --tree"):
        load(plain, tree_width=2)
    with pytest.raises(BundleError, match="tree width must be an integer from 1 to 4"):
        load(bundle("llama", 0.3, "full", tree=True), tree_width=5)
    with pytest.raises(ConfigError, match="add --specee"):
        CompileConfig(model="m", out="o.onnx", tree=True)
    with pytest.raises(ConfigError, match="ONNX Runtime only"):
        CompileConfig(model="m", out="o.onnx", specee=True, tree=True, check="trt")


def test_tree_graph_nodes_see_only_their_ancestors(bundle):
    """A child's greedy token and K/V do not depend on its siblings: the same candidate in a
    tree of one and in a tree of four gives the same outputs."""
    out = bundle("llama", 0.3, "full", tree=True)
    engine = load(out, tree_width=4)
    state = engine._new_state()
    engine._first_token(state, PROMPTS[0])
    n = len(PROMPTS[0])
    alone, _ = engine._verify(state, 5, [9], n)
    row = [a[0, :, n + 1].copy() for a in state.arrays]
    crowd, _ = engine._verify(state, 5, [3, 9, 4, 7], n)
    assert alone[1] == crowd[2] and alone[0] == crowd[0]
    for a, r in zip(state.arrays, row):
        np.testing.assert_allclose(a[0, :, n + 2], r, atol=1e-5)


def test_specee_run_decodes_with_a_tree(bundle, capsys):
    from specee_compile.cli import run_main
    from specee_compile.testing import IN_PROCESS

    out = bundle("llama", 0.3, "full", tree=True)
    args = [str(out), "--prompt", "hello world", "--max-new-tokens", "8", "--no-chat", "-q", *IN_PROCESS]
    assert run_main([*args, "--tree", "3"]) == 0
    tree = capsys.readouterr()
    assert "tokens per target forward" in tree.err
    assert run_main([*args, "--no-exit"]) == 0
    assert tree.out == capsys.readouterr().out  # the dense graph's text
