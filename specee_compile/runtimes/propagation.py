"""State propagation: the K/V a skipped layer would have written, from the exit hidden state.

One function for numpy (ONNX Runtime backend) and torch (TensorRT backend, on the device),
the same operations in the same order; the nested exit graph (lower/exit_graph.py) builds
the same math in ONNX.
"""

from __future__ import annotations


def propagated_kv(xp, kv: dict, j: int, h, cos, sin, eps: float, kv_heads: int):
    """Layer j's K (after RoPE) and V, each [kv_heads, D], for the exit hidden state h [d].

    ``xp`` is numpy or torch, ``kv`` the kv_fill tensors as its arrays, ``cos``/``sin`` the
    RoPE rows [D/2] of the position. The same operations in the same order for both.
    """
    x = h / xp.sqrt(xp.mean(h * h) + eps) * kv[f"{j}.norm"]
    k = x @ kv[f"{j}.k"].T + kv.get(f"{j}.k_bias", 0.0)
    v = x @ kv[f"{j}.v"].T + kv.get(f"{j}.v_bias", 0.0)
    k = k.reshape(kv_heads, -1)
    half = k.shape[1] // 2
    k1, k2 = k[:, :half], k[:, half:]
    k = xp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=1)
    return k, v.reshape(kv_heads, -1)
