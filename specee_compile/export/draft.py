"""The draft head's graphs: its step (candidates for the next token) and its tree step.

    inputs   input_ids [1, S], features [1, S, d], past_sequence_length [1],
             (tree step: position_ids [1, S], attention_bias [1, 1, S, past + S],)
             past_key_values.0.key|value [1, KVH, CAP, D]
    outputs  draft_ids, (tree step: draft_logprobs, draft_features,) present.0.key|value
"""

from __future__ import annotations

import onnx_ir as ir
import torch
from torch import nn

from specee_compile.attention import (
    op_arguments,  # importing it registers torch.ops.specee
)
from specee_compile.contract import (
    ATTENTION_BIAS,
    DRAFT_FEATURES,
    DRAFT_IDS,
    DRAFT_LOGPROBS,
    FEATURES,
    INPUT_IDS,
    KINDS,
    PAST_LENGTH,
    POSITION_IDS,
    past,
    present,
)
from specee_compile.export.onnx import to_onnx
from specee_compile.export.step import packed_linear


class DraftStep(nn.Module):
    """The draft's step over its own preallocated KV buffer (same attention op as the target).

    inputs   input_ids [1, S], features [1, S, d] (the previous positions' features),
             past_sequence_length [1], past_key_values.0.key|value [1, KVH, CAP, D]
    outputs  draft_ids [4] (target ids of the top-4 at the last position), present.0.key|value
    """

    def __init__(self, draft: nn.Module, capacity: int):
        super().__init__()
        self.draft = draft
        attn = draft.layer.self_attn
        self.qkv_proj = getattr(attn, "qkv_proj", None) or packed_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up_proj = draft.spec.packed_gate_up(packed_linear)
        cos, sin = rope_tables_like(draft, capacity)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def forward(self, input_ids, features, past_sequence_length, past_key, past_value):
        f, pk, pv = self._layer(input_ids, features, past_sequence_length, past_key, past_value)
        logits = self.draft.head(f[:, -1])  # [1, Vd]
        top = torch.topk(logits[0], 4).indices
        return self.draft.vocab_map[top], pk, pv

    def _layer(self, input_ids, features, past_sequence_length, past_key, past_value, tree=None):
        """The draft's normed output features [1, S, d] and its cache."""
        d = self.draft
        total = past_sequence_length + input_ids.shape[1]
        x = d.fc(torch.cat([d.embed(input_ids), features], dim=-1))
        spec = d.spec
        qkv = spec.packed_qkv(spec.input_norm(x), self.qkv_proj)
        args = (qkv, past_key, past_value, (total - 1).to(torch.int32), total.to(torch.int32).reshape(()),
                self.cos_cache, self.sin_cache)
        heads = (d.num_heads, d.kv_heads, *op_arguments(spec.attention))
        if tree is None:
            out, pk, pv = torch.ops.specee.cached_attention(*args, *heads)
        else:
            out, pk, pv = torch.ops.specee.tree_attention(*args, *tree, *heads)
        return d.norm(spec.after_mlp(spec.after_attention(x, out), self.gate_up_proj)), pk, pv


class DraftTreeStep(DraftStep):
    """The draft over the nodes of a token tree (tree speculation expands one depth per run).

    inputs   input_ids [1, S], features [1, S, d] (each node's parent's feature),
             past_sequence_length [1], position_ids [1, S], attention_bias [1, 1, S, past + S]
             (as ``TreeStep``), past_key_values.0.key|value
    outputs  draft_ids [S, K] (target ids of every node's top-K children, best first),
             draft_logprobs [S, K] (their log-probabilities under the draft), draft_features
             [1, S, d] (the draft's estimate of every node's target feature: its children's
             input), present.0.key|value (node s written at row past + s)
    """

    def __init__(self, draft: nn.Module, capacity: int, top_k: int):
        super().__init__(draft, capacity)
        self.top_k = min(top_k, len(draft.vocab_map))

    def forward(self, input_ids, features, past_sequence_length, position_ids, attention_bias, past_key,
                past_value):
        f, pk, pv = self._layer(input_ids, features, past_sequence_length, past_key, past_value,
                                tree=(position_ids, attention_bias))
        logprobs = torch.log_softmax(self.draft.head(f[0]), dim=-1)  # [S, Vd]
        top = torch.topk(logprobs, self.top_k, dim=-1)
        return self.draft.vocab_map[top.indices], top.values, f, pk, pv


def rope_tables_like(draft: nn.Module, capacity: int):
    n = min(capacity, draft.cos.shape[0])
    return draft.cos[:n].contiguous(), draft.sin[:n].contiguous()


def export_draft(draft: nn.Module, capacity: int, target: str = "ort", tree_top_k: int | None = None) -> ir.Model:
    """Export the draft step (prefill over many positions and one-token steps) to onnx_ir;
    with ``tree_top_k``, the tree-expanding ``DraftTreeStep``."""
    d = draft.fc.out_features
    cache = torch.zeros(1, draft.kv_heads, capacity, draft.head_dim)
    seq = torch.export.Dim("sequence", min=1, max=capacity)
    names = [INPUT_IDS, FEATURES, PAST_LENGTH, *(past(0, kind) for kind in KINDS)]
    args = [torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 3, d), torch.full((1,), 2, dtype=torch.int64),
            cache, cache.clone()]
    dynamic = {"input_ids": {1: seq}, "features": {1: seq}, "past_sequence_length": None, "past_key": None,
               "past_value": None}
    if tree_top_k is None:
        step, outputs = DraftStep(draft, capacity), [DRAFT_IDS]
    else:
        step, outputs = DraftTreeStep(draft, capacity, tree_top_k), [DRAFT_IDS, DRAFT_LOGPROBS, DRAFT_FEATURES]
        names[3:3] = [POSITION_IDS, ATTENTION_BIAS]
        args[3:3] = [torch.tensor([[2, 3, 3]]), torch.zeros(1, 1, 3, 5)]
        total = torch.export.Dim("total", min=1, max=capacity)
        dynamic = {**dynamic, "position_ids": {1: seq}, "attention_bias": {2: seq, 3: total}}
    outputs += [present(0, kind) for kind in KINDS]
    return to_onnx(step, tuple(args), names, outputs, dynamic, target, "the draft step")
