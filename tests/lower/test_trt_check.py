"""The static TensorRT check on graphs built inline: each unsupported construct is named precisely."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from specee_compile.errors import PassError
from specee_compile.lower.trt_check import CheckTensorRTPass, TensorRTCompatibilityError, find_problems
from specee_compile.passes import Pipeline

F, D, I64, B = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()) -> ir.Model:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


def _check(model, target=(10, 0)) -> list[str]:
    ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
    return [str(p) for p in find_problems(model, target, "g")]


def _if(then_outs, else_outs, n_outputs=1):
    """An If whose branches return Identity copies of constants shaped as given."""
    def branch(name, shapes):
        nodes = [helper.make_node("Constant", [], [f"{name}_c{k}"], value=helper.make_tensor(
            f"{name}_t{k}", F, shape, [0.0] * max(1, int(__import__("math").prod(shape)))))
                 for k, shape in enumerate(shapes)]
        nodes += [helper.make_node("Identity", [f"{name}_c{k}"], [f"{name}_o{k}"]) for k in range(len(shapes))]
        outs = [helper.make_tensor_value_info(f"{name}_o{k}", F, None) for k in range(len(shapes))]
        return helper.make_graph(nodes, name, [], outs)
    node = helper.make_node("If", ["cond"], [f"y{k}" for k in range(n_outputs)], name="exit.3",
                            then_branch=branch("then", then_outs), else_branch=branch("else", else_outs))
    return _model([node], [("cond", B, [])], [(f"y{k}", F, None) for k in range(n_outputs)])


def test_standard_graph_passes_and_the_pass_reports_no_change():
    model = _model([helper.make_node("Add", ["x", "x"], ["y"], name="add")], [("x", F, [1, "s"])], [("y", F, [1, "s"])])
    assert _check(model) == []
    assert CheckTensorRTPass()(model).modified is False


def test_com_microsoft_op_is_reported_with_node_and_domain():
    node = helper.make_node("GroupQueryAttention", ["x"], ["y"], name="attn.0", domain="com.microsoft")
    model = _model([node], [("x", F, [1, 4])], [("y", F, [1, 4])], extra_opsets=[("com.microsoft", 1)])
    with pytest.raises(TensorRTCompatibilityError) as e:
        CheckTensorRTPass(graph_name="step")(model)
    assert len(e.value.problems) == 1
    assert "step: node 'attn.0' (com.microsoft::GroupQueryAttention): operator domain 'com.microsoft'" in str(e.value)
    assert "--out NAME.onnx" in str(e.value)


def test_float64_tensor_is_reported_at_the_op_and_the_network_input():
    model = _model([helper.make_node("Add", ["x", "x"], ["y"], name="add64")], [("x", D, [2])], [("y", D, [2])])
    problems = _check(model)
    assert "g: node 'add64' (ai.onnx::Add): input 0 'x' is DOUBLE (TensorRT's Add takes FP32, FP16, BF16, INT32, " \
           "INT64)" in problems
    assert any("'x': network input of type DOUBLE" in p for p in problems)


def test_cast_to_float64_is_reported():
    model = _model([helper.make_node("Cast", ["x"], ["y"], name="up", to=D)], [("x", F, [2])], [("y", D, [2])])
    assert any("node 'up' (ai.onnx::Cast): attribute 'to' is of type DOUBLE" in p for p in _check(model))


def test_if_with_branch_outputs_of_different_ranks_is_reported():
    problems = _check(_if([[1]], [[1, 1]]))
    assert len(problems) == 1
    assert "node 'exit.3' (ai.onnx::If): output 0: then_branch gives rank 1" in problems[0]
    assert "else_branch rank 2" in problems[0] and "same rank" in problems[0]


def test_if_with_different_output_counts_is_reported():
    problems = _check(_if([[1], [1]], [[1]], n_outputs=2))
    assert any("branches return 2 and 1 outputs for 2 node outputs" in p for p in problems)


def test_if_with_equal_branches_passes():
    assert _check(_if([[1], [1, 4]], [[1], [1, 4]], n_outputs=2)) == []


def test_problem_inside_an_if_branch_names_the_subgraph():
    bad = helper.make_graph([helper.make_node("Unique", ["x"], ["u"], name="uniq")], "then", [],
                            [helper.make_tensor_value_info("u", F, None)])
    ok = helper.make_graph([helper.make_node("Identity", ["x"], ["v"])], "else", [],
                           [helper.make_tensor_value_info("v", F, None)])
    node = helper.make_node("If", ["c"], ["y"], name="predictor.1", then_branch=bad, else_branch=ok)
    problems = _check(_model([node], [("c", B, []), ("x", F, [3])], [("y", F, None)]))
    assert any(p.startswith("g/predictor.1.then_branch: node 'uniq' (ai.onnx::Unique): unsupported operator")
               for p in problems)


def test_problem_inside_a_model_local_function_names_the_function():
    body = [helper.make_node("Unique", ["x"], ["y"], name="inner")]
    function = helper.make_function("local", "MyOp", ["x"], ["y"], body, [helper.make_opsetid("", 18)])
    graph = helper.make_graph([helper.make_node("MyOp", ["a"], ["b"], domain="local")], "g",
                              [helper.make_tensor_value_info("a", F, [3])], [helper.make_tensor_value_info("b", F, None)])
    model = ir.serde.deserialize_model(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)], functions=[function]))
    assert _check(model) == ["g/function MyOp: node 'inner' (ai.onnx::Unique): unsupported operator (TensorRT 10's "
                             "operator matrix marks it unsupported)"]


def test_unknown_ai_onnx_operator_is_reported():
    model = _model([helper.make_node("SimplifiedLayerNormalization", ["x"], ["y"], name="rms")],
                   [("x", F, [2])], [("y", F, [2])])
    assert any("node 'rms' (ai.onnx::SimplifiedLayerNormalization): unknown operator" in p for p in _check(model))


def test_documented_restrictions_are_enforced():
    nodes = [
        helper.make_node("ScatterND", ["x", "idx", "upd"], ["a"], name="scatter_add", reduction="add"),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["k"]),
        helper.make_node("TopK", ["x", "k"], ["vals", "ids"], name="topk_dynamic"),
    ]
    inits = [helper.make_tensor("idx", I64, [1, 1], [0]), helper.make_tensor("upd", F, [1], [1.0]),
             helper.make_tensor("zero", I64, [1], [0]), helper.make_tensor("one", I64, [1], [1])]
    problems = _check(_model(nodes, [("x", F, [8])], [("a", F, [8]), ("vals", F, None)], inits))
    assert any("node 'scatter_add' (ai.onnx::ScatterND): attribute reduction='add'" in p for p in problems)
    assert any("node 'topk_dynamic' (ai.onnx::TopK): input 1 'k' is computed at run time" in p for p in problems)


def test_restriction_lifted_in_a_later_release_depends_on_the_target():
    nodes = [helper.make_node("Shape", ["x"], ["axes"], start=0, end=1),
             helper.make_node("Slice", ["x", "zero", "one", "axes"], ["y"], name="slice_dyn_axes")]
    inits = [helper.make_tensor("zero", I64, [1], [0]), helper.make_tensor("one", I64, [1], [1])]
    model = _model(nodes, [("x", F, [4])], [("y", F, [1])], inits)
    assert any("node 'slice_dyn_axes' (ai.onnx::Slice): input 3 'axes' is computed at run time" in p
               for p in _check(model, (10, 0)))
    assert _check(model, (10, 3)) == []


def test_operator_newer_than_the_target_and_attention_cache_inputs_are_reported():
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["o", "pko", "pvo"], name="attn")
    q = [("q", F, [1, 2, 3, 4]), ("k", F, [1, 2, 3, 4]), ("v", F, [1, 2, 3, 4]), ("pk", F, [1, 2, 5, 4]),
         ("pv", F, [1, 2, 5, 4])]
    model = _model([node], q, [("o", F, None), ("pko", F, None), ("pvo", F, None)], opset=23)
    old = _check(model, (10, 0))
    assert any("opset_import" in p and "ai.onnx opset 23" in p for p in old)
    assert any("node 'attn' (ai.onnx::Attention): operator too new for the target" in p for p in old)
    new = _check(model, (10, 15))
    assert any("input 4 'pk' is given (`past_key` is unsupported" in p for p in new)
    assert any("output 1 'pko' is used" in p for p in new)


def test_cache_output_written_by_another_op_is_reported():
    past = [("past_key_values.0.key", F, [1, 2, 8, 4])]
    nodes = [helper.make_node("Add", ["past_key_values.0.key", "past_key_values.0.key"], ["present.0.key"],
                              name="double_cache")]
    problems = _check(_model(nodes, past, [("present.0.key", F, [1, 2, 8, 4])]))
    assert any("node 'double_cache' (ai.onnx::Add): writes the cache output 'present.0.key'" in p for p in problems)


def test_cache_scatter_into_the_past_buffer_passes():
    nodes = [helper.make_node("ScatterElements", ["past_key_values.0.key", "idx", "k"], ["present.0.key"], axis=2)]
    inputs = [("past_key_values.0.key", F, [1, 2, 8, 4]), ("idx", I64, [1, 2, "s", 4]), ("k", F, [1, 2, "s", 4])]
    assert _check(_model(nodes, inputs, [("present.0.key", F, [1, 2, 8, 4])])) == []


def test_check_as_a_pipeline_pass_names_the_passes_before_it():
    node = helper.make_node("Unique", ["x"], ["y"], name="u")
    model = _model([node], [("x", F, [3])], [("y", F, None)])
    pipeline = Pipeline({"finalize": [CheckTensorRTPass(graph_name="step")]})
    with pytest.raises(PassError, match=r"(?s)node .u. \(ai.onnx::Unique\): unsupported operator.*passes that ran before"):
        pipeline(model)


def _dequantize(dtype=TensorProto.INT4, k=128, block=128, zero=None, axis=0):
    """y = x @ DequantizeLinear(W [k, 8], scales [k / block, 8]): a blocked weight product, opset 21."""
    inits = [helper.make_tensor("w", dtype, [k, 8], [1] * (k * 8)),
             helper.make_tensor("s", F, [max(1, k // block), 8], [0.5] * (max(1, k // block) * 8))]
    if zero is not None:
        inits.append(helper.make_tensor("z", dtype, [max(1, k // block), 8], [zero] * (max(1, k // block) * 8)))
    dq = helper.make_node("DequantizeLinear", ["w", "s"] + (["z"] if zero is not None else []), ["wf"],
                          name="dq", axis=axis, block_size=block)
    mm = helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm")
    return _model([dq, mm], [("x", F, [1, k])], [("y", F, [1, 8])], inits, opset=21)


def test_blocked_int4_weights_pass_from_the_release_whose_opsets_hold_them():
    from specee_compile.lower.trt_check import oldest_target

    model = _dequantize()
    assert oldest_target([model]) == (10, 15)
    assert _check(model, (10, 15)) == []
    assert _check(_dequantize(block=64), (10, 15)) == []
    assert _check(model, (10, 0)) == ["g: 'opset_import': ai.onnx opset 21 (TensorRT 10.0 parses opsets 9 to 20)"]


@pytest.mark.parametrize("kwargs, what", [
    ({"block": 32}, "block_size 32 over 128 values"),
    ({"k": 192, "block": 128}, "block_size 128 over 192 values"),
    ({"zero": 1}, "zero point 'z' is not all 0"),
    ({"dtype": TensorProto.INT8}, "blocked scales over INT8 weights"),
])
def test_blocked_dequantization_outside_tensorrts_schemes_is_reported(kwargs, what):
    problems = _check(_dequantize(**kwargs), (10, 15))
    assert len(problems) == 1 and f"g: node 'dq' (ai.onnx::DequantizeLinear): {what}" in problems[0]


def test_a_zero_point_of_zeros_passes():
    assert _check(_dequantize(zero=0), (10, 15)) == []
