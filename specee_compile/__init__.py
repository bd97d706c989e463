"""specee-compile: speculative early exiting (SpecEE) compiled into ONNX Runtime bundles."""

__version__ = "0.1.0"

from specee_compile.errors import SpecEEError  # noqa: E402

__all__ = ["SpecEEError", "__version__", "compile_model"]


def compile_model(config):
    """Compile a model into a bundle (see :class:`specee_compile.config.CompileConfig`)."""
    from specee_compile.compiler import compile as _compile

    return _compile(config)
