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

from specee_compile.architecture import Attention
from specee_compile.functional import apply_rope, attend, visible


def _gqa_schema() -> OpSchema:
    """The part of ORT's GroupQueryAttention contract this project uses (onnx has no copy)."""
    param = OpSchema.FormalParameter
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k",
             "total_sequence_length", "cos_cache", "sin_cache", "position_ids", "attention_bias"]
    types = ["T", "T", "T", "T", "T", "M", "M", "T", "T", "P", "T"]
    attrs = [("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
             ("scale", OpSchema.AttrType.FLOAT), ("do_rotary", OpSchema.AttrType.INT),
             ("local_window_size", OpSchema.AttrType.INT), ("softcap", OpSchema.AttrType.FLOAT)]
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param(n, t, "", param_option=OpSchema.FormalParameterOption.Optional
                      if n in ("key", "value", "cos_cache", "sin_cache", "position_ids", "attention_bias")
                      else OpSchema.FormalParameterOption.Single)
                for n, t in zip(names, types)],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], ""), ("P", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in attrs],
    )


GROUP_QUERY_ATTENTION = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())


def _rotate_and_write(qkv, past_key, past_value, positions, total: int, cos_cache, sin_cache, num_heads: int,
                      kv_heads: int, rotary: bool):
    """Split packed QKV [B, S, ...], rotate q and k at ``positions`` [S] (unless not ``rotary``), and
    return q [B, H, S, D] with copies of the caches holding the new K/V at rows total - S .. total - 1."""
    b, s, _ = qkv.shape
    d = past_key.shape[-1]
    query, key, value = qkv.split([num_heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = query.view(b, s, num_heads, d).transpose(1, 2)
    k = key.view(b, s, kv_heads, d).transpose(1, 2)
    if rotary:
        q = apply_rope(q, cos_cache[positions], sin_cache[positions])
        k = apply_rope(k, cos_cache[positions], sin_cache[positions])
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
    window: int,  # 0: none; else the query at position p sees keys at p - window < t <= p
    softcap: float,  # 0: none
    rotary: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, _ = qkv.shape
    total = int(total_length)
    pos = torch.arange(total - s, total)
    q, present_key, present_value = _rotate_and_write(qkv, past_key, past_value, pos, total, cos_cache, sin_cache,
                                                      num_heads, kv_heads, rotary)
    spec = _spec(scale, window, softcap)
    out = attend(q, present_key[:, :, :total], present_value[:, :, :total], visible(pos, torch.arange(total),
                                                                                     spec.window), spec)
    return out.transpose(1, 2).reshape(b, s, -1), present_key, present_value


def _spec(scale: float, window: int, softcap: float) -> Attention:
    return Attention(scale, window or None, softcap or None)


def op_arguments(attention: Attention) -> tuple:
    """The attention ops' trailing arguments for a layer: scale, window, softcap, rotary."""
    return attention.scale, attention.window or 0, attention.softcap or 0.0, attention.rope is not None


@cached_attention.register_fake
def _(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
      num_heads, kv_heads, scale, window, softcap, rotary):
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
    window: int,
    softcap: float,
    rotary: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cached_attention`` over a token tree. Node s is rotated at ``position_ids[0, s]``, its
    K/V lands in row past_len + s, and it attends to row t iff t <= past_len + s (causal by
    row, as GroupQueryAttention) with ``attention_bias[0, 0, s, t]`` added to the score: the
    runtime sets it very negative for the rows of nodes that are not its ancestors. A window is
    measured in positions: a node at position p sees the context rows t > p - window."""
    b, s, _ = qkv.shape
    total = int(total_length)
    past = total - s
    q, present_key, present_value = _rotate_and_write(qkv, past_key, past_value, position_ids[0], total, cos_cache,
                                                      sin_cache, num_heads, kv_heads, rotary)
    mask = torch.arange(total)[None, :] <= (past + torch.arange(s))[:, None]  # [S, T]
    if window:
        key_positions = torch.cat([torch.arange(past), position_ids[0]])
        mask = mask & (position_ids[0][:, None] - key_positions[None, :] < window)
    out = attend(q, present_key[:, :, :total], present_value[:, :, :total], mask, _spec(scale, window, softcap),
                 attention_bias)
    return out.transpose(1, 2).reshape(b, s, -1), present_key, present_value


@tree_attention.register_fake
def _(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, position_ids, attention_bias,
      num_heads, kv_heads, scale, window, softcap, rotary):
    out_shape = (*qkv.shape[:2], num_heads * past_key.shape[-1])
    return qkv.new_empty(out_shape), past_key.new_empty(past_key.shape), past_value.new_empty(past_value.shape)


HIDDEN_BIAS = -1e9  # the score bias of a key outside a tree node's window (as the runtime's tree mask)


def _gqa(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, num_heads, kv_heads, scale,
         window, softcap, rotary, position_ids=None, attention_bias=None):
    if not rotary:
        cos_cache = sin_cache = position_ids = None
    return GROUP_QUERY_ATTENTION(
        qkv, None, None, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, position_ids,
        attention_bias, num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, do_rotary=int(rotary),
        local_window_size=window or -1, softcap=softcap,
    )


def tree_attention_ort(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
                       position_ids, attention_bias, num_heads: int, kv_heads: int, scale: float, window: int,
                       softcap: float, rotary: bool):
    """ONNX Runtime lowering: GroupQueryAttention with its ``position_ids`` (RoPE per node) and
    ``attention_bias`` (the tree mask) inputs. GroupQueryAttention's own window counts rows, not
    positions, so a window becomes part of the bias: rows t < past_len with p - t >= window hidden."""
    if window:
        ints = lambda *v: op.Constant(value_ints=list(v))  # noqa: E731
        nodes = op.Reshape(position_ids, ints(-1))  # [S]
        past = op.Sub(op.Cast(op.Reshape(total_length, ints(1)), to=7), op.Shape(nodes))  # [1]
        context = op.Range(op.Constant(value_int=0), op.Squeeze(past, ints(0)), op.Constant(value_int=1))
        key_positions = op.Concat(context, nodes, axis=0)  # [T]
        far = op.GreaterOrEqual(op.Sub(op.Unsqueeze(nodes, ints(1)), op.Unsqueeze(key_positions, ints(0))),
                                op.Constant(value_int=window))  # [S, T]
        attention_bias = op.Where(far, op.Constant(value_float=HIDDEN_BIAS), attention_bias)
    return _gqa(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, num_heads, kv_heads, scale,
                0, softcap, rotary, position_ids, attention_bias)


def cached_attention_ort(qkv, past_key, past_value, seqlens_k, total_length,
                         cos_cache, sin_cache, num_heads: int, kv_heads: int, scale: float, window: int,
                         softcap: float, rotary: bool):
    """ONNX Runtime lowering: one GroupQueryAttention node, packed QKV, in-kernel RoPE, its
    ``local_window_size`` and ``softcap``."""
    return _gqa(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, num_heads, kv_heads, scale,
                window, softcap, rotary)


def cached_attention_onnx(qkv, past_key, past_value, seqlens_k, total_length,
                          cos_cache, sin_cache, num_heads: int, kv_heads: int, scale: float, window: int,
                          softcap: float, rotary: bool):
    """Standard-ONNX lowering (ai.onnx opset 18 only): what TensorRT's ONNX parser takes.

    ``present`` is ``past`` with the new positions scattered in (a new tensor unless the
    runtime aliases the buffers). Query rows are grouped per KV head so the cache is never
    repeated: q [1, H, S, D] -> [1, KVH, G*S, D] against keys [1, KVH, CAP, D].
    """
    return _standard_attention(qkv, past_key, past_value, total_length, cos_cache, sin_cache, num_heads, kv_heads,
                               Attention(scale, window or None, softcap or None, "rope" if rotary else None))


def tree_attention_onnx(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
                        position_ids, attention_bias, num_heads: int, kv_heads: int, scale: float, window: int,
                        softcap: float, rotary: bool):
    """Standard-ONNX lowering of ``tree_attention``: RoPE at ``position_ids``, the bias padded
    to the cache's capacity and added to the scores of ``cached_attention_onnx``."""
    return _standard_attention(qkv, past_key, past_value, total_length, cos_cache, sin_cache, num_heads, kv_heads,
                               Attention(scale, window or None, softcap or None, "rope" if rotary else None),
                               position_ids, attention_bias)


def _standard_attention(qkv, past_key, past_value, total_length, cos_cache, sin_cache, num_heads: int,
                        kv_heads: int, attention: Attention, position_ids=None, attention_bias=None):
    """The rows past_len .. total-1 take the new K/V; RoPE at those rows or ``position_ids``;
    key row t is visible to query s iff t <= past_len + s (and, with a window, its position is
    within the window of the query's), with ``attention_bias`` added to the soft-capped scores."""
    cap, d = past_key.shape[2], past_key.shape[3]  # static: the cache buffer [1, KVH, CAP, D]
    group = num_heads // kv_heads
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

    def heads(x, n):  # [1, S, n*D] -> [1, n, S, D]
        return op.Transpose(op.Reshape(x, ints(0, -1, n, d)), perm=[0, 2, 1, 3])

    q, k, v = heads(query, num_heads), heads(key, kv_heads), heads(value, kv_heads)  # [1, n, S, D]
    if attention.rope is not None:
        half = cos_cache.shape[1]  # R/2: the first R dimensions rotate (rotate_half layout, as Hugging Face Llama)
        cos = op.Gather(cos_cache, rotated_at, axis=0)  # [S, R/2]
        sin = op.Gather(sin_cache, rotated_at, axis=0)

        def rope(x):
            x1 = op.Slice(x, ints(0), ints(half), ints(3))
            x2 = op.Slice(x, ints(half), ints(2 * half), ints(3))
            parts = [op.Sub(op.Mul(x1, cos), op.Mul(x2, sin)), op.Add(op.Mul(x2, cos), op.Mul(x1, sin))]
            if 2 * half < d:
                parts.append(op.Slice(x, ints(2 * half), ints(d), ints(3)))
            return op.Concat(*parts, axis=-1)

        q, k = rope(q), rope(k)
    # the cache write: present[:, :, positions[s], :] = k[:, :, s, :]
    where = op.Expand(op.Reshape(positions, ints(1, 1, -1, 1)), op.Shape(k))  # [1, KVH, S, D]
    present_key = op.ScatterElements(past_key, where, k, axis=2)
    present_value = op.ScatterElements(past_value, where, v, axis=2)
    # grouped attention over the whole buffer; key t is visible to the query at position p iff t <= p
    qg = op.Reshape(op.Mul(q, op.Constant(value_float=attention.scale)), ints(0, kv_heads, -1, d))  # [1, KVH, G*S, D]
    scores = op.MatMul(qg, op.Transpose(present_key, perm=[0, 1, 3, 2]))  # [1, KVH, G*S, CAP]
    if attention.softcap is not None:
        cap_value = op.Constant(value_float=attention.softcap)
        scores = op.Mul(op.Tanh(op.Div(scores, cap_value)), cap_value)
    key_positions = op.Constant(value_ints=list(range(cap)))
    visible = op.LessOrEqual(op.Unsqueeze(key_positions, ints(0)), op.Unsqueeze(positions, ints(1)))  # [S, CAP]
    if attention.window is not None:
        # positions of the keys: rows before past_len are positions, later rows hold the new tokens
        # (at ``rotated_at``: a tree node's position is not its row)
        key_at = key_positions  # [CAP]: in a dense step every row holds its own position
        if position_ids is not None:
            new_rows = op.Sub(key_positions, past)  # [CAP]: row - past_len
            last = op.Sub(op.Squeeze(seq, ints(0)), op.Constant(value_int=1))
            held = op.Gather(rotated_at, op.Min(op.Max(new_rows, op.Constant(value_int=0)), last), axis=0)
            key_at = op.Where(op.Less(new_rows, op.Constant(value_int=0)), key_positions, held)
        near = op.Less(op.Sub(op.Unsqueeze(rotated_at, ints(1)), op.Unsqueeze(key_at, ints(0))),
                       op.Constant(value_int=attention.window))  # [S, CAP]
        visible = op.And(visible, near)
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
