"""Graph passes over the ONNX in-memory IR (``onnx_ir``), and the pipelines that run them.

Every pass follows the ``onnx_ir`` pass contract: an object with ``call(model) ->
PassResult(model, modified)``, in-place or functional, with ``requires``/``ensures`` for its
preconditions; a snake_case ``name`` identifies it to the pipeline and the CLI
(``--list-passes``, ``--skip-pass NAME``). A :class:`Pipeline` (phases of passes) is a pass
too; a :class:`PassPlan` holds one pipeline per graph family (:mod:`.plan`).
"""

from __future__ import annotations

from specee_compile.passes.fuse_draft_gathers import FuseDraftGathersPass
from specee_compile.passes.fuse_ort_transformers import FuseOrtTransformersPass
from specee_compile.passes.insert_early_exit import InsertEarlyExitPass
from specee_compile.passes.insert_predictors import InsertPredictorsPass
from specee_compile.passes.pipeline import PHASES, Pipeline
from specee_compile.passes.plan import ExitWeights, PassPlan, default_plan, specee_pipeline

__all__ = ["PHASES", "ExitWeights", "FuseDraftGathersPass", "FuseOrtTransformersPass", "InsertEarlyExitPass",
           "InsertPredictorsPass", "PassPlan", "Pipeline", "default_pipeline", "default_plan", "specee_pipeline"]


def default_pipeline(opt_level: str = "O1", target: str = "ort") -> Pipeline:
    """The ``step`` family's pipeline at an optimization level for a graph target."""
    return default_plan(opt_level, target)["step"]
