"""FuseDraftGathersPass: one gather of the draft tokens' LM-head rows per step.

Rewrite cases:

- every predictor's ``Gather(lm_head.weight, draft_ids)`` (tagged ``specee.role =
  draft_rows``, inside the predictors' If branches) is replaced by one shared gather in the
  main graph, computed once per step;
- the final norm's weight is folded into those shared rows (``rows * norm_weight``), so each
  predictor multiplies the *unweighted* normalized state: ``(x̂ * w) @ R.T == x̂ @ (R * w).T``;
  the per-predictor weight multiplies (``specee.role = norm_weight``) disappear.

``fired`` reports how many predictor sites were fused. A graph without tagged gathers is
left unchanged (``modified`` is False).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from specee_compile.contract import ROLE, ROLE_CANDIDATE_LOGITS, ROLE_DRAFT_ROWS, ROLE_NORM_WEIGHT
from specee_compile.passes.conditions import Broken


@dataclasses.dataclass
class FuseDraftGathersPass(ir.passes.InPlacePass):
    """Share one draft-rows gather (with the norm weight folded in) among all predictors."""

    name: str = "fuse_draft_gathers"
    fired: dict[str, int] = dataclasses.field(default_factory=dict)

    def ensures(self, model: ir.Model) -> None:
        if _tagged_gathers(model):
            raise Broken(f"{self.name}: predictor gathers of the draft rows are left unfused.")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        gathers = _tagged_gathers(model)
        self.fired = {}
        if not gathers:
            return ir.passes.PassResult(model, modified=False)
        weight, ids = gathers[0].inputs
        axis = gathers[0].attributes.get_int("axis", 0)
        graph = model.graph
        tape = ir.tape.Tape(graph)
        rows = tape.op("Gather", [weight, ids], {"axis": axis}, name="specee.draft_rows")
        rows.name = "specee.draft_rows"
        fused_sites = 0
        folded = None
        for gather in gathers:
            matmul = next(u.node for u in gather.outputs[0].uses()
                          if u.node.metadata_props.get(ROLE) == ROLE_CANDIDATE_LOGITS
                          or u.node.op_type == "Transpose")
            logits = matmul if matmul.metadata_props.get(ROLE) == ROLE_CANDIDATE_LOGITS else \
                next(u.node for u in matmul.outputs[0].uses())
            norm_mul = logits.inputs[0].producer()
            if norm_mul is not None and norm_mul.metadata_props.get(ROLE) == ROLE_NORM_WEIGHT:
                if folded is None:
                    norm_w = norm_mul.inputs[1]
                    rank = len(ids.shape) if ids.shape is not None else 1  # draft_ids [4], or [S, 4] per node
                    scale = norm_w if axis == 0 else tape.op("Unsqueeze", [norm_w, _axes(tape, rank)])
                    folded = tape.op("Mul", [rows, scale], name="specee.draft_rows_normed")
                    folded.name = "specee.draft_rows_normed"
                logits.replace_input_with(0, norm_mul.inputs[0])
                gather.outputs[0].replace_all_uses_with(folded)
                norm_mul.graph.remove(norm_mul, safe=True)
            else:
                gather.outputs[0].replace_all_uses_with(rows)
            gather.graph.remove(gather, safe=True)
            fused_sites += 1
        graph.sort()
        self.fired = {"draft_gathers": fused_sites}
        return ir.passes.PassResult(model, modified=True)


def _axes(tape: ir.tape.Tape, rank: int) -> ir.Value:
    """Axes 1..rank: the norm weight [d] against rows gathered along axis 1 of a [d, V] head."""
    return tape.op("Constant", [], {"value": ir.tensor(np.arange(1, rank + 1, dtype=np.int64))})


def _tagged_gathers(model: ir.Model) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph)
            if n.metadata_props.get(ROLE) == ROLE_DRAFT_ROWS]
