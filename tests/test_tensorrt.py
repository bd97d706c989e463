"""TensorRT lowering: the TensorRT-ready graphs run on CPU, pass the static check and equal the
ONNX Runtime graphs; without TensorRT and a GPU a TensorRT output fails fast; the engine steps
that need the hardware are skipped with the reason."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from specee_compile import cli
from specee_compile.bundle import MANIFEST, read_manifest
from specee_compile.calibrate import CalibrationSettings, calibrate, load_calibration
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.errors import BackendError, BundleError, ConfigError
from specee_compile.export import export_step
from specee_compile.lower import tensorrt as trt_lowering
from specee_compile.lower.trt_check import TensorRTCompatibilityError
from specee_compile.passes import FuseOrtTransformersPass, Pipeline
from specee_compile.reference import DecodeSettings, ReferenceDecoder
from specee_compile.runtimes import load
from specee_compile.testing import write_calibration_jsonl
from tests.conftest import FAMILIES, make_tiny_model

HARDWARE = trt_lowering.unavailable_reason()
needs_hardware = pytest.mark.skipif(HARDWARE is not None, reason=f"needs TensorRT and a GPU: {HARDWARE}")
without_hardware = pytest.mark.skipif(HARDWARE is None, reason="TensorRT and a GPU are present")
CAPACITY = 64  # as the tiny_bundle fixture
PROMPTS = ([1, 40, 41, 42], [1, 7, 8, 9, 10, 11], [1, 200])


@pytest.fixture(scope="module")
def trt_graphs(tmp_path_factory):
    """family -> (TensorRT-ready step graph saved to disk, its shapes)."""
    folder = tmp_path_factory.mktemp("trt-graphs")
    graphs = {}
    for family in FAMILIES:
        model, shapes = export_step(make_tiny_model(family), CAPACITY, target="trt")
        ir.save(model, folder / f"{family}.onnx")
        graphs[family] = (model, shapes, folder / f"{family}.onnx")
    return graphs


def _step_logits(path, shapes, ids: list[int], prompt_len: int) -> list[np.ndarray]:
    """Prefill ids[:prompt_len], then decode the rest one by one; the logits of every step."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [f"past_key_values.{i}.{k}" for i in range(shapes.num_layers) for k in ("key", "value")]
    cache = [np.zeros((1, shapes.num_kv_heads, CAPACITY, shapes.head_dim), np.float32) for _ in names]
    logits, past = [], 0
    for chunk in [ids[:prompt_len]] + [[t] for t in ids[prompt_len:]]:
        feeds = {"input_ids": np.array([chunk]), "past_sequence_length": np.array([past]), **dict(zip(names, cache))}
        out = session.run(None, feeds)
        logits.append(out[0][0])
        cache, past = out[2:], past + len(chunk)
    return logits


# ---- the TensorRT-ready graph on CPU ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_trt_ready_graph_has_only_standard_ops_and_matches_eager(trt_graphs, family):
    model, shapes, path = trt_graphs[family]
    assert {n.domain for n in ir.traversal.RecursiveGraphIterator(model.graph)} == {""}
    assert "ScatterElements" in {n.op_type for n in model.graph}
    ids = [1, 17, 42, 99, 5, 7, 250, 3, 64]
    got = _step_logits(path, shapes, ids, prompt_len=5)
    with torch.no_grad():
        ref = make_tiny_model(family)(torch.tensor([ids])).logits[0].numpy()
    for k, g in enumerate(got):
        np.testing.assert_allclose(g, ref[4 + k], atol=1e-4, rtol=0, err_msg=f"step {k}")


def test_trt_ready_graph_logits_equal_the_group_query_attention_graph(trt_graphs, tiny_bundle):
    _, shapes, path = trt_graphs["llama"]
    ids = [1, 17, 42, 99, 5, 7, 250, 3]
    gqa = _step_logits(tiny_bundle / "model.onnx", shapes, ids, prompt_len=4)
    for k, (a, b) in enumerate(zip(_step_logits(path, shapes, ids, prompt_len=4), gqa)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f"step {k}")


@pytest.mark.parametrize("family", FAMILIES)
def test_trt_ready_graphs_pass_the_tensorrt_check(trt_graphs, family):
    assert trt_lowering.check_graphs({"step": trt_graphs[family][0]}, target=(10, 0)) == (10, 0)


def test_group_query_attention_graph_fails_the_check_naming_every_attention_and_cache_write(tiny_bundle):
    model = ir.load(tiny_bundle / "model.onnx")
    with pytest.raises(TensorRTCompatibilityError) as e:
        trt_lowering.check_graphs({"step": model}, target=(10, 0))
    problems = [str(p) for p in e.value.problems]
    assert sum("(com.microsoft::GroupQueryAttention): operator domain 'com.microsoft'" in p for p in problems) == 3
    assert sum("writes the cache output 'present." in p for p in problems) == 6
    assert str(e.value).startswith("graph(s) step hold ")


def test_check_trt_cli_writes_an_onnx_runtime_bundle_with_the_gqa_bundles_tokens(tiny_dirs, tiny_bundle, tmp_path):
    out = tmp_path / "llama-trt.onnx"
    assert cli.compile_main([str(tiny_dirs["llama"]), "--out", str(out), "--check", "trt", "--max-context", "64",
                             "-q"]) == 0
    manifest = read_manifest(out)
    assert manifest["graph_target"] == "trt" and manifest["backend"] == "onnxruntime"
    assert manifest["tensorrt_check"] == {"tensorrt": "10.0", "graphs": ["step"], "problems": 0}
    assert "fuse_ort_transformers" not in {p["pass"] for p in manifest["passes"]}
    engine, gqa = load(out), load(tiny_bundle)
    for prompt in PROMPTS:
        assert engine.generate(prompt, max_new_tokens=24).token_ids == gqa.generate(prompt, max_new_tokens=24).token_ids


@pytest.fixture(scope="module")
def calibration(tiny_dirs, tmp_path_factory):
    """A tiny calibration artifact of the tiny Llama."""
    calib = write_calibration_jsonl(tmp_path_factory.mktemp("calib") / "c.jsonl")
    settings = CalibrationSettings(calib_file=str(calib), draft_sequences=8, predictor_sequences=4, draft_vocab=64,
                                   predictor_hidden=16, predictor_epochs=3, positions_per_sequence=16, draft_epochs=1)
    return calibrate(tiny_dirs["llama"], settings, progress=False)


def _reference(calibration, rule="full"):
    target = make_tiny_model("llama")
    cal = load_calibration(calibration, target)
    return ReferenceDecoder(target, cal.draft, cal.bank, cal.schedule,
                            DecodeSettings(rule=rule, kv_policy="propagate", threshold=0.3), capacity=64)


def test_specee_trt_ready_bundle_checks_every_graph_and_equals_the_reference_decoder(tiny_dirs, calibration,
                                                                                     tmp_path):
    out = compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "spec.onnx", max_context=64,
                                       specee=True, calibration=calibration, threshold=0.3, check="trt"),
                         progress=False)
    manifest = read_manifest(out)
    graphs = manifest["tensorrt_check"]["graphs"]
    assert graphs[0] == "step" and graphs[-1] == "draft" and "segment_0" in graphs
    engine = load(out)
    ref = _reference(calibration)
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=12)
        want = ref.generate(prompt, 12, eos_ids=engine.eos_token_ids)
        assert (got.token_ids, got.exit_layers) == (want.tokens, want.exit_layers)


def test_check_failure_lists_the_problems_and_writes_nothing(tiny_dirs, tmp_path):
    out = tmp_path / "x.onnx"
    ort_fusions = Pipeline({"optimize": [FuseOrtTransformersPass()]})
    with pytest.raises(TensorRTCompatibilityError, match=r"com\.microsoft::SkipSimplifiedLayerNormalization"):
        compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=out, max_context=64, check="trt",
                                     pipeline=ort_fusions), progress=False)
    assert list(tmp_path.iterdir()) == []


# ---- failing fast without the hardware ----------------------------------------------------------
@without_hardware
@pytest.mark.parametrize("args", [["--out", "x.plan"], ["--out", "x.engine"], ["--out", "x", "--backend", "trt"],
                                  ["--out", "x.plan", "--specee"]])
def test_tensorrt_output_without_hardware_exits_1_before_loading_anything(tmp_path, monkeypatch, capsys, args):
    def must_not_run(*a, **k):
        raise AssertionError("the model was touched before the backend check")

    for name in ("resolve", "inspect", "load"):
        monkeypatch.setattr(f"specee_compile.load.{name}", must_not_run)
    monkeypatch.setattr("specee_compile.export.export_step", must_not_run)
    monkeypatch.chdir(tmp_path)
    assert cli.compile_main(["smollm2", *args]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot build a TensorRT engine: {HARDWARE}." in err and "Traceback" not in err
    assert "--out x.onnx" in err and "--check trt" in err
    assert list(tmp_path.iterdir()) == []


@without_hardware
def test_tensorrt_output_without_hardware_fails_in_a_fresh_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "specee_compile.cli", "smollm2", "--out", str(tmp_path / "x.plan")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "error: cannot build a TensorRT engine" in proc.stderr and str(tmp_path / "x.onnx") in proc.stderr
    assert list(tmp_path.iterdir()) == []


@without_hardware
def test_loading_a_tensorrt_bundle_without_hardware_names_what_is_missing(tiny_bundle, tmp_path):
    bundle = tmp_path / "fake.plan"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["backend"] = "tensorrt"
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match=r"TensorRT bundle.*" + re.escape(HARDWARE.split(" (")[0])):
        load(bundle)


# ---- configuration and the steps before the hardware call ---------------------------------------
def test_precision_defaults_to_fp16_for_tensorrt_and_fp32_for_onnx_runtime():
    assert CompileConfig(model="m", out="x.plan").precision == "fp16"
    assert CompileConfig(model="m", out="x.onnx").precision == "fp32"
    assert CompileConfig(model="m", out="x.engine", precision="bf16").precision == "bf16"


@pytest.mark.parametrize("kwargs, message", [
    (dict(out="x.onnx", precision="fp16"), "ONNX Runtime bundles are fp32"),
    (dict(out="x.onnx", backend="trt"), "contradicts the output suffix '.onnx'"),
    (dict(out="x.plan", specee=True, exit_mode="graph"), "TensorRT SpecEE bundles use exit mode 'segments'"),
    (dict(out="x.plan", precision="int8"), "precision 'int8' is unknown"),
    (dict(out="x.onnx", check="tensorrt"), "check 'tensorrt' is unknown"),
])
def test_invalid_tensorrt_options_are_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CompileConfig(model="m", **kwargs)


def test_optimization_profile_spans_one_token_to_the_capacity(trt_graphs):
    assert trt_lowering.optimization_profile(trt_graphs["llama"][0], CAPACITY) == {
        "input_ids": [[1, 1], [1, 1], [1, CAPACITY]]}


def test_parser_errors_are_reported_with_their_nodes(tmp_path):
    class Error:
        def __init__(self, node, name, op, desc):
            self.values = dict(node=node, node_name=name, node_operator=op, desc=desc, code="UNSUPPORTED_NODE")

        def __getattr__(self, item):
            return lambda: self.values[item]

    text = trt_lowering.format_parser_errors(
        [Error(7, "attn.0", "GroupQueryAttention", "No importer registered"), Error(-1, "", "", "bad graph")],
        tmp_path / "model.onnx")
    assert "rejected " + str(tmp_path / "model.onnx") + " with 2 error(s)" in text
    assert "node 7 'attn.0' (GroupQueryAttention): No importer registered [UNSUPPORTED_NODE]" in text
    assert "the graph: bad graph" in text


# ---- SpecEE on TensorRT, up to the hardware call ------------------------------------------------
def _fake_build(config: CompileConfig):
    """Compile ``config`` (a TensorRT SpecEE bundle) with the builder replaced: every engine file
    holds only the name of its ONNX graph. Returns the bundle and the calls in order (check, builds)."""
    calls = []
    check = trt_lowering.check_graphs

    def build(onnx_path, profile, precision):
        folder = "specee/" if onnx_path.parent.name == "specee" else ""
        calls.append(("build", folder + onnx_path.name, profile, precision))
        return f"fake engine of {onnx_path.name}".encode()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trt_lowering, "unavailable_reason", lambda: None)
        mp.setattr(trt_lowering, "check_graphs", lambda graphs: calls.append(("check", list(graphs))) or check(graphs))
        mp.setattr(trt_lowering, "build_engine", build)
        mp.setattr(trt_lowering, "engine_facts", lambda precision, profile: {"precision": precision, "profile": profile})
        out = compile_bundle(config, progress=False)
    return out, calls


@pytest.fixture(scope="module")
def trt_specee_bundle(tiny_dirs, calibration, tmp_path_factory):
    """A TensorRT SpecEE bundle compiled with the builder replaced (``_fake_build``)."""
    return _fake_build(CompileConfig(model=str(tiny_dirs["llama"]), max_context=CAPACITY, specee=True,
                                     out=tmp_path_factory.mktemp("trt-specee") / "spec.plan",
                                     calibration=calibration, threshold=0.3, precision="fp32"))


@pytest.fixture(scope="module")
def trt_tree_bundle(tiny_dirs, calibration, tmp_path_factory):
    """The same with the tree graphs, its default tree shape given (measuring one needs the engines)."""
    return _fake_build(CompileConfig(model=str(tiny_dirs["llama"]), max_context=CAPACITY, specee=True, tree=True,
                                     tree_shape="2x2x3+4", out=tmp_path_factory.mktemp("trt-tree") / "tree.plan",
                                     calibration=calibration, threshold=0.3, precision="fp32"))


@pytest.fixture
def emulated_tensorrt(monkeypatch):
    """Runtimes load a TensorRT bundle's engines as ONNX Runtime emulations on the CPU."""
    from specee_compile.runtimes.backends import tensorrt as trt_runtime
    from tests.trt_fake import FakeTrtEngine

    monkeypatch.setattr(trt_runtime, "unavailable_reason", lambda: None)
    monkeypatch.setattr(trt_runtime, "_deserialize", lambda plan, facts: FakeTrtEngine(plan.with_suffix(".onnx")))
    monkeypatch.setattr(trt_runtime.TrtStep, "device", "cpu")


def test_specee_tensorrt_bundle_has_an_engine_per_segment_and_the_draft_built_after_the_check(trt_specee_bundle):
    out, calls = trt_specee_bundle
    manifest = read_manifest(out)
    spec = manifest["specee"]
    assert manifest["backend"] == "tensorrt" and manifest["graphs"]["step"]["file"] == "model.plan"
    assert calls[0] == ("check", ["step", "segment_0", "segment_1", "segment_2", "draft"])
    built = [c[1] for c in calls[1:]]
    assert built == ["model.onnx", "specee/segment_0.onnx", "specee/segment_1.onnx", "specee/segment_2.onnx",
                     "specee/draft.onnx"]
    assert {c[3] for c in calls[1:]} == {"fp32"}
    for k, seg in enumerate(spec["segments"]):
        assert (seg["file"], seg["onnx"]) == (f"specee/segment_{k}.plan", f"specee/segment_{k}.onnx")
        assert seg["profile"] == calls[2 + k][2]
        assert (out / seg["file"]).read_bytes() == f"fake engine of segment_{k}.onnx".encode()
        assert (out / seg["onnx"]).is_file()
    # segments run decode steps only: the token and the hidden states at the cuts are fixed at one position
    assert spec["segments"][0]["profile"] == {"input_ids": [[1, 1]] * 3}
    # (and the fusion draft's low layer, normed, which the exit after layer 1 fuses)
    assert spec["segments"][1]["profile"] == {"layers.0.output": [[1, 1, 64]] * 3,
                                              "specee.fuse.normed.0": [[1, 1, 64]] * 3}
    assert spec["draft"]["file"] == "specee/draft.plan" and spec["draft"]["onnx"] == "specee/draft.onnx"
    assert spec["draft"]["profile"] == {"input_ids": [[1, 1], [1, 1], [1, CAPACITY]],
                                        "features": [[1, 1, 64], [1, 1, 64], [1, CAPACITY, 64]]}


def test_engine_jobs_fix_segment_dimensions_at_one_and_span_the_capacity_for_the_draft():
    from specee_compile.lower.tensorrt import engine_jobs, with_engines

    io = lambda name, shape: {"name": name, "dtype": "float32", "shape": shape}  # noqa: E731
    spec = {"segments": [{"file": "specee/segment_0.onnx", "inputs": [io("input_ids", [1, "s"]),
                                                                      io("exit_threshold", [1])]},
                         {"file": "specee/segment_1.onnx", "inputs": [io("layers.0.output", [1, "s70", 8])]}],
            "draft": {"file": "specee/draft.onnx", "inputs": [io("features", [1, "sequence", 8])]}}
    jobs = engine_jobs(spec, capacity=32)
    assert [(j.name, j.onnx, j.engine) for j in jobs] == [
        ("segment_0", "specee/segment_0.onnx", "specee/segment_0.plan"),
        ("segment_1", "specee/segment_1.onnx", "specee/segment_1.plan"),
        ("draft", "specee/draft.onnx", "specee/draft.plan")]
    assert [j.profile for j in jobs] == [{"input_ids": [[1, 1]] * 3}, {"layers.0.output": [[1, 1, 8]] * 3},
                                         {"features": [[1, 1, 8], [1, 1, 8], [1, 32, 8]]}]
    recorded = with_engines(spec, jobs)
    assert recorded["segments"][1]["file"] == "specee/segment_1.plan" and spec["segments"][1]["file"].endswith(".onnx")
    assert recorded["draft"]["onnx"] == "specee/draft.onnx"


def test_segment_reading_a_value_nobody_writes_is_a_damaged_bundle():
    from specee_compile.errors import BundleError
    from specee_compile.runtimes.backends.tensorrt import exchange_buffers

    io = lambda name, shape, dtype="float32": {"name": name, "dtype": dtype, "shape": shape}  # noqa: E731
    draft = {"outputs": [io("draft_ids", [4], "int64"), io("present.0.key", [1, 2, 64, 16])]}
    segments = [{"inputs": [io("input_ids", [1, "s"], "int64"), io("past_key_values.0.key", [1, 2, 64, 16])],
                 "outputs": [io("layers.0.output", [1, "s", 8])]},
                {"inputs": [io("layers.0.output", [1, "s", 8]), io("draft_ids", [4], "int64")],
                 "outputs": [io("logits", [1, 320])]}]
    assert exchange_buffers(segments, draft) == {"draft_ids": ((4,), "int64"), "input_ids": ((1, 1), "int64"),
                                                 "layers.0.output": ((1, 1, 8), "float32"),
                                                 "logits": ((1, 320), "float32")}
    segments[1]["inputs"].append(io("val_7", [1]))
    with pytest.raises(BundleError, match="segment 1 reads 'val_7', which neither"):
        exchange_buffers(segments, draft)


def test_specee_runtime_on_emulated_engines_equals_the_reference_decoder(trt_specee_bundle, calibration,
                                                                         emulated_tensorrt):
    from specee_compile.runtimes.backends.tensorrt import TrtSpecEE, TrtStep
    from specee_compile.runtimes.decoders import DenseDecoder, SegmentedDecoder

    out, _ = trt_specee_bundle
    engine, dense, never = load(out), load(out, dense=True), load(out, threshold=1.0)
    assert (type(engine.decoder), type(engine.decoder.backend)) == (SegmentedDecoder, TrtSpecEE)
    assert (type(dense.decoder), type(dense.decoder.backend)) == (DenseDecoder, TrtStep)
    assert engine.threshold == pytest.approx(0.3)
    ref = _reference(calibration)
    exits, last_segment = [], engine.decoder.backend.segment_engines[-1]
    for prompt in PROMPTS:
        runs = last_segment.runs
        got = engine.generate(prompt, max_new_tokens=12)
        want = ref.generate(prompt, 12, eos_ids=engine.eos_token_ids)
        assert (got.token_ids, got.exit_layers) == (want.tokens, want.exit_layers)
        # a step that exits stops there: the last segment ran only for the full-depth steps (exit_layers
        # leaves out the step that produced an EOS)
        full_depth = got.exit_layers[1:].count(2)
        assert full_depth <= last_segment.runs - runs <= full_depth + (got.stop_reason == "eos")
        assert never.generate(prompt, max_new_tokens=12).token_ids == dense.generate(prompt, 12).token_ids
        exits += got.exit_layers[1:]
    assert min(exits) < 2  # exits happened, so the flags were read and the skipped layers' K/V propagated
    scored = engine.score(PROMPTS[-1], got.token_ids)
    assert (scored.predicted, scored.exit_layers) == (got.token_ids, got.exit_layers)
    assert scored.features.shape == (len(got.token_ids), 64)


@without_hardware
def test_loading_a_tensorrt_specee_bundle_without_hardware_names_what_is_missing(trt_specee_bundle):
    with pytest.raises(BackendError, match=r"TensorRT bundle.*--out NAME\.onnx --specee --check trt"):
        load(trt_specee_bundle[0])


# ---- tree speculation on TensorRT, up to the hardware call ---------------------------------------
def test_tensorrt_tree_bundle_has_engines_of_the_tree_graphs_and_no_tree_segments(trt_tree_bundle):
    out, calls = trt_tree_bundle
    tree = read_manifest(out)["specee"]["tree"]
    assert calls[0][0] == "check" and calls[0][1][-2:] == ["tree", "draft_tree"]
    assert not any(name.startswith("tree_segment") for name in calls[0][1])
    assert [c[1] for c in calls[-2:]] == ["specee/tree.onnx", "specee/draft_tree.onnx"]
    assert "segments" not in tree and tree["default_shape"] == "2x2x3+4"
    rows = trt_lowering.TREE_OPT_ROWS
    for graph, name in ((tree, "tree"), (tree["draft"], "draft_tree")):
        assert (graph["file"], graph["onnx"]) == (f"specee/{name}.plan", f"specee/{name}.onnx")
        assert (out / graph["file"]).read_bytes() == f"fake engine of {name}.onnx".encode()
        # rows and bias columns (past + rows) from 1 to the capacity, tuned for a tree of TREE_OPT_ROWS nodes
        assert graph["profile"]["input_ids"] == [[1, 1], [1, rows], [1, CAPACITY]]
        assert graph["profile"]["attention_bias"] == [[1, 1, 1, 1], [1, 1, rows, rows], [1, 1, CAPACITY, CAPACITY]]
    assert tree["draft"]["profile"]["features"][2] == [1, CAPACITY, 64]


def test_tree_runtime_on_emulated_engines_gives_the_dense_tokens(trt_tree_bundle, emulated_tensorrt):
    from specee_compile.runtimes.backends.tensorrt_tree import TrtTree
    from specee_compile.runtimes.tree import TreeDecoder
    from tests.test_tree import _oracle_draft

    out, _ = trt_tree_bundle
    engine, dense = load(out, tree=True), load(out, dense=True)
    assert (type(engine.decoder), type(engine.decoder.backend)) == (TreeDecoder, TrtTree)
    assert str(engine.shape) == "2x2x3+4"
    backend = engine.decoder.backend
    assert backend.segment_engines == []  # trees decode without the segments
    for shape in ("1", "2x2x3+4", "3x2x5", "1+8"):
        for prompt in PROMPTS:
            want = dense.generate(prompt, max_new_tokens=12).token_ids
            got = engine.generate(prompt, max_new_tokens=12, tree=shape)
            assert got.token_ids == want, shape
            assert len(got.step_seconds) == len(got.accepted_lengths)
    assert backend.tree_engine.runs > 0 and backend.draft_tree_engine.runs > 0
    # a draft that knows the next tokens, each after a wrong sibling: every step accepts a path whose K/V
    # rows are moved down on the device, and the output is still dense greedy decoding's
    oracle = load(out, tree="2x3x6")
    oracle.decoder._real_draft = oracle.decoder._draft_tree
    for prompt in PROMPTS:
        want = dense.generate(prompt, max_new_tokens=12).token_ids
        oracle.decoder._draft_tree = _oracle_draft(oracle, list(prompt) + want, 1)
        got = oracle.generate(prompt, max_new_tokens=12)
        assert got.token_ids == want and got.accepted_lengths[:2] == [4, 4]
    with pytest.raises(BundleError, match="holds the lossless tree engines only"):
        load(out, tree="1+4:exit")
    # the compile-time shape choice (run on the GPU for a real bundle) drives the same engines
    from specee_compile.runtimes.tree_choice import choose_tree

    choice = choose_tree(out, ["hello world, how are you", "tell me a story"], count=2, new_tokens=8,
                         candidates=("1x1x1", "2x2x3+4"))
    assert choice["shape"] in ("1x1x1", "2x2x3+4") and choice["prompts"] == 2
    assert all(r["tokens_per_forward"] >= 1.0 and r["verify_ms"] > 0 for r in choice["candidates"])


@without_hardware
def test_loading_a_tensorrt_tree_bundle_without_hardware_names_what_is_missing(trt_tree_bundle):
    with pytest.raises(BackendError, match="TensorRT bundle"):
        load(trt_tree_bundle[0], tree=True)


def test_an_int4_tensorrt_bundle_builds_its_engines_from_blocked_dequantization(tiny_dirs, tmp_path, monkeypatch,
                                                                                  emulated_tensorrt):
    built = []
    monkeypatch.setattr(trt_lowering, "unavailable_reason", lambda: None)
    monkeypatch.setattr(trt_lowering, "build_engine", lambda onnx_path, profile, precision: built.append(
        onnx_path.name) or b"fake engine")
    monkeypatch.setattr(trt_lowering, "engine_facts", lambda precision, profile: {"precision": precision,
                                                                                  "profile": profile})
    out = compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "q.plan", max_context=CAPACITY,
                                       quant="int4", precision="fp32"), progress=False)
    manifest = read_manifest(out)
    assert built == ["model.onnx"] and manifest["tensorrt_check"]["tensorrt"] == "10.15"
    assert {n.op_type for n in ir.load(out / "model.onnx").graph} >= {"DequantizeLinear", "MatMul"}
    onnx_bundle = compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "q.onnx",
                                               max_context=CAPACITY, quant="int4", check="trt"), progress=False)
    for prompt in PROMPTS:
        assert load(out).generate(prompt, max_new_tokens=12).token_ids == \
            load(onnx_bundle).generate(prompt, max_new_tokens=12).token_ids


# ---- with the hardware --------------------------------------------------------------------------
@needs_hardware
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_generates_the_onnx_runtime_bundles_tokens(tiny_dirs, tiny_bundle, tmp_path, precision):
    out = compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "tiny.plan", max_context=64,
                                       precision=precision), progress=False)
    manifest = read_manifest(out)
    assert manifest["backend"] == "tensorrt" and manifest["engine"]["precision"] == precision
    engine, reference = load(out), load(tiny_bundle)
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=16).token_ids
        if precision == "fp32":
            assert got == reference.generate(prompt, max_new_tokens=16).token_ids
        else:
            assert len(got) > 0


@needs_hardware
def test_an_int4_engine_generates_the_tokens_of_onnx_runtime_on_the_same_blocks(tiny_dirs, tmp_path):
    config = dict(model=str(tiny_dirs["llama"]), max_context=64, quant="int4", accuracy_level=0)  # fp32 activations
    engine = load(compile_bundle(CompileConfig(out=tmp_path / "q.plan", precision="fp32", **config), progress=False))
    reference = load(compile_bundle(CompileConfig(out=tmp_path / "q.onnx", check="trt", **config), progress=False))
    for prompt in PROMPTS:
        assert engine.generate(prompt, max_new_tokens=16).token_ids == \
            reference.generate(prompt, max_new_tokens=16).token_ids


@needs_hardware
def test_specee_engines_give_the_reference_decoders_tokens_and_exits(tiny_dirs, calibration, tmp_path):
    out = compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "spec.plan", max_context=64,
                                       specee=True, calibration=calibration, threshold=0.3, precision="fp32"),
                         progress=False)
    engine, ref = load(out), _reference(calibration)
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=12)
        want = ref.generate(prompt, 12, eos_ids=engine.eos_token_ids)
        assert (got.token_ids, got.exit_layers) == (want.tokens, want.exit_layers)


@needs_hardware
def test_parser_rejects_the_group_query_attention_graph_naming_the_node(tiny_bundle):
    with pytest.raises(BackendError, match="GroupQueryAttention"):
        trt_lowering.build_engine(tiny_bundle / "model.onnx", {"input_ids": [[1, 1], [1, 1], [1, 64]]}, "fp32")
