"""What one more row costs a 4-bit product: ONNX Runtime's MatMulNBits on M rows of activations.

Tree verification runs every weight product on one row per tree node. Each product here is 30
MatMulNBits of SmolLM2's shapes (random 4-bit blocks of 32, symmetric) in one session, timed as
the median of 30 runs after 10 warm-up runs, divided by 30.

    python rows.py
"""

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROWS = (1, 2, 3, 5, 8)
SHAPES = {"gate|up": (576, 3072), "down": (1536, 576), "q|k|v": (576, 960)}  # (K, N)
PRODUCTS = 30
BLOCK = 32


def products(k: int, n: int, level: int, rng) -> bytes:
    nodes, weights = [], []
    for i in range(PRODUCTS):
        weights += [numpy_helper.from_array(rng.integers(0, 256, (n, k // BLOCK, BLOCK // 2), dtype=np.uint8), f"q{i}"),
                    numpy_helper.from_array(rng.random((n, k // BLOCK), dtype=np.float32) * 0.01, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"q{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=level))
    graph = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", n])
                               for i in range(PRODUCTS)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def main() -> None:
    rng = np.random.default_rng(0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    print("| product (K x N) | accuracy level | " + " | ".join(f"{m} rows" for m in ROWS) + " |")
    print("|---|---|" + "---|" * len(ROWS))
    for name, (k, n) in SHAPES.items():
        for level in (4, 0):
            session = ort.InferenceSession(products(k, n, level, rng), options)
            cells = []
            for m in ROWS:
                x = rng.standard_normal((m, k), dtype=np.float32)
                for _ in range(10):
                    session.run(None, {"x": x})
                laps = []
                for _ in range(30):
                    start = time.perf_counter()
                    session.run(None, {"x": x})
                    laps.append(time.perf_counter() - start)
                cells.append(1e6 * float(np.median(laps)) / PRODUCTS)
            print(f"| {name} ({k} x {n}) | {level} | " + " | ".join(
                f"{c:.1f} us ({c / cells[0]:.2f}x)" for c in cells) + " |")


if __name__ == "__main__":
    main()
