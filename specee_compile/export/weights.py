"""Weights the runtimes use outside the graphs: what K/V state propagation needs per layer."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from specee_compile.functional import rope_tables


@torch.no_grad()
def kv_fill(hf_model: nn.Module, capacity: int) -> dict[str, np.ndarray]:
    """Per layer j the input norm weight (``{j}.norm``), the K and V projections (``{j}.k``,
    ``{j}.v``, and ``{j}.k_bias``, ``{j}.v_bias`` where they have one); the RoPE tables
    ``cos``, ``sin`` [capacity, D/2]."""
    out = {}
    for j, layer in enumerate(hf_model.model.layers):
        attn = layer.self_attn
        out[f"{j}.norm"] = layer.input_layernorm.weight.numpy().copy()
        out[f"{j}.k"] = attn.k_proj.weight.numpy().copy()
        out[f"{j}.v"] = attn.v_proj.weight.numpy().copy()
        if attn.k_proj.bias is not None:
            out[f"{j}.k_bias"] = attn.k_proj.bias.numpy().copy()
            out[f"{j}.v_bias"] = attn.v_proj.bias.numpy().copy()
    head_dim = hf_model.model.layers[0].self_attn.head_dim
    cos, sin = rope_tables(hf_model.model.rotary_emb, capacity, head_dim)
    out["cos"], out["sin"] = cos.numpy().copy(), sin.numpy().copy()
    return out


def rms_eps(hf_model: nn.Module) -> float:
    """The epsilon of the model's RMS norms (what propagation normalizes with)."""
    return float(getattr(hf_model.config, "rms_norm_eps", 1e-6))
