"""Export semantics on tiny random models: ONNX Runtime step == eager PyTorch within 1e-4."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from specee_compile.export import DecoderStep, export_step, layer_output_name
from tests.conftest import FAMILIES, make_tiny_model

CAPACITY = 32


def _run_steps(session, shapes, prompt, continuation, capacity: int = CAPACITY):
    """Prefill with ``prompt`` then decode ``continuation`` token by token; return all logits."""
    cache = [np.zeros((1, shapes.num_kv_heads, capacity, shapes.head_dim), np.float32)
             for _ in range(2 * shapes.num_layers)]
    names = [f"past_key_values.{i}.{k}" for i in range(shapes.num_layers) for k in ("key", "value")]
    logits = []
    past = 0
    for chunk in [prompt] + [[t] for t in continuation]:
        feeds = {"input_ids": np.array([chunk], np.int64), "past_sequence_length": np.array([past], np.int64)}
        feeds.update(zip(names, cache))
        out = session.run(["logits", *(n.replace("past_key_values.", "present.") for n in names)], feeds)
        logits.append(out[0][0])
        cache = out[1:]
        past += len(chunk)
    return logits


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_match_eager(family, tmp_path):
    model = make_tiny_model(family)
    onnx_model, shapes = export_step(model, CAPACITY)
    path = tmp_path / "step.onnx"
    ir.save(onnx_model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    prompt, continuation = [1, 17, 42, 99, 5], [7, 250, 3, 64]
    got = _run_steps(session, shapes, prompt, continuation)
    ids = prompt + continuation
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    expected = [ref[len(prompt) - 1]] + [ref[len(prompt) + k] for k in range(len(continuation))]
    for step, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=0, err_msg=f"step {step}")


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_step_module_matches_hf(family):
    model = make_tiny_model(family, seed=1)
    step = DecoderStep(model, CAPACITY).eval()
    shapes_kv = (1, step.kv_heads, CAPACITY, step.head_dim)
    past = [torch.zeros(shapes_kv) for _ in range(2 * len(step.blocks))]
    ids = [1, 9, 33, 200]
    with torch.no_grad():
        out = step(torch.tensor([ids[:3]]), torch.tensor([0]), past)
        out2 = step(torch.tensor([ids[3:]]), torch.tensor([3]), list(out[2:]))
        ref = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(out[0][0], ref[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(out2[0][0], ref[3], atol=1e-5, rtol=0)


def test_exported_graph_names_every_layer_output():
    model = make_tiny_model("llama")
    onnx_model, shapes = export_step(model, CAPACITY)
    names = {v.name for node in onnx_model.graph for v in node.outputs}
    assert {layer_output_name(i) for i in range(shapes.num_layers)} <= names
    assert "features" in names
    inputs = [v.name for v in onnx_model.graph.inputs]
    assert inputs[:2] == ["input_ids", "past_sequence_length"]
    assert inputs[2:4] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [v.name for v in onnx_model.graph.outputs][:4] == ["logits", "features", "present.0.key", "present.0.value"]


def test_features_output_is_the_final_normed_hidden_state_of_every_position(tmp_path):
    model = make_tiny_model("llama")
    onnx_model, shapes = export_step(model, CAPACITY)
    ir.save(onnx_model, tmp_path / "step.onnx")
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    feeds = {f"past_key_values.{i}.{k}": np.zeros((1, shapes.num_kv_heads, CAPACITY, shapes.head_dim), np.float32)
             for i in range(shapes.num_layers) for k in ("key", "value")}
    ids = [1, 17, 42]
    out = session.run(["features"], {"input_ids": np.array([ids]), "past_sequence_length": np.array([0]), **feeds})
    with torch.no_grad():
        ref = model.model(torch.tensor([ids])).last_hidden_state.numpy()
    np.testing.assert_allclose(out[0], ref, atol=1e-5)


def test_gate_and_up_are_one_product_only_where_the_mlp_is_down_of_act_gate_times_up():
    """The export packs a gated MLP's gate and up linears into one product (one MatMul, then a
    Split); an MLP whose forward computes something else keeps its own forward."""
    import types

    from specee_compile.architecture import Architecture
    from specee_compile.export.step import packed_linear

    model = make_tiny_model("llama")
    spec = Architecture(model).spec(0, 32)
    mlp = spec.layer.mlp
    packed = spec.packed_gate_up(packed_linear)
    assert packed is not None and packed.out_features == 2 * mlp.gate_proj.out_features
    matmuls = [n for n in export_step(model, 32)[0].graph if n.op_type == "MatMul"]
    assert len(matmuls) == 4 * model.config.num_hidden_layers  # qkv, o, gate|up, down (the head is a Gemm)
    mlp.forward = types.MethodType(lambda self, x: self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x))),
                                   mlp)
    assert spec.packed_gate_up(packed_linear) is None
