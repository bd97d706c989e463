"""FuseDraftInputPass: the target graph hands the draft EAGLE-3's fused input.

A fusion draft (calibrate/draft.py) reads ``fuse([z_low, z_mid, z_l])`` after a target
forward, where ``z_j`` is layer j's output under the final norm and l the layer the token
left from. This pass makes the graph compute it, so every runtime feeds the draft the graph's
feature outputs as before:

    n_j       = final_norm(layers.{j}.output)                        j in (low, mid), [1, S, d]
    partial   = n_low @ W_low + n_mid @ W_mid                         [1, S, d]
    features  = partial + features @ W_top                            (the full-depth feature)
    exit_feature.{i} = rows(partial) + exit_feature.{i} @ W_top       (i >= mid)

The normed states stay outputs too, as ``normed_features`` and ``normed_exit_feature.{i}``:
what a token's distribution came from, which scoring reads (a runtime may leave them unbound).

``W_low | W_mid | W_top`` are the draft's ``fuse`` weight (d x 3d) split by input slot. An exit
shallower than a slot's layer reads its own feature in that slot (its matrix is added to
``W_top``). ``rows`` is the last position ([1, d]), or every node ([S, d]) with ``per_node``
(the tree verification graph's per-node exits). The exit's fusion runs in the exit's segment;
the partial sum is computed once, where it is first needed, and crosses the cuts like any
other value. Run it after ``insert_early_exit`` and before ONNX Runtime's fusions, which merge
the layer outputs it reads into the next layer's norm.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from specee_compile.contract import FEATURES, NORMED_FEATURES, SEGMENT, exit_feature, normed_exit_feature
from specee_compile.passes.analysis import find_decoder
from specee_compile.passes.conditions import Broken, Unmet, graph_output_names
from specee_compile.passes.insert_predictors import constant, rms_normalized

PREFIX = "specee.fuse."  # initializer names (the quantizer leaves specee.* weights fp32)
EXIT_FEATURE = "exit_feature."


@dataclasses.dataclass
class FuseDraftInputPass(ir.passes.InPlacePass):
    """Make ``features`` and every ``exit_feature`` the fusion draft's input."""

    layers: tuple[int, int] = (0, 0)  # (low, mid): calibrate.draft.fusion_layers
    weight: np.ndarray | None = dataclasses.field(default=None, repr=False)  # [d, 3d]: the draft's fuse.weight
    per_node: bool = False  # exit features [S, d], one per tree node
    name: str = "fuse_draft_input"
    fired: dict[str, int] = dataclasses.field(default_factory=dict)

    def requires(self, model: ir.Model) -> None:
        dec = find_decoder(model, self.name, Unmet)
        if self.weight is None:
            raise Unmet(f"{self.name}: no fusion weights; it runs with a fusion draft's (calibrate.draft).")
        d = dec.norm_weight.shape[0]
        if tuple(self.weight.shape) != (d, 3 * d):
            raise Unmet(f"{self.name}: the fusion weight is {tuple(self.weight.shape)}, the model needs "
                        f"({d}, {3 * d}); it belongs to a draft of another model.")
        if not all(0 <= j < dec.num_layers for j in self.layers):
            raise Unmet(f"{self.name}: layers {self.layers} are not all among the graph's {dec.num_layers}.")
        if FEATURES not in graph_output_names(model):
            raise Unmet(f"{self.name}: the graph has no '{FEATURES}' output.")
        if f"{PREFIX}low" in model.graph.initializers:
            raise Unmet(f"{self.name}: the graph's draft input is fused already; run it once.")

    def ensures(self, model: ir.Model) -> None:
        outputs = graph_output_names(model)
        if FEATURES not in outputs or f"{PREFIX}low" not in model.graph.initializers:
            raise Broken(f"{self.name}: the graph lacks the fused '{FEATURES}' output.")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        dec = find_decoder(model, self.name)
        graph = model.graph
        d = dec.norm_weight.shape[0]
        w = np.asarray(self.weight, np.float32)
        slots = {"low": np.ascontiguousarray(w[:, :d].T), "mid": np.ascontiguousarray(w[:, d:2 * d].T),
                 "top": np.ascontiguousarray(w[:, 2 * d:].T)}  # x @ slot: the Linear's x @ W.T, one third each
        tape = ir.tape.Tape(graph)
        mats = {k: tape.initializer(ir.tensor(v), name=f"{PREFIX}{k}") for k, v in slots.items()}
        low, mid = self.layers
        normed = {j: tape.op("Mul", [rms_normalized(tape, dec, dec.layer_outputs[j]), dec.norm_weight])
                  for j in sorted({low, mid})}
        for j, v in normed.items():
            v.name = f"{PREFIX}normed.{j}"  # may cross a cut (segments): a stable name for the manifest
        partial = tape.op("Add", [tape.op("MatMul", [normed[low], mats["low"]]),
                                  tape.op("MatMul", [normed[mid], mats["mid"]])])  # [1, S, d]
        partial.name = f"{PREFIX}partial"
        self._replace(graph, FEATURES, NORMED_FEATURES,
                      lambda top: tape.op("Add", [partial, tape.op("MatMul", [top, mats["top"]])]))
        exits = sorted(int(v.name[len(EXIT_FEATURE):]) for v in graph.outputs
                       if (v.name or "").startswith(EXIT_FEATURE))
        for i in exits:
            start = len(tape.nodes)
            deeper = [k for k, j in (("low", low), ("mid", mid)) if j > i]  # slots the exit's own feature fills
            if deeper:
                m = slots["top"] + sum(slots[k] for k in deeper)
                own = tape.initializer(ir.tensor(np.ascontiguousarray(m)), name=f"{PREFIX}exit.{i}")
                known = [tape.op("MatMul", [self._rows(tape, normed[j], d), mats[k]])
                         for k, j in (("low", low), ("mid", mid)) if k not in deeper]
            else:
                own, known = mats["top"], [self._rows(tape, partial, d)]
            self._replace(graph, exit_feature(i), normed_exit_feature(i),
                          lambda top: _sum(tape, [*known, tape.op("MatMul", [top, own])]))
            for new in tape.nodes[start:]:
                new.metadata_props[SEGMENT] = str(i)
        graph.sort()
        self.fired = {"features": 1, "exit_features": len(exits)}
        return ir.passes.PassResult(model, modified=True)

    def _rows(self, tape: ir.tape.Tape, v: ir.Value, d: int) -> ir.Value:
        """[1, S, d] -> the rows an exit feature has: the last position [1, d], or every node [S, d]."""
        if self.per_node:
            return tape.op("Reshape", [v, constant(tape, np.array([-1, d], np.int64))])
        return tape.op("Gather", [v, constant(tape, np.array(-1, np.int64))], {"axis": 1})

    @staticmethod
    def _replace(graph: ir.Graph, name: str, normed: str, fused) -> None:
        """Graph output ``name`` becomes ``fused(old)``; the old value is output ``normed`` next to it."""
        k = next(k for k, v in enumerate(graph.outputs) if v.name == name)
        old = graph.outputs[k]
        old.name = normed
        new = fused(old)
        new.name = name
        graph.outputs[k] = new
        graph.outputs.insert(k + 1, old)


def _sum(tape: ir.tape.Tape, values: list[ir.Value]) -> ir.Value:
    out = values[0]
    for v in values[1:]:
        out = tape.op("Add", [out, v])
    return out
