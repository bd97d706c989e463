"""InsertPredictorsPass: SpecEE exit predictors after the scheduled decoder layers.

Rewrite, for every layer i in ``layers`` (ascending), on the value ``layers.{i}.output``:

    rows   = Gather(lm_head.weight, draft_ids)               # [4, d]   draft tokens' head rows
    score_i, p_i = If(active_layers[i],
        then: z = final_norm(h_i[:, -1])                       # [1, d]
              l = z @ rows.T; p = Softmax(l)                   # [1, 4]
              dp = p - p_prev if a predictor ran before, else p
              s = Sigmoid(Relu([l, p, dp] @ W1_i + b1_i) @ w2_i + b2_i)
        else: 0, p_prev)                                       # an inactive predictor costs nothing

New graph inputs: ``draft_ids`` int64 [4] and ``active_layers`` bool [L]. New outputs:
``exit_score.{i}`` float [1] per predictor. Every predictor gathers its own rows here;
FuseDraftGathersPass shares one gather. Raises PassError when a layer is out of range or
is the last layer (stopping there is not an early exit).

With ``per_node`` (the tree verification graph, S query tokens) every position is scored
with its own candidates in one batched product: ``draft_ids`` is [S, 4] (node s's draft
top-4), the rows [S, 4, d], ``z`` [S, 1, d], the logits [S, 1, 4] and ``exit_score.{i}`` [S]
(an inactive predictor's is 0 of shape [1], broadcast over the nodes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from specee_compile.contract import (ACTIVE_LAYERS, DRAFT_IDS, ROLE, ROLE_CANDIDATE_LOGITS, ROLE_DRAFT_ROWS,
                                     ROLE_NORM_WEIGHT, SEGMENT)
from specee_compile.passes.analysis import find_decoder
from specee_compile.passes.conditions import Broken, Unmet, graph_input, graph_output_names


def exit_score(layer: int) -> str:
    return f"exit_score.{layer}"  # float32 [1] ([S] per node): predictor i's score


@dataclasses.dataclass
class InsertPredictorsPass(ir.passes.InPlacePass):
    """Insert gated SpecEE predictors after the given decoder layers."""

    layers: tuple[int, ...] = ()
    w1: np.ndarray | None = dataclasses.field(default=None, repr=False)  # [L, 12, H]
    b1: np.ndarray | None = dataclasses.field(default=None, repr=False)  # [L, H]
    w2: np.ndarray | None = dataclasses.field(default=None, repr=False)  # [L, H]
    b2: np.ndarray | None = dataclasses.field(default=None, repr=False)  # [L]
    per_node: bool = False  # score every query position with its own candidates (draft_ids [S, 4])
    name: str = "insert_predictors"
    fired: dict[str, int] = dataclasses.field(default_factory=dict)

    def requires(self, model: ir.Model) -> None:
        """The decoder's structure (named layer outputs, final norm, LM head), predictor layers in
        range with weights for every layer, and no predictors yet."""
        L = find_decoder(model, self.name, Unmet).num_layers
        bad = [i for i in self.layers if not 0 <= i < L - 1]
        if bad or not self.layers:
            raise Unmet(f"{self.name}: predictor layers {bad or 'none'} must be in [0, {L - 2}] "
                        f"(the model has {L} layers; the last cannot exit early).")
        if self.w1 is None or self.w1.shape[0] != L:
            raise Unmet(f"{self.name}: predictor weights for {L} layers are required.")
        if graph_input(model, DRAFT_IDS) is not None:
            raise Unmet(f"{self.name}: the graph already has predictors (a '{DRAFT_IDS}' input); run it once.")

    def ensures(self, model: ir.Model) -> None:
        missing = [exit_score(i) for i in self.layers if exit_score(i) not in graph_output_names(model)]
        if missing:
            raise Broken(f"{self.name}: the graph lacks the score outputs {missing}.")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        dec = find_decoder(model, self.name)
        L = dec.num_layers
        graph = model.graph
        nodes = model.graph.inputs[0].shape[1] if self.per_node else None  # input_ids [1, S]
        draft_ids = ir.val(DRAFT_IDS, ir.DataType.INT64, [nodes, 4] if self.per_node else [4])
        active = ir.val(ACTIVE_LAYERS, ir.DataType.BOOL, [L])
        graph.inputs.extend([draft_ids, active])
        tape = ir.tape.Tape(graph)
        p_shape = (1, 1, 4) if self.per_node else (1, 4)  # the rank of p: [S, 1, 4] per node (If branches agree)
        p_prev = tape.initializer(ir.tensor(np.zeros(p_shape, np.float32)), name="specee.p_init")
        has_prev = tape.initializer(ir.tensor(np.array(False)), name="specee.has_prev_init")
        for i in sorted(self.layers):
            start = len(tape.nodes)
            p_prev, has_prev, score = self._predictor(tape, dec, i, draft_ids, active, p_prev, has_prev)
            for node in tape.nodes[start:]:
                node.metadata_props[SEGMENT] = str(i)
            score.name = exit_score(i)
            graph.outputs.append(score)
        graph.sort()
        self.fired = {"predictors": len(self.layers)}
        return ir.passes.PassResult(model, modified=True)

    def _predictor(self, tape, dec, i, draft_ids, active, p_prev, has_prev):
        c = lambda arr, n: tape.initializer(ir.tensor(np.asarray(arr, np.float32)), name=f"specee.{n}.{i}")  # noqa: E731
        idx = tape.initializer(ir.tensor(np.array(i, np.int64)), name=f"specee.layer_index.{i}")
        is_active = tape.op("Gather", [active, idx], {"axis": 0})
        then = ir.tape.Tape()
        x = normalized_nodes(then, dec, i) if self.per_node else normalized_last(then, dec, i)
        z = then.op("Mul", [x, dec.norm_weight], metadata_props={ROLE: ROLE_NORM_WEIGHT})
        rows = then.op("Gather", [dec.head_weight, draft_ids], {"axis": 1 if dec.head_transposed else 0},
                       metadata_props={ROLE: ROLE_DRAFT_ROWS})
        if self.per_node:  # rows [S, 4, d] (or [d, S, 4]) -> [S, d, 4]; [S, 1, d] @ [S, d, 4]
            rows = then.op("Transpose", [rows], {"perm": [1, 0, 2] if dec.head_transposed else [0, 2, 1]})
        elif not dec.head_transposed:
            rows = then.op("Transpose", [rows])
        logits = then.op("MatMul", [z, rows], metadata_props={ROLE: ROLE_CANDIDATE_LOGITS})  # [1, 4] or [S, 1, 4]
        p = then.op("Softmax", [logits], {"axis": -1})
        dp = then.op("Where", [has_prev, then.op("Sub", [p, p_prev]), p])
        feats = then.op("Concat", [logits, p, dp], {"axis": -1})  # [1, 12] or [S, 1, 12]
        hidden = then.op("Relu", [then.op("Add", [then.op("MatMul", [feats, c(self.w1[i], "w1")]), c(self.b1[i], "b1")])])
        score = then.op("Sigmoid", [then.op("Add", [then.op("MatMul", [hidden, c(self.w2[i][:, None], "w2")]),
                                                     c(self.b2[i:i + 1], "b2")])])
        score = then.op("Reshape", [score, constant(then, np.array([-1 if self.per_node else 1], np.int64))])
        other = ir.tape.Tape()
        zero = other.op("Identity", [constant(other, np.zeros(1, np.float32))])
        same_p = other.op("Identity", [p_prev])
        branch = lambda t, outs, name: ir.Graph([], outs, nodes=name_nodes(t, name), name=name)  # noqa: E731
        score_out, p_out = tape.op_multi_out(
            "If", [is_active],
            {"then_branch": branch(then, [score, p], f"predictor_{i}"),
             "else_branch": branch(other, [zero, same_p], f"skip_predictor_{i}")},
            num_outputs=2, name=f"predictor.{i}",  # insert_early_exit finds them by this name
        )
        has_prev = tape.op("Or", [has_prev, is_active])
        return p_out, has_prev, score_out


def normalized_last(t: ir.tape.Tape, dec, i: int) -> ir.Value:
    """The last position of layer i's output, RMS-normalized without the norm weight: [1, d]."""
    return rms_normalized(t, dec, t.op("Gather", [dec.layer_outputs[i], constant(t, np.array(-1, np.int64))], {"axis": 1}))


def normalized_nodes(t: ir.tape.Tape, dec, i: int) -> ir.Value:
    """Every position of layer i's output [1, S, d], RMS-normalized without the norm weight, as [S, 1, d]."""
    return rms_normalized(t, dec, t.op("Transpose", [dec.layer_outputs[i]], {"perm": [1, 0, 2]}))


def rms_normalized(t: ir.tape.Tape, dec, h: ir.Value) -> ir.Value:
    ms = t.op("ReduceMean", [t.op("Mul", [h, h]), constant(t, np.array([-1], np.int64))], {"keepdims": 1})
    inv = t.op("Reciprocal", [t.op("Sqrt", [t.op("Add", [ms, constant(t, np.float32(dec.norm_eps))])])])
    return t.op("Mul", [h, inv])


def name_nodes(tape: ir.tape.Tape, prefix: str) -> list[ir.Node]:
    """Give a subgraph's nodes and values unique names (ONNX needs SSA across all graphs)."""
    for k, node in enumerate(tape.nodes):
        node.name = f"{prefix}/{node.op_type}_{k}"
        for j, out in enumerate(node.outputs):
            out.name = f"{prefix}/{node.op_type}_{k}:{j}"
    return list(tape.nodes)


def constant(tape: ir.tape.Tape, array) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(np.asarray(array))})
