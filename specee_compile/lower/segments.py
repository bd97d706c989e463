"""Segmented lowering: cut the SpecEE decode graph after every predictor layer.

Segment k holds the decoder layers after cut k-1 up to and including cut k, the predictor
and exit decision of cut k, and everything they need; the last segment holds the remaining
layers and the LM head. A runtime runs the segments in order with the KV buffers of each
segment's layers bound in place, reads ``exit_flag.{cut}`` after each one (one byte on the
host) and stops at the first exit: no ``If`` around the deeper layers, which on GPUs costs a
device-to-host copy of its condition and rules out CUDA graphs. (Exit mode "graph",
lower/exit_graph.py, nests these segments under ``If`` nodes instead.)

Values that cross a cut become outputs of the producing segment and inputs (same name) of
the consuming ones; initializers are shared by reference, and ``save_segments`` writes each
tensor once into one external-data file that every segment points into.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401

from specee_compile.passes.analysis import scope
from specee_compile.contract import SEGMENT

INLINE_BYTES = 1024


@dataclass
class Segment:
    model: ir.Model
    first_layer: int
    last_layer: int  # inclusive
    exit_layer: int | None  # the predictor layer this segment ends with; None for the last


@dataclass
class Segmented:
    """A graph cut after every predictor layer: its segments in run order, and the inputs of
    the graph they were cut from, in its order (the order a nested decode graph takes)."""

    segments: list[Segment]
    inputs: list[str]


def split_segments(model: ir.Model, cuts: list[int], num_layers: int) -> list[Segment]:
    """Split ``model`` (consumed) into len(cuts) + 1 segments."""
    cuts = sorted(cuts)
    # Every value that crosses a cut becomes a graph input, which needs a type and shape.
    ir.passes.common.ShapeInferencePass()(model)
    graph = model.graph
    top = list(graph)
    owner: dict[int, ir.Node] = {}
    for node in top:
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                for sub in ir.traversal.RecursiveGraphIterator(attr.value if attr.type == ir.AttributeType.GRAPH
                                                               else attr.value[0]):
                    owner[id(sub)] = node
                if attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.value[1:]:
                        for sub in ir.traversal.RecursiveGraphIterator(g):
                            owner[id(sub)] = node
    last = len(cuts)
    seg: dict[int, int] = {}
    for node in top:
        s = scope(node)
        if SEGMENT in node.metadata_props:
            seg[id(node)] = bisect.bisect_left(cuts, int(node.metadata_props[SEGMENT]))
        elif len(s) >= 2 and s[1].startswith("blocks."):
            seg[id(node)] = bisect.bisect_left(cuts, int(s[1].split(".")[1]))
    for node in reversed(top):  # the rest: with their first consumer, else in the last segment
        if id(node) in seg:
            continue
        consumers = [seg[id(owner.get(id(u.node), u.node))] for out in node.outputs for u in out.uses()
                     if id(owner.get(id(u.node), u.node)) in seg]
        seg[id(node)] = min(consumers) if consumers else last
    outputs = {id(v) for v in graph.outputs}
    graph_inputs = {id(v) for v in graph.inputs}
    segments = []
    for k in range(last + 1):
        nodes = [n for n in top if seg[id(n)] == k]
        members = set(map(id, nodes))
        inputs: dict[str, ir.Value] = {}
        inits: dict[str, ir.Value] = {}
        for node in nodes:
            for inner in [node, *_subnodes(node)]:
                for idx, v in enumerate(inner.inputs):
                    if v is None:
                        continue
                    prod = v.producer()
                    if prod is not None:
                        if id(owner.get(id(prod), prod)) in members:
                            continue  # computed in this segment
                        new = inputs.get(v.name) or ir.Value(name=v.name, shape=v.shape, type=v.type)
                        inputs[v.name] = new
                    elif v.name in graph.initializers and graph.initializers[v.name] is v:
                        new = inits.get(v.name) or ir.Value(name=v.name, shape=v.shape, type=v.type,
                                                           const_value=v.const_value)
                        inits[v.name] = new
                    elif id(v) in graph_inputs:
                        new = inputs.get(v.name) or ir.Value(name=v.name, shape=v.shape, type=v.type)
                        inputs[v.name] = new
                    else:
                        continue
                    inner.replace_input_with(idx, new)
        outs = [v for n in nodes for v in n.outputs
                if id(v) in outputs or any(id(owner.get(id(u.node), u.node)) not in members for u in v.uses())]
        segments.append((nodes, list(inputs.values()), outs, list(inits.values())))
    graph.remove(top, safe=False)
    graph.outputs.clear()
    result = []
    bounds = [-1, *cuts, num_layers - 1]
    for k, (nodes, inputs, outs, inits) in enumerate(segments):
        g = ir.Graph(inputs, outs, nodes=nodes, initializers=inits, opset_imports=dict(graph.opset_imports),
                     name=f"segment_{k}")
        m = ir.Model(g, ir_version=model.ir_version, producer_name="specee-compile")
        result.append(Segment(m, bounds[k] + 1, bounds[k + 1], cuts[k] if k < last else None))
    return result


def _subnodes(node: ir.Node):
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else \
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
        for g in graphs:
            yield from ir.traversal.RecursiveGraphIterator(g)


def save_segments(segments: list[Segment], folder: Path, stem: str = "segment") -> list[str]:
    """Write {stem}_{k}.onnx files whose initializers all point into one shared data file
    ({stem}s.data)."""
    folder.mkdir(parents=True, exist_ok=True)
    offsets: dict[int, tuple[int, int]] = {}
    weights = f"{stem}s.data"
    with open(folder / weights, "wb") as f:
        for s in segments:
            for v in s.model.graph.initializers.values():
                key = id(v.const_value)
                if key in offsets or v.const_value.nbytes < INLINE_BYTES:
                    continue
                data = v.const_value.tobytes()  # as ONNX stores it (4-bit values two to a byte)
                pad = (-f.tell()) % 64
                f.write(b"\0" * pad)
                offsets[key] = (f.tell(), len(data))
                f.write(data)
    names = []
    for k, s in enumerate(segments):
        for v in s.model.graph.initializers.values():
            if id(v.const_value) not in offsets:
                continue  # small: stays inline (shape inference reads axes and shapes)
            offset, length = offsets[id(v.const_value)]
            v.const_value = ir.ExternalTensor(weights, offset, length, v.const_value.dtype,
                                              shape=v.const_value.shape, name=v.name, base_dir=folder)
        name = f"{stem}_{k}.onnx"
        ir.save(s.model, folder / name)
        names.append(name)
    return names
