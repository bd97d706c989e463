"""Lossless tree speculation (EAGLE-2-style trees of draft tokens) on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest

from specee_compile.bundle import read_manifest
from specee_compile.config import CompileConfig
from specee_compile.errors import BundleError, ConfigError
from specee_compile.runtimes import load
from specee_compile.runtimes.propagation import propagated_kv, rope_rows
from specee_compile.runtimes.tree import DEFAULT_TREE, TokenTree, TreeShape, context_lookup
from tests.test_specee_engine import PROMPTS

NEW = 16
SHAPES = ["1", "4", "2x2x4", "3x3x8", "8x4x20", "2x2x3+4", "1+8"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_tree_speculation_gives_the_dense_greedy_tokens_for_every_shape(bundle, family):
    out = bundle(family, 0.3, "full", tree=True)
    dense = load(out, dense=True)
    engine = load(out, tree="1")
    for text in SHAPES:
        shape = TreeShape.parse(text)
        for prompt in PROMPTS:
            got = engine.generate(prompt, max_new_tokens=NEW, tree=text)
            assert got.token_ids == dense.generate(prompt, max_new_tokens=NEW).token_ids, (family, shape)
            assert max(got.accepted_lengths) <= max(shape.depth, shape.lookup) + 1
            assert sum(got.accepted_lengths) >= len(got.token_ids) - 1  # every later token came from a tree step
            assert set(got.exit_layers) == {engine.num_layers - 1}
            assert len(got.step_seconds) == len(got.accepted_lengths)  # timed per target forward


def _oracle_draft(engine, sequence, slot):
    """Replace the draft's tree by a chain of the right tokens, each with a wrong sibling first
    when ``slot`` is 1: every step accepts the whole chain."""

    def draft(state, token, n):
        engine.decoder._real_draft(state, token, n)  # keeps the draft's cache and bookkeeping as in real decoding
        tokens, parents, depths = [token], [-1], [0]
        for d in range(1, engine.shape.depth + 1):
            right = sequence[n + d] if n + d < len(sequence) else 0
            parent = len(tokens) - 1
            for t in ([(right + 1) % engine.vocab_size] if slot else []) + [right]:
                tokens.append(t)
                parents.append(parent)
                depths.append(d)
        return TokenTree(tokens, parents, depths)

    return draft


@pytest.mark.parametrize("slot", [0, 1])
def test_an_accepted_path_keeps_the_cache_on_its_rows(bundle, slot):
    """With a draft that always knows the next 3 tokens, every step emits 4; with a wrong
    sibling before every right node (slot 1) the accepted rows are copied down, and the
    output still equals dense greedy decoding."""
    out = bundle("llama", 0.3, "full", tree=True)
    dense = load(out, dense=True)
    engine = load(out, tree="2x3x6")
    engine.decoder._real_draft = engine.decoder._draft_tree
    for prompt in PROMPTS:
        want = dense.generate(prompt, max_new_tokens=NEW).token_ids
        engine.decoder._draft_tree = _oracle_draft(engine, list(prompt) + want, slot)
        got = engine.generate(prompt, max_new_tokens=NEW)
        assert got.token_ids == want
        assert got.accepted_lengths[:3] == [4, 4, 4]


def test_tree_speculation_refuses_what_it_cannot_run(bundle):
    plain = bundle("llama", 0.3, "draft")
    with pytest.raises(BundleError, match="recompile it with --specee --tree"):
        load(plain, tree=2)
    tree = bundle("llama", 0.3, "full", tree=True)
    for shape, message in (("9", "width must be from 1 to 8"), ("2x2x7", "budget must be from 1 to the 6 nodes"),
                           ("2x0x2", "depth must be at least 1"), ("wide", "WIDTHxDEPTHxBUDGET")):
        with pytest.raises(ConfigError, match=message):
            load(tree, tree=shape)
    with pytest.raises(ConfigError, match="add --specee"):
        CompileConfig(model="m", out="o.onnx", tree=True)


def test_tree_shapes_parse_and_count_their_nodes():
    assert TreeShape.parse("4") == TreeShape(4, 1, 4)
    assert TreeShape.parse(" 4x2x6 ") == TreeShape(4, 2, 6)
    assert str(TreeShape(3, 2, 5)) == "3x2x5"
    assert TreeShape(4, 3, 8).drafted == 4 + 2 * 16
    assert TreeShape.parse("4x2x6+3") == TreeShape(4, 2, 6, 3) and TreeShape.parse("2+5") == TreeShape(2, 1, 2, 5)
    assert str(TreeShape(4, 2, 6, 3)) == "4x2x6+3"
    assert TreeShape.parse(True) == DEFAULT_TREE == TreeShape.parse("1+4")  # specee-run --tree alone


def test_context_lookup_continues_the_latest_earlier_occurrence():
    assert context_lookup([1, 2, 3, 9, 8, 7, 1, 2, 3], 4) == [9, 8, 7, 1]  # a 3-token match: up to the length
    assert context_lookup([5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6], 3) == [9, 2]  # the latest [5, 6]; a 2-token match: 2
    assert context_lookup([1, 2, 3, 9, 2, 3, 4, 7, 3], 2) == [4]  # [4, 7, 3] and [7, 3] are not there before: [3]
    assert context_lookup([1, 2, 3], 4) == []
    assert context_lookup([4, 4], 3) == [4]
    assert context_lookup([1, 2, 1, 2], 0) == []


def test_a_lookup_chain_merges_into_the_tree():
    tree = TokenTree.star(9, [10, 11])
    tree.add_chain([11, 12, 13])
    assert tree.tokens == [9, 10, 11, 12, 13] and tree.parents == [-1, 0, 0, 2, 3] and tree.depths == [0, 1, 1, 2, 3]
    tree.add_chain([14])
    assert tree.parents[-1] == 0 and tree.depths[-1] == 1


def test_a_token_tree_masks_all_but_ancestors_and_walks_the_greedy_path():
    #     0 -> 1 (a) -> 3 (c)
    #       -> 2 (b) -> 4 (d)
    tree = TokenTree([9, 10, 11, 12, 13], [-1, 0, 0, 1, 2], [0, 1, 1, 2, 2])
    seen = tree.bias(past=2)[0, 0] == 0
    assert seen[:, :2].all()  # the past
    assert [list(np.flatnonzero(row[2:])) for row in seen] == [[0], [0, 1], [0, 2], [0, 1, 3], [0, 2, 4]]
    assert tree.accepted(np.array([11, 0, 13, 0, 0])) == [2, 4]
    assert tree.accepted(np.array([10, 5, 0, 0, 0])) == [1]
    assert tree.accepted(np.array([7, 0, 0, 0, 0])) == []


def test_tree_graph_nodes_see_only_their_ancestors(bundle):
    """A node's greedy token and K/V do not depend on the branches beside it: the same chain
    alone and inside a bushier tree gives the same outputs."""
    out = bundle("llama", 0.3, "full", tree=True)
    engine = load(out, tree=4)
    decoder = engine.decoder
    request = decoder.new_request()
    decoder.prefill(request, PROMPTS[0])
    n = len(PROMPTS[0])
    arrays = request.buffers.cache.arrays
    alone, _ = decoder.verify(request, TokenTree([5, 9, 6], [-1, 0, 1], [0, 1, 2]), n)
    rows = [a[0, :, n + 1:n + 3].copy() for a in arrays]
    crowd, _ = decoder.verify(request, TokenTree([5, 3, 9, 4, 7, 6], [-1, 0, 0, 1, 1, 2], [0, 1, 1, 2, 2, 2]), n)
    assert alone[0] == crowd[0] and alone[1] == crowd[2] and alone[2] == crowd[5]
    for a, r in zip(arrays, rows):
        np.testing.assert_allclose(a[0, :, [n + 2, n + 5]].transpose(1, 0, 2), r, atol=1e-5)


def test_draft_tree_graph_equals_the_draft_graph_on_a_chain(bundle):
    """The tree draft graph over a causal chain proposes what the one-token draft graph does
    (both fp32: by default the tree draft is int8, test below)."""
    out = bundle("llama", 0.3, "full", tree=True, quant_draft="fp32")
    engine = load(out, tree=4)
    decoder = engine.decoder
    request = decoder.new_request()
    decoder.prefill(request, PROMPTS[1])
    ids, feats = [3, 4], np.random.default_rng(0).standard_normal((1, 2, engine.hidden_size)).astype(np.float32)
    start = request.draft_len
    top, logp, _ = decoder.backend.run_draft_tree(request.buffers, ids, feats, [start, start + 1],
                                                  np.zeros((1, 1, 2, start + 2), np.float32), start)
    request.draft_len = start
    want = decoder.draft(request, ids, feats)
    np.testing.assert_array_equal(top[-1, :4], want)
    assert (np.diff(logp, axis=1) <= 0).all() and (logp <= 0).all()


@pytest.mark.parametrize("quant_draft", ["", "int8", "int4"])
def test_the_tree_draft_is_int8_by_default_and_the_trees_stay_lossless(bundle, quant_draft):
    """By default the tree draft's products and gathers read int8 blocks and the autoregressive
    draft stays fp32; --quant-draft sets both. The manifest says so, the graphs hold it, and
    the trees still emit the dense tokens (the target verifies every proposal)."""
    import onnx

    out = bundle("llama", 0.3, "full", tree=True, quant_draft=quant_draft)
    weights = read_manifest(out)["specee"]["draft_weights"]
    want = {"draft": quant_draft or "fp32", "draft_tree": quant_draft or "int8"}
    for family, precision in want.items():
        graph = onnx.load(out / f"specee/{family}.onnx", load_external_data=False)
        quantized = {n.op_type for n in graph.graph.node} & {"MatMulNBits", "GatherBlockQuantized"}
        assert weights[family]["weights"] == weights[family]["head"] == precision
        if precision == "fp32":
            assert weights[family]["stored"] == {} and not quantized
        else:  # the fusion, q|k|v, o, gate|up, down, head and embedding
            assert weights[family]["stored"] == {precision: 7}, weights
            assert quantized == {"MatMulNBits", "GatherBlockQuantized"}
    engine, dense = load(out, tree="2x2x3+4"), load(out, dense=True)
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=NEW)
        assert got.token_ids == dense.generate(prompt, max_new_tokens=NEW).token_ids
        assert max(got.accepted_lengths) > 1  # the int8 draft's tokens were accepted


def test_quant_draft_is_checked():
    with pytest.raises(ConfigError, match="--quant-draft int8 sets the precision of a SpecEE bundle's draft"):
        CompileConfig(model="m", out="m.onnx", quant_draft="int8")
    with pytest.raises(ConfigError, match="--quant-draft 'int2' is unknown"):
        CompileConfig(model="m", out="m.onnx", specee=True, quant_draft="int2")
    with pytest.raises(ConfigError, match="TensorRT takes INT8 weights per tensor"):
        CompileConfig(model="m", out="m.onnx", specee=True, quant_draft="int8", check="trt")
    trt = CompileConfig(model="m", out="m.onnx", specee=True, tree=True, check="trt")
    assert not trt.draft_quant_spec("draft_tree").active  # TensorRT-ready graphs keep --quant's precision


def test_tensorrt_ready_tree_graphs_pass_the_check_and_decode_as_the_ort_ones(bundle):
    """``--tree --check trt``: the tree and tree draft graphs in standard ONNX attention pass
    TensorRT's parser check (the compile fails otherwise) and, run by ONNX Runtime, give the
    dense tokens with the same accepted lengths as the GroupQueryAttention graphs."""
    out = bundle("llama", 0.3, "full", tree=True, check="trt")
    spec = read_manifest(out, verify=False)
    checked = set(spec["tensorrt_check"]["graphs"])
    assert spec["graph_target"] == "trt" and {"tree", "draft_tree", "tree_segment_0", "tree_segment_2"} <= checked
    ort_graphs = load(bundle("llama", 0.3, "full", tree=True), tree="3x2x5")
    trt_ready = load(out, tree="3x2x5")
    trt_segments = load(out, tree="3x2x5:exit", threshold=1.0)  # through the tree segments, no exit
    for prompt in PROMPTS:
        want = ort_graphs.generate(prompt, max_new_tokens=NEW)
        for got in (trt_ready.generate(prompt, max_new_tokens=NEW), trt_segments.generate(prompt, max_new_tokens=NEW)):
            assert got.token_ids == want.token_ids and got.accepted_lengths == want.accepted_lengths


def test_specee_run_decodes_with_a_tree(bundle, capsys):
    from specee_compile.cli import run_main
    from specee_compile.testing import IN_PROCESS

    out = bundle("llama", 0.3, "full", tree=True)
    args = [str(out), "--prompt", "hello world", "--max-new-tokens", "8", "--no-chat", "-q", *IN_PROCESS]
    assert run_main([*args, "--tree", "3x2x5"]) == 0
    tree = capsys.readouterr()
    assert "tree 3x2x5" in tree.err and "tokens per target forward" in tree.err
    assert run_main([*args, "--no-exit"]) == 0
    assert tree.out == capsys.readouterr().out  # the dense graph's text


# ---- merged mapping: early exit inside tree verification --------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tree_exits_that_never_fire_give_the_dense_tokens(bundle, family):
    """Through the tree segments with every predictor unable to pass (threshold 1): the
    dense tokens, every token from the last layer, the same accepted lengths as lossless."""
    out = bundle(family, 0.3, "full", tree=True)
    dense, lossless = load(out, dense=True), load(out, tree="2x2x3+4")
    engine = load(out, tree="2x2x3+4:exit", threshold=1.0)
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=NEW)
        assert got.token_ids == dense.generate(prompt, max_new_tokens=NEW).token_ids
        assert got.accepted_lengths == lossless.generate(prompt, max_new_tokens=NEW).accepted_lengths
        assert set(got.exit_layers) == {engine.num_layers - 1}


def _record_candidates(engine):
    """Wrap the tree decoder's ``_candidates`` to keep every step's tree and candidates."""
    steps, real = [], engine.decoder._candidates

    def candidates(state, tree, n):
        got = real(state, tree, n)
        steps.append((n, tree, got))
        return got

    engine.decoder._candidates = candidates
    return steps


@pytest.mark.parametrize("shape", ["1+4:exit", "3x2x5:exit"])
def test_tree_exits_emit_each_nodes_choice_at_the_exit_layer(bundle, tiny_dirs, shape):
    """Rule "draft", threshold 0 and only layer 1's predictor active: every verification
    settles at layer 1, so layers 0-1 of every position are computed, never propagated.
    Each emitted token must then be its producing node's best candidate under the truncated
    model's layer-1 state at that position (PyTorch over the final sequence), which checks
    the per-node candidates, the walk, the rows kept and the positions."""
    import torch
    from transformers import AutoModelForCausalLM

    out = bundle("llama", 0.0, "draft", tree=True)
    engine = load(out, tree=shape, threshold=0.0)
    only = np.zeros(engine.num_layers, bool)
    only[1] = True
    engine.decoder.active_layers = lambda history: only
    steps = _record_candidates(engine)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    head = model.lm_head.weight.detach()
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=NEW)
        steps.clear()
        scored = engine.score(prompt, got.token_ids)  # the same steps, keeping every prediction's feature
        assert scored.predicted == got.token_ids
        assert set(got.exit_layers[1:]) == {1} and max(got.accepted_lengths) > 1
        sequence = list(prompt) + got.token_ids
        with torch.no_grad():
            h = model.model(torch.tensor([sequence]), output_hidden_states=True).hidden_states[2][0]
            z = model.model.norm(h)
        # the exit feature of every prediction after the first is the layer-1 state at its position
        np.testing.assert_allclose(scored.features[1:], z[len(prompt):-1].numpy(), atol=1e-4)
        cache = engine._pool[-1].buffers.cache.arrays  # the cache score left: layer 2 of every decoded position is propagated
        for p in range(len(prompt), len(sequence) - 1):
            kv, spec = engine.decoder.backend.kv, engine.decoder.spec
            k, v = propagated_kv(np, kv, 2, h[p].numpy(), *rope_rows(kv, 2, p), spec.kv_eps, spec.kv_heads)
            np.testing.assert_allclose(cache[4][0, :, p], k, atol=1e-4)
            np.testing.assert_allclose(cache[5][0, :, p], v, atol=1e-4)
        emitted = 1  # the first token comes from prefill
        for (n, tree, cands), length in zip(steps, got.accepted_lengths):
            node = 0
            for j in range(length):  # token j of this step is predicted at position n + j by the path's node j
                if emitted >= len(got.token_ids):
                    break
                c = torch.as_tensor(cands[node])
                want = int(c[(head[c] @ z[n + j]).argmax()])
                assert got.token_ids[emitted] == want, (prompt, n, j)
                emitted += 1
                node = tree.child(node, want) if j + 1 < length else None
        assert emitted == len(got.token_ids)


def test_teacher_forced_tree_exits_reproduce_their_own_output(bundle):
    """``score`` by tree steps along the engine's own output predicts that output (every
    position once); along the dense output, lossless trees predict it all."""
    out = bundle("llama", 0.3, "full", tree=True)
    engine = load(out, tree="2x2x3+4:exit", threshold=0.0)
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=NEW)
        scored = engine.score(prompt, got.token_ids)
        assert scored.predicted == got.token_ids and scored.exit_layers == got.exit_layers
        assert scored.features.shape == (len(got.token_ids), engine.hidden_size)
    dense = load(out, dense=True)
    want = dense.generate(PROMPTS[0], max_new_tokens=NEW).token_ids
    assert engine.score(PROMPTS[0], want, tree="2x2x3+4").predicted == want


def test_tree_exits_need_the_tree_segments(bundle, tmp_path):
    import json
    import shutil

    out = bundle("llama", 0.3, "full", tree=True)
    spec = read_manifest(out, verify=False)["specee"]["tree"]
    assert [g["exit_layer"] for g in spec["segments"]][:-1] == read_manifest(out, verify=False)["specee"][
        "predictor_layers"]
    copy = tmp_path / "b.onnx"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["specee"]["tree"]["segments"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert load(copy, tree="4", verify=False).generate(PROMPTS[0], max_new_tokens=4).token_ids
    with pytest.raises(BundleError, match="no tree segments with per-node exits"):
        load(copy, tree="4:exit", verify=False)


def test_the_default_tree_shape_is_the_candidate_measured_fastest(bundle):
    """--tree without a shape: the compile measures every candidate on held-out prompts and
    records the one with the highest predicted speed-up (of those within TIE of it, the one
    with the fewest nodes), which tree=True then runs."""
    from specee_compile.runtimes.tree_choice import CANDIDATES, TIE, nodes

    out = bundle("llama", 0.3, "full", tree=True)
    tree = read_manifest(out)["specee"]["tree"]
    choice = tree["choice"]
    rows = {r["shape"]: r for r in choice["candidates"]}
    assert set(rows) == {str(TreeShape.parse(c)) for c in CANDIDATES} and choice["prompts"] >= 1
    assert choice["thread_pool"] == "shared"  # measured as specee-run runs it, in a child process
    top = max(r["predicted_speedup"] for r in rows.values())
    near = [r for r in rows.values() if r["predicted_speedup"] >= (1 - TIE) * top]  # a tie: the fewest nodes
    assert tree["default_shape"] == min(near, key=lambda r: (nodes(TreeShape.parse(r["shape"])),
                                                             -r["predicted_speedup"]))["shape"]
    for r in rows.values():
        assert r["tokens_per_forward"] >= 1.0 and r["verify_ms"] > 0 and r["forward_cost"] > 0
        assert abs(r["predicted_speedup"] - r["tokens_per_forward"] / r["forward_cost"]) < 0.01 * r["predicted_speedup"]
    assert rows["1x1x1"]["tokens_per_forward"] <= 2.0  # one draft node: at most it and the bonus token
    assert {"1", "2", "16"} <= set(choice["verification_ms"])
    assert str(load(out, tree=True).shape) == tree["default_shape"]


def test_the_compile_warns_when_no_tree_shape_is_predicted_faster_than_dense():
    from specee_compile.cli import _tree_choice_line

    def line(*speedups):
        rows = [{"shape": s, "predicted_speedup": p} for s, p in zip(("1x1x1", "1x1x1+4"), speedups)]
        return _tree_choice_line({"default_shape": "1x1x1", "choice": {"candidates": rows}})

    assert "1x1x1 0.96x, 1x1x1+4 0.89x" in line(0.96, 0.89) and "decode without --tree" in line(0.96, 0.89)
    assert "warning" not in line(1.02, 0.89)


@pytest.mark.parametrize("stop_early", [False, True])
def test_a_replay_on_the_dense_text_accepts_what_tree_decoding_does(bundle, stop_early):
    """``accepted_lengths`` (what the compile's shape choice measures) gives the accepted
    length of every target forward a real tree decode makes, without running the target; with
    an end-of-text token inside the text as well (then the last forward counts no token past
    it, where a real one may)."""
    out = bundle("llama", 0.3, "full", tree=True)
    dense = load(out, dense=True)
    engine = load(out, tree="1")
    decoder = engine.decoder
    stopped = 0
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        known = dense.generate(ids, max_new_tokens=NEW + 9).token_ids
        if stop_early:  # the first new token from the third on ends the text for both
            k = next((k for k in range(2, NEW) if known[k] not in known[:k]), None)
            if k is None:
                continue
            dense.eos_token_ids = engine.eos_token_ids = {known[k]}
            known = dense.generate(ids, max_new_tokens=NEW + 9).token_ids
            assert len(known) == k
            stopped += 1
        sequence, features = decoder.known_features(decoder.new_request(), ids, known)
        for text in SHAPES:
            request = decoder.new_request()
            decoder.configure(request, tree=text)
            got = decoder.accepted_lengths(request, len(ids), sequence, features, NEW, engine.eos_token_ids)
            want = engine.generate(ids, max_new_tokens=NEW, tree=text).accepted_lengths
            if stop_early:  # a real forward may accept tokens past the end-of-text one, which the text lacks
                assert got[:-1] == want[:-1] and got[-1] <= want[-1], (prompt, text)
            else:
                assert got == want, (prompt, text)
            assert request.breakdown["draft"] > 0
    assert stopped or not stop_early
    with pytest.raises(ConfigError, match="not lossless"):
        request = decoder.new_request()
        decoder.configure(request, tree="2:exit")
        decoder.accepted_lengths(request, len(ids), sequence, features, NEW)


def test_a_given_tree_shape_is_recorded_without_measuring(tiny_dirs, calibrations, tmp_path, capsys):
    from specee_compile.cli import compile_main

    out = tmp_path / "b.onnx"
    assert compile_main([str(tiny_dirs["llama"]), "--out", str(out), "--max-context", "64", "--specee", "--tree",
                         "--tree-shape", " 2x1x2+3", "--set", f"calibration={calibrations['llama']}"]) == 0
    assert "default tree shape: 2x1x2+3 (given)" in capsys.readouterr().err
    tree = read_manifest(out)["specee"]["tree"]
    assert tree["default_shape"] == "2x1x2+3" and tree["choice"] == {"given": "2x1x2+3"}
    assert load(out, tree=True).shape == TreeShape(2, 1, 2, 3)
    with pytest.raises(ConfigError, match="add --tree"):
        CompileConfig(model="m", out="o.onnx", specee=True, tree_shape="2")
    with pytest.raises(ConfigError, match="width must be from 1 to 8"):
        CompileConfig(model="m", out="o.onnx", specee=True, tree=True, tree_shape="9")


def test_the_tree_shape_is_chosen_on_prompts_its_draft_never_trained_on(monkeypatch, tmp_path):
    """A supplied draft's choice prompts are the predictors' text (past the draft's training
    text); a trained draft's are the records after all the calibration read."""
    from types import SimpleNamespace

    from specee_compile import compiler
    from specee_compile.calibrate import data

    asked = []
    monkeypatch.setattr(data, "sharegpt", lambda n, skip=0: asked.append((n, skip)) or [])
    config = CompileConfig(model="m", out=tmp_path / "b.onnx", specee=True, tree=True, tree_prompts=2)
    supplied = {"settings": {"draft_file": "draft.safetensors", "draft_sequences": 1280, "predictor_sequences": 48},
                "text": {"from": 10240, "draft": 0, "predictors": 48}}
    trained = {"settings": {"draft_sequences": 1280, "predictor_sequences": 48}, "text": {"from": 0}}
    for meta in (supplied, trained):
        compiler.tree_prompts(config, SimpleNamespace(meta=meta))
    assert asked == [(8, 10240), (8, 1328)]
    assert compiler.tree_prompts(CompileConfig(model="m", out=tmp_path / "b.onnx", specee=True, tree=True,
                                               tree_shape="1x1x1"), SimpleNamespace(meta=supplied)) == ()
