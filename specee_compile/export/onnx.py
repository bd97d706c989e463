"""The one call into torch.onnx's dynamo exporter that every graph family goes through."""

from __future__ import annotations

import functools
import warnings

import onnx_ir as ir
import torch
from torch import nn

from specee_compile.attention import TRANSLATIONS
from specee_compile.errors import ExportError

try:  # torch.onnx.export's internals, to reuse its registry (see _registry)
    from torch.onnx._internal.exporter import _core, _registration
except ImportError:  # another torch: torch.onnx.export builds its registry every call
    _core = _registration = None

OPSET = 18


def to_onnx(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dynamic, target: str,
            what: str) -> ir.Model:
    """Export ``module(*args)`` with torch.export + the dynamo ONNX exporter to onnx_ir.

    ``target`` picks the attention lowering (see attention.py): "ort" emits ONNX Runtime's
    GroupQueryAttention, "trt" standard ONNX ops only (what TensorRT's parser takes).
    ``what`` names the graph in the error a failed export raises.
    """
    if target not in TRANSLATIONS:
        raise ExportError(f"graph target '{target}' is unknown; choose one of {sorted(TRANSLATIONS)}.")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            registry = _registry(target)
            if registry is not None:  # torch.onnx.export's own path, without rebuilding the registry
                program = _core.export(module.eval(), args, registry=registry, dynamic_shapes=dynamic,
                                       input_names=inputs, output_names=outputs, optimize=True, opset_version=OPSET,
                                       verbose=False)
            else:
                program = torch.onnx.export(
                    module.eval(), args, dynamo=True, opset_version=OPSET, input_names=inputs, output_names=outputs,
                    dynamic_shapes=dynamic, custom_translation_table=TRANSLATIONS[target], optimize=True,
                    verbose=False)
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(f"torch.onnx.export failed on {what}: {type(e).__name__}: {first_line}. "
                          "Run with -v for the exporter's full report.") from e
    return program.model


@functools.cache
def _registry(target: str):
    """The exporter's registry of ATen -> ONNX functions with ``target``'s attention translations,
    built once per process. ``torch.onnx.export(dynamo=True)`` builds it on every call (1-2 s
    here, a tenth of a tiny model's compile, for each of its three to five graphs) and then
    calls ``_core.export`` with it; this calls that with the cached one. None when this torch
    lacks those internals: the public call then does it all."""
    if _core is None or not hasattr(_registration.ONNXRegistry, "from_torchlib") or not hasattr(_core, "export"):
        return None
    registry = _registration.ONNXRegistry.from_torchlib(opset_version=OPSET)
    for op, function in TRANSLATIONS[target].items():
        registry.register_op(op, function, is_complex=False)
    return registry
