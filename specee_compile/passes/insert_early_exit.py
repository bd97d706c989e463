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

``exit_threshold`` (float32 [1]) is a graph input, so one compiled graph serves every
threshold: the runtime feeds the calibrated one unless asked for another trade-off.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from specee_compile.errors import PassError
from specee_compile.passes.analysis import find_decoder
from specee_compile.passes.insert_predictors import SEGMENT, _const, _named, normalized_last

RULES = ("full", "reduced", "draft")
THRESHOLD_INPUT = "exit_threshold"


@dataclasses.dataclass
class InsertEarlyExitPass(ir.passes.InPlacePass):
    """Add exit flag, token and feature outputs after every predictor, and the
    ``exit_threshold`` graph input they compare the scores with."""

    rule: str = "full"
    vocab_map: np.ndarray | None = dataclasses.field(default=None, repr=False)  # for rule "reduced"
    name: str = "insert_early_exit"
    fired: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.rule not in RULES:
            raise PassError(f"{self.name}: exit rule '{self.rule}' is unknown; choose one of {RULES}.")
        if self.rule == "reduced" and self.vocab_map is None:
            raise PassError(f"{self.name}: the 'reduced' rule needs the draft's vocabulary map.")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        dec = find_decoder(model, self.name)
        predictors = [n for n in model.graph if n.op_type == "If" and (n.name or "").startswith("predictor.")]
        if not predictors:
            raise PassError(f"{self.name}: the graph has no predictors; run insert_predictors first.")
        graph = model.graph
        draft_ids = next(v for v in graph.inputs if v.name == "draft_ids")
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
            i = int(node.name.split(".")[1])
            start = len(tape.nodes)
            fire = tape.op("And", [node.inputs[0], tape.op("Greater", [node.outputs[0], thr])])
            then = self._check(dec, i, draft_ids, reduced)
            other = ir.tape.Tape()
            no = [other.op("Identity", [_const(other, v)]) for v in
                  (np.array([False]), np.array([-1], np.int64), np.zeros((1, d), np.float32))]
            outs = tape.op_multi_out(
                "If", [fire],
                {"then_branch": ir.Graph([], then[1], nodes=_named(then[0], f"exit_{i}"), name=f"exit_{i}"),
                 "else_branch": ir.Graph([], no, nodes=_named(other, f"stay_{i}"), name=f"stay_{i}")},
                num_outputs=3, name=f"exit.{i}",
            )
            for value, kind in zip(outs, ("exit_flag", "exit_token", "exit_feature")):
                value.name = f"{kind}.{i}"
                graph.outputs.append(value)
            for new in tape.nodes[start:]:
                new.metadata_props[SEGMENT] = str(i)
        graph.sort()
        self.fired = {"exits": len(predictors)}
        return ir.passes.PassResult(model, modified=True)

    def _check(self, dec, i, draft_ids, reduced):
        t = ir.tape.Tape()
        z = t.op("Mul", [normalized_last(t, dec, i), dec.norm_weight])  # [1, d]
        trans = 0 if dec.head_transposed else 1
        if self.rule == "full":
            token = t.op("ArgMax", [t.op("Gemm", [z, dec.head_weight], {"transB": trans})], {"axis": -1, "keepdims": 0})
        elif self.rule == "reduced":
            idx = t.op("ArgMax", [t.op("Gemm", [z, reduced[0]], {"transB": 1})], {"axis": -1, "keepdims": 0})
            token = t.op("Gather", [reduced[1], idx], {"axis": 0})
        else:
            rows = t.op("Gather", [dec.head_weight, draft_ids], {"axis": 1 if dec.head_transposed else 0})
            idx = t.op("ArgMax", [t.op("Gemm", [z, rows], {"transB": trans})], {"axis": -1, "keepdims": 0})
            token = t.op("Gather", [draft_ids, idx], {"axis": 0})
        if self.rule == "draft":
            ok = t.op("Identity", [_const(t, np.array([True]))])
        else:
            hit = t.op("Cast", [t.op("Equal", [draft_ids, token])], {"to": ir.DataType.INT64})
            ok = t.op("Cast", [t.op("ReduceMax", [hit], {"keepdims": 1})], {"to": ir.DataType.BOOL})
        return t, [ok, token, z]
