"""A user-defined graph pass in the compile pipeline.

The pass below records an op histogram of the final graph in the model's metadata; it is an
ordinary ``onnx_ir`` pass object with a snake_case ``name``. It is appended to the default
pipeline's ``finalize`` phase and the model (a tiny random Llama, or the directory given as
the first argument) is compiled with it, then loaded and run.

    python examples/custom_pass.py [MODEL] [OUT_DIR]
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import onnx_ir as ir

from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.passes import default_pipeline
from specee_compile.runtimes import load
from specee_compile.testing import save_tiny_model


@dataclasses.dataclass
class RecordOpHistogramPass(ir.passes.InPlacePass):
    """Store the graph's op histogram as JSON in the model metadata."""

    name: str = "record_op_histogram"
    key: str = "example.op_histogram"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        hist = collections.Counter(node.op_type for node in model.graph)
        model.metadata_props[self.key] = json.dumps(dict(sorted(hist.items())))
        return ir.passes.PassResult(model, modified=True)


def main(argv: list[str]) -> int:
    work = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp())
    model = argv[0] if argv and argv[0] else str(save_tiny_model(work / "tiny-llama"))
    pipeline = default_pipeline("O1")
    pipeline.append("finalize", RecordOpHistogramPass())
    print(pipeline.describe())
    out = compile_bundle(CompileConfig(model=model, out=work / "custom.onnx", max_context=64, force=True,
                                       pipeline=pipeline), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    print("passes:", [entry["pass"] for entry in manifest["passes"]])
    graph = ir.load(out / "model.onnx")
    print("op histogram:", graph.metadata_props["example.op_histogram"])
    print("generated:", load(out).generate([1, 40, 41], max_new_tokens=5).token_ids)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
