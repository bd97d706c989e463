"""Tree speculation's pure algorithms: tree shapes, token trees and context lookup.

No graph runs here: :class:`specee_compile.runtimes.tree.TreeDecoder` drafts and verifies
with them, and ``examples/standalone_algorithms.py`` holds the same algorithms for engines
outside this package (``tests/golden`` checks both against one recording).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from specee_compile.errors import ConfigError

HIDDEN = -1e9  # attention bias of a key a tree node must not see


@dataclass(frozen=True)
class TreeShape:
    """How a speculation tree grows: ``width`` children per expanded node and nodes expanded
    per depth, ``depth`` draft runs, ``budget`` draft nodes verified besides the newest token,
    and ``lookup``: up to that many more nodes from the context (the tokens that followed the
    latest earlier occurrence of the newest tokens, a chain merged into the tree).
    Written ``WxDxN`` or ``WxDxN+L``; a single number W is ``Wx1xW``. A ``:exit`` suffix
    (``1+4:exit``) turns on early exit inside verification (``exits``)."""

    width: int
    depth: int = 1
    budget: int = 1
    lookup: int = 0
    exits: bool = False  # merged mapping: verification may stop early at a predictor layer (lossy)

    @classmethod
    def parse(cls, value: "TreeShape | str | int") -> "TreeShape":
        if isinstance(value, TreeShape):
            return value
        if value is True:
            return DEFAULT_TREE
        text = str(value).strip()
        match = re.fullmatch(r"(\d+)(?:x(\d+)x(\d+))?(?:\+(\d+))?(:exit)?", text)
        if match is None:
            raise ConfigError(f"a tree shape is WIDTHxDEPTHxBUDGET like 4x2x6, one width like 4, either with +LOOKUP "
                              f"like 4x2x6+3 and :exit for early exit inside verification; got {value!r}.")
        width, depth, budget, lookup, exits = match.groups()
        return cls(int(width), int(depth or 1), int(budget or width), int(lookup or 0), exits is not None)

    def __str__(self) -> str:
        return (f"{self.width}x{self.depth}x{self.budget}" + (f"+{self.lookup}" if self.lookup else "")
                + (":exit" if self.exits else ""))

    @property
    def drafted(self) -> int:
        """Nodes the draft proposes: w at depth 1, w * w at every later depth."""
        return self.width + (self.depth - 1) * self.width * self.width

    def check(self, max_width: int) -> "TreeShape":
        if not 1 <= self.width <= max_width:
            raise ConfigError(f"tree {self}: the width must be from 1 to {max_width} (the draft graph's top-K).")
        if self.depth < 1:
            raise ConfigError(f"tree {self}: the depth must be at least 1.")
        if not 1 <= self.budget <= self.drafted:
            raise ConfigError(f"tree {self}: the budget must be from 1 to the {self.drafted} nodes this width and "
                              "depth draft.")
        return self


# The default, 1x1x1+4, was the fastest of 10 shapes on SmolLM2 here (docs/benchmarks/tree-shapes,
# then 1.31x dense over 80 prompts in docs/benchmarks/tree): fed its own regressed feature the
# earlier draft hit at depth 2 on 4-5% of forwards, so depth cost a draft run for little, and
# with the current draft a chain of two draft tokens is still slower; verifying more nodes
# costs more on a CPU.
DEFAULT_TREE = TreeShape(1, 1, 1, 4)


def context_lookup(context: list[int], length: int, longest: int = 3) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the context's last k tokens
    (k = ``longest`` down to 1, the first k that occurs): up to ``length`` after a match of
    ``longest`` tokens, at most k after a shorter one, whose continuation is right less often
    (a row it would add to the verification costs as much either way)."""
    if length <= 0 or len(context) < 2:
        return []
    tokens = np.asarray(context)
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # where an earlier match of the last token ends
    for k in range(min(longest, len(tokens) - 1), 0, -1):
        hits = ends[ends >= k - 1]
        for j in range(1, k):  # ... and of the k - 1 tokens before it
            hits = hits[tokens[hits - j] == tokens[-1 - j]]
        if len(hits):
            start = hits[-1] + 1
            return [int(t) for t in tokens[start:start + (length if k == longest else min(k, length))]]
    return []


@dataclass
class TokenTree:
    """A verification tree: node 0 is the newest token, nodes 1.. the drafted ones, parents
    before children (``parents[0]`` is -1)."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]

    @classmethod
    def star(cls, root: int, children: list[int]) -> "TokenTree":
        """The root and ``children`` at depth 1."""
        return cls([root, *children], [-1] + [0] * len(children), [0] + [1] * len(children))

    def __len__(self) -> int:
        return len(self.tokens)

    def child(self, node: int, token: int) -> int | None:
        """The child of ``node`` that holds ``token``, if any."""
        return next((c for c in range(node + 1, len(self)) if self.parents[c] == node and self.tokens[c] == token),
                    None)

    def add_chain(self, chain: list[int]) -> None:
        """Merge a chain of tokens after the root: follow the nodes that already hold them,
        append the rest."""
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
        """[1, 1, S, past + S]: 0 where a node sees (the past, its ancestors, itself), else HIDDEN."""
        s = len(self)
        bias = np.zeros((1, 1, s, past + s), np.float32)
        bias[0, 0, :, past + 1:] = HIDDEN
        for node in range(1, s):
            a = node
            while a > 0:
                bias[0, 0, node, past + a] = 0.0
                a = self.parents[a]
        return bias

    def accepted(self, greedy: np.ndarray, settled: np.ndarray | None = None) -> list[int] | None:
        """The nodes on the accepted path: from the root, the child whose token is its parent's
        greedy token, while there is one. With ``settled`` (a flag per node: its token is
        final at this layer), None unless every node on the path and the last one are settled."""
        path, node = [], 0
        while True:
            if settled is not None and not settled[node]:
                return None
            node = self.child(node, int(greedy[node]))
            if node is None:
                return path
            path.append(node)
