"""The attention kernel of the exported step, as one custom op with two lowerings.

``specee::cached_attention`` is grouped-query attention with RoPE over a preallocated KV
buffer: ``past_key`` is ``[B, kv_heads, capacity, head_dim]`` of which the first
``past_len`` positions are valid, and the op returns the buffer with the new positions
written at ``past_len .. past_len + S``. Keeping it one op through ``torch.export`` lets
the ONNX lowering choose the kernel:

- ONNX Runtime: ``com.microsoft.GroupQueryAttention`` with ``do_rotary=1``. When the
  runtime binds the same buffer as past input and present output, ORT writes the new
  K/V in place (shared-buffer mode), so a decode step never copies the cache.
- The eager implementation below defines the semantics; tests compare both against
  Hugging Face transformers.
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

from specee_compile.functional import apply_rope, attention


def _gqa_schema() -> OpSchema:
    """The part of ORT's GroupQueryAttention contract this project uses (onnx has no copy)."""
    param = OpSchema.FormalParameter
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k",
             "total_sequence_length", "cos_cache", "sin_cache"]
    types = ["T", "T", "T", "T", "T", "M", "M", "T", "T"]
    attrs = [("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
             ("scale", OpSchema.AttrType.FLOAT), ("do_rotary", OpSchema.AttrType.INT)]
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param(n, t, "", param_option=OpSchema.FormalParameterOption.Optional
                      if n in ("key", "value") else OpSchema.FormalParameterOption.Single)
                for n, t in zip(names, types)],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in attrs],
    )


GROUP_QUERY_ATTENTION = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())


@torch.library.custom_op("specee::cached_attention", mutates_args=())
def cached_attention(
    qkv: torch.Tensor,  # [B, S, (H + 2*KVH)*D]: packed q, k, v projections, before RoPE
    past_key: torch.Tensor,  # [B, KVH, CAP, D]
    past_value: torch.Tensor,  # [B, KVH, CAP, D]
    seqlens_k: torch.Tensor,  # [B] int32: past_len + S - 1
    total_length: torch.Tensor,  # [] int32: past_len + S
    cos_cache: torch.Tensor,  # [CAP, D/2]
    sin_cache: torch.Tensor,  # [CAP, D/2]
    num_heads: int,
    kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, _ = qkv.shape
    d = past_key.shape[-1]
    query, key, value = qkv.split([num_heads * d, kv_heads * d, kv_heads * d], dim=-1)
    total = int(total_length)
    past = total - s
    pos = torch.arange(past, total)
    q = apply_rope(query.view(b, s, num_heads, d).transpose(1, 2), cos_cache[pos], sin_cache[pos])
    k = apply_rope(key.view(b, s, kv_heads, d).transpose(1, 2), cos_cache[pos], sin_cache[pos])
    v = value.view(b, s, kv_heads, d).transpose(1, 2)
    present_key = past_key.clone()
    present_value = past_value.clone()
    present_key[:, :, past:total] = k
    present_value[:, :, past:total] = v
    out = attention(q, present_key[:, :, :total], present_value[:, :, :total], pos, scale=scale)  # [B, H, S, D]
    return out.transpose(1, 2).reshape(b, s, num_heads * d), present_key, present_value


@cached_attention.register_fake
def _(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
      num_heads, kv_heads, scale):
    out_shape = (*qkv.shape[:2], num_heads * past_key.shape[-1])
    return qkv.new_empty(out_shape), past_key.new_empty(past_key.shape), past_value.new_empty(
        past_value.shape
    )


def cached_attention_ort(qkv, past_key, past_value, seqlens_k, total_length,
                         cos_cache, sin_cache, num_heads: int, kv_heads: int, scale: float):
    """ONNX Runtime lowering: one GroupQueryAttention node, packed QKV, in-kernel RoPE."""
    return GROUP_QUERY_ATTENTION(
        qkv, None, None, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1,
    )


ORT_TRANSLATIONS = {torch.ops.specee.cached_attention.default: cached_attention_ort}
