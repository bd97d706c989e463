"""Weights the runtimes use outside the graphs: what K/V state propagation needs per layer."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from specee_compile.architecture import Architecture

PROBE = 1000.0  # a constant vector of this value has RMS PROBE; RMSNorm maps it to its weight (to fp32 rounding)


@torch.no_grad()
def kv_fill(hf_model: nn.Module, capacity: int) -> dict[str, np.ndarray]:
    """Per layer j:

    - ``{j}.norm``: the input RMSNorm's weight as it multiplies (Gemma's ``1 + weight``); absent
      when the layer has no input norm (OLMo 2);
    - ``{j}.k``, ``{j}.v``: the K and V projections (``{j}.k_bias``, ``{j}.v_bias`` where they
      have one), cut from a fused projection where the family has one (Phi-3);
    - ``{j}.k_norm``: the key norm's weight where there is one, [D] per head or [KVH*D] over the
      whole projection;
    - ``{j}.rope`` [1] int64: the layer's RoPE table, 0 for ``cos``/``sin``, i for
      ``cos.{i}``/``sin.{i}``, -1 for none;

    and the RoPE tables [capacity, R/2]."""
    arch = Architecture(hf_model)
    names = arch.table_names
    widths = [arch.num_heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.kv_heads * arch.head_dim]
    out = {}
    for j, spec in enumerate(arch.specs(capacity)):
        attn = spec.layer.self_attn
        norm = getattr(spec.layer, "input_layernorm", None)
        if norm is not None:
            out[f"{j}.norm"] = _weight(norm, hf_model.config.hidden_size)
        fused = getattr(attn, "qkv_proj", None)
        for kind, index in (("k", 1), ("v", 2)):
            linear = getattr(attn, f"{kind}_proj", None)
            weight, bias = (fused.weight.split(widths)[index], None if fused.bias is None else
                            fused.bias.split(widths)[index]) if fused is not None else (linear.weight, linear.bias)
            out[f"{j}.{kind}"] = weight.numpy().copy()
            if bias is not None:
                out[f"{j}.{kind}_bias"] = bias.numpy().copy()
        k_norm = getattr(attn, "k_norm", None)
        if k_norm is not None:
            out[f"{j}.k_norm"] = _weight(k_norm, k_norm.weight.numel())
        rope = spec.attention.rope
        out[f"{j}.rope"] = np.array([names.index(rope) if rope is not None else -1], np.int64)
    for i, name in enumerate(names):
        cos, sin = arch.table(name, capacity)
        suffix = "" if i == 0 else f".{i}"
        out[f"cos{suffix}"], out[f"sin{suffix}"] = cos.numpy().copy(), sin.numpy().copy()
    return out


def _weight(norm: nn.Module, width: int) -> np.ndarray:
    """What an RMSNorm multiplies the normalized input by, read by running it (Gemma's norms add 1
    to their stored weight)."""
    return norm(torch.full((1, width), PROBE))[0].float().numpy().copy()


def rms_eps(hf_model: nn.Module) -> float:
    """The epsilon of the model's RMS norms (what propagation normalizes with)."""
    return float(getattr(hf_model.config, "rms_norm_eps", 1e-6))
