"""The decode loops' pure algorithms, for examples/standalone_ort.py: numpy and the standard library only.

An engine outside specee_compile has to re-implement these pieces of docs/bundle-format.md;
this is the standalone example's version, kept apart from its ONNX Runtime plumbing so that
tests/test_golden.py can call each piece directly. The package has its own versions
(``specee_compile.schedule.Schedule.active``, ``propagated_kv``, ``TreeShape.parse``,
``context_lookup`` and ``TokenTree``), and both are checked against the same recorded
outputs (tests/golden/algorithms.json), so neither can drift from the other.

- ``scheduled_layers``: which predictor layers a decode step may run (the exit schedule);
- ``propagated_kv``: a skipped layer's K/V from the exit hidden state (state propagation);
- ``parse_shape``: the ``--tree`` shape ``WxDxN+L:exit``;
- ``lookup_chain``: the tokens that followed the newest tokens earlier in the context;
- ``TokenTree``: a verification tree's attention bias, accepted path and lookup chain.

Like the example, it never imports specee_compile, transformers or torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

HIDDEN = -1e9  # attention bias of a row a tree node must not see


# ---- the exit schedule and K/V state propagation (SpecEE decode step, steps 2 and 4) ---------


def scheduled_layers(schedule: dict, history: list[int]) -> set[int]:
    """The layers whose predictors may run, from the manifest's ``specee.schedule`` and the
    exit layer of every decode step so far (newest last). The engine keeps those that have
    a predictor (``specee.predictor_layers``)."""
    if not schedule["online"] or len(history) < schedule["history"]:
        return set(schedule["offline_layers"])
    # the online window: e + offset for each of the last `history` exit layers e, below the last layer
    return {e + o for e in history[-schedule["history"]:] for o in schedule["offsets"]
            if 0 <= e + o < schedule["num_layers"] - 1}


def rope_rows(kv: dict[str, np.ndarray], j: int, position: int):
    """cos/sin rows [R/2] of layer j's RoPE table at ``position`` (``{j}.rope``: 0 for
    ``cos``/``sin``, i for ``cos.{i}``/``sin.{i}``, -1 for none; absent means 0), or (None, None)."""
    index = int(kv[f"{j}.rope"][0]) if f"{j}.rope" in kv else 0
    if index < 0:
        return None, None
    suffix = "" if index == 0 else f".{index}"
    return kv[f"cos{suffix}"][position], kv[f"sin{suffix}"][position]


def _rms(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def propagated_kv(kv: dict[str, np.ndarray], j: int, h: np.ndarray, cos: np.ndarray | None,
                  sin: np.ndarray | None, eps: float, kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer j's key (after its key norm and RoPE) and value, each [kv_heads, D], for the exit
    hidden state h [d].

    ``kv`` holds the kv_fill tensors (``{j}.norm`` unless the layer has no input norm,
    ``{j}.k``, ``{j}.v``, optional ``{j}.k_bias``/``{j}.v_bias``, optional ``{j}.k_norm``: [D]
    per head or [kv_heads * D] over the whole key); ``cos``/``sin`` [R/2] are the RoPE rows of
    the position (``rope_rows``), rotating the first R dimensions, or None for no RoPE.
    """
    x = _rms(h, eps) * kv[f"{j}.norm"] if f"{j}.norm" in kv else h  # layer j's input RMSNorm
    k = x @ kv[f"{j}.k"].T + kv.get(f"{j}.k_bias", 0.0)  # [kv_heads * D]
    v = x @ kv[f"{j}.v"].T + kv.get(f"{j}.v_bias", 0.0)
    if f"{j}.k_norm" in kv:
        w = kv[f"{j}.k_norm"]
        k = _rms(k, eps) * w if w.shape[0] == k.shape[0] else _rms(k.reshape(kv_heads, -1), eps) * w
    k = k.reshape(kv_heads, -1)  # [kv_heads, D]
    if cos is not None:
        half = cos.shape[0]
        k1, k2, rest = k[:, :half], k[:, half:2 * half], k[:, 2 * half:]
        k = np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin, rest], axis=1)  # RoPE, rotate-half
    return k, v.reshape(kv_heads, -1)


# ---- tree speculation: the shape, the context lookup and the token tree ----------------------


class TreeShape(NamedTuple):
    width: int  # children per expanded node, and nodes expanded per depth
    depth: int  # draft runs
    budget: int  # draft nodes verified besides the newest token
    lookup: int  # at most this many more nodes from the context
    exits: bool  # ":exit": early exit inside verification (lossy)


def parse_shape(text: str) -> TreeShape:
    """"WxDxN+L" (or "W", "W+L"), optionally ":exit"; raises ValueError for anything else."""
    match = re.fullmatch(r"(\d+)(?:x(\d+)x(\d+))?(?:\+(\d+))?(:exit)?", text.strip())
    if match is None:
        raise ValueError(f"--tree takes WIDTHxDEPTHxBUDGET[+LOOKUP][:exit] like 4x2x6+4 or 1+4:exit, not {text!r}")
    w, d, n, lookup, exits = match.groups()
    return TreeShape(int(w), int(d or 1), int(n or w), int(lookup or 0), exits is not None)


def lookup_chain(context: list[int], length: int) -> list[int]:
    """The tokens after the latest earlier occurrence of the context's last 3 tokens (else 2,
    else 1): up to ``length`` after a 3-token match, at most k after a k-token one."""
    for k in range(min(3, len(context) - 1), 0, -1):
        tail = context[-k:]
        for start in range(len(context) - k - 1, -1, -1):
            if context[start:start + k] == tail:
                return context[start + k:start + k + (length if k == 3 else min(k, length))]
    return []


@dataclass
class TokenTree:
    """A verification tree: node 0 is the newest token, nodes 1.. the drafted ones, parents
    before children (``parents[0]`` is -1, ``depths[0]`` is 0)."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    def child(self, node: int, token: int) -> int | None:
        """The child of ``node`` that holds ``token``, if any."""
        return next((c for c in range(node + 1, len(self)) if self.parents[c] == node and self.tokens[c] == token),
                    None)

    def add_chain(self, chain: list[int]) -> None:
        """Merge a chain of tokens after the root: follow the nodes that already hold its
        tokens, append the rest."""
        node = 0
        for token in chain:
            child = self.child(node, token)
            if child is None:
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(self.depths[node] + 1)
                child = len(self) - 1
            node = child

    def bias(self, past: int) -> np.ndarray:
        """attention_bias [1, 1, S, past + S]: 0 where node s sees (the past, the root, its
        ancestors and itself: node a sits at column past + a), else HIDDEN."""
        s = len(self)
        bias = np.zeros((1, 1, s, past + s), np.float32)
        bias[0, 0, :, past + 1:] = HIDDEN
        for node in range(1, s):
            a = node
            while a > 0:
                bias[0, 0, node, past + a] = 0.0
                a = self.parents[a]
        return bias

    def accepted(self, choice: np.ndarray, settled: np.ndarray | None = None) -> list[int] | None:
        """The accepted path's nodes: from the root, the child holding its parent's ``choice``
        token, while there is one. With ``settled`` (a flag per node), None unless every node
        on the walk, the last included, is settled."""
        path, node = [], 0
        while True:
            if settled is not None and not settled[node]:
                return None
            node = self.child(node, int(choice[node]))
            if node is None:
                return path
            path.append(node)
