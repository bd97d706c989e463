"""State propagation: the K/V a skipped layer would have written, from the exit hidden state.

One function for numpy (ONNX Runtime backend) and torch (TensorRT backend, on the device),
the same operations in the same order; the nested exit graph (lower/exit_graph.py) builds
the same math in ONNX. The tensors are ``export.weights.kv_fill``'s.
"""

from __future__ import annotations

from specee_compile.contract import rope_table


def rope_rows(kv: dict, j: int, position: int):
    """cos/sin rows [R/2] of layer j's RoPE table at ``position``; (None, None) for a layer without RoPE."""
    suffix = rope_table(kv, j)
    return (None, None) if suffix is None else (kv[f"cos{suffix}"][position], kv[f"sin{suffix}"][position])


def propagated_kv(xp, kv: dict, j: int, h, cos, sin, eps: float, kv_heads: int):
    """Layer j's K (after its key norm and RoPE) and V, each [kv_heads, D], for the exit hidden
    state h [d].

    ``xp`` is numpy or torch, ``kv`` the kv_fill tensors as its arrays, ``cos``/``sin`` the rows
    [R/2] of the layer's RoPE table at the position (``rope_rows``; None: no RoPE). The same
    operations in the same order for both.
    """
    x = h / xp.sqrt((h * h).mean(-1) + eps) * kv[f"{j}.norm"] if f"{j}.norm" in kv else h
    k = x @ kv[f"{j}.k"].T + kv.get(f"{j}.k_bias", 0.0)
    v = x @ kv[f"{j}.v"].T + kv.get(f"{j}.v_bias", 0.0)
    k = k.reshape(kv_heads, -1)
    if f"{j}.k_norm" in kv:
        w = kv[f"{j}.k_norm"]
        rows = k if w.shape[0] == k.shape[1] else k.reshape(1, -1)  # per head, or the whole projection
        k = (rows / xp.sqrt((rows * rows).mean(-1)[:, None] + eps) * w).reshape(kv_heads, -1)
    if cos is not None:
        half = cos.shape[0]
        k1, k2, rest = k[:, :half], k[:, half:2 * half], k[:, 2 * half:]
        k = xp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin, rest], axis=1)
    return k, v.reshape(kv_heads, -1)
