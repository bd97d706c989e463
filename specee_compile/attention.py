"""The attention kernel of the exported step, as one custom op with two lowerings.

``specee::cached_attention`` is grouped-query attention with RoPE over a preallocated KV
buffer: ``past_key`` is ``[B, kv_heads, capacity, head_dim]`` of which the first
``past_len`` positions are valid, and the op returns the buffer with the new positions
written at ``past_len .. past_len + S``. Keeping it one op through ``torch.export`` lets
the ONNX lowering choose the kernel:

- ONNX Runtime (``"ort"``): ``com.microsoft.GroupQueryAttention`` with ``do_rotary=1``.
  When the runtime binds the same buffer as past input and present output, ORT writes
  the new K/V in place (shared-buffer mode), so a decode step never copies the cache.
- Standard ONNX (``"trt"``), for TensorRT, whose ONNX parser takes only ``ai.onnx`` ops:
  RoPE from Gather/Slice/Mul/Sub/Add/Concat, the cache write as ``ScatterElements`` along
  the position axis at ``past_len .. past_len + S``, and softmax attention over the whole
  buffer with the positions after each query (and never written) masked out.
- The eager implementation below defines the semantics; tests compare both against
  Hugging Face transformers.
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from specee_compile.functional import apply_rope, attention


def _gqa_schema() -> OpSchema:
    """The part of ORT's GroupQueryAttention contract this project uses (onnx has no copy)."""
    param = OpSchema.FormalParameter
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k",
             "total_sequence_length", "cos_cache", "sin_cache", "position_ids", "attention_bias"]
    types = ["T", "T", "T", "T", "T", "M", "M", "T", "T", "P", "T"]
    attrs = [("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
             ("scale", OpSchema.AttrType.FLOAT), ("do_rotary", OpSchema.AttrType.INT)]
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param(n, t, "", param_option=OpSchema.FormalParameterOption.Optional
                      if n in ("key", "value", "position_ids", "attention_bias")
                      else OpSchema.FormalParameterOption.Single)
                for n, t in zip(names, types)],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], ""), ("P", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in attrs],
    )


GROUP_QUERY_ATTENTION = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())


def _rotate_and_write(qkv, past_key, past_value, positions, total: int, cos_cache, sin_cache, num_heads: int,
                      kv_heads: int):
    """Split packed QKV [B, S, ...], rotate q and k at ``positions`` [S], and return q [B, H, S, D]
    with copies of the caches holding the new K/V at rows total - S .. total - 1."""
    b, s, _ = qkv.shape
    d = past_key.shape[-1]
    query, key, value = qkv.split([num_heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = apply_rope(query.view(b, s, num_heads, d).transpose(1, 2), cos_cache[positions], sin_cache[positions])
    k = apply_rope(key.view(b, s, kv_heads, d).transpose(1, 2), cos_cache[positions], sin_cache[positions])
    present_key = past_key.clone()
    present_value = past_value.clone()
    present_key[:, :, total - s:total] = k
    present_value[:, :, total - s:total] = value.view(b, s, kv_heads, d).transpose(1, 2)
    return q, present_key, present_value


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
    total = int(total_length)
    pos = torch.arange(total - s, total)
    q, present_key, present_value = _rotate_and_write(qkv, past_key, past_value, pos, total, cos_cache, sin_cache,
                                                      num_heads, kv_heads)
    out = attention(q, present_key[:, :, :total], present_value[:, :, :total], pos, scale=scale)  # [B, H, S, D]
    return out.transpose(1, 2).reshape(b, s, -1), present_key, present_value


@cached_attention.register_fake
def _(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
      num_heads, kv_heads, scale):
    out_shape = (*qkv.shape[:2], num_heads * past_key.shape[-1])
    return qkv.new_empty(out_shape), past_key.new_empty(past_key.shape), past_value.new_empty(
        past_value.shape
    )


@torch.library.custom_op("specee::tree_attention", mutates_args=())
def tree_attention(
    qkv: torch.Tensor,  # [B, S, (H + 2*KVH)*D]: the S nodes of a token tree, parents before children
    past_key: torch.Tensor,  # [B, KVH, CAP, D]
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,  # [B] int32: past_len + S - 1
    total_length: torch.Tensor,  # [] int32: past_len + S
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    position_ids: torch.Tensor,  # [B, S] int64: each node's position (past_len + its depth)
    attention_bias: torch.Tensor,  # [B, 1, S, past_len + S]: 0 where a node may look, very negative elsewhere
    num_heads: int,
    kv_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cached_attention`` over a token tree. Node s is rotated at ``position_ids[0, s]``, its
    K/V lands in row past_len + s, and it attends to row t iff t <= past_len + s (causal by
    row, as GroupQueryAttention) with ``attention_bias[0, 0, s, t]`` added to the score: the
    runtime sets it very negative for the rows of nodes that are not its ancestors."""
    b, s, _ = qkv.shape
    total = int(total_length)
    past = total - s
    q, present_key, present_value = _rotate_and_write(qkv, past_key, past_value, position_ids[0], total, cos_cache,
                                                      sin_cache, num_heads, kv_heads)
    group = num_heads // kv_heads
    keys = present_key[:, :, :total].repeat_interleave(group, dim=1)
    values = present_value[:, :, :total].repeat_interleave(group, dim=1)
    causal = torch.arange(total)[None, :] <= (past + torch.arange(s))[:, None]  # [S, T]
    mask = attention_bias.masked_fill(~causal, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(b, s, -1), present_key, present_value


@tree_attention.register_fake
def _(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, position_ids, attention_bias,
      num_heads, kv_heads, scale):
    out_shape = (*qkv.shape[:2], num_heads * past_key.shape[-1])
    return qkv.new_empty(out_shape), past_key.new_empty(past_key.shape), past_value.new_empty(past_value.shape)


def tree_attention_ort(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
                       position_ids, attention_bias, num_heads: int, kv_heads: int, scale: float):
    """ONNX Runtime lowering: GroupQueryAttention with its ``position_ids`` (RoPE per node) and
    ``attention_bias`` (the tree mask) inputs."""
    return GROUP_QUERY_ATTENTION(
        qkv, None, None, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, position_ids,
        attention_bias, num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1,
    )


def cached_attention_ort(qkv, past_key, past_value, seqlens_k, total_length,
                         cos_cache, sin_cache, num_heads: int, kv_heads: int, scale: float):
    """ONNX Runtime lowering: one GroupQueryAttention node, packed QKV, in-kernel RoPE."""
    return GROUP_QUERY_ATTENTION(
        qkv, None, None, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1,
    )


def cached_attention_onnx(qkv, past_key, past_value, seqlens_k, total_length,
                          cos_cache, sin_cache, num_heads: int, kv_heads: int, scale: float):
    """Standard-ONNX lowering (ai.onnx opset 18 only): what TensorRT's ONNX parser takes.

    ``present`` is ``past`` with the new positions scattered in (a new tensor unless the
    runtime aliases the buffers). Query rows are grouped per KV head so the cache is never
    repeated: q [1, H, S, D] -> [1, KVH, G*S, D] against keys [1, KVH, CAP, D].
    """
    return _standard_attention(qkv, past_key, past_value, total_length, cos_cache, sin_cache, num_heads, kv_heads,
                               scale)


def tree_attention_onnx(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
                        position_ids, attention_bias, num_heads: int, kv_heads: int, scale: float):
    """Standard-ONNX lowering of ``tree_attention``: RoPE at ``position_ids``, the bias padded
    to the cache's capacity and added to the scores of ``cached_attention_onnx``."""
    return _standard_attention(qkv, past_key, past_value, total_length, cos_cache, sin_cache, num_heads, kv_heads,
                               scale, position_ids, attention_bias)


def _standard_attention(qkv, past_key, past_value, total_length, cos_cache, sin_cache, num_heads: int,
                        kv_heads: int, scale: float, position_ids=None, attention_bias=None):
    """The rows past_len .. total-1 take the new K/V; RoPE at those rows or ``position_ids``;
    key row t is visible to query s iff t <= past_len + s, with ``attention_bias`` added."""
    cap, d = past_key.shape[2], past_key.shape[3]  # static: the cache buffer [1, KVH, CAP, D]
    group = num_heads // kv_heads
    half = d // 2
    ints = lambda *v: op.Constant(value_ints=list(v))  # noqa: E731
    q_end, k_end = num_heads * d, (num_heads + kv_heads) * d
    query = op.Slice(qkv, ints(0), ints(q_end), ints(2))
    key = op.Slice(qkv, ints(q_end), ints(k_end), ints(2))
    value = op.Slice(qkv, ints(k_end), ints(k_end + kv_heads * d), ints(2))
    # positions past_len .. total-1, from the total length and the step's length S
    seq = op.Shape(qkv, start=1, end=2)  # [1]: S
    past = op.Sub(op.Cast(op.Reshape(total_length, ints(1)), to=7), seq)  # [1] int64
    positions = op.Add(op.Range(op.Constant(value_int=0), op.Squeeze(seq, ints(0)), op.Constant(value_int=1)), past)  # [S]
    rotated_at = positions if position_ids is None else op.Reshape(position_ids, ints(-1))
    cos = op.Gather(cos_cache, rotated_at, axis=0)  # [S, D/2]
    sin = op.Gather(sin_cache, rotated_at, axis=0)

    def heads(x, n):  # [1, S, n*D] -> [1, n, S, D]
        return op.Transpose(op.Reshape(x, ints(0, -1, n, d)), perm=[0, 2, 1, 3])

    def rope(x):  # rotate_half layout, as Hugging Face Llama
        x1 = op.Slice(x, ints(0), ints(half), ints(3))
        x2 = op.Slice(x, ints(half), ints(d), ints(3))
        return op.Concat(op.Sub(op.Mul(x1, cos), op.Mul(x2, sin)), op.Add(op.Mul(x2, cos), op.Mul(x1, sin)), axis=-1)

    q = rope(heads(query, num_heads))  # [1, H, S, D]
    k = rope(heads(key, kv_heads))  # [1, KVH, S, D]
    v = heads(value, kv_heads)
    # the cache write: present[:, :, positions[s], :] = k[:, :, s, :]
    where = op.Expand(op.Reshape(positions, ints(1, 1, -1, 1)), op.Shape(k))  # [1, KVH, S, D]
    present_key = op.ScatterElements(past_key, where, k, axis=2)
    present_value = op.ScatterElements(past_value, where, v, axis=2)
    # grouped attention over the whole buffer; key t is visible to the query at position p iff t <= p
    qg = op.Reshape(op.Mul(q, op.Constant(value_float=scale)), ints(0, kv_heads, -1, d))  # [1, KVH, G*S, D]
    scores = op.MatMul(qg, op.Transpose(present_key, perm=[0, 1, 3, 2]))  # [1, KVH, G*S, CAP]
    key_positions = op.Constant(value_ints=list(range(cap)))
    visible = op.LessOrEqual(op.Unsqueeze(key_positions, ints(0)), op.Unsqueeze(positions, ints(1)))  # [S, CAP]
    visible = op.Tile(visible, ints(group, 1))  # [G*S, CAP], row g*S + s
    if attention_bias is not None:  # [1, 1, S, total] -> zeros after total -> [G*S, CAP] rows as ``visible``
        total = op.Cast(op.Reshape(total_length, ints(1)), to=7)
        pads = op.Concat(ints(0, 0, 0, 0, 0, 0, 0), op.Sub(ints(cap), total), axis=0)
        bias = op.Reshape(op.Pad(attention_bias, pads), ints(-1, cap))
        scores = op.Add(scores, op.Tile(bias, ints(group, 1)))
    scores = op.Where(visible, scores, op.Constant(value_float=float("-inf")))
    out = op.MatMul(op.Softmax(scores, axis=-1), present_value)  # [1, KVH, G*S, D]
    out = op.Transpose(op.Reshape(out, ints(0, num_heads, -1, d)), perm=[0, 2, 1, 3])  # [1, S, H, D]
    return op.Reshape(out, ints(0, -1, num_heads * d)), present_key, present_value


ORT_TRANSLATIONS = {torch.ops.specee.cached_attention.default: cached_attention_ort,
                    torch.ops.specee.tree_attention.default: tree_attention_ort}
ONNX_TRANSLATIONS = {torch.ops.specee.cached_attention.default: cached_attention_onnx,
                     torch.ops.specee.tree_attention.default: tree_attention_onnx}
TRANSLATIONS = {"ort": ORT_TRANSLATIONS, "trt": ONNX_TRANSLATIONS}  # by graph target
