"""InsertEarlyExitPass: the exit decision after every predictor, with the exit's token and feature.

Rewrite, for each predictor ``predictor.{i}`` (from InsertPredictorsPass) with score s_i:

    fire_i = active_layers[i] and s_i > exit_threshold
    exit_flag.{i}, exit_token.{i}, exit_feature.{i} = If(fire_i,
        then: z = final_norm(h_i[:, -1])                                  # [1, d]
              rule full:    t = argmax(z @ lm_head.T);   ok = t in draft_ids
              rule reduced: t = vocab[argmax(z @ lm_head[vocab].T)]; ok = t in draft_ids
              rule draft:   t = draft_ids[argmax(z @ lm_head[draft_ids].T)]; ok = true
              -> ok, t, z
        else: false, -1, 0)

The head product of the rule runs only when the predictor fires. ``exit_feature`` is what
the draft is fed at the next step. The runtime (or the segmented lowering) stops at the
first layer whose ``exit_flag`` is set; ``features`` gives the full-depth feature otherwise.

With ``per_node`` (after InsertPredictorsPass(per_node=True), on the tree verification
graph) every node s gets its own decision from its own row of ``draft_ids`` [S, 4]: the If
runs when any node's score passes, and returns ``exit_flag`` [S] (score_s > threshold and
the rule's check), ``exit_token`` [S] and ``exit_feature`` [S, d] (else [False], [-1],
zeros [1, d], broadcast over the nodes). Which path of the tree may stop is the
runtime's walk over these (runtimes/tree.py).

``exit_threshold`` (float32 [1]) is a graph input, so one compiled graph serves every
threshold: the runtime feeds the calibrated one unless asked for another trade-off.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from specee_compile.contract import DRAFT_IDS, EXIT_RULES, EXIT_THRESHOLD, SEGMENT, exit_feature, exit_flag, exit_token
from specee_compile.errors import PassError
from specee_compile.passes.analysis import find_decoder
from specee_compile.passes.conditions import Broken, Unmet, graph_input, graph_output_names
from specee_compile.passes.insert_predictors import constant, name_nodes, normalized_last, normalized_nodes

RULES = EXIT_RULES
THRESHOLD_INPUT = EXIT_THRESHOLD
PREDICTOR = "predictor."  # the name prefix of InsertPredictorsPass's If nodes: predictor.{i}


@dataclasses.dataclass
class InsertEarlyExitPass(ir.passes.InPlacePass):
    """Add an exit decision (flag, token, feature outputs) after every predictor.

    The scores are compared with the new graph input ``exit_threshold``."""

    rule: str = "full"
    vocab_map: np.ndarray | None = dataclasses.field(default=None, repr=False)  # for rule "reduced"
    per_node: bool = False  # a decision per query position (draft_ids [S, 4])
    name: str = "insert_early_exit"
    fired: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.rule not in RULES:
            raise PassError(f"{self.name}: exit rule '{self.rule}' is unknown; choose one of {RULES}.")

    def requires(self, model: ir.Model) -> None:
        """The decoder's structure, predictors (``insert_predictors`` ran) and no exits yet."""
        find_decoder(model, self.name, Unmet)
        if not _predictors(model) or graph_input(model, DRAFT_IDS) is None:
            raise Unmet(f"{self.name}: the graph has no predictors; run insert_predictors first.")
        if self.rule == "reduced" and self.vocab_map is None:
            raise Unmet(f"{self.name}: the 'reduced' rule needs the draft's vocabulary map.")
        if graph_input(model, THRESHOLD_INPUT) is not None:
            raise Unmet(f"{self.name}: the graph already has exits (an '{THRESHOLD_INPUT}' input); run it once.")

    def ensures(self, model: ir.Model) -> None:
        outputs = graph_output_names(model)
        layers = [int(n.name[len(PREDICTOR):]) for n in _predictors(model)]
        missing = [name(i) for i in layers for name in (exit_flag, exit_token, exit_feature) if name(i) not in outputs]
        if missing:
            raise Broken(f"{self.name}: the graph lacks the exit outputs {missing}.")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        dec = find_decoder(model, self.name)
        predictors = _predictors(model)
        graph = model.graph
        draft_ids = graph_input(model, DRAFT_IDS)
        tape = ir.tape.Tape(graph)
        reduced = None
        if self.rule == "reduced":
            w = np.asarray(dec.head_weight.const_value.numpy())
            w = w.T if dec.head_transposed else w
            reduced = (tape.initializer(ir.tensor(np.ascontiguousarray(w[self.vocab_map])), name="specee.reduced_head"),
                       tape.initializer(ir.tensor(np.asarray(self.vocab_map, np.int64)), name="specee.vocab_map"))
        thr = ir.Value(name=THRESHOLD_INPUT, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(thr)
        d = dec.norm_weight.shape[0]
        for node in predictors:
            i = int(node.name[len(PREDICTOR):])
            start = len(tape.nodes)
            score = node.outputs[0]
            best = tape.op("ReduceMax", [score], {"keepdims": 1}) if self.per_node else score
            fire = tape.op("And", [node.inputs[0], tape.op("Greater", [best, thr])])
            then = self._check(dec, i, draft_ids, reduced)
            if self.per_node:  # each node's own flag: its score passes and the rule's check holds
                then[1][0] = then[0].op("And", [then[1][0], then[0].op("Greater", [score, thr])])
            other = ir.tape.Tape()
            no = [other.op("Identity", [constant(other, v)]) for v in
                  (np.array([False]), np.array([-1], np.int64), np.zeros((1, d), np.float32))]
            outs = tape.op_multi_out(
                "If", [fire],
                {"then_branch": ir.Graph([], then[1], nodes=name_nodes(then[0], f"exit_{i}"), name=f"exit_{i}"),
                 "else_branch": ir.Graph([], no, nodes=name_nodes(other, f"stay_{i}"), name=f"stay_{i}")},
                num_outputs=3, name=f"exit.{i}",
            )
            for value, name in zip(outs, (exit_flag, exit_token, exit_feature)):
                value.name = name(i)
                graph.outputs.append(value)
            for new in tape.nodes[start:]:
                new.metadata_props[SEGMENT] = str(i)
        graph.sort()
        self.fired = {"exits": len(predictors)}
        return ir.passes.PassResult(model, modified=True)

    def _check(self, dec, i, draft_ids, reduced):
        t = ir.tape.Tape()
        if self.per_node:  # [S, 1, d] -> [S, d]
            x = t.op("Squeeze", [normalized_nodes(t, dec, i), constant(t, np.array([1], np.int64))])
        else:
            x = normalized_last(t, dec, i)
        z = t.op("Mul", [x, dec.norm_weight])  # [1, d] or [S, d]
        trans = 0 if dec.head_transposed else 1
        if self.rule == "full":
            token = t.op("ArgMax", [t.op("Gemm", [z, dec.head_weight], {"transB": trans})], {"axis": -1, "keepdims": 0})
        elif self.rule == "reduced":
            idx = t.op("ArgMax", [t.op("Gemm", [z, reduced[0]], {"transB": 1})], {"axis": -1, "keepdims": 0})
            token = t.op("Gather", [reduced[1], idx], {"axis": 0})
        elif self.per_node:  # each node's argmax over its own candidates: [S, 1, d] @ [S, d, 4]
            rows = t.op("Gather", [dec.head_weight, draft_ids], {"axis": 1 if dec.head_transposed else 0})
            rows = t.op("Transpose", [rows], {"perm": [1, 0, 2] if dec.head_transposed else [0, 2, 1]})
            logits = t.op("MatMul", [t.op("Unsqueeze", [z, constant(t, np.array([1], np.int64))]), rows])
            idx = t.op("ArgMax", [logits], {"axis": -1, "keepdims": 0})  # [S, 1]
            token = t.op("Squeeze", [t.op("GatherElements", [draft_ids, idx], {"axis": 1}),
                                     constant(t, np.array([1], np.int64))])
        else:
            rows = t.op("Gather", [dec.head_weight, draft_ids], {"axis": 1 if dec.head_transposed else 0})
            idx = t.op("ArgMax", [t.op("Gemm", [z, rows], {"transB": trans})], {"axis": -1, "keepdims": 0})
            token = t.op("Gather", [draft_ids, idx], {"axis": 0})
        if self.rule == "draft":
            ok = t.op("Identity", [constant(t, np.array([True]))])
        elif self.per_node:  # token s among row s of draft_ids
            hit = t.op("Equal", [draft_ids, t.op("Unsqueeze", [token, constant(t, np.array([1], np.int64))])])
            ok = t.op("Cast", [t.op("ReduceMax", [t.op("Cast", [hit], {"to": ir.DataType.INT64}),
                                                  constant(t, np.array([1], np.int64))], {"keepdims": 0})],
                      {"to": ir.DataType.BOOL})
        else:
            hit = t.op("Cast", [t.op("Equal", [draft_ids, token])], {"to": ir.DataType.INT64})
            ok = t.op("Cast", [t.op("ReduceMax", [hit], {"keepdims": 1})], {"to": ir.DataType.BOOL})
        return t, [ok, token, z]


def _predictors(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "If" and (n.name or "").startswith(PREDICTOR)]
