"""Functional pieces of a decoder layer, shared by the export, the draft and the eager reference
decoder. They run a Hugging Face layer's own submodules through its :class:`LayerSpec`.

Shapes: h [B, S, d]; keys/values [B, KVH, T, D]; cos/sin tables [positions, R/2].
"""

from __future__ import annotations

import torch
from torch import nn

from specee_compile.architecture import Attention, LayerSpec


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, D] by cos/sin [S, R/2] (non-interleaved, as Hugging Face Llama); a table
    narrower than D/2 rotates the first R dimensions only (partial rotary)."""
    rotated = 2 * cos.shape[-1]
    if rotated < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)
    half = rotated // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def visible(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """[S, T] bool: causal, and within ``window`` (distance < window) when there is one."""
    distance = query_positions[:, None] - key_positions[None, :]
    ok = distance >= 0
    return ok if window is None else ok & (distance < window)


def attend(q, keys, values, mask: torch.Tensor, attention: Attention, bias: torch.Tensor | None = None):
    """Softmax attention of q [B, H, S, D] over keys/values [B, KVH, T, D] (grouped), ``mask`` [S, T]
    bool, ``bias`` added to the (soft-capped) scores."""
    if attention.softcap is None:  # grouped in the kernel: as fast as repeating the K/V per head is slow
        attn_mask = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
        return nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask,
                                                          scale=attention.scale, enable_gqa=True)
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = q @ keys.transpose(-1, -2) * attention.scale
    scores = torch.tanh(scores / attention.softcap) * attention.softcap
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ values


def attention(q, keys, values, query_positions, attention_spec: Attention, key_valid=None, first_key_position=0,
              mask=None):
    """Causal GQA attention. q [B, H, S, D]; keys/values [B, KVH, T, D] at positions
    first_key_position .. first_key_position+T-1.

    ``key_valid`` [T] (bool) hides keys that were never computed (skipped layers); ``mask``
    [S, T] (bool), when given, says which keys each query sees instead of causality and the window.
    """
    if mask is None:
        mask = visible(query_positions, first_key_position + torch.arange(keys.shape[2]), attention_spec.window)
    if key_valid is not None:
        mask = mask & key_valid[None, :]
    return attend(q, keys, values, mask, attention_spec)


def _heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """[B, S, n*D] -> [B, n, S, D]"""
    return x.unflatten(-1, (n, d)).transpose(1, 2)


def key_value(spec: LayerSpec, h: torch.Tensor, positions):
    """The K/V that a layer writes for hidden states h [B, S, d] at ``positions`` [S]."""
    _, k, v = spec.project(spec.input_norm(h))
    k = _heads(k, spec.kv_heads, spec.head_dim)
    if spec.rotary:
        k = apply_rope(k, spec.cos[positions], spec.sin[positions])
    return k, _heads(v, spec.kv_heads, spec.head_dim)


def layer_step(spec: LayerSpec, h, past_k, past_v, positions, key_valid=None, mask=None, kv_from=None):
    """One decoder layer over new positions. Returns (h_out, keys, values) with the new K/V
    appended to ``past_k``/``past_v`` ([B, KVH, P, D]: the P positions before positions[0];
    a cache need not start at position 0, the draft's starts at 1). ``mask`` [S, P + S]
    replaces the causal mask (see ``attention``). ``kv_from`` (which [S] bool, states [B, S, d]):
    the new positions ``which`` selects write the K/V of those states instead of their own
    (K/V propagated from an earlier layer's exit state)."""
    b, s, _ = h.shape
    q, k, v = spec.project(spec.input_norm(h))
    q = _heads(q, spec.num_heads, spec.head_dim)
    k = _heads(k, spec.kv_heads, spec.head_dim)
    if spec.rotary:
        q = apply_rope(q, spec.cos[positions], spec.sin[positions])
        k = apply_rope(k, spec.cos[positions], spec.sin[positions])
    v = _heads(v, spec.kv_heads, spec.head_dim)
    if kv_from is not None:  # only the selected positions' states are projected a second time
        which, states = kv_from
        picked = which.nonzero().squeeze(-1)
        other_k, other_v = key_value(spec, states[:, picked], positions[picked])
        k, v = k.index_copy(2, picked, other_k), v.index_copy(2, picked, other_v)
    keys = torch.cat([past_k, k], dim=2)
    values = torch.cat([past_v, v], dim=2)
    first = (int(positions[0]) if len(positions) else past_k.shape[2]) - past_k.shape[2]  # no queries: any
    out = attention(q, keys, values, positions, spec.attention, key_valid, first_key_position=first, mask=mask)
    h = spec.after_attention(h, out.transpose(1, 2).reshape(b, s, spec.num_heads * spec.head_dim))
    return spec.after_mlp(h), keys, values
