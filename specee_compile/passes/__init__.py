"""Graph passes over the ONNX in-memory IR (``onnx_ir``), and the pipeline that runs them.

Every pass follows the ``onnx_ir`` pass contract: an object with ``call(model) ->
PassResult(model, modified)``; a snake_case ``name`` identifies it to the pipeline and CLI.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from specee_compile.errors import PassError
from specee_compile.passes.fuse_ort_transformers import FuseOrtTransformersPass

logger = logging.getLogger(__name__)

__all__ = ["FuseOrtTransformersPass", "run_passes"]


def run_passes(model: ir.Model, passes: list, skip: tuple[str, ...] = ()) -> tuple[ir.Model, list[dict]]:
    """Run passes in order, skipping names in ``skip``; return the model and a log per pass."""
    known = {p.name for p in passes}
    unknown = [s for s in skip if s not in known]
    if unknown:
        raise PassError(
            f"cannot skip unknown pass(es) {unknown}; the passes are: {', '.join(known) or 'none'}."
        )
    ran: list[str] = []
    log: list[dict] = []
    for p in passes:
        if p.name in skip:
            log.append({"pass": p.name, "skipped": True})
            continue
        try:
            result = p(model)
        except PassError:
            raise
        except Exception as e:
            raise PassError(
                f"pass '{p.name}' failed ({type(e).__name__}: {e}); passes that ran before it: "
                f"{', '.join(ran) or 'none'}. Skip it with --skip-pass {p.name} to compile without it."
            ) from e
        model = result.model
        ran.append(p.name)
        entry = {"pass": p.name, "modified": bool(result.modified)}
        if getattr(p, "fired", None):
            entry["fired"] = dict(p.fired)
        log.append(entry)
        logger.info("pass %s: modified=%s %s", p.name, result.modified, entry.get("fired", ""))
    return model, log
