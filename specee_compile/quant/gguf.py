"""A GGUF's own blocks for the weights of an exported graph, found by content.

The exported graphs hold the fp32 weights transformers dequantized from the GGUF, but
transposed, concatenated (q, k and v in one product) and row-permuted (llama.cpp's q/k order),
with names the exporter chose. So the blocks are found by what the weights hold: every row of
every tensor in a kept format is dequantized the GGUF's way and indexed by its bytes; a graph
weight is kept when each of its rows is found in tensors of one format, and its blocks then
dequantize to the weight bit for bit (checked before they are used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from specee_compile.quant.blocks import KEPT, Blocks, from_gguf


@dataclass
class KeptBlocks:
    path: Path
    kept: dict[str, str] = field(default_factory=dict)  # GGUF tensor -> format, of every tensor a found weight used

    @cached_property
    def _matrices(self) -> list[tuple[str, str, np.ndarray]]:
        """(name, format, raw blocks) of every 2-D tensor of the GGUF."""
        from gguf import GGUFReader

        return [(t.name, t.tensor_type.name, np.asarray(t.data)) for t in GGUFReader(self.path).tensors
                if len(t.data.shape) == 2]

    @cached_property
    def _tensors(self) -> list[tuple[str, str, np.ndarray]]:
        return [m for m in self._matrices if m[1] in KEPT]

    @cached_property
    def _rows(self) -> dict[bytes, tuple[int, int]]:
        """Dequantized row bytes -> (tensor index, row)."""
        import gguf

        index: dict[bytes, tuple[int, int]] = {}
        for t, (_, qtype, raw) in enumerate(self._tensors):
            values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
            for r, row in enumerate(values):
                index.setdefault(row.tobytes(), (t, r))
        return index

    def not_kept(self) -> dict[str, str]:
        """The GGUF's matrices (tensor -> format) that no bundle weight was kept from: formats the
        bundle cannot hold exactly, or weights the graphs do not use as they are stored."""
        return {name: fmt for name, fmt, _ in self._matrices if name not in self.kept}

    def find(self, rows: np.ndarray) -> Blocks | None:
        """The GGUF's blocks of a weight given as float32 rows [N, K], or None when any row is
        not a GGUF row, the rows mix formats, or the blocks do not reproduce the rows exactly."""
        hits = [self._rows.get(np.ascontiguousarray(row, np.float32).tobytes()) for row in rows]
        if not hits or any(h is None for h in hits):
            return None
        qtypes = {self._tensors[t][1] for t, _ in hits}
        if len(qtypes) != 1:
            return None
        raw = np.stack([self._tensors[t][2][r] for t, r in hits])
        blocks = from_gguf(raw, qtypes.pop())
        if not np.array_equal(blocks.dequantize().view(np.uint32), np.asarray(rows, np.float32).view(np.uint32)):
            return None
        for t, _ in hits:
            self.kept.setdefault(self._tensors[t][0], self._tensors[t][1])
        return blocks
