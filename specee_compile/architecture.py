"""What differs between the supported decoder families, read from a Hugging Face model's config
and modules rather than from a table of model names.

Every supported family is a stack of decoder layers, each self-attention with RoPE over a KV
cache followed by a gated MLP, between a token embedding and an LM head. What varies, and where
it is read from:

- normalization around the sublayers: before attention and MLP (Llama, Qwen, Mistral, Phi-3,
  Granite, SmolLM3), before and after both (Gemma 2/3: the layer has ``pre_feedforward_layernorm``
  and ``post_feedforward_layernorm``), or after both only (OLMo 2: no ``input_layernorm``);
- norms on the queries and keys (``self_attn.q_norm``/``k_norm``): per head (Qwen3, Gemma 3, the
  norm's width is the head size) or over the whole projection (OLMo 2);
- the projections: q/k/v separate or fused (Phi-3's ``qkv_proj``);
- attention per layer: its scale (``self_attn.scaling``: Granite's attention multiplier, Gemma's
  ``query_pre_attn_scalar``), a score soft-cap (Gemma 2's ``attn_logit_softcapping``), a sliding
  window (``self_attn.sliding_window``, or the config's for families that apply it to every layer),
  RoPE or none (SmolLM3's ``use_rope``), the RoPE table (Gemma 3: one per layer type) and how many
  dimensions it rotates (Phi-3's ``partial_rotary_factor``: the table's width);
- multipliers outside the layers: on the embeddings (Granite's ``embedding_multiplier``; Gemma's
  embedding module scales itself), on each residual branch (Granite's ``residual_multiplier``), on
  the logits (Granite's ``logits_scaling`` divides them, Gemma 2's ``final_logit_softcapping``
  caps them).

The export (``export/step.py``), the eager reference decoder, the draft and the calibration all run
a layer through :class:`LayerSpec`, so one description serves every path.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Attention:
    """One layer's attention, beyond grouped-query softmax attention over its cache."""

    scale: float
    window: int | None = None  # the query at position p sees keys at p - window < t <= p; None: every key
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap) before the mask
    rope: str | None = "default"  # the RoPE table's name; None: the layer applies no RoPE

    def to_json(self) -> dict:
        return {"scale": self.scale, "window": self.window, "softcap": self.softcap, "rope": self.rope}


@dataclass
class LayerSpec:
    """One decoder layer with everything needed to run it outside its own ``forward``."""

    layer: nn.Module
    attention: Attention
    num_heads: int
    kv_heads: int
    head_dim: int
    cos: torch.Tensor  # [positions, R/2]: the layer's RoPE table (R <= head_dim rotated dimensions)
    sin: torch.Tensor
    residual_scale: float = 1.0

    @property
    def rotary(self) -> bool:
        return self.attention.rope is not None

    def input_norm(self, h: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.layer, "input_layernorm", None)
        return h if norm is None else norm(h)

    def project(self, x: torch.Tensor, packed: nn.Module | None = None):
        """q [B, S, H*D], k and v [B, S, KVH*D] for normed inputs x, after the q/k norms.

        ``packed``: one linear computing q, k and v (the export's); the layer's own otherwise."""
        attn = self.layer.self_attn
        packed = packed if packed is not None else getattr(attn, "qkv_proj", None)
        if packed is not None:
            q, k, v = packed(x).split(self.widths, dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        return self._norm(getattr(attn, "q_norm", None), q), self._norm(getattr(attn, "k_norm", None), k), v

    def packed_qkv(self, x: torch.Tensor, packed: nn.Module) -> torch.Tensor:
        """[B, S, (H + 2*KVH)*D]: what the attention op takes; one product when there are no q/k norms."""
        if not self.has_qk_norms:
            return packed(x)
        return torch.cat(self.project(x, packed), dim=-1)

    @property
    def widths(self) -> list[int]:
        d = self.head_dim
        return [self.num_heads * d, self.kv_heads * d, self.kv_heads * d]

    @property
    def has_qk_norms(self) -> bool:
        attn = self.layer.self_attn
        return getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None

    def _norm(self, norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        if norm is None:
            return x
        if norm.weight.numel() == x.shape[-1]:  # over the whole projection (OLMo 2)
            return norm(x)
        return norm(x.unflatten(-1, (-1, self.head_dim))).flatten(-2)  # per head (Qwen3, Gemma 3)

    def after_attention(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention, from the heads' output [B, S, H*D]."""
        y = self.layer.self_attn.o_proj(out)
        if self.post_norms:
            y = self.layer.post_attention_layernorm(y)
        return h + self._scaled(y)

    def after_mlp(self, h: torch.Tensor, gate_up: nn.Module | None = None) -> torch.Tensor:
        """``gate_up``: one linear computing the gated MLP's gate and up projections (the export's,
        from :meth:`packed_gate_up`); the layer's own MLP otherwise."""
        layer = self.layer
        mlp = layer.mlp if gate_up is None else lambda x: self._gated_mlp(x, gate_up)
        if self.post_norms:
            pre = getattr(layer, "pre_feedforward_layernorm", None)
            y = layer.post_feedforward_layernorm(mlp(h if pre is None else pre(h)))
        else:
            y = mlp(layer.post_attention_layernorm(h))
        return h + self._scaled(y)

    def _gated_mlp(self, x: torch.Tensor, gate_up: nn.Module) -> torch.Tensor:
        mlp = self.layer.mlp
        gate, up = gate_up(x).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def packed_gate_up(self, pack) -> nn.Module | None:
        """One linear for the MLP's gate and up projections (``pack``: the export's packing of
        linears), or None when the MLP is not ``down(act(gate(x)) * up(x))`` with separate gate
        and up linears: checked on a random input against the MLP's own forward, so a family
        whose MLP differs keeps it."""
        mlp = self.layer.mlp
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
        if not all(isinstance(p, nn.Linear) for p in parts[:3]) or parts[3] is None \
                or parts[0].weight.shape != parts[1].weight.shape:
            return None
        packed = pack(parts[:2])
        x = torch.randn(2, parts[0].in_features, generator=torch.Generator().manual_seed(0),
                        dtype=parts[0].weight.dtype)
        with torch.no_grad():
            same = torch.allclose(self._gated_mlp(x, packed), mlp(x), rtol=1e-4, atol=1e-5)
        return packed if same else None

    @property
    def post_norms(self) -> bool:
        """Norms after the sublayers (Gemma 2/3, OLMo 2): ``post_attention_layernorm`` then normalizes
        the attention output instead of the MLP's input."""
        return hasattr(self.layer, "post_feedforward_layernorm")

    def _scaled(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.residual_scale == 1.0 else y * self.residual_scale


class Architecture:
    """The family facts of a Hugging Face causal LM (see the module docstring)."""

    def __init__(self, hf_model: nn.Module):
        cfg = hf_model.config
        self.hf_model = hf_model
        self.base = hf_model.model
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.embedding_multiplier = float(getattr(cfg, "embedding_multiplier", None) or 1.0)
        self.logits_divisor = float(getattr(cfg, "logits_scaling", None) or 1.0)
        softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_softcap = float(softcap) if softcap else None
        self._typed_rope = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters
        self.attention = [self._attention(layer) for layer in self.base.layers]
        self._tables: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _attention(self, layer: nn.Module) -> Attention:
        attn = layer.self_attn
        if hasattr(attn, "sliding_window"):  # set per layer (None on global layers)
            window = attn.sliding_window
        else:  # families whose attention applies the config's window to every layer (Mistral, Phi-3)
            window = getattr(self.hf_model.config, "sliding_window", None)
        softcap = getattr(attn, "attn_logit_softcapping", None)
        if not getattr(attn, "use_rope", True):
            rope = None
        else:
            rope = getattr(attn, "layer_type", None) if self._typed_rope else "default"
        return Attention(float(attn.scaling), int(window) if window else None, float(softcap) if softcap else None,
                         rope)

    @property
    def num_layers(self) -> int:
        return len(self.attention)

    def table(self, name: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [n, R/2] of RoPE table ``name`` (the default table for layers without RoPE)."""
        name = name or self.table_names[0]
        if (name, n) not in self._tables:
            layer_type = None if name == "default" else name
            self._tables[name, n] = rope_tables(self.base.rotary_emb, n, layer_type)
        return self._tables[name, n]

    @property
    def table_names(self) -> list[str]:
        """The RoPE tables the layers use, in first use order (never empty)."""
        names = list(dict.fromkeys(a.rope for a in self.attention if a.rope is not None))
        return names or (["default"] if not self._typed_rope else [self.hf_model.config.layer_types[0]])

    def spec(self, i: int, capacity: int, layer: nn.Module | None = None, **changes) -> LayerSpec:
        """Layer i with RoPE tables of ``capacity`` positions; ``layer`` replaces the module (the
        draft's copy), ``changes`` replace attention fields."""
        layer = self.base.layers[i] if layer is None else layer
        attention = dataclasses.replace(self.attention[i], **changes)
        if attention.window is not None and attention.window >= capacity:  # never reached: no window
            attention = dataclasses.replace(attention, window=None)
        cos, sin = self.table(attention.rope, capacity)
        return LayerSpec(layer, attention, self.num_heads, self.kv_heads, self.head_dim, cos, sin,
                         float(getattr(layer, "residual_multiplier", 1.0)))

    def specs(self, capacity: int) -> list[LayerSpec]:
        return [self.spec(i, capacity) for i in range(self.num_layers)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.base.embed_tokens(input_ids)
        return h if self.embedding_multiplier == 1.0 else h * self.embedding_multiplier

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The LM head's logits of final-normed states z (greedy tokens are their argmax, which the
        divisor and the soft-cap do not move)."""
        x = self.hf_model.lm_head(z)
        if self.logits_divisor != 1.0:
            x = x / self.logits_divisor
        if self.logit_softcap is not None:
            x = torch.tanh(x / self.logit_softcap) * self.logit_softcap
        return x


def rope_tables(rotary_emb: nn.Module, n: int, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of positions 0..n-1, first half of the rotate_half layout: [n, R/2] each (R: the
    rotated dimensions, the head size unless the rotation is partial)."""
    positions = torch.arange(n)[None, :]
    extra = {} if layer_type is None else {"layer_type": layer_type}
    with torch.no_grad():
        cos, sin = rotary_emb(torch.zeros(1, dtype=torch.float32), positions, **extra)  # [1, n, R]
    half = cos.shape[-1] // 2
    return cos[0, :, :half].contiguous().float(), sin[0, :, :half].contiguous().float()
