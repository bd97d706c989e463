"""The EAGLE-1-style draft head with a reduced vocabulary.

    x_t   = fc([embed(token_t), feature_{t-1}])        # [B, S, 2d] -> [B, S, d]
    f_t   = norm(decoder_layer(x_t))                    # one layer of the target's architecture
    logits_t = head(f_t)                                # rows of the target's LM head: [B, S, Vd]

``f_t`` predicts the target's next feature. ``feature`` is a *normed* hidden state of the
target: the final norm applied to the output
of the layer the previous token left from (its exit layer, or the last layer). Training
mixes full-depth and intermediate-layer features so the draft keeps proposing good
candidates after an early exit. ``vocab_map[j]`` is the target id of draft logit j.

With ``fusion`` (EAGLE-3's multi-layer input) the feature a target forward hands the draft
is ``fuse([z_low, z_mid, z_l])`` [3d -> d] instead of ``z_l``, where ``z_i`` is layer i's
normed output, ``(low, mid) = fusion_layers(L)`` and l the layer the token left from; a
slot whose layer is deeper than l reads ``z_l``. ``fuse`` starts as "take ``z_l``", so a
draft trained without fusion is its warm start. The target graphs compute the fused
feature themselves (passes/fuse_draft_input.py); the draft's graph and its deeper steps,
which read its own predicted feature, are the same either way.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from specee_compile.architecture import Architecture, LayerSpec
from specee_compile.functional import layer_step


class EagleDraft(nn.Module):
    """One-layer draft over the target's embedding, with its own KV cache at inference."""

    def __init__(self, target: nn.Module, vocab_map: torch.Tensor, capacity: int = 4096, fusion: bool = False):
        super().__init__()
        arch = Architecture(target)
        base = target.model
        d = target.config.hidden_size
        self.num_heads, self.kv_heads, self.head_dim = arch.num_heads, arch.kv_heads, arch.head_dim
        self.embed = base.embed_tokens  # shared and frozen
        self.fc = nn.Linear(2 * d, d)
        with torch.no_grad():  # start as "use the feature": identity on the feature half
            self.fc.weight.zero_()
            self.fc.weight[:, d:].copy_(torch.eye(d))
            self.fc.bias.zero_()
        self.layer = copy.deepcopy(base.layers[-1])  # same architecture, warm start from the last layer
        self.norm = copy.deepcopy(base.norm)  # the head reads normed states, as the target's does
        self.register_buffer("vocab_map", vocab_map.clone().long())
        self.head = nn.Linear(d, len(vocab_map), bias=False)
        with torch.no_grad():
            self.head.weight.copy_(target.lm_head.weight[vocab_map])
        # the target's own head rows, frozen: its distribution over the draft's vocabulary is the
        # label training distils (a plain attribute, so neither saved nor exported)
        self.teacher_head = target.lm_head.weight[vocab_map].detach().clone().float()
        # the last layer's attention, without a window: the draft sees its whole context
        self.attention = dataclasses.replace(arch.attention[-1], window=None)
        self.fusion = fusion_layers(arch.num_layers) if fusion else None
        if fusion:
            self.fuse = nn.Linear(3 * d, d, bias=False)
            with torch.no_grad():  # start as "the exit (or last) layer's feature"
                self.fuse.weight.zero_()
                self.fuse.weight[:, 2 * d:].copy_(torch.eye(d))
        self.residual_scale = float(getattr(self.layer, "residual_multiplier", 1.0))
        cos, sin = arch.table(self.attention.rope, capacity)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # the layer and norm are copies of a target that calibration freezes: they are the
        # draft's own and train, only the shared embedding stays frozen
        for name, w in self.named_parameters():
            w.requires_grad_(not name.startswith("embed."))

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec(self.layer, self.attention, self.num_heads, self.kv_heads, self.head_dim, self.cos, self.sin,
                         self.residual_scale)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything but the shared embedding (which is the target's)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed.")}

    def fed_features(self, example, use_exit: torch.Tensor) -> torch.Tensor:
        """What training feeds at positions 1..n-1 of a ``store.DraftExample``: the previous
        position's final feature, or its intermediate one where ``use_exit`` (fused with the
        store's low and middle layers when the draft fuses; the store's exits are at L/2 or deeper)."""
        top = torch.where(use_exit[:, None], example.exit[:-1], example.final[:-1])
        if self.fusion is None:
            return top
        low, mid = (example.layers[i][:-1] for i in self.fusion)
        return self.fuse(torch.cat([low, mid, top], dim=-1))

    def inputs(self, z: torch.Tensor, layer) -> torch.Tensor:
        """The feature a target forward hands the draft: ``z`` [L, N, d] holds every layer's
        normed output at N positions, ``layer`` (int, or [N]) the layer each left from -> [N, d]."""
        L, N, _ = z.shape
        layer = torch.as_tensor(layer, dtype=torch.long).expand(N)
        rows = torch.arange(N)
        if self.fusion is None:
            return z[layer, rows]
        low, mid = (torch.minimum(torch.full_like(layer, i), layer) for i in self.fusion)
        return self.fuse(torch.cat([z[low, rows], z[mid, rows], z[layer, rows]], dim=-1))

    def handed(self, normed: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
        """``inputs`` for one step that left at ``layer``: ``normed`` maps layers to their normed
        outputs [..., d] (``layer`` and the fusion layers shallower than it)."""
        if self.fusion is None:
            return normed[layer]
        return self.fuse(torch.cat([normed[min(i, layer)] for i in (*self.fusion, layer)], dim=-1))

    def empty_cache(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(batch, self.kv_heads, 0, self.head_dim)
        return z, z.clone()

    def forward(self, tokens, features, cache=None, start: int = 0, mask=None):
        """tokens [B, S], features [B, S, d] -> (predicted features [B, S, d], logits [B, S, Vd], cache).
        ``mask`` (bool, [B, 1, S, T] or broadcastable) says which cached and new keys each query
        sees instead of causality by position."""
        if cache is None:
            cache = self.empty_cache(tokens.shape[0])
        x = self.fc(torch.cat([self.embed(tokens), features], dim=-1))
        f, cache = self.decode(x, cache, torch.arange(start, start + tokens.shape[1]), mask)
        return f, self.head(f), cache

    def decode(self, x, cache, positions, mask=None):
        """The draft's decoder over its fused inputs ``x`` [B, S, d] at ``positions``: (normed
        states [B, S, d], the cache with their keys and values appended)."""
        f, keys, values = layer_step(self.spec, x, cache[0], cache[1], positions, mask=mask)
        return self.norm(f), (keys, values)

    def unrolled(self, tokens, features, depth: int):
        """The draft run ``depth`` steps ahead on its own guesses, as a tree step reaches depth j
        (EAGLE-3's training-time test): what training at depth >= 2 needs.

        tokens [n] at positions 1..n; features [n, d], the target's feature of each previous
        position. Step 1 is ``forward``. Step j runs positions j..n on tokens[j-1:] fed the
        features step j-1 predicted one position earlier; its query at position t sees step 1's
        keys up to t-j+1 (made from the target's features, the decoded context and the depth-1
        node) and step i's key at t-j+i for 1 < i <= j (the path's deeper nodes and itself).
        Returns [(predicted features [n-j+1, d], logits [n-j+1, Vd]) for j = 1..depth].
        """
        f, logits, cache = self(tokens[None], features[None], None, 1)
        steps = [(f[0], logits[0])]
        n = tokens.shape[0]
        key_pos, key_step = torch.arange(1, n + 1), torch.ones(n, dtype=torch.long)
        for j in range(2, depth + 1):
            pos = torch.arange(j, n + 1)
            x = self.fc(torch.cat([self.embed(tokens[j - 1:]), steps[-1][0][:-1]], dim=-1))[None]
            key_pos, key_step = torch.cat([key_pos, pos]), torch.cat([key_step, torch.full_like(pos, j)])
            first = pos[:, None] - j  # t - j: step i's visible key is at t-j+i
            mask = torch.where(key_step[None, :] == 1, key_pos[None, :] <= first + 1,
                               key_pos[None, :] == first + key_step[None, :])
            f, cache = self.decode(x, cache, pos, mask)
            steps.append((f[0], self.head(f)[0]))
        return steps

    @torch.no_grad()
    def propose(self, token: int, feature: torch.Tensor, cache, position: int, k: int = 4):
        """Top-k candidate target ids for the token after ``token``; returns (ids [k], cache)."""
        _, logits, cache = self(torch.tensor([[token]]), feature.view(1, 1, -1), cache, position)
        return self.vocab_map[logits[0, -1].topk(k).indices], cache


def fusion_layers(num_layers: int) -> tuple[int, int]:
    """The low and middle layers a fusion draft reads: (2, L/2) as EAGLE-3, kept below L/2 in small models."""
    mid = num_layers // 2
    return min(2, max(mid - 1, 0)), mid


def reduced_vocabulary(target_tokens: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The ``size`` most frequent target tokens (sorted ids): the draft's vocabulary."""
    counts = torch.bincount(target_tokens.flatten(), minlength=vocab_size)
    size = min(size, vocab_size)
    return counts.topk(size).indices.sort().values
