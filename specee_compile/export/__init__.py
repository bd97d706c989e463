"""Export: the graph families of a Llama-layout model and its draft to the ONNX in-memory IR.

- :mod:`.step`: the target's decoder step (family ``step``, and ``decode``, a copy the
  SpecEE passes rewrite) and its tree verification step (``tree``, ``tree_decode``);
- :mod:`.draft`: the draft head's step (``draft``) and tree step (``draft_tree``);
- :mod:`.weights`: the tensors state propagation reads outside the graphs;
- :mod:`.onnx`: the one call into torch.onnx that every family goes through.

Every decoder layer's output is named ``contract.layer_output(i)`` in the graphs and the
final norm's output is the graph output ``features``: passes find the structure by these.
"""

from specee_compile.export.draft import export_draft
from specee_compile.export.onnx import OPSET
from specee_compile.export.step import (DecoderStep, StepShapes, TreeStep, export_step, export_tree,
                                        layer_output_name, step_shapes)
from specee_compile.export.weights import kv_fill, rms_eps

__all__ = ["OPSET", "DecoderStep", "StepShapes", "TreeStep", "export_draft", "export_step", "export_tree", "kv_fill",
           "layer_output_name", "rms_eps", "step_shapes"]
