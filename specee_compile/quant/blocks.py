"""Block-quantized weights in ONNX Runtime's ``MatMulNBits`` layout, from a GGUF's own blocks or
from ONNX Runtime's block quantizer.

A weight is held as its N output rows of K inputs, cut into blocks of ``block_size`` along K:

    data         uint8 [N, K/block, block*bits/8]   element 2i in the low nibble of byte i (4 bits)
    scales       float32 [N, K/block]
    zero_points  uint8 [N, K/block] (unpacked), or None: the op's default 2^(bits-1)
    mins         float32 [N, K/block], or None      (GGUF Q4_1: value = q * scale + min)

and dequantizes to ``(q - zero_point) * scale (+ min)``. ``MatMulNBits`` has no per-block
minimum: a weight with ``mins`` runs with zero point 0, and the graph adds the block sums of
the input times the minimums (``blocksum(A) @ mins.T``), which is the same product.

GGUF formats kept exactly (``KEPT``): Q4_0 (d * (q - 8)), Q8_0 (d * q, q signed) and Q4_1
(d * q + m), each block 32 values with fp16 d and m.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GGUF_BLOCK = 32
KEPT = ("Q4_0", "Q4_1", "Q8_0")


@dataclass(frozen=True)
class Blocks:
    bits: int
    block_size: int
    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None
    mins: np.ndarray | None = None
    origin: str = ""  # "Q4_1" for kept GGUF blocks, "int4"/"int8" for ONNX Runtime's quantizer

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight as rows."""
        n, k_blocks, _ = self.data.shape
        return n, k_blocks * self.block_size

    def values(self) -> np.ndarray:
        """The integer values q, uint8 [N, K]."""
        n, k = self.shape
        if self.bits == 8:
            return self.data.reshape(n, k)
        q = np.empty((n, k), np.uint8)
        flat = self.data.reshape(n, k // 2)
        q[:, 0::2], q[:, 1::2] = flat & 0x0F, flat >> 4
        return q

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], computed as the GGUF reference does for kept blocks: d * q (+ m)."""
        n, k = self.shape
        q = self.values().reshape(n, k // self.block_size, self.block_size).astype(np.float32)
        zp = np.float32(1 << (self.bits - 1)) if self.zero_points is None else self.zero_points[..., None]
        d = self.scales[..., None]
        if self.mins is not None:
            return ((d * (q - zp)) + self.mins[..., None]).reshape(n, k)
        return (d * (q - zp)).reshape(n, k)

    def kernel_form(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(zero points, minimums) the graph computes with. Minimums at zero point 0 move to the
        op's default zero point when that is exact: d * q + m = d * (q - 8) + (m + 8d), and
        symmetric blocks run on ONNX Runtime's faster kernel. (m + 8d must be a float32 exactly;
        else the zero point stays 0.)"""
        if self.mins is None or self.zero_points is None or self.zero_points.any():
            return self.zero_points, self.mins
        shifted = self.mins.astype(np.float64) + (1 << (self.bits - 1)) * self.scales.astype(np.float64)
        if np.array_equal(shifted.astype(np.float32).astype(np.float64), shifted):
            return None, shifted.astype(np.float32)
        return self.zero_points, self.mins

    def packed_zero_points(self, zp: np.ndarray | None = None) -> np.ndarray | None:
        """Zero points (``self``'s, or ``zp``) as ``MatMulNBits`` takes them: uint8 [N, ceil(K/block * bits / 8)]."""
        zp = self.zero_points if zp is None else zp
        if zp is None or self.bits == 8:
            return zp
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return zp[:, 0::2] | (zp[:, 1::2] << 4)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.scales, self.zero_points, self.mins) if a is not None)


def from_gguf(raw: np.ndarray, qtype: str) -> Blocks:
    """A GGUF tensor's rows (uint8 [N, bytes per row], as ``gguf.GGUFReader`` holds them) as Blocks."""
    if qtype not in KEPT:
        raise ValueError(f"GGUF format {qtype} has no exact MatMulNBits form; kept formats are {KEPT}")
    n = raw.shape[0]
    head = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}[qtype]
    block_bytes = head + (GGUF_BLOCK if qtype == "Q8_0" else GGUF_BLOCK // 2)
    blocks = np.ascontiguousarray(raw).reshape(n, -1, block_bytes)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if qtype == "Q4_1" else None
    qs = blocks[..., head:]
    if qtype == "Q8_0":  # signed q -> q + 128 with the default zero point 128
        data = (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(8, GGUF_BLOCK, data, scales, origin=qtype)
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # GGUF: byte j holds values j and j + 16
    data = values[..., 0::2] | (values[..., 1::2] << 4)
    zero = np.zeros(scales.shape, np.uint8) if qtype == "Q4_1" else None  # Q4_0: the default zero point 8
    return Blocks(4, GGUF_BLOCK, data, scales, zero, mins, origin=qtype)


def quantize(rows: np.ndarray, bits: int, block_size: int, symmetric: bool) -> Blocks:
    """ONNX Runtime's own block quantizer (round to nearest, per block) on float rows [N, K]."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=symmetric, bits=bits))
    data, scales, zp = quantizer.qbits_block_quant(np.ascontiguousarray(rows.T, dtype=np.float32))  # takes [K, N]
    n, k_blocks = scales.shape
    zero_points = None
    if not symmetric:
        zero_points = zp if bits == 8 else np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :k_blocks]
    return Blocks(bits, block_size, data, scales.astype(np.float32), zero_points, origin=f"int{bits}")
