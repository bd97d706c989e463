"""FuseOrtTransformersPass: ONNX Runtime's transformer fusions from onnxscript.

Rewrite cases (counted per kind in ``fired``), all from ``onnxscript.rewriter.ort_fusions``:

- RMSNorm chains (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) become
  ``SimplifiedLayerNormalization``;
- a residual Add followed by an RMSNorm becomes ``SkipSimplifiedLayerNormalization``;
- rotary, attention and GQA patterns where the exporter emitted them decomposed (our
  export already emits ``GroupQueryAttention`` for the cached attention).

The fused ops live in the ``com.microsoft`` domain: the result runs on ONNX Runtime only.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort


@dataclasses.dataclass
class FuseOrtTransformersPass(ir.passes.InPlacePass):
    """Apply onnxscript's ORT fusions in place; ``fired`` holds the count of each fusion."""

    name: str = "fuse_ort_transformers"
    fired: dict[str, int] = dataclasses.field(default_factory=dict)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _histogram(model)
        model, counts = optimize_for_ort(model)
        self.fired = {k: v for k, v in counts.items() if v}
        return ir.passes.PassResult(model, modified=_histogram(model) != before)


def _histogram(model: ir.Model) -> dict[str, int]:
    hist: dict[str, int] = {}
    for node in model.graph:
        hist[node.op_type] = hist.get(node.op_type, 0) + 1
    return hist
