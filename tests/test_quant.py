"""Weight quantization: GGUF blocks kept exactly, ONNX Runtime's int4/int8 within a stated
tolerance of fp32, and quantized bundles of every kind (dense, SpecEE, tree) decoding."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.errors import ConfigError
from specee_compile.passes.quantize_weights import QuantizeWeightsPass
from specee_compile.lower.trt_check import find_problems
from specee_compile.quant import KEPT, KeptBlocks, QuantSpec, from_gguf
from specee_compile.quant.blocks import quantize as quantize_blocks
from specee_compile.runtimes import load
from specee_compile.testing import FAMILIES, save_gguf_model, tiny_tokenizer

# Logits of a quantized bundle against its fp32 bundle over a prefill, as ||difference|| / ||logits||:
# the tolerance each precision is held to on the tiny random models (measured 0.011-0.014 for int8 and
# 0.18-0.19 for int4 at either accuracy level: 4-bit blocks of Gaussian weights lose about a tenth per
# product, and three layers compound it).
TOLERANCE = {"int8": 0.03, "int4": 0.25}
PROMPT = "the quick brown fox"


def _gguf_rows(rows: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.quantize(rows, gguf.GGMLQuantizationType[fmt])


@pytest.mark.parametrize("fmt", KEPT)
def test_kept_gguf_blocks_dequantize_to_the_ggufs_own_values_bit_for_bit(fmt):
    rows = np.random.default_rng(0).standard_normal((24, 128)).astype(np.float32)
    raw = _gguf_rows(rows, fmt)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt])
    got = from_gguf(raw, fmt).dequantize()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_q4_1_runs_at_the_default_zero_point_only_where_that_is_exact():
    half = lambda x: np.array([x], np.float16).view(np.uint8)  # noqa: E731
    d, exact, inexact = half(1.0), half(-4.0), half(2.0 ** -22)
    qs = np.arange(16, dtype=np.uint8)
    for m, zero in ((exact, False), (inexact, True)):
        blocks = from_gguf(np.concatenate([d, m, qs])[None, :], "Q4_1")
        zp, mins = blocks.kernel_form()
        assert (zp is not None) == zero
        assert mins[0, 0] == (np.float32(2.0 ** -22) if zero else np.float32(4.0))


def _matmul_model(weight: np.ndarray) -> ir.Model:
    """y = A @ W, W [K, N] an initializer: the tiny inline graph the pass rewrites."""
    k, n = weight.shape
    a = ir.Value(name="A", shape=ir.Shape([2, k]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="W", const_value=ir.tensor(weight, name="W"), shape=ir.Shape([k, n]),
                 type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("MatMul", [a, w])
    node.outputs[0].name = "Y"
    graph = ir.Graph([a], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feeds: dict, level: int | None = None) -> np.ndarray:
    """``level``: the accuracy level ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits at."""
    options = ort.SessionOptions()
    if level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("fmt", KEPT)
def test_a_product_with_kept_gguf_blocks_equals_the_product_with_the_ggufs_weights(fmt, tmp_path):
    rng = np.random.default_rng(1)
    raw = _gguf_rows(rng.standard_normal((48, 96)).astype(np.float32), fmt)  # N = 48 rows of K = 96
    weight = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt])
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("w", raw, raw_dtype=gguf.GGMLQuantizationType[fmt])
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()

    model = _matmul_model(np.ascontiguousarray(weight.T))
    p = QuantizeWeightsPass(QuantSpec("gguf", accuracy_level=0), KeptBlocks(path))
    p(model)
    # at accuracy level 0 (fp32 activations) 8-bit blocks are multiplied dequantized, in fp32
    assert p.fired == {f"{fmt} kept" + (", products in fp32 (dequantized)" if fmt == "Q8_0" else ""): 1}
    assert ("MatMulNBits" in [n.op_type for n in model.graph]) == (fmt != "Q8_0")
    a = rng.standard_normal((2, 96)).astype(np.float32)
    want = a.astype(np.float64) @ weight.T.astype(np.float64)
    np.testing.assert_allclose(_run(model, {"A": a}), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_rows_that_do_not_fill_whole_blocks_are_padded(precision):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((48, 16)).astype(np.float32)  # K = 48: one and a half blocks of 32
    model = _matmul_model(weight)
    QuantizeWeightsPass(QuantSpec(precision))(model)
    node = next(n for n in model.graph if n.op_type == "MatMulNBits")
    assert node.attributes["K"].value == 48
    a = rng.standard_normal((2, 48)).astype(np.float32)
    want = a @ weight
    assert np.linalg.norm(_run(model, {"A": a}) - want) / np.linalg.norm(want) < TOLERANCE[precision]


def test_a_weight_the_gguf_does_not_hold_is_requantized_and_reported(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("w", _gguf_rows(rng.standard_normal((8, 64)).astype(np.float32), "Q8_0"),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    model = _matmul_model(rng.standard_normal((64, 16)).astype(np.float32))
    p = QuantizeWeightsPass(QuantSpec("gguf"), KeptBlocks(path))
    p(model)
    assert p.fired == {"int4 (not in the GGUF)": 1}
    assert p.report == [{"role": "layers", "shape": [16, 64], "stored": "int4 (not in the GGUF)"}]
    assert p.kept.kept == {} and p.kept.not_kept() == {"w": "Q8_0"}  # the compile names it in the manifest


@pytest.mark.parametrize("k, block", [(256, 128), (192, 64), (48, None)])
def test_the_tensorrt_form_reads_int4_blocks_of_128_or_64_through_dequantize_linear(k, block):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((k, 40)).astype(np.float32)
    model = _matmul_model(weight)
    quantize = QuantizeWeightsPass(QuantSpec("int4", block_size=128), qdq=True)
    quantize(model)
    ops = [n.op_type for n in model.graph]
    if block is None:  # TensorRT's blocks are 64 or 128 values: this weight stays as it is
        assert ops == ["MatMul"] and quantize.fired == {f"fp32 (K={k} takes no TensorRT block)": 1}
        return
    assert ops == ["DequantizeLinear", "MatMul"] and model.opset_imports[""] == 21
    assert quantize.fired == {f"int4 DequantizeLinear/{block}": 1}
    ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
    assert find_problems(model, (10, 15)) == []
    a = rng.standard_normal((2, k)).astype(np.float32)
    want = a @ quantize_blocks(weight.T, 4, block, True).dequantize().T  # ONNX Runtime's blocks, dequantized
    got = _run(model, {"A": a}, level=0)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.fixture(scope="module")
def fp32_bundles(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant-fp32")
    return {f: compile_bundle(CompileConfig(model=str(tiny_dirs[f]), out=out / f"{f}.onnx", max_context=64),
                              progress=False) for f in FAMILIES}


def _step_logits(bundle, ids: np.ndarray) -> np.ndarray:
    """The step graph's logits for a prefill of ``ids`` on an empty cache, run by ONNX Runtime directly."""
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "past_sequence_length": np.zeros(1, np.int64)}
    for i in session.get_inputs():
        if i.name not in feeds:
            feeds[i.name] = np.zeros(i.shape, np.float32)
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_logits_stay_within_the_stated_tolerance_of_fp32(family, precision, tiny_dirs, fp32_bundles,
                                                                    tmp_path):
    out = compile_bundle(CompileConfig(model=str(tiny_dirs[family]), out=tmp_path / "q.onnx", max_context=64,
                                       quant=precision), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quant"]["weights"] == precision
    assert manifest["quant"]["weights_stored"] == {"step": {precision: 3 * 4 + 2}}  # qkv, o, gate|up, down; head; embedding
    ops = {n.op_type for n in ir.load(out / "model.onnx").graph}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "Gemm" not in ops
    ids = np.array([[5, 9, 33, 2, 100, 7, 41]], np.int64)
    want, got = _step_logits(fp32_bundles[family], ids), _step_logits(out, ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < TOLERANCE[precision]


def test_the_head_and_embedding_take_their_own_precision_and_asymmetric_blocks_stay_within_tolerance(
        tiny_dirs, fp32_bundles, tmp_path):
    out = compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "q.onnx", max_context=64,
                                       quant="int4", quant_head="int8", quant_embedding="int8", quant_symmetric=False),
                         progress=False)
    quant = json.loads((out / "manifest.json").read_text())["quant"]
    assert (quant["weights"], quant["head"], quant["embedding"], quant["symmetric"]) == ("int4", "int8", "int8", False)
    assert quant["weights_stored"] == {"step": {"int4": 3 * 4, "int8": 2}}
    zero_points = [n for n in ir.load(out / "model.onnx").graph if n.op_type == "MatMulNBits"
                   and len(n.inputs) > 3 and n.inputs[3] is not None]
    assert zero_points  # asymmetric blocks carry their zero points
    ids = np.array([[5, 9, 33, 2, 100, 7, 41]], np.int64)
    want, got = _step_logits(fp32_bundles["llama"], ids), _step_logits(out, ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < TOLERANCE["int4"]


def test_a_tied_embeddings_own_precision_is_refused_before_anything_is_written(tmp_path):
    from specee_compile.testing import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    tiny_tokenizer().save_pretrained(tmp_path / "tied")
    with pytest.raises(ConfigError, match="ties its embedding to its LM head .*--quant-head"):
        compile_bundle(CompileConfig(model=str(tmp_path / "tied"), out=tmp_path / "b.onnx", max_context=64,
                                     quant="int4", quant_embedding="int8"), progress=False)
    assert not (tmp_path / "b.onnx").exists()


def test_a_gguf_bundle_keeps_every_block_and_computes_the_ggufs_model(tmp_path):
    formats = {"q_proj": "Q4_1", "k_proj": "Q4_1", "v_proj": "Q4_1", "o_proj": "Q4_0", "gate_proj": "Q4_1",
               "up_proj": "Q4_1", "down_proj": "Q8_0"}
    model_dir, path = save_gguf_model(tmp_path, "llama", formats)
    fp32 = compile_bundle(CompileConfig(model=str(model_dir), out=tmp_path / "fp32.onnx", max_context=64),
                          progress=False)
    kept = compile_bundle(CompileConfig(model=str(model_dir), out=tmp_path / "gguf.onnx", max_context=64, quant="gguf",
                                        gguf=path, accuracy_level=0), progress=False)
    quant = json.loads((kept / "manifest.json").read_text())["quant"]
    # per layer: qkv and gate|up (Q4_1), o (Q4_0), down (Q8_0); the head and embedding Q8_0. At
    # accuracy level 0 the Q8_0 products (down and the head) multiply the dequantized blocks in fp32
    assert quant["weights_stored"] == {"step": {"Q4_1 kept": 6, "Q4_0 kept": 3, "Q8_0 kept": 1,
                                                "Q8_0 kept, products in fp32 (dequantized)": 4}}
    assert quant["gguf"]["tensors_kept"] == 3 * 7 + 2 and quant["gguf"]["formats"] == {"Q4_1": 15, "Q4_0": 3, "Q8_0": 5}
    assert len(quant["gguf"]["kept"]) == 3 * 7 + 2 and quant["gguf"]["not_kept"] == {}
    assert quant["gguf"]["kept"]["model.layers.0.self_attn.o_proj"] == "Q4_0"
    ids = np.array([[5, 9, 33, 2, 100, 7, 41]], np.int64)
    want, got = _step_logits(fp32, ids), _step_logits(kept, ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert load(kept).generate(PROMPT, max_new_tokens=12).token_ids == \
        load(fp32).generate(PROMPT, max_new_tokens=12).token_ids


def test_a_tied_head_is_quantized_in_the_step_and_the_tree_graph():
    """A tied embedding and head (SmolLM2's) is one weight read by a gather and the head product
    in both graphs; the tree graph's head over every node must not hide it behind a transpose."""
    from specee_compile.export import export_step, export_tree
    from specee_compile.testing import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    hf = AutoModelForCausalLM.from_config(config).eval()
    fired = {}
    for name, model in (("step", export_step(hf, 32)[0]), ("tree", export_tree(hf, 32))):
        quantize = QuantizeWeightsPass(QuantSpec("int4"))
        quantize(model)
        fired[name] = [r["role"] for r in quantize.report]
    assert fired["tree"] == fired["step"] and "head" in fired["tree"]


def test_quantized_specee_and_tree_bundles_decode_their_own_dense_tokens(tiny_dirs, tiny_llama_calibration, tmp_path):
    """Trees are exact on fp32 activations; on int8 ones (the default) the compile says they are not."""
    from specee_compile.bundle.assemble import inexact_tree

    config = CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "q.onnx", max_context=64, specee=True,
                           calibration=tiny_llama_calibration, tree=True, quant="int4", accuracy_level=0)
    assert inexact_tree(config) is None and inexact_tree(dataclasses.replace(config, quant="fp32")) is None
    assert "--accuracy-level 0" in inexact_tree(dataclasses.replace(config, accuracy_level=4))
    out = compile_bundle(config, progress=False)
    stored = json.loads((out / "manifest.json").read_text())["quant"]["weights_stored"]
    assert {"step", "draft", "tree", "draft_tree", "segments[0]", "tree_segments[0]"} <= set(stored)
    for stem in ("segment", "tree_segment"):  # the segments share one copy of each quantized weight
        where: dict[str, set] = {}
        for f in (out / "specee").glob(f"{stem}_*.onnx"):
            for t in onnx.load(f, load_external_data=False).graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL and t.name.endswith("_q4"):
                    where.setdefault(t.name, set()).add(next(e.value for e in t.external_data if e.key == "offset"))
        assert where and all(len(offsets) == 1 for offsets in where.values()), where
    dense = load(out, dense=True)
    want = dense.generate(PROMPT, max_new_tokens=16).token_ids
    assert load(out, tree="2x2x3+4").generate(PROMPT, max_new_tokens=16).token_ids == want  # lossless
    assert load(out, threshold=0.999999).generate(PROMPT, max_new_tokens=16).token_ids == want  # no exit fires
    assert "inexact" not in json.loads((out / "manifest.json").read_text())["specee"]["tree"]


def test_a_tree_bundle_on_int8_activations_says_in_its_manifest_and_on_load_that_trees_are_not_exact(
        tiny_dirs, tiny_llama_calibration, tmp_path, caplog):
    out = compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "q.onnx", max_context=64,
                                       specee=True, calibration=tiny_llama_calibration, tree=True, tree_shape="1",
                                       quant="int4", accuracy_level=4), progress=False)
    reason = json.loads((out / "manifest.json").read_text())["specee"]["tree"]["inexact"]
    assert "--accuracy-level 0" in reason
    caplog.clear()
    with caplog.at_level("WARNING", logger="specee_compile.runtimes"):
        load(out, dense=True)
        assert not caplog.records  # the dense graph is what trees are compared with
        load(out, tree=True)
    assert [r.getMessage() for r in caplog.records] == [f"{out}: {reason}"]
    assert len(load(out).generate(PROMPT, max_new_tokens=16).token_ids) == 16


def test_a_quantized_graph_mode_bundle_decodes_its_dense_tokens(tiny_dirs, tiny_llama_calibration, tmp_path):
    out = compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "g.onnx", max_context=64,
                                       specee=True, calibration=tiny_llama_calibration, exit_mode="graph",
                                       quant="int8"), progress=False)
    ops = {n.op_type for n in ir.load(out / "specee" / "decode.onnx").graph}
    assert "MatMulNBits" in ops and "If" in ops
    want = load(out, dense=True).generate(PROMPT, max_new_tokens=16).token_ids
    assert load(out, threshold=0.999999).generate(PROMPT, max_new_tokens=16).token_ids == want


def test_a_tensorrt_ready_int4_bundle_passes_the_check_and_its_tree_decodes_its_dense_tokens(
        tiny_dirs, tiny_llama_calibration, fp32_bundles, tmp_path):
    out = compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "t.onnx", max_context=64,
                                       specee=True, calibration=tiny_llama_calibration, tree=True, quant="int4",
                                       check="trt"), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt_check"]["tensorrt"] == "10.15"  # the first 10.x whose opsets hold opset 21
    assert manifest["quant"]["block_size"] == 128
    # hidden 64, intermediate 128: down takes blocks of 128, the rest (qkv, o, gate|up, head) 64; the
    # embedding's gather stays fp32
    assert manifest["quant"]["weights_stored"]["step"] == {"int4 DequantizeLinear/64": 10,
                                                           "int4 DequantizeLinear/128": 3, "fp32 (gather)": 1}
    step = ir.load(out / "model.onnx")
    ops = {n.op_type for n in step.graph}
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops and step.opset_imports[""] == 21
    ids = np.array([[5, 9, 33, 2, 100, 7, 41]], np.int64)
    want, got = _step_logits(fp32_bundles["llama"], ids), _step_logits(out, ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < TOLERANCE["int4"]
    dense = load(out, dense=True).generate(PROMPT, max_new_tokens=16).token_ids
    assert load(out, tree="2x1x2+4").generate(PROMPT, max_new_tokens=16).token_ids == dense  # lossless
    assert load(out, threshold=0.999999).generate(PROMPT, max_new_tokens=16).token_ids == dense  # no exit fires


def test_quantization_refuses_what_it_cannot_build(tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match="--gguf FILE"):
        compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "b.onnx", quant="gguf"),
                       progress=False)
    assert not (tmp_path / "b.onnx").exists()
    for kwargs, message in (({"quant": "int8"}, "per tensor or per channel"), ({"quant": "gguf"}, "64 or 128"),
                            ({"quant": "int4", "quant_block": 32}, "64 or 128"),
                            ({"quant": "int4", "quant_embedding": "int4"}, "embedding in fp32"),
                            ({"quant": "int4", "quant_symmetric": False}, "symmetric"),
                            ({"quant": "int4", "specee": True, "exit_mode": "graph"}, "--exit-mode segments")):
        with pytest.raises(ConfigError, match=message):
            CompileConfig(model="m", out=tmp_path / "b.onnx", check="trt", **kwargs)
    with pytest.raises(ConfigError, match="--quant-block"):
        CompileConfig(model="m", out=tmp_path / "b.onnx", quant="int4", quant_block=24)
