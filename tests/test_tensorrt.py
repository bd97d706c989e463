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
from specee_compile.errors import BackendError, ConfigError
from specee_compile.export import export_step
from specee_compile.lower import tensorrt as trt_lowering
from specee_compile.lower.trt_check import TensorRTCompatibilityError
from specee_compile.passes import FuseOrtTransformersPass, Pipeline
from specee_compile.reference import DecodeSettings, ReferenceDecoder
from specee_compile.runtimes import load
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


def test_specee_trt_ready_bundle_checks_every_graph_and_equals_the_reference_decoder(tiny_dirs, tmp_path):
    calib = tmp_path / "c.jsonl"
    calib.write_text("\n".join(json.dumps({"prompt": f"hello world {i}",
                                           "response": "the quick brown fox jumps over the lazy dog " * 3})
                               for i in range(12)))
    settings = CalibrationSettings(calib_file=str(calib), draft_sequences=8, predictor_sequences=4, draft_vocab=64,
                                   predictor_hidden=16, predictor_epochs=3, positions_per_sequence=16, draft_epochs=1)
    cal_dir = calibrate(tiny_dirs["llama"], settings, progress=False)
    out = compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "spec.onnx", max_context=64,
                                       specee=True, calibration=cal_dir, threshold=0.3, check="trt"), progress=False)
    manifest = read_manifest(out)
    graphs = manifest["tensorrt_check"]["graphs"]
    assert graphs[0] == "step" and graphs[-1] == "draft" and "segment_0" in graphs
    engine = load(out)
    target = make_tiny_model("llama")
    cal = load_calibration(cal_dir, target)
    ref = ReferenceDecoder(target, cal.draft, cal.bank, cal.schedule,
                           DecodeSettings(rule="full", kv_policy="propagate", threshold=0.3), capacity=64)
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
@pytest.mark.parametrize("args", [["--out", "x.plan"], ["--out", "x.engine"], ["--out", "x", "--backend", "trt"]])
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
    (dict(out="x.plan", specee=True), "SpecEE TensorRT engines are not built yet"),
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
def test_parser_rejects_the_group_query_attention_graph_naming_the_node(tiny_bundle):
    with pytest.raises(BackendError, match="GroupQueryAttention"):
        trt_lowering.build_engine(tiny_bundle / "model.onnx", {"input_ids": [[1, 1], [1, 1], [1, 64]]}, "fp32")
