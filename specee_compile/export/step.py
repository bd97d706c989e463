"""The target model's graphs: one decoder step (prefill and decode) and the tree verification step.

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

from dataclasses import dataclass

import onnx_ir as ir
import torch
from torch import nn

from specee_compile.architecture import Architecture, LayerSpec
from specee_compile.attention import (
    op_arguments,  # importing it registers torch.ops.specee
)
from specee_compile.contract import (
    ATTENTION_BIAS,
    FEATURES,
    INPUT_IDS,
    KINDS,
    LOGITS,
    PAST_LENGTH,
    POSITION_IDS,
    TOKENS,
    layer_output,
    past,
    present,
)
from specee_compile.errors import ExportError
from specee_compile.export.onnx import to_onnx


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
    sliding_windows: tuple[int | None, ...] = ()  # per layer, within the capacity; () when no layer has one


layer_output_name = layer_output  # the name of decoder layer i's output in every exported graph
FINAL_NORM_OUTPUT = FEATURES


class DecoderStep(nn.Module):
    """A functional decoder step built from a Hugging Face model's own submodules."""

    def __init__(self, hf_model: nn.Module, capacity: int):
        super().__init__()
        arch = Architecture(hf_model)
        self.arch = arch
        self.norm = arch.base.norm
        self.lm_head = hf_model.lm_head
        self.embed_tokens = arch.base.embed_tokens
        self.num_heads, self.kv_heads, self.head_dim = arch.num_heads, arch.kv_heads, arch.head_dim
        self.capacity = capacity
        for name in arch.table_names:
            cos, sin = arch.table(name, capacity)
            self.register_buffer(_table(name, "cos"), cos, persistent=False)  # [CAP, R/2]
            self.register_buffer(_table(name, "sin"), sin, persistent=False)
        self.blocks = nn.ModuleList(StepLayer(arch.spec(i, capacity)) for i in range(arch.num_layers))

    def rope(self, block: "StepLayer") -> tuple[torch.Tensor, torch.Tensor]:
        name = block.spec.attention.rope or self.arch.table_names[0]
        return getattr(self, _table(name, "cos")), getattr(self, _table(name, "sin"))

    def forward(self, input_ids, past_sequence_length, past: list[torch.Tensor]):
        s = input_ids.shape[1]
        total = past_sequence_length + s  # [1]
        seqlens_k = (total - 1).to(torch.int32)  # [B=1]
        total_i32 = total.to(torch.int32).reshape(())
        h = self.arch.embed(input_ids)  # [1, S, d]
        presents = []
        for i, block in enumerate(self.blocks):
            h, pk, pv = block(h, past[2 * i], past[2 * i + 1], seqlens_k, total_i32, *self.rope(block))
            presents += [pk, pv]
        z = self.norm(h)  # [1, S, d]: the draft's input features
        return (self.arch.logits(z[:, -1]), z, *presents)


def _table(name: str, kind: str) -> str:
    return f"{kind}_cache" if name == "default" else f"{kind}_cache_{name}"


class StepLayer(nn.Module):
    """One decoder layer around the cached-attention op; its scope is ``blocks.{i}``."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.layer = spec.layer
        attn = spec.layer.self_attn
        self.qkv_proj = getattr(attn, "qkv_proj", None) or packed_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up_proj = spec.packed_gate_up(packed_linear)  # one product for both (one MatMulNBits quantized)

    def forward(self, h, past_key, past_value, seqlens_k, total, cos_cache, sin_cache, tree=None):
        """``tree``: (position_ids, attention_bias) when the S tokens are the nodes of a token tree."""
        spec = self.spec
        qkv = spec.packed_qkv(spec.input_norm(h), self.qkv_proj)  # [1, S, (H + 2*KVH)*D]
        args = (qkv, past_key, past_value, seqlens_k, total, cos_cache, sin_cache)
        if tree is None:
            out, present_key, present_value = torch.ops.specee.cached_attention(
                *args, spec.num_heads, spec.kv_heads, *op_arguments(spec.attention))
        else:
            out, present_key, present_value = torch.ops.specee.tree_attention(
                *args, *tree, spec.num_heads, spec.kv_heads, *op_arguments(spec.attention))
        return spec.after_mlp(spec.after_attention(h, out), self.gate_up_proj), present_key, present_value


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
        h = self.arch.embed(input_ids)
        presents = []
        for i, block in enumerate(self.blocks):
            h, pk, pv = block(h, past[2 * i], past[2 * i + 1], seqlens_k, total_i32, *self.rope(block),
                              tree=(position_ids, attention_bias))
            presents += [pk, pv]
        z = self.norm(h)
        # the head over [S, d] (a Gemm on the weight as stored, as in the step) rather than [1, S, d]
        # (a MatMul on its transpose, which weight quantization would not find); the divisor and the
        # soft-cap do not move the argmax
        return (self.lm_head(z[0]).argmax(-1)[None], z, *presents)


def packed_linear(linears: list[nn.Linear]) -> nn.Linear:
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
    return [INPUT_IDS, PAST_LENGTH, *(past(i, kind) for i in range(num_layers) for kind in KINDS)]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, FEATURES, *(present(i, kind) for i in range(num_layers) for kind in KINDS)]


def example_inputs(shapes: StepShapes, seq: int = 3):
    cache = torch.zeros(1, shapes.num_kv_heads, shapes.capacity, shapes.head_dim)
    kv = [cache.clone() for _ in range(2 * shapes.num_layers)]
    return (torch.zeros(1, seq, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), kv)


def step_shapes(hf_model: nn.Module, capacity: int) -> StepShapes:
    """The static facts of ``hf_model``'s step with a cache of ``capacity`` positions."""
    arch = Architecture(hf_model)
    windows = tuple(arch.spec(i, capacity).attention.window for i in range(arch.num_layers))
    return StepShapes(
        num_layers=arch.num_layers, num_heads=arch.num_heads, num_kv_heads=arch.kv_heads, head_dim=arch.head_dim,
        hidden_size=hf_model.config.hidden_size, vocab_size=hf_model.config.vocab_size, capacity=capacity,
        sliding_windows=windows if any(windows) else (),
    )


GQA_ROTARY_MULTIPLE = 16  # GroupQueryAttention's in-kernel RoPE turns a multiple of this many dimensions


def check_target(step: DecoderStep, target: str) -> None:
    """Refuse, before exporting, what the ``target``'s attention op cannot compute."""
    if target != "ort":
        return
    rotated = {2 * getattr(step, _table(block.spec.attention.rope, "cos")).shape[1]
               for block in step.blocks if block.spec.rotary}
    odd = sorted(r for r in rotated if r % GQA_ROTARY_MULTIPLE)
    if odd:
        raise ExportError(f"this model's RoPE rotates {odd[0]} dimensions of each head; ONNX Runtime's "
                          f"GroupQueryAttention rotates a multiple of {GQA_ROTARY_MULTIPLE}. Compile TensorRT-ready "
                          "graphs (--check trt), whose attention is standard ONNX and rotates any number.")


def export_step(hf_model: nn.Module, capacity: int, target: str = "ort") -> tuple[ir.Model, StepShapes]:
    """Export the decoder step (``DecoderStep``) to onnx_ir; ``target`` as for :func:`.onnx.to_onnx`."""
    step = DecoderStep(hf_model, capacity)
    check_target(step, target)
    shapes = step_shapes(hf_model, capacity)
    seq = torch.export.Dim("sequence", min=1, max=capacity)
    dynamic = {"input_ids": {1: seq}, "past_sequence_length": None, "past": [None] * (2 * shapes.num_layers)}
    model = to_onnx(step, example_inputs(shapes), input_names(shapes.num_layers), output_names(shapes.num_layers),
                    dynamic, target, f"the {hf_model.config.model_type} decoder step")
    model.graph.inputs[0].shape = ir.Shape([1, ir.SymbolicDim("sequence")])
    _name_structure(model, shapes.num_layers)
    return model, shapes


def export_tree(hf_model: nn.Module, capacity: int, target: str = "ort") -> ir.Model:
    """Export the tree verification step (``TreeStep``); ``target`` as for ``export_step``."""
    step = TreeStep(hf_model, capacity)
    check_target(step, target)
    layers = len(step.blocks)
    cache = torch.zeros(1, step.kv_heads, capacity, step.head_dim)
    example = (torch.zeros(1, 3, dtype=torch.int64), torch.full((1,), 2, dtype=torch.int64),
               torch.tensor([[2, 3, 3]]), torch.zeros(1, 1, 3, 5), [cache.clone() for _ in range(2 * layers)])
    seq = torch.export.Dim("sequence", min=1, max=capacity)
    total = torch.export.Dim("total", min=1, max=capacity)
    dynamic = {"input_ids": {1: seq}, "past_sequence_length": None, "position_ids": {1: seq},
               "attention_bias": {2: seq, 3: total}, "past": [None] * (2 * layers)}
    names = input_names(layers)
    names[2:2] = [POSITION_IDS, ATTENTION_BIAS]
    outputs = output_names(layers)
    outputs[0] = TOKENS
    model = to_onnx(step, example, names, outputs, dynamic, target, "the tree verification step")
    _name_structure(model, layers)
    return model


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


