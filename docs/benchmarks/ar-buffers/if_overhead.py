"""What ONNX Runtime's If node costs on this CPU: 11 [1, 576] x [576, 576] products, each
followed (or not) by an If whose branches are one small op, as many as a SmolLM2 SpecEE step
has predictor layers.

    python if_overhead.py

One shared thread pool of 2 threads, medians of 5 rounds of 500 runs, ms per run.
"""

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

F, LAYERS, D = TensorProto.FLOAT, 11, 576


def model(with_if: bool) -> bytes:
    rng = np.random.default_rng(0)
    nodes, weights, outputs, x = [], [numpy_helper.from_array(np.zeros((), np.float32), "zero")], [], "x"
    for i in range(LAYERS):
        weights.append(numpy_helper.from_array(rng.standard_normal((D, D), dtype=np.float32) * 0.01, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        x = f"h{i}"
        if with_if:
            then = helper.make_graph([helper.make_node("ReduceSum", [x], [f"t{i}"], keepdims=0)], f"then{i}", [],
                                     [helper.make_tensor_value_info(f"t{i}", F, None)])
            other = helper.make_graph([helper.make_node("Identity", ["zero"], [f"e{i}"])], f"else{i}", [],
                                      [helper.make_tensor_value_info(f"e{i}", F, None)])
            nodes.append(helper.make_node("If", ["cond"], [f"o{i}"], then_branch=then, else_branch=other))
            outputs.append(helper.make_tensor_value_info(f"o{i}", F, None))
    inputs = [helper.make_tensor_value_info("x", F, [1, D])]
    if with_if:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(x, F, None), *outputs], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def ms(session, feed) -> float:
    for _ in range(200):
        session.run(None, feed)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(500):
            session.run(None, feed)
        rounds.append((time.perf_counter() - start) / 500 * 1e3)
    return statistics.median(rounds)


ort.set_global_thread_pool_sizes(2, 1)
options = ort.SessionOptions()
options.use_per_session_threads = False
options.log_severity_level = 3
x = np.random.default_rng(1).standard_normal((1, D), dtype=np.float32)
plain = ort.InferenceSession(model(False), options, providers=["CPUExecutionProvider"])
print(f"{LAYERS} products, no If: {ms(plain, {'x': x}):.3f} ms")
with_if = ort.InferenceSession(model(True), options, providers=["CPUExecutionProvider"])
for cond in (False, True):
    print(f"{LAYERS} products, each with an If ({'then' if cond else 'else'}): "
          f"{ms(with_if, {'x': x, 'cond': np.array(cond)}):.3f} ms")
