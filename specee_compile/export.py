"""Export: one decoder step of a Llama-layout model to the ONNX in-memory IR.

The exported graph serves prefill (S = prompt length, past length 0) and decode (S = 1):

    inputs   input_ids                     int64  [1, S]
             past_sequence_length          int64  [1]        valid positions in the cache
             past_key_values.{i}.key|value float32 [1, KVH, CAP, D]
    outputs  logits                        float32 [1, V]     for the last position only
             features                      float32 [1, S, d]  final-normed hidden states
             present.{i}.key|value         float32 [1, KVH, CAP, D]

The cache is a preallocated buffer of CAP positions; ``present`` is ``past`` with the new
positions written in. ONNX Runtime writes them in place when the runtime binds the same
buffer to both (see attention.py). Every decoder layer's output hidden state is named
``layers.{i}.output`` in the graph, and the final norm's output is the graph output
``features``: passes find the decoder structure by these names.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import onnx_ir as ir
import torch
from torch import nn

from specee_compile.attention import TRANSLATIONS, cached_attention  # noqa: F401
from specee_compile.errors import ExportError
from specee_compile.functional import rope_tables

logger = logging.getLogger(__name__)

OPSET = 18


@dataclass(frozen=True)
class StepShapes:
    """Static facts of the exported step that the manifest and runtime need."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    capacity: int


def layer_output_name(i: int) -> str:
    return f"layers.{i}.output"


FINAL_NORM_OUTPUT = "features"


class DecoderStep(nn.Module):
    """A functional decoder step built from a Hugging Face model's own submodules."""

    def __init__(self, hf_model: nn.Module, capacity: int):
        super().__init__()
        base = hf_model.model
        cfg = hf_model.config
        self.embed_tokens = base.embed_tokens
        self.norm = base.norm
        self.lm_head = hf_model.lm_head
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.capacity = capacity
        cos, sin = rope_tables(base.rotary_emb, capacity, self.head_dim)
        self.register_buffer("cos_cache", cos, persistent=False)  # [CAP, D/2]
        self.register_buffer("sin_cache", sin, persistent=False)
        self.blocks = nn.ModuleList(
            StepLayer(layer, self.num_heads, self.kv_heads) for layer in base.layers
        )

    def forward(self, input_ids, past_sequence_length, past: list[torch.Tensor]):
        s = input_ids.shape[1]
        total = past_sequence_length + s  # [1]
        seqlens_k = (total - 1).to(torch.int32)  # [B=1]
        total_i32 = total.to(torch.int32).reshape(())
        h = self.embed_tokens(input_ids)  # [1, S, d]
        presents = []
        for i, block in enumerate(self.blocks):
            h, pk, pv = block(h, past[2 * i], past[2 * i + 1], seqlens_k, total_i32,
                              self.cos_cache, self.sin_cache)
            presents += [pk, pv]
        z = self.norm(h)  # [1, S, d]: the draft's input features
        return (self.lm_head(z[:, -1]), z, *presents)


class StepLayer(nn.Module):
    """One pre-norm decoder layer around the cached-attention op; its scope is ``blocks.{i}``."""

    def __init__(self, layer: nn.Module, num_heads: int, kv_heads: int):
        super().__init__()
        self.layer = layer
        self.num_heads = num_heads
        self.kv_heads = kv_heads
        self.scale = float(layer.self_attn.scaling)
        self.qkv_proj = _packed_linear(
            [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        )

    def forward(self, h, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, tree=None):
        """``tree``: (position_ids, attention_bias) when the S tokens are the nodes of a token tree."""
        attn = self.layer.self_attn
        x = self.layer.input_layernorm(h)  # [1, S, d]
        if tree is None:
            out, present_key, present_value = torch.ops.specee.cached_attention(
                self.qkv_proj(x), past_key, past_value, seqlens_k, total, cos_cache, sin_cache, self.num_heads,
                self.kv_heads, self.scale,
            )
        else:
            out, present_key, present_value = torch.ops.specee.tree_attention(
                self.qkv_proj(x), past_key, past_value, seqlens_k, total, cos_cache, sin_cache, *tree,
                self.num_heads, self.kv_heads, self.scale,
            )
        h = h + attn.o_proj(out)
        h = h + self.layer.mlp(self.layer.post_attention_layernorm(h))
        return h, present_key, present_value


class TreeStep(DecoderStep):
    """The verification step of tree speculation: the S new tokens are the nodes of a token
    tree (parents before children) rooted at position past_sequence_length.

    inputs   input_ids [1, S], past_sequence_length [1], position_ids [1, S] (past + depth),
             attention_bias [1, 1, S, past + S] (0: visible, very negative: another branch),
             past_key_values.{i}.key|value
    outputs  tokens [1, S] int64 (greedy: the argmax of every node's logits), features [1, S, d],
             present.{i}.key|value (node s written at row past + s)
    """

    def forward(self, input_ids, past_sequence_length, position_ids, attention_bias, past: list[torch.Tensor]):
        s = input_ids.shape[1]
        total = past_sequence_length + s
        seqlens_k = (total - 1).to(torch.int32)
        total_i32 = total.to(torch.int32).reshape(())
        h = self.embed_tokens(input_ids)
        presents = []
        for i, block in enumerate(self.blocks):
            h, pk, pv = block(h, past[2 * i], past[2 * i + 1], seqlens_k, total_i32, self.cos_cache, self.sin_cache,
                              tree=(position_ids, attention_bias))
            presents += [pk, pv]
        z = self.norm(h)
        return (self.lm_head(z).argmax(-1), z, *presents)


def _packed_linear(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing several projections of the same input, outputs concatenated."""
    weight = torch.cat([lin.weight for lin in linears], dim=0)
    has_bias = [lin.bias is not None for lin in linears]
    packed = nn.Linear(weight.shape[1], weight.shape[0], bias=any(has_bias))
    with torch.no_grad():
        packed.weight.copy_(weight)
        if any(has_bias):
            packed.bias.copy_(torch.cat([
                lin.bias if lin.bias is not None else torch.zeros(lin.out_features) for lin in linears
            ]))
    return packed


def input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "past_sequence_length"]
    for i in range(num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(num_layers: int) -> list[str]:
    names = ["logits", "features"]
    for i in range(num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def example_inputs(shapes: StepShapes, seq: int = 3):
    past = torch.zeros(1, shapes.num_kv_heads, shapes.capacity, shapes.head_dim)
    kv = [past.clone() for _ in range(2 * shapes.num_layers)]
    return (torch.zeros(1, seq, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), kv)


def export_step(hf_model: nn.Module, capacity: int, target: str = "ort") -> tuple[ir.Model, StepShapes]:
    """Export the decoder step with torch.export + the dynamo ONNX exporter to onnx_ir.

    ``target`` picks the attention lowering (see attention.py): "ort" emits ONNX Runtime's
    GroupQueryAttention, "trt" standard ONNX ops only (what TensorRT's parser takes).
    """
    step = DecoderStep(hf_model, capacity).eval()
    cfg = hf_model.config
    shapes = StepShapes(
        num_layers=len(step.blocks), num_heads=step.num_heads, num_kv_heads=step.kv_heads,
        head_dim=step.head_dim, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
        capacity=capacity,
    )
    seq = torch.export.Dim("sequence", min=1, max=capacity)
    dynamic = {"input_ids": {1: seq}, "past_sequence_length": None,
               "past": [None] * (2 * shapes.num_layers)}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                step, example_inputs(shapes), dynamo=True, opset_version=OPSET,
                input_names=input_names(shapes.num_layers),
                output_names=output_names(shapes.num_layers),
                dynamic_shapes=dynamic, custom_translation_table=_translations(target),
                optimize=True, verbose=False,
            )
    except Exception as e:
        raise ExportError(
            f"torch.onnx.export failed on the {cfg.model_type} decoder step: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Run with -v for the exporter's full report."
        ) from e
    model = program.model
    model.graph.inputs[0].shape = ir.Shape([1, ir.SymbolicDim("sequence")])
    _name_structure(model, shapes.num_layers)
    return model, shapes


def export_tree(hf_model: nn.Module, capacity: int, target: str = "ort") -> ir.Model:
    """Export the tree verification step (``TreeStep``); ``target`` as for ``export_step``."""
    step = TreeStep(hf_model, capacity).eval()
    layers = len(step.blocks)
    past = torch.zeros(1, step.kv_heads, capacity, step.head_dim)
    example = (torch.zeros(1, 3, dtype=torch.int64), torch.full((1,), 2, dtype=torch.int64),
               torch.tensor([[2, 3, 3]]), torch.zeros(1, 1, 3, 5), [past.clone() for _ in range(2 * layers)])
    seq = torch.export.Dim("sequence", min=1, max=capacity)
    total = torch.export.Dim("total", min=1, max=capacity)
    dynamic = {"input_ids": {1: seq}, "past_sequence_length": None, "position_ids": {1: seq},
               "attention_bias": {2: seq, 3: total}, "past": [None] * (2 * layers)}
    names = input_names(layers)
    names[2:2] = ["position_ids", "attention_bias"]
    outputs = output_names(layers)
    outputs[0] = "tokens"
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                step, example, dynamo=True, opset_version=OPSET, input_names=names, output_names=outputs,
                dynamic_shapes=dynamic, custom_translation_table=_translations(target), optimize=True, verbose=False,
            )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed on the tree verification step: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}. Run with -v for the exporter's report.") from e
    model = program.model
    _name_structure(model, layers)
    return model


def _translations(target: str) -> dict:
    if target not in TRANSLATIONS:
        raise ExportError(f"graph target '{target}' is unknown; choose one of {sorted(TRANSLATIONS)}.")
    return TRANSLATIONS[target]


def _scope(node: ir.Node) -> list[str]:
    raw = node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]")
    return [part.strip(" '") for part in raw.strip("[]").split(",")]


def _name_structure(model: ir.Model, num_layers: int) -> None:
    """Name each decoder layer's output and the final norm's output in the exported graph.

    A layer's output is the last Add directly in scope ``blocks.{i}`` (the second residual
    add); the final norm's output (last node in scope ``norm``) is the graph output ``features``.
    """
    layer_out: dict[int, ir.Value] = {}
    norm_out = None
    for node in model.graph:
        scope = _scope(node)
        if len(scope) == 3 and scope[1].startswith("blocks.") and node.op_type == "Add":
            layer_out[int(scope[1].split(".")[1])] = node.outputs[0]
        elif len(scope) >= 2 and scope[1] == "norm":
            norm_out = node.outputs[0]
    if sorted(layer_out) != list(range(num_layers)) or norm_out is None:
        raise ExportError(
            f"could not find every decoder layer's output and the final norm in the exported "
            f"graph (found layers {sorted(layer_out)} of {num_layers}); the exporter's "
            "naming metadata changed. Report this with your torch and onnxscript versions."
        )
    for i, value in layer_out.items():
        value.name = layer_output_name(i)
    if norm_out.name != FINAL_NORM_OUTPUT:
        raise ExportError(f"the final norm's output is '{norm_out.name}', expected the graph output "
                          f"'{FINAL_NORM_OUTPUT}'; the exporter's naming changed.")


class DraftStep(nn.Module):
    """The draft's step over its own preallocated KV buffer (same attention op as the target).

    inputs   input_ids [1, S], features [1, S, d] (the previous positions' features),
             past_sequence_length [1], past_key_values.0.key|value [1, KVH, CAP, D]
    outputs  draft_ids [4] (target ids of the top-4 at the last position), present.0.key|value
    """

    def __init__(self, draft: nn.Module, capacity: int):
        super().__init__()
        self.draft = draft
        self.qkv_proj = _packed_linear([draft.layer.self_attn.q_proj, draft.layer.self_attn.k_proj,
                                        draft.layer.self_attn.v_proj])
        cos, sin = rope_tables_like(draft, capacity)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)
        self.scale = float(draft.layer.self_attn.scaling)

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
        layer = d.layer
        qkv = self.qkv_proj(layer.input_layernorm(x))
        args = (qkv, past_key, past_value, (total - 1).to(torch.int32), total.to(torch.int32).reshape(()),
                self.cos_cache, self.sin_cache)
        if tree is None:
            out, pk, pv = torch.ops.specee.cached_attention(*args, d.num_heads, d.kv_heads, self.scale)
        else:
            out, pk, pv = torch.ops.specee.tree_attention(*args, *tree, d.num_heads, d.kv_heads, self.scale)
        x = x + layer.self_attn.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return d.norm(x), pk, pv


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
    past = torch.zeros(1, draft.kv_heads, capacity, draft.head_dim)
    seq = torch.export.Dim("sequence", min=1, max=capacity)
    names = ["input_ids", "features", "past_sequence_length", "past_key_values.0.key", "past_key_values.0.value"]
    args = [torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 3, d), torch.full((1,), 2, dtype=torch.int64),
            past, past.clone()]
    dynamic = {"input_ids": {1: seq}, "features": {1: seq}, "past_sequence_length": None, "past_key": None,
               "past_value": None}
    if tree_top_k is None:
        step, outputs = DraftStep(draft, capacity).eval(), ["draft_ids"]
    else:
        step, outputs = DraftTreeStep(draft, capacity, tree_top_k).eval(), ["draft_ids", "draft_logprobs",
                                                                            "draft_features"]
        names[3:3] = ["position_ids", "attention_bias"]
        args[3:3] = [torch.tensor([[2, 3, 3]]), torch.zeros(1, 1, 3, 5)]
        total = torch.export.Dim("total", min=1, max=capacity)
        dynamic = {**dynamic, "position_ids": {1: seq}, "attention_bias": {2: seq, 3: total}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                step, tuple(args), dynamo=True, opset_version=OPSET, input_names=names,
                output_names=[*outputs, "present.0.key", "present.0.value"], dynamic_shapes=dynamic,
                custom_translation_table=_translations(target), optimize=True, verbose=False,
            )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed on the draft step: {type(e).__name__}: {e}") from e
    return program.model
