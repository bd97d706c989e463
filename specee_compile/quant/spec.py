"""What ``--quant`` asks for: the weights' precision per role, the block size, the rounding and
the activation precision of ONNX Runtime's ``MatMulNBits``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from specee_compile.errors import ConfigError

PRECISIONS = ("fp32", "int8", "int4", "gguf")
ROLES = ("layers", "head", "embedding")
BITS = {"int4": 4, "int8": 8}
# MatMulNBits' accuracy_level: 0 (unset: the op's own, fp32 activations), 1 fp32, 2 fp16, 3 bf16,
# 4 int8 activations quantized per block at run time.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# A GGUF weight that no kept format holds is re-quantized at this precision.
GGUF_FALLBACK = {"layers": "int4", "head": "int8", "embedding": "int8"}


@dataclass(frozen=True)
class QuantSpec:
    """``weights`` for the decoder layers; ``head`` and ``embedding`` default to it ("" = as
    ``weights``); a tied embedding is quantized as the head, the product that costs."""

    weights: str = "fp32"
    head: str = ""
    embedding: str = ""
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4

    def __post_init__(self):
        for role, value in (("weights", self.weights), ("head", self.head), ("embedding", self.embedding)):
            if value and value not in PRECISIONS:
                flag = "--quant" if role == "weights" else f"--quant-{role}"
                raise ConfigError(f"{flag} {value!r} is unknown; choose one of {', '.join(PRECISIONS)}.")
        if "gguf" in (self.head, self.embedding) and self.weights != "gguf":
            raise ConfigError("--quant-head/--quant-embedding gguf keeps a GGUF's blocks, which needs --quant gguf for "
                              "the layers too; or pick int8/int4 for the head and embedding.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--quant-block {self.block_size} is not a power of two >= 16 (MatMulNBits' block "
                              "sizes); 32 is the default, 128 trades accuracy for smaller scales.")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"--accuracy-level {self.accuracy_level} is unknown; MatMulNBits takes "
                              f"{ACCURACY_LEVELS} (0: fp32 activations, 4: int8 activations).")

    def precision(self, role: str) -> str:
        """The precision a weight of ``role`` (one of ROLES) is stored at."""
        if role == "head":
            return self.head or self.weights
        if role == "embedding":
            return self.embedding or self.head or self.weights
        return self.weights

    @property
    def active(self) -> bool:
        return any(self.precision(r) != "fp32" for r in ROLES)

    def to_json(self) -> dict:
        return {**asdict(self), **{role: self.precision(role) for role in ("head", "embedding")}}
