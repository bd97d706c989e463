"""The errors a pass's ``requires`` and ``ensures`` raise.

They are ``onnx_ir``'s precondition and postcondition errors, so ``PassBase`` passes them
through unchanged, and this package's ``PassError``, so the CLI prints their message (what
the graph lacks, which pass to run first) without a traceback.
"""

from __future__ import annotations

import onnx_ir as ir

from specee_compile.errors import PassError


class Unmet(PassError, ir.passes.PreconditionError):
    """A pass's precondition does not hold for the graph it was given."""


class Broken(PassError, ir.passes.PostconditionError):
    """A pass did not leave the graph in the state it promises."""


def graph_input(model: ir.Model, name: str) -> ir.Value | None:
    return next((v for v in model.graph.inputs if v.name == name), None)


def graph_output_names(model: ir.Model) -> set[str]:
    return {v.name for v in model.graph.outputs}
