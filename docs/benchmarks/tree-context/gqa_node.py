"""One ONNX Runtime GroupQueryAttention node with SmolLM2's shapes (9 query heads, 3 K/V heads,
head size 64, a 2048-row cache bound as the same buffer for past and present, in-kernel RoPE),
timed alone at a context of 1000 rows for S = 1..8 new rows, with and without an attention bias:
how the kernel's cost grows with the rows of a tree forward, without the rest of the model.

    python docs/benchmarks/tree-context/gqa_node.py [CONTEXT]
"""

import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

H, KV, D, CAP = 9, 3, 64, 2048
T = int(sys.argv[1]) if len(sys.argv) > 1 else 1000


def model(bias: bool) -> bytes:
    f, i32, i64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("qkv", f, [1, "S", (H + 2 * KV) * D]),
              helper.make_tensor_value_info("past_key", f, [1, KV, CAP, D]),
              helper.make_tensor_value_info("past_value", f, [1, KV, CAP, D]),
              helper.make_tensor_value_info("seqlens_k", i32, [1]), helper.make_tensor_value_info("total", i32, []),
              helper.make_tensor_value_info("cos", f, [CAP, D // 2]), helper.make_tensor_value_info("sin", f, [CAP, D // 2]),
              helper.make_tensor_value_info("position_ids", i64, [1, "S"])]
    names = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin", "position_ids"]
    if bias:
        inputs.append(helper.make_tensor_value_info("bias", f, [1, 1, "S", "T"]))
        names.append("bias")
    node = helper.make_node("GroupQueryAttention", names, ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=H, kv_num_heads=KV, do_rotary=1, scale=D ** -0.5)
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("out", "present_key", "present_value")]
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


options = ort.SessionOptions()
options.intra_op_num_threads = 2
sessions = {b: ort.InferenceSession(model(b), options, providers=["CPUExecutionProvider"]) for b in (False, True)}
rng = np.random.default_rng(0)
key = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, KV, CAP, D), dtype=np.float32))
value = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, KV, CAP, D), dtype=np.float32))
angles = np.arange(CAP)[:, None] * 10000.0 ** (-np.arange(D // 2) / (D // 2))


def ms(s: int, bias: bool, calls: int = 200) -> float:
    """Median of 5 rounds of ``calls`` runs, in ms per run (after 20 warm-up runs)."""
    feed = {"qkv": rng.standard_normal((1, s, (H + 2 * KV) * D), dtype=np.float32),
            "seqlens_k": np.array([T - 1], np.int32), "total": np.array(T, np.int32),
            "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
            "position_ids": np.arange(T - s, T)[None].astype(np.int64)}
    if bias:
        feed["bias"] = np.zeros((1, 1, s, T), np.float32)
    session = sessions[bias]
    binding = session.io_binding()
    for name, x in feed.items():
        binding.bind_cpu_input(name, x)
    binding.bind_ortvalue_input("past_key", key)
    binding.bind_ortvalue_input("past_value", value)
    binding.bind_ortvalue_output("present_key", key)  # the shared-buffer mode the bundles run in
    binding.bind_ortvalue_output("present_value", value)
    binding.bind_output("out")
    for _ in range(20):
        session.run_with_iobinding(binding)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            session.run_with_iobinding(binding)
        rounds.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(rounds)


print(f"context {T}: ms per GroupQueryAttention run")
for s in (1, 2, 3, 4, 6, 8):
    print(f"S={s}: no bias {ms(s, False):.3f}, bias {ms(s, True):.3f}", flush=True)
