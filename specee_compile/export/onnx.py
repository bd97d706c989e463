"""The one call into torch.onnx's dynamo exporter that every graph family goes through."""

from __future__ import annotations

import warnings

import onnx_ir as ir
import torch
from torch import nn

from specee_compile.attention import TRANSLATIONS
from specee_compile.errors import ExportError

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
            program = torch.onnx.export(
                module.eval(), args, dynamo=True, opset_version=OPSET, input_names=inputs, output_names=outputs,
                dynamic_shapes=dynamic, custom_translation_table=TRANSLATIONS[target], optimize=True, verbose=False,
            )
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(f"torch.onnx.export failed on {what}: {type(e).__name__}: {first_line}. "
                          "Run with -v for the exporter's full report.") from e
    return program.model
