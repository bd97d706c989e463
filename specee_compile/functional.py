"""Functional pieces of a Llama-layout decoder layer, shared by the export, the draft and
the eager reference decoder. They use a Hugging Face layer's own submodules for weights.

Shapes: h [B, S, d]; keys/values [B, KVH, T, D]; cos/sin tables [positions, D/2].
"""

from __future__ import annotations

import torch
from torch import nn


def rope_tables(rotary_emb: nn.Module, n: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of positions 0..n-1, first half of the rotate_half layout: [n, D/2] each."""
    positions = torch.arange(n)[None, :]
    with torch.no_grad():
        cos, sin = rotary_emb(torch.zeros(1, dtype=torch.float32), positions)  # [1, n, D]
    half = head_dim // 2
    return cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, D] by cos/sin [S, D/2] (non-interleaved, as Hugging Face Llama)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attention(q, keys, values, query_positions, key_valid=None, scale=None, first_key_position=0, mask=None):
    """Causal GQA attention. q [B, H, S, D]; keys/values [B, KVH, T, D] at positions
    first_key_position .. first_key_position+T-1.

    ``key_valid`` [T] (bool) hides keys that were never computed (skipped layers); ``mask``
    [S, T] (bool), when given, says which keys each query sees instead of causality.
    """
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    if mask is None:
        key_positions = first_key_position + torch.arange(keys.shape[2])
        mask = key_positions[None, :] <= query_positions[:, None]  # [S, T]
    if key_valid is not None:
        mask = mask & key_valid[None, :]
    return nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def key_value(layer: nn.Module, h: torch.Tensor, positions, cos, sin, kv_heads: int):
    """The K/V that ``layer`` writes for hidden states h [B, S, d] at ``positions`` [S]."""
    attn = layer.self_attn
    b, s, _ = h.shape
    x = layer.input_layernorm(h)
    d = attn.head_dim
    k = attn.k_proj(x).view(b, s, kv_heads, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, kv_heads, d).transpose(1, 2)
    return apply_rope(k, cos[positions], sin[positions]), v


def layer_step(layer, h, past_k, past_v, positions, cos, sin, num_heads, kv_heads, key_valid=None, mask=None):
    """One decoder layer over new positions. Returns (h_out, keys, values) with the new K/V
    appended to ``past_k``/``past_v`` ([B, KVH, P, D]: the P positions before positions[0];
    a cache need not start at position 0, the draft's starts at 1). ``mask`` [S, P + S]
    replaces the causal mask (see ``attention``)."""
    attn = layer.self_attn
    b, s, _ = h.shape
    d = attn.head_dim
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(b, s, num_heads, d).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, kv_heads, d).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, kv_heads, d).transpose(1, 2)
    q = apply_rope(q, cos[positions], sin[positions])
    k = apply_rope(k, cos[positions], sin[positions])
    keys = torch.cat([past_k, k], dim=2)
    values = torch.cat([past_v, v], dim=2)
    first = (int(positions[0]) if len(positions) else past_k.shape[2]) - past_k.shape[2]  # no queries: any
    out = attention(q, keys, values, positions, key_valid, scale=attn.scaling, first_key_position=first, mask=mask)
    h = h + attn.o_proj(out.transpose(1, 2).reshape(b, s, num_heads * d))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, keys, values
