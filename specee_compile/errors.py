"""One error hierarchy for everything a user can cause.

Every message says what failed, where, why, and what to do about it. The CLI prints
the message alone (exit code 1) unless ``-v`` is given.
"""

from __future__ import annotations

from safetensors import SafetensorError

# What a failed file write raises: OSError from Python and onnx, SafetensorError from
# safetensors' Rust writer (a full disk reads "... (os error 28)" there).
WRITE_ERRORS = (OSError, SafetensorError)


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` reports a full disk, whichever library's writer raised it."""
    return getattr(e, "errno", None) == 28 or "(os error 28)" in str(e) or "No space left on device" in str(e)


class SpecEEError(Exception):
    """Base class of every error a user can cause or fix."""


class ConfigError(SpecEEError):
    """A compile or run option is invalid."""


class ModelLoadError(SpecEEError):
    """The model path, its config or its weights cannot be used."""


class UnsupportedModelError(ModelLoadError):
    """The model is not a decoder-only causal LM of a supported family."""


class ResourceError(SpecEEError):
    """An offline resource (the built-in model, MT-Bench, ShareGPT) cannot be obtained."""


class ExportError(SpecEEError):
    """torch.export or the ONNX exporter failed on the model."""


class PassError(SpecEEError):
    """A graph pass failed or found the graph in a state it cannot handle."""


class BackendError(SpecEEError):
    """A lowering backend (ONNX Runtime, TensorRT) is unavailable or failed."""


class OutputError(SpecEEError):
    """The output path cannot be written as asked."""


class BundleError(SpecEEError):
    """A compiled bundle is missing, damaged, or from an incompatible version."""


class GenerationError(SpecEEError):
    """A generation request is invalid for the loaded engine."""
