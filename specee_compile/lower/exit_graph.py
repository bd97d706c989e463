"""In-graph exit lowering: the SpecEE decode step as ONE graph with nested ``If`` exits.

Built from the segments of :func:`split_segments` (the same node partition, the same
per-segment fusions), nested instead of run one after another by the host:

    decode graph:  segment 0                                       # layers 0..c0, predictor c0
                   If(exit_flag.c0,
                      then: exit at c0                             # token, feature, c0, and the
                                                                   # K/V of layers c0+1..L-1 at n
                      else: segment 1                              # layers c0+1..c1, predictor c1
                            If(exit_flag.c1,
                               then: exit at c1
                               else: ... segment K: the last layers and the LM head))

Both branches of every ``If`` return the token, the feature the draft is fed next, the exit
layer and the ``present.{j}.key|value`` of every layer after the cut, so the graph's outputs
are the same whichever way it went:

    token       int64   [1]                 the emitted token
    feature     float32 [1, 1, d]           exit_feature.{c}, or the full-depth features
    exit_layer  int64   [1]                 c, or L-1 when no predictor exited
    normed_feature float32 [1, 1, d]        the normed state the token came from (``feature``,
                                            unless the draft fuses: passes/fuse_draft_input.py)
    present.{i}.key|value                   every layer's cache with position n written

An exit branch fills the skipped layers' cache at position n (``past_sequence_length``) by
state propagation, the math of ``runtimes.propagation.propagated_kv``: x = rmsnorm(h_c) * norm_j,
k = rope(knorm(x @ Wk_j.T (+ b))), v = x @ Wv_j.T (+ b), written with ``ScatterElements``.

``rows=True`` (TensorRT-ready graphs, whose attention writes the cache with ScatterElements)
returns from the branches only the new K/V row ``[1, kv_heads, 1, D]`` of every layer after
the cut; the main graph scatters the rows into the past buffers, so every ``present.*`` is a
ScatterElements into its ``past_key_values.*`` input, the cache update TensorRT takes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401

from specee_compile.contract import (
    FEATURES,
    GRAPH_EXIT_OUTPUTS,
    KINDS,
    LOGITS,
    NORMED_FEATURES,
    PAST,
    exit_feature,
    exit_flag,
    exit_token,
    layer_output,
    normed_exit_feature,
    past,
    present,
    rope_table,
)
from specee_compile.errors import PassError
from specee_compile.lower.segments import Segment
from specee_compile.passes.insert_predictors import name_nodes

OUTPUTS = GRAPH_EXIT_OUTPUTS  # token, feature, exit_layer


def nest_segments(segments: list[Segment], input_names: list[str], kv_fill: dict[str, np.ndarray],
                  eps: float, num_layers: int, kv_heads: int, rows: bool = False) -> ir.Model:
    """Nest ``segments`` (consumed) into one decode graph with an ``If`` after every cut.

    ``input_names`` orders the graph inputs (the SpecEE step graph's input order);
    ``kv_fill`` holds the K/V-propagation tensors (``export.kv_fill``); ``rows``: the
    branches return new cache rows, scattered in the main graph (TensorRT-ready graphs).
    """
    return _Nester(segments, kv_fill, eps, num_layers, kv_heads, rows).build(input_names)


class _Nester:
    def __init__(self, segments, kv_fill, eps, num_layers, kv_heads, rows):
        self.segments = segments
        self.rows = rows
        self.kv = kv_fill
        self.eps = eps
        self.L = num_layers
        self.kv_heads = kv_heads
        self.head_dim = kv_fill["0.k"].shape[0] // kv_heads
        self.available: dict[str, ir.Value] = {}  # values visible to the next segment, by name
        self.inits: dict[str, ir.Value] = {}  # every initializer, kept in the main graph
        self.opsets: dict[str, int] = {}
        self.functions: dict = {}

    def build(self, input_names: list[str]) -> ir.Model:
        wanted = {v.name: v for s in self.segments for v in s.model.graph.inputs}
        inputs = [ir.Value(name=n, shape=wanted[n].shape, type=wanted[n].type) for n in input_names if n in wanted]
        self.available.update((v.name, v) for v in inputs)
        first = self.segments[0].model
        nodes, outs = self._level(0)
        if self.rows:  # the rows the If returned go into the past buffers here
            t = ir.tape.Tape()
            where = self._where(t)
            for j in range(self.segments[0].last_layer + 1, self.L):
                for kind in KINDS:
                    name = present(j, kind)
                    outs[name] = t.op("ScatterElements", [self.available[past(j, kind)], where,
                                                          outs[name]], {"axis": 2}, name=f"write_row.{j}.{kind}")
                    outs[name].name = name
            nodes += t.nodes
        names = [*OUTPUTS, *(present(i, kind) for i in range(self.L) for kind in KINDS)]
        graph = ir.Graph(inputs, [outs[n] for n in names], nodes=nodes, initializers=list(self.inits.values()),
                         opset_imports=self.opsets, name="specee_decode")
        model = ir.Model(graph, ir_version=first.ir_version, producer_name="specee-compile",
                         functions=list(self.functions.values()))
        # Names must be unique across the graph and its branches; the graph's own inputs
        # and outputs keep theirs (any clash left from segment-local fusions is renamed).
        ir.passes.common.NameFixPass()(model)
        return model

    # ---- one nesting level: segment k, then the If after its cut ----------------------------
    def _level(self, k: int) -> tuple[list[ir.Node], dict[str, ir.Value]]:
        seg = self.segments[k]
        nodes = self._adopt(seg.model)
        outs = {present(i, kind): self.available[present(i, kind)]
                for i in range(seg.first_layer, seg.last_layer + 1) for kind in KINDS}
        if k > 0 and self.rows:  # a branch returns the rows its attention scattered into the cache
            outs = {name: _scattered_row(v, name) for name, v in outs.items()}
        if k > 0:  # inside a branch: the outer If's outputs take the plain names
            for name, v in outs.items():
                v.name = f"segment_{k}/{name}"
        if seg.exit_layer is None:  # the last segment: the LM head ran
            t = ir.tape.Tape()
            token = t.op("ArgMax", [self.available[LOGITS]], {"axis": -1, "keepdims": 0})  # [1]
            feature = t.op("Identity", [self.available[FEATURES]])  # [1, 1, d]
            layer = t.op("Constant", [], {"value": ir.tensor(np.array([self.L - 1], np.int64))})
            normed = t.op("Identity", [self.available.get(NORMED_FEATURES, self.available[FEATURES])])
            nodes += name_nodes(t, "full_depth")
            return nodes, {**outs, **dict(zip(OUTPUTS, (token, feature, layer, normed)))}
        c = seg.exit_layer
        names = [*OUTPUTS, *(present(j, kind) for j in range(c + 1, self.L) for kind in KINDS)]
        then_nodes, then_outs = self._exit_branch(c)
        else_nodes, else_outs = self._level(k + 1)
        then_g = ir.Graph([], [then_outs[n] for n in names], nodes=then_nodes, name=f"exit_at_{c}")
        else_g = ir.Graph([], [else_outs[n] for n in names], nodes=else_nodes, name=f"continue_after_{c}")
        node = ir.Node("", "If", [self.available[exit_flag(c)]], num_outputs=len(names),
                       name=f"exit_or_continue.{c}",
                       attributes=[ir.AttrGraph("then_branch", then_g), ir.AttrGraph("else_branch", else_g)])
        for name, value in zip(names, node.outputs):
            plain = name.replace("present.", "row.", 1) if self.rows else name
            value.name = plain if k == 0 else f"exit_or_continue.{c}/{plain}"
            value.type, value.shape = else_outs[name].type, else_outs[name].shape
        for j in (1, 3):  # feature, normed_feature
            if node.outputs[j].shape is not None:
                node.outputs[j].shape = ir.Shape([1, 1, node.outputs[j].shape[-1]])
        nodes.append(node)
        return nodes, {**outs, **dict(zip(names, node.outputs))}

    def _adopt(self, model: ir.Model) -> list[ir.Node]:
        """Take a segment's nodes: its inputs become the outer values of the same name, its
        initializers move to the main graph (one per tensor), its outputs become visible."""
        g = model.graph
        for v in list(g.inputs):
            v.replace_all_uses_with(self.available[v.name])
        for name, v in list(g.initializers.items()):
            g.initializers.pop(name)
            kept = self.inits.get(name)
            if kept is not None and (kept.const_value is v.const_value or _same(kept, v)):
                v.replace_all_uses_with(kept)
                continue
            if kept is not None:  # the same name for another tensor (segment-local fusions)
                v.name = f"{name}.{len(self.inits)}"
            self.inits[v.name] = v
        outputs = list(g.outputs)
        g.outputs.clear()
        g.inputs.clear()
        nodes = list(g)
        g.remove(nodes, safe=False)
        self.available.update((v.name, v) for v in outputs)
        self.opsets.update(g.opset_imports)
        self.functions.update(model.functions)
        return nodes

    # ---- exit at layer c: emit its token and feature, propagate K/V to the skipped layers -------
    def _exit_branch(self, c: int) -> tuple[list[ir.Node], dict[str, ir.Value]]:
        t = ir.tape.Tape()
        kvh, D = self.kv_heads, self.head_dim
        outs = dict(zip(OUTPUTS, (
            t.op("Identity", [self.available[exit_token(c)]]),
            t.op("Unsqueeze", [self.available[exit_feature(c)], self.constant("axes_1", [1])]),
            t.op("Constant", [], {"value": ir.tensor(np.array([c], np.int64))}),
            t.op("Unsqueeze", [self.available.get(normed_exit_feature(c), self.available[exit_feature(c)]),
                               self.constant("axes_1", [1])]))))
        h = t.op("Gather", [self.available[layer_output(c)], self.constant("last", -1)], {"axis": 1})  # [1, d]
        xhat = self._rms(t, h)
        pos = self.available["past_sequence_length"]  # [1]: the position being decoded
        tables = {}  # suffix -> (cos, sin) rows [1, R/2] of the position
        where = None if self.rows else self._where(t)
        for j in range(c + 1, self.L):
            x = t.op("Mul", [xhat, self._init(f"{j}.norm")]) if f"{j}.norm" in self.kv else h  # input norm, [1, d]
            k, v = (self._project(t, x, j, kind) for kind in ("k", "v"))  # [1, kvh * D]
            k = t.op("Reshape", [k, self.constant("shape_heads", [kvh, D])])
            if f"{j}.k_norm" in self.kv:
                per_head = self.kv[f"{j}.k_norm"].shape[0] == D
                rows = k if per_head else t.op("Reshape", [k, self.constant("shape_row", [1, kvh * D])])
                k = t.op("Mul", [self._rms(t, rows), self._init(f"{j}.k_norm")])
                k = k if per_head else t.op("Reshape", [k, self.constant("shape_heads", [kvh, D])])
            suffix = rope_table(self.kv, j)
            if suffix is not None:
                if suffix not in tables:
                    tables[suffix] = tuple(t.op("Gather", [self._init(f"{kind}{suffix}"), pos], {"axis": 0})
                                           for kind in ("cos", "sin"))  # [1, R/2]
                k = self._rotate(t, k, *tables[suffix], self.kv[f"cos{suffix}"].shape[1])
            for kind, new in (("key", k), ("value", v)):
                row = t.op("Reshape", [new, self.constant("shape_cache_row", [1, kvh, 1, D])])
                cache = self.available[past(j, kind)]
                outs[present(j, kind)] = row if self.rows else \
                    t.op("ScatterElements", [cache, where, row], {"axis": 2})
        return name_nodes(t, f"exit_at_{c}"), outs

    def _rms(self, t: ir.tape.Tape, x: ir.Value) -> ir.Value:
        """x / sqrt(mean(x^2) + eps) over the last axis."""
        ms = t.op("ReduceMean", [t.op("Mul", [x, x]), self.constant("axes_-1", [-1])], {"keepdims": 1})
        return t.op("Div", [x, t.op("Sqrt", [t.op("Add", [ms, self.constant("eps", np.float32(self.eps))])])])

    def _rotate(self, t: ir.tape.Tape, k: ir.Value, cos: ir.Value, sin: ir.Value, half: int) -> ir.Value:
        """RoPE of k [kvh, D] (rotate_half layout) on its first 2 * ``half`` dimensions."""
        D = self.head_dim

        def part(start: int, end: int) -> ir.Value:
            return t.op("Slice", [k, self.constant(f"at_{start}", [start]), self.constant(f"at_{end}", [end]),
                                  self.constant("axes_1", [1])])

        k1, k2 = part(0, half), part(half, 2 * half)
        parts = [t.op("Sub", [t.op("Mul", [k1, cos]), t.op("Mul", [k2, sin])]),
                 t.op("Add", [t.op("Mul", [k2, cos]), t.op("Mul", [k1, sin])])]
        if 2 * half < D:
            parts.append(part(2 * half, D))
        return t.op("Concat", parts, {"axis": 1})

    def _where(self, t: ir.tape.Tape) -> ir.Value:
        """ScatterElements indices of cache position n: [1, kv_heads, 1, D], all n."""
        pos = self.available["past_sequence_length"]
        return t.op("Expand", [t.op("Reshape", [pos, self.constant("shape_1111", [1, 1, 1, 1])]),
                               self.constant("shape_cache_row", [1, self.kv_heads, 1, self.head_dim])])

    def _project(self, t: ir.tape.Tape, x: ir.Value, j: int, kind: str) -> ir.Value:
        y = t.op("MatMul", [x, self._init(f"{j}.{kind}", transpose=True)])
        bias = f"{j}.{kind}_bias"
        return t.op("Add", [y, self._init(bias)]) if bias in self.kv else y

    def _init(self, key: str, transpose: bool = False) -> ir.Value:
        name = f"specee.kv_fill.{key}" + (".T" if transpose else "")
        if name not in self.inits:
            array = self.kv[key].T if transpose else self.kv[key]
            tensor = ir.tensor(np.ascontiguousarray(array, np.float32), name=name)
            self.inits[name] = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                                        const_value=tensor)
        return self.inits[name]

    def constant(self, key: str, value) -> ir.Value:
        name = f"specee.exit_graph.{key}"
        if name not in self.inits:
            array = np.asarray(value)
            array = array.astype(np.int64) if array.dtype.kind == "i" else array
            tensor = ir.tensor(array, name=name)
            self.inits[name] = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                                        const_value=tensor)
        return self.inits[name]


def _scattered_row(present: ir.Value, name: str) -> ir.Value:
    """The updates of the ScatterElements that wrote ``present`` into its past buffer."""
    node = present.producer()
    into_past = node is not None and (node.inputs[0].name or "").startswith(PAST)
    if not into_past or node.op_type != "ScatterElements":
        raise PassError(f"exit_graph: '{name}' is not written by a ScatterElements into its past buffer "
                        f"({node.op_type if node else 'no producer'}); the row form needs TensorRT-ready graphs "
                        "(graph target 'trt').")
    return node.inputs[2]


def _same(a: ir.Value, b: ir.Value) -> bool:
    x, y = a.const_value, b.const_value
    if x is None or y is None or x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape) or x.nbytes > 1 << 16:
        return False
    return bool(np.array_equal(x.numpy(), y.numpy()))
