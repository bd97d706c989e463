"""FuseOrtTransformersPass on graphs built inline, checked structurally and numerically."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from specee_compile.passes import FuseOrtTransformersPass


def _rmsnorm_model() -> ir.Model:
    """y = w * x / sqrt(mean(x^2) + eps), the decomposed form torch.export emits."""
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1, noop_with_empty_axes=0),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["xn"]),
        helper.make_node("Mul", ["w", "xn"], ["y"]),
    ]
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6]),
        helper.make_tensor("w", TensorProto.FLOAT, [8], np.linspace(0.5, 1.5, 8).tolist()),
    ]
    graph = helper.make_graph(
        nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8])], inits,
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_rmsnorm_chain_fuses_and_keeps_numbers():
    x = np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32)
    before = _run(_rmsnorm_model(), x)
    model = _rmsnorm_model()
    p = FuseOrtTransformersPass()
    result = p(model)
    assert result.modified
    assert p.fired == {"rms_normalization": 1}
    assert [n.op_type for n in result.model.graph] == ["SimplifiedLayerNormalization"]
    np.testing.assert_allclose(_run(result.model, x), before, atol=1e-6)


def test_graph_without_patterns_is_not_modified():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    p = FuseOrtTransformersPass()
    assert not p(model).modified
    assert p.fired == {}


