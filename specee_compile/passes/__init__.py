"""Graph passes over the ONNX in-memory IR (``onnx_ir``), and the pipeline that runs them.

Every pass follows the ``onnx_ir`` pass contract: an object with ``call(model) ->
PassResult(model, modified)``; a snake_case ``name`` identifies it to the pipeline and the
CLI (``--list-passes``, ``--skip-pass NAME``).
"""

from __future__ import annotations

from specee_compile.passes.fuse_ort_transformers import FuseOrtTransformersPass
from specee_compile.passes.pipeline import PHASES, Pipeline

__all__ = ["PHASES", "FuseOrtTransformersPass", "Pipeline", "default_pipeline"]


def default_pipeline(opt_level: str = "O1", target: str = "ort") -> Pipeline:
    """The passes ``specee-compile`` runs at an optimization level for a graph target.

    The ONNX Runtime fusions emit ``com.microsoft`` ops, so graphs for TensorRT
    (``target="trt"``) leave them out.
    """
    pipeline = Pipeline()
    if opt_level != "O0" and target == "ort":
        pipeline.append("optimize", FuseOrtTransformersPass())
    return pipeline
