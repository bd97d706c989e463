"""Time one call of a bundle's tree draft graph at fp32, int8 and int4 weights.

    python draft_call.py BUNDLE [PAST]

The int8/int4 graphs are made from the bundle's fp32 ``specee/draft_tree.onnx`` by the
compiler's own QuantizeWeightsPass (blocks of 32, int8 activations), written to a temporary
folder. Each graph runs S = 1, 2, 3 rows after PAST rows of cache (default 500), 20 warm-up
calls then 200 timed; medians, ms. The cache buffers are fed as numpy arrays, so every call
also copies them (the runtime binds them in place): the differences are what counts.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from specee_compile.passes.quantize_weights import QuantizeWeightsPass
from specee_compile.quant import QuantSpec


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(s: ort.InferenceSession, rows: int, past: int) -> dict:
    shapes = {i.name: i.shape for i in s.get_inputs()}
    key = [n for n in shapes if n.endswith(".key")][0]
    cache = np.zeros([d if isinstance(d, int) else 1 for d in shapes[key]], np.float32)
    hidden = shapes["features"][-1]
    return {"input_ids": np.full((1, rows), 100, np.int64),
            "features": np.random.default_rng(0).standard_normal((1, rows, hidden)).astype(np.float32),
            "past_sequence_length": np.array([past], np.int64),
            "position_ids": np.arange(past, past + rows)[None].astype(np.int64),
            "attention_bias": np.zeros((1, 1, rows, past + rows), np.float32),
            key: cache, key.replace(".key", ".value"): cache}


def main(bundle: str, past: int = 500) -> None:
    source = Path(bundle) / "specee" / "draft_tree.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"fp32": source}
        for precision in ("int8", "int4"):
            model = ir.load(source)
            QuantizeWeightsPass(QuantSpec(precision, precision, precision))(model)
            graphs[precision] = Path(tmp) / f"draft_tree_{precision}.onnx"
            ir.save(model, graphs[precision], external_data=graphs[precision].name + ".data")
        print(f"| weights | {' | '.join(f'{r} rows' for r in (1, 2, 3))} |")
        print("|---|---|---|---|")
        for precision, path in graphs.items():
            s = session(path)
            cells = []
            for rows in (1, 2, 3):
                f = feeds(s, rows, past)
                for _ in range(20):
                    s.run(None, f)
                laps = []
                for _ in range(200):
                    start = time.perf_counter()
                    s.run(None, f)
                    laps.append(time.perf_counter() - start)
                cells.append(f"{1000 * float(np.median(laps)):.3f}")
            print(f"| {precision} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
