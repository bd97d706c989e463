"""One pass pipeline per graph family: what ``specee-compile`` runs, lists and skips.

    family         graphs                                   default passes (O1, ONNX Runtime)
    step           model.onnx                               fuse_ort_transformers
    decode         the SpecEE decode step, before the cut   insert_predictors, insert_early_exit,
                                                            fuse_draft_gathers
    segments       each graph cut from ``decode``           fuse_ort_transformers
    draft          the draft head's step                    (none)
    tree           the tree verification step               fuse_ort_transformers
    tree_decode    the tree step with per-node exits        the SpecEE passes, per node
    tree_segments  each graph cut from ``tree_decode``      fuse_ort_transformers
    draft_tree     the draft over a token tree              (none)

With a fusion draft (EAGLE-3's multi-layer input) the step, decode, tree and tree_decode
graphs also end their "specee" phase with ``fuse_draft_input``: their features become the
draft's fused input (a listing without a calibration shows it; a plan for an unfused
draft leaves it out).

With ``--quant`` every family whose graphs the bundle holds (all but ``decode`` and
``tree_decode``, which are cut first) ends with ``quantize_weights`` (phase "quantize").

Fusions run after the cut: ONNX Runtime's skip-norm fusion merges a layer's residual add
into the next layer's norm, and the cut and the exits need every layer's output as is.
``--skip-pass NAME`` skips a pass in every family that has it, ``--skip-pass FAMILY:NAME``
in that family only; ``--dump-ir DIR`` writes ``DIR/FAMILY/NN-PHASE.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from specee_compile.contract import FAMILIES
from specee_compile.errors import PassError
from specee_compile.passes.fuse_draft_gathers import FuseDraftGathersPass
from specee_compile.passes.fuse_draft_input import FuseDraftInputPass
from specee_compile.passes.fuse_ort_transformers import FuseOrtTransformersPass
from specee_compile.passes.insert_early_exit import InsertEarlyExitPass
from specee_compile.passes.insert_predictors import InsertPredictorsPass
from specee_compile.passes.pipeline import Pipeline, summary
from specee_compile.passes.quantize_weights import QuantizeWeightsPass


@dataclass(frozen=True)
class ExitWeights:
    """What the SpecEE passes insert, from a calibration: predictors after ``layers`` and the
    exit rule's check (``vocab_map``: the draft's reduced vocabulary, for rule "reduced")."""

    layers: tuple[int, ...]
    rule: str
    predictors: dict[str, np.ndarray]  # w1 [L, 12, H], b1 [L, H], w2 [L, H], b2 [L]
    vocab_map: np.ndarray | None
    fusion: tuple[tuple[int, int], np.ndarray] | None = None  # a fusion draft's (low, mid) layers and fuse weight


class PassPlan:
    """The pipeline of every graph family a compile emits (see the module docstring)."""

    def __init__(self, pipelines: dict[str, Pipeline], exits: ExitWeights | None = None):
        unknown = [f for f in pipelines if f not in FAMILIES]
        if unknown:
            raise PassError(f"unknown graph famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; the families are: "
                            f"{', '.join(FAMILIES)}.")
        self.pipelines = dict(pipelines)
        self.exits = exits  # the predictors the SpecEE passes insert; the cut follows their layers

    def __getitem__(self, family: str) -> Pipeline:
        if family not in self.pipelines:
            raise PassError(f"this compile has no graph family '{family}'; its families are: "
                            f"{', '.join(self.pipelines)}.")
        return self.pipelines[family]

    def __contains__(self, family: str) -> bool:
        return family in self.pipelines

    def names(self) -> list[str]:
        """Every pass as FAMILY:NAME."""
        return [f"{family}:{name}" for family, p in self.pipelines.items() for name in p.names()]

    def check_skip(self, skip: tuple[str, ...]) -> None:
        """Every NAME or FAMILY:NAME in ``skip`` must name a pass of this plan."""
        known = set(self.names()) | {q.split(":", 1)[1] for q in self.names()}
        unknown = [s for s in skip if s not in known]
        if unknown:
            plain = sorted({q.split(":", 1)[1] for q in self.names()})
            example = self.names()[0] if self.names() else "step:NAME"
            raise PassError(f"cannot skip unknown pass(es) {unknown}; the passes are: {', '.join(plain) or 'none'} "
                            f"(FAMILY:NAME skips one family's, e.g. {example}).")

    def run(self, family: str, model: ir.Model, skip: tuple[str, ...] = (), dump_dir: Path | None = None,
            part: int | None = None) -> tuple[ir.Model, list[dict]]:
        """Run ``family``'s pipeline on ``model`` (``part``: which cut graph of the family)."""
        mine = tuple(s.split(":", 1)[1] if ":" in s else s for s in skip
                     if ":" not in s or s.split(":", 1)[0] == family)
        where = {"graph": family} if part is None else {"graph": family, "part": part}
        if dump_dir is not None:
            dump_dir = Path(dump_dir) / family / (f"{part:02d}" if part is not None else "")
        model, log = self[family].run(model, skip=mine, dump_dir=dump_dir, strict=False)
        return model, [{**where, **entry} for entry in log]

    def describe(self) -> str:
        """Every family with its description, then its passes by phase (non-empty phases only)."""
        lines = []
        for family, pipeline in self.pipelines.items():
            lines.append(f"{family}: {FAMILIES[family]}")
            phases = [(phase, passes) for phase, passes in pipeline.phases.items() if passes]
            for phase, passes in phases:
                lines.append(f"  {phase}:")
                lines += [f"    {p.name}  {summary(p)}" for p in passes]
            if not phases:
                lines.append("  (no passes)")
        return "\n".join(lines)


def default_plan(opt_level: str = "O1", target: str = "ort", specee: bool = False, tree: bool = False,
                 exit_mode: str = "segments", exits: ExitWeights | None = None, quant=None,
                 kept=None, draft_quant: dict | None = None) -> PassPlan:
    """The passes ``specee-compile`` runs for these options.

    ``exits`` carries the calibrated predictors; without it the SpecEE passes are listed
    but hold no weights (``--list-passes``: running them fails their precondition). The
    ONNX Runtime fusions emit ``com.microsoft`` ops, so graphs for TensorRT leave them out.
    ``quant`` (a :class:`specee_compile.quant.QuantSpec`) adds the weight quantization, with
    ``kept`` (:class:`specee_compile.quant.KeptBlocks`) the GGUF whose blocks ``gguf`` keeps;
    graphs for TensorRT take it as blocked DequantizeLinear instead of ``MatMulNBits``.
    ``draft_quant`` maps a draft family ("draft", "draft_tree") to its own QuantSpec (default:
    ``quant``).
    """
    fused = opt_level != "O0" and target == "ort"

    def fusions() -> Pipeline:
        return Pipeline({"optimize": [FuseOrtTransformersPass()] if fused else []})

    plan = {"step": fusions()}
    if specee:
        plan.update(decode=specee_pipeline(exits), segments=fusions(), draft=Pipeline())
        if tree:
            plan["tree"] = fusions()
            if exit_mode == "segments":  # early exit inside tree verification
                plan.update(tree_decode=specee_pipeline(exits, per_node=True), tree_segments=fusions())
            plan["draft_tree"] = Pipeline()
        if exits is None or exits.fusion is not None:  # listed without weights, like the SpecEE passes
            layers, weight = exits.fusion if exits is not None else ((0, 0), None)
            for family in ("step", "decode", "tree", "tree_decode"):
                if family in plan:
                    plan[family].append("specee", FuseDraftInputPass(layers, weight, per_node=family == "tree_decode"))
    for family, pipeline in plan.items():
        spec = (draft_quant or {}).get(family, quant)
        if spec is not None and spec.active and family not in ("decode", "tree_decode"):
            pipeline.append("quantize", QuantizeWeightsPass(spec, kept, qdq=target == "trt"))
    return PassPlan(plan, exits)


def specee_pipeline(exits: ExitWeights | None, per_node: bool = False) -> Pipeline:
    """The SpecEE passes; ``per_node`` for the tree verification graph (a decision per node)."""
    if exits is None:
        predictors, exit_ = InsertPredictorsPass(per_node=per_node), InsertEarlyExitPass(per_node=per_node)
    else:
        predictors = InsertPredictorsPass(layers=exits.layers, per_node=per_node, **exits.predictors)
        exit_ = InsertEarlyExitPass(rule=exits.rule, vocab_map=exits.vocab_map, per_node=per_node)
    return Pipeline({"specee": [predictors, exit_, FuseDraftGathersPass()]})
