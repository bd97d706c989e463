"""Find the decoder's structure in an exported graph from names and metadata, not model classes.

The export names every decoder layer's output ``layers.{i}.output`` and the final norm's
output is the graph output ``features``; the final norm's weight and epsilon and the LM head's weight
are read from the nodes in the exporter's ``norm`` and ``lm_head`` name scopes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from specee_compile.contract import LAYER_OUTPUT_PATTERN
from specee_compile.errors import PassError

LAYER_OUTPUT = re.compile(LAYER_OUTPUT_PATTERN)


@dataclass
class DecoderGraph:
    layer_outputs: list[ir.Value]  # index i: hidden state after layer i, [1, S, d]
    norm_weight: ir.Value  # initializer [d]
    norm_eps: float
    head_weight: ir.Value  # initializer, [V, d] when head_transposed is False
    head_transposed: bool  # the head multiplies by a [d, V] weight

    @property
    def num_layers(self) -> int:
        return len(self.layer_outputs)


def scope(node: ir.Node) -> list[str]:
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]")
    return [part.strip(" '") for part in raw.strip("[]").split(",")]


def find_decoder(model: ir.Model, pass_name: str, error: type[Exception] = PassError) -> DecoderGraph:
    """Locate layer outputs, final norm and LM head; raise a PassError naming what is missing."""
    layers: dict[int, ir.Value] = {}
    for node in model.graph:
        for out in node.outputs:
            m = LAYER_OUTPUT.match(out.name or "")
            if m:
                layers[int(m.group(1))] = out
    if not layers or sorted(layers) != list(range(len(layers))):
        raise error(
            f"{pass_name}: the graph has no complete set of 'layers.{{i}}.output' values (found "
            f"{sorted(layers)}); run it on a graph from specee_compile.export before ORT fusions."
        )
    norm_nodes = [n for n in model.graph if len(scope(n)) >= 2 and scope(n)[1] == "norm"]
    weight = next((v for n in norm_nodes if n.op_type == "Mul" for v in n.inputs
                   if v is not None and v.const_value is not None and len(v.shape or []) == 1), None)
    eps = next((float(np.asarray(v.const_value.numpy()).reshape(-1)[0]) for n in norm_nodes if n.op_type == "Add"
                for v in n.inputs if v is not None and v.const_value is not None), None)
    head = next((n for n in model.graph if len(scope(n)) >= 2 and scope(n)[1] == "lm_head"
                 and n.op_type in ("Gemm", "MatMul")), None)
    head_weight = head.inputs[1] if head is not None else None
    transposed = head is not None and (head.op_type == "MatMul" or not head.attributes.get_int("transB", 0))
    source = head_weight.producer() if head_weight is not None else None
    if source is not None and source.op_type == "Transpose" and source.inputs[0].const_value is not None \
            and len(source.inputs[0].shape or []) == 2:  # MatMul by a transposed [V, d] weight (many query tokens)
        head_weight, transposed = source.inputs[0], False
    if weight is None or eps is None or head_weight is None or head_weight.const_value is None:
        raise error(f"{pass_name}: could not find the final norm's weight/epsilon or the LM head's weight.")
    return DecoderGraph([layers[i] for i in range(len(layers))], weight, eps, head_weight, transposed)
