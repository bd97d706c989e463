"""Weight quantization: what ``--quant`` asks for (:class:`QuantSpec`), blocks in ONNX Runtime's
``MatMulNBits`` layout (:mod:`.blocks`) and a GGUF's own blocks found for exported weights
(:class:`KeptBlocks`). The graph rewrite is ``passes.QuantizeWeightsPass``."""

from specee_compile.quant.blocks import KEPT, Blocks, from_gguf, quantize
from specee_compile.quant.gguf import KeptBlocks
from specee_compile.quant.spec import PRECISIONS, QuantSpec

__all__ = ["KEPT", "PRECISIONS", "Blocks", "KeptBlocks", "QuantSpec", "from_gguf", "quantize"]
