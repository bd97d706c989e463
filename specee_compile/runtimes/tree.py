"""Lossless tree speculation (EAGLE-2 style) over a SpecEE bundle's draft and tree graphs.

Per target forward (batch 1, greedy), with ``t`` the newest token, not yet in the cache, at
position n, and a tree shape of width w, depth D and budget N (``TreeShape``):

1. the tree draft graph (``specee/draft_tree.onnx``) runs over the accepted tokens it has not
   seen yet and t, each fed the target feature that produced it; t's top-w tokens become the
   depth-1 nodes, scored by their log-probability under the draft. For depths 2..D, the w
   best-scored nodes of the previous depth run through the draft in one call, each fed its
   parent's draft feature (the draft's estimate of the target feature, EAGLE's regression)
   and seeing only its ancestors; each gets its top-w tokens as children, scored by the
   path's summed log-probability;
2. the N best-scored nodes (a child never scores above its parent, so they form a tree),
   parents first, plus with a lookup of L the up to L tokens that followed the latest
   earlier occurrence of the newest 1-3 tokens in the context (merged in as a chain from t),
   follow t in one target forward of the tree graph (``specee/tree.onnx``):
   node s at position n + its depth sees the past, its ancestors and itself
   (``attention_bias``); the graph returns every node's greedy token and writes node s's K/V
   at row n + s;
3. from t, the walk follows the child whose token is the target's greedy token at its parent
   while there is one. The m accepted tokens and the greedy token at the last of them (the
   bonus) are emitted: m + 1 tokens per target forward, each exactly what dense greedy
   decoding emits. The accepted nodes' K/V rows move to rows n+1..n+m; the other rows are
   overwritten later.

The output equals dense greedy decoding token for token, up to floating-point differences
between the one-token and the many-token kernels.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from specee_compile.errors import BundleError, ConfigError
from specee_compile.runtimes.ort import Scored, check_io, open_session, session_options
from specee_compile.runtimes.specee import SpecEEEngine, lap, SpecEEState, run_bound

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
    """Up to ``length`` tokens that followed the latest earlier occurrence of the context's
    last k tokens (k = ``longest`` down to 1, the first k that occurs)."""
    if length <= 0 or len(context) < 2:
        return []
    tokens = np.asarray(context)
    for k in range(min(longest, len(tokens) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], k)
        hits = np.flatnonzero((windows == tokens[-k:]).all(axis=1))
        if len(hits):
            start = hits[-1] + k
            return [int(t) for t in tokens[start:start + length]]
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


class _TreeState(SpecEEState):
    def __init__(self, engine: "TreeEngine"):
        super().__init__(engine)
        self.tree_binding = self.cache_bindings([engine.tree], [range(engine.num_layers)])[0]
        self.draft_tree_binding = self.draft_cache_binding(engine.draft_tree)
        self.tree_seg_bindings = None  # bound when the first shape with ':exit' runs
        self.fed: list = []  # per tree node: the feature the draft feeds it (for its candidates)
        self.root_top = None  # the draft's top-K after the newest token
        self.draft_row = 0  # the draft cache's first free row after growing the tree
        self.pending: list[tuple[int, int]] = []  # (token, exit layer) already in the cache, to return next
        self.context: list[int] = []  # the prompt and every token decided so far (for lookup)
        self.draft_prefix: list[tuple[int, np.ndarray]] = []  # (token, feature that produced it) for the draft


class TreeEngine(SpecEEEngine):
    """A SpecEE bundle compiled with ``--tree``, decoding by lossless tree speculation with
    trees of ``shape`` (a ``TreeShape``). ``generate`` reports ``accepted_lengths``."""

    def __init__(self, path: Path, manifest: dict, tokenizer, threads: int | None = None,
                 profile_dir: Path | None = None, shape: TreeShape | str | int = DEFAULT_TREE,
                 threshold: float | None = None):
        super().__init__(path, manifest, tokenizer, threads, profile_dir, threshold)
        spec = manifest["specee"].get("tree")
        if not isinstance(spec, dict) or "file" not in spec or "draft" not in spec:
            raise BundleError(f"{self.path} has no tree verification and tree draft graphs; recompile it with "
                              "--specee --tree.")
        self.max_width = int(spec.get("max_width", 1))
        self._request = threading.local()  # the shape of this thread's generate call
        so = session_options(threads, self.spinning, profile_dir)
        sessions = []
        for graph, field in ((spec, "specee.tree.file"), (spec["draft"], "specee.tree.draft.file")):
            file = self.file(graph["file"], field)
            sessions.append(open_session(file, so))
            check_io(sessions[-1], graph, file)
        self.tree, self.draft_tree = sessions
        # The tree step with per-node exits (merged mapping): loaded when a shape with ':exit' first runs.
        self._tree_segment_specs = spec.get("segments", [])
        self._session_options = so
        self.tree_segments: list[ort.InferenceSession] = []
        self.tree_segment_layers = [range(g["first_layer"], g["last_layer"] + 1) for g in self._tree_segment_specs]
        self.tree_segment_exit = [g["exit_layer"] for g in self._tree_segment_specs]
        self.shape = shape

    @property
    def shape(self) -> TreeShape:
        """The trees this engine drafts and verifies."""
        return self._shape

    @shape.setter
    def shape(self, value: TreeShape | str | int) -> None:
        self._shape = self._checked(value)

    def _checked(self, value: TreeShape | str | int) -> TreeShape:
        shape = TreeShape.parse(value).check(self.max_width)
        if shape.exits:
            if not self._tree_segment_specs:
                raise BundleError(f"tree {shape}: {self.path} has no tree segments with per-node exits; recompile it "
                                  "with --specee --tree and exit mode segments, or drop ':exit'.")
            self._load_tree_segments()
        return shape

    def _load_tree_segments(self) -> None:
        with self._lock:
            if self.tree_segments:
                return
            sessions = []
            for g in self._tree_segment_specs:
                file = self.file(g["file"], "specee.tree.segments.file")
                sessions.append(open_session(file, self._session_options))
                check_io(sessions[-1], g, file)
            self.tree_segment_inputs = [[i.name for i in x.get_inputs() if not i.name.startswith("past_key_values.")]
                                        for x in sessions]
            self.tree_segment_outputs = [[o.name for o in x.get_outputs() if not o.name.startswith("present.")]
                                         for x in sessions]
            self.tree_segments = sessions

    def generate(self, prompt, max_new_tokens: int = 128, stream=None, chat: bool | None = None,
                 tree: TreeShape | str | int | None = None):
        """``OrtEngine.generate`` by tree speculation; ``tree`` overrides the engine's ``shape``
        for this call (thread-safe: concurrent calls may use different shapes)."""
        self._request.shape = self.shape if tree is None else self._checked(tree)
        return super().generate(prompt, max_new_tokens, stream, chat)

    def score(self, prompt, continuation, chat: bool | None = None, tree: TreeShape | str | int | None = None):
        """Teacher forcing by tree steps: after the prompt and the continuation's first k
        tokens, a tree step runs; its emitted tokens are the predictions at k, k+1, ... up to
        and including the first that differs from the continuation (the rest depended on it).
        Each position is predicted once. Lossless shapes predict the dense tokens; with
        ``:exit`` this measures what early exit inside verification changes."""
        self._request.shape = self.shape if tree is None else self._checked(tree)
        ids = self.encode(prompt, chat)
        continuation = self._check_continuation(ids, continuation)
        state = self._acquire()
        try:
            state.breakdown, state.accepted = {}, []
            predicted, exits = [self._first_token(state, ids)], [self.num_layers - 1]
            features = [state.feature[0, -1].copy()]
            while len(predicted) < len(continuation):
                k = len(predicted)
                state.context[-1] = continuation[k - 1]  # fed the reference's token, not the prediction
                emitted, producers, feats, layer = self._tree_step(state, continuation[k - 1], len(ids) + k - 1)
                count = next((j + 1 for j, t in enumerate(emitted) if t != continuation[k + j]
                              or k + j + 1 == len(continuation)), len(emitted))
                self._commit(state, emitted[:count], producers, feats)
                predicted += emitted[:count]
                exits += [layer] * count
                features += [feats[0, p].copy() for p in producers[:count]]
        finally:
            self._release(state)
        return Scored(predicted, exits, np.stack(features))

    def _read_decode_graphs(self, spec: dict) -> list[str]:
        self.segment_layers, self.segment_exit = [], []  # no segments: the tree graph runs every layer
        return []

    def _sessions(self) -> list[ort.InferenceSession]:
        return [self.session, self.draft, self.tree, self.draft_tree, *self.tree_segments]

    def _new_state(self) -> _TreeState:
        return _TreeState(self)

    def _first_token(self, state: _TreeState, ids: list[int]) -> int:
        state.pending, state.draft_prefix = [], []
        token = super()._first_token(state, ids)
        state.context = [*ids, token]
        return token

    def _next_token(self, state: _TreeState, token: int, n: int) -> tuple[int, int]:
        if state.pending:  # accepted by the last tree step: ``token`` is already in the cache at n
            return state.pending.pop(0)
        emitted, producers, feats, layer = self._tree_step(state, token, n)
        self._commit(state, emitted, producers, feats)
        state.pending = [(t, layer) for t in emitted[1:]]
        return emitted[0], layer

    def _tree_step(self, state: _TreeState, token: int, n: int):
        """Draft a tree after ``token`` at position n, verify it (with early exit when the
        shape asks) and move the accepted nodes' K/V rows to n+1..; return the emitted tokens,
        the node that produced each, every node's feature [1, S, d] and the exit layer."""
        shape = getattr(self._request, "shape", self.shape)
        clock = time.perf_counter()
        tree = self._draft_tree(state, token, n)
        candidates = self._candidates(state, tree, n) if shape.exits else None
        clock = lap(state.breakdown, "draft", clock)
        if candidates is not None:
            path, greedy, feats, layer = self._verify_with_exits(state, tree, n, candidates)
        else:
            greedy, feats = self._verify(state, tree, n)
            path, layer = tree.accepted(greedy), self.num_layers - 1
        lap(state.breakdown, "verify", clock)
        rows = [n + s for s in path]
        if rows != list(range(n + 1, n + 1 + len(path))):
            for array in state.arrays:  # the accepted nodes' K/V goes to the path's rows
                array[0, :, n + 1:n + 1 + len(path), :] = array[0][:, rows, :]
        producers = [0, *path]  # the node whose target feature produced each emitted token
        state.history.append(layer)
        return [int(greedy[s]) for s in producers], producers, feats, layer

    def _commit(self, state: _TreeState, emitted: list[int], producers: list[int], feats: np.ndarray) -> None:
        """Keep the first ``len(emitted)`` tokens of a tree step: the draft is fed all but the
        last with the features that produced them, the last's feature waits for the next step."""
        state.context += emitted
        state.draft_prefix = [(emitted[i], feats[:, producers[i]:producers[i] + 1].copy())
                              for i in range(len(emitted) - 1)]
        last = producers[len(emitted) - 1]
        state.feature = feats[:, last:last + 1].copy()
        state.accepted.append(len(emitted))

    def _draft_tree(self, state: _TreeState, token: int, n: int) -> TokenTree:
        """Grow the draft's tree after ``token`` at position n (module docstring, step 1) and
        keep the budget's best nodes, parents first."""
        shape = getattr(self._request, "shape", self.shape)
        w, depth, budget = shape.width, shape.depth, shape.budget
        # The draft's cache row r holds the token at position r + 1 (it starts at the prompt's second
        # token), and its graph rotates by row: t goes to row n - 1, expanded nodes from row n on.
        root = n - 1
        ids = [t for t, _ in state.draft_prefix] + [token]
        feats = np.concatenate([f for _, f in state.draft_prefix] + [state.feature], axis=1)
        state.draft_prefix = []
        start = state.draft_len
        top, logp, f = self._run_draft(state, ids, feats, list(range(start, root + 1)),
                                       np.zeros((1, 1, len(ids), root + 1), np.float32), start)
        state.draft_len = root + 1
        state.root_top, root_feature = top[-1].copy(), f[0, -1]
        # per node: token, parent (-1: the root), depth, score, the draft feature it is fed (its parent's), draft row
        tokens, parents, depths = list(top[-1, :w]), [-1] * w, [1] * w
        scores, inputs, rows = list(logp[-1, :w]), [f[0, -1]] * w, [None] * w
        frontier, row = list(range(w)), root + 1
        for d in range(2, depth + 1):
            expand = sorted(frontier, key=lambda i: -scores[i])[: min(w, self.capacity - row)]
            if not expand:
                break
            bias = np.full((1, 1, len(expand), row + len(expand)), HIDDEN, np.float32)
            bias[0, 0, :, :root + 1] = 0.0
            for j, node in enumerate(expand):
                rows[node] = row + j
                a = node
                while a >= 0:
                    bias[0, 0, j, rows[a]] = 0.0
                    a = parents[a]
            top, logp, f = self._run_draft(state, [int(tokens[i]) for i in expand],
                                           np.stack([inputs[i] for i in expand])[None], [root + d - 1] * len(expand),
                                           bias, row)
            row += len(expand)
            frontier = []
            for j, node in enumerate(expand):
                for k in range(w):
                    frontier.append(len(tokens))
                    tokens.append(top[j, k])
                    parents.append(node)
                    depths.append(d)
                    scores.append(scores[node] + logp[j, k])
                    inputs.append(f[0, j])
                    rows.append(None)
        best = sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i], i))[: min(budget, self.capacity - n - 1)]
        order = sorted(best, key=lambda i: (depths[i], i))
        index = {node: s + 1 for s, node in enumerate(order)}
        tree = TokenTree([token, *(int(tokens[i]) for i in order)], [-1, *(index.get(parents[i], 0) for i in order)],
                         [0, *(depths[i] for i in order)])
        room = self.capacity - n - len(tree)  # rows left after the draft's nodes
        tree.add_chain(context_lookup(state.context, min(shape.lookup, room)))
        state.draft_row = row
        state.fed = [None, *(inputs[i] for i in order)]
        for s in range(len(state.fed), len(tree)):  # the lookup chain's nodes: the draft never ran on their parents
            parent = tree.parents[s]
            state.fed.append(root_feature if parent == 0 else state.fed[parent])
        return tree

    def _candidates(self, state: _TreeState, tree: TokenTree, n: int) -> np.ndarray | None:
        """[S, 4]: every node's own exit candidates, the draft's top-4 after it (what the
        predictors were trained on): the root's from growing the tree, the other nodes' from
        one more draft run over all of them (tree attention, each fed its parent's draft
        feature; a lookup node deeper than 1, whose parent the draft never ran on, takes its
        parent's input feature). None when the draft's cache has no room for them."""
        root, row, m = n - 1, state.draft_row, len(tree) - 1
        if m == 0:
            return state.root_top[None, :4].astype(np.int64)
        if row + m > self.capacity:
            return None
        bias = np.full((1, 1, m, row + m), HIDDEN, np.float32)
        bias[0, 0, :, :root + 1] = 0.0
        for s in range(1, len(tree)):
            a = s
            while a > 0:
                bias[0, 0, s - 1, row + a - 1] = 0.0
                a = tree.parents[a]
        top, _, _ = self._run_draft(state, tree.tokens[1:], np.stack(state.fed[1:])[None],
                                    [root + d for d in tree.depths[1:]], bias, row)
        return np.concatenate([state.root_top[None, :4], top[:, :4]]).astype(np.int64)

    def _run_draft(self, state: _TreeState, ids: list[int], features: np.ndarray, positions: list[int],
                   bias: np.ndarray, past: int):
        """The tree draft graph over ``ids`` written from row ``past``: every node's top-K target
        ids [S, K], their log-probabilities [S, K] and the draft's features [1, S, d]."""
        b = state.draft_tree_binding
        b.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
        b.bind_cpu_input("features", np.ascontiguousarray(features, np.float32))
        b.bind_cpu_input("past_sequence_length", np.array([past], np.int64))
        b.bind_cpu_input("position_ids", np.asarray([positions], np.int64))
        b.bind_cpu_input("attention_bias", bias)
        for name in ("draft_ids", "draft_logprobs", "draft_features"):
            b.bind_output(name)  # rebound each run: their shapes change with the number of nodes
        self.draft_tree.run_with_iobinding(b)
        out = b.get_outputs()  # the presents, then these three (bound after them)
        return out[-3].numpy(), out[-2].numpy(), out[-1].numpy()

    def verification_seconds(self, prompt, sizes, repeats: int = 10) -> dict[int, float]:
        """Median seconds of one tree verification forward per tree size (nodes, the root
        included) after ``prompt``: what verifying more candidates costs on this machine."""
        ids = self.encode(prompt)
        rng = np.random.default_rng(0)
        state = self._acquire()
        try:
            state.breakdown, state.accepted = {}, []
            token = self._first_token(state, ids)
            n = len(ids)
            out = {}
            for size in sizes:
                if not 1 <= size <= self.capacity - n:
                    raise BundleError(f"a tree of {size} nodes after {n} prompt tokens does not fit the cache "
                                      f"({self.capacity}).")
                laps = []
                for _ in range(repeats + 1):
                    tree = TokenTree.star(token, [int(c) for c in rng.integers(0, self.vocab_size, size - 1)])
                    start = time.perf_counter()
                    self._verify(state, tree, n)
                    laps.append(time.perf_counter() - start)
                out[size] = statistics.median(laps[1:])  # the first run of a new shape warms up
            return out
        finally:
            self._release(state)

    def _verify(self, state: _TreeState, tree: TokenTree, n: int):
        """One target forward over ``tree`` rooted at position n; its nodes' greedy tokens [S]
        and features [1, S, d]."""
        b = state.tree_binding
        b.bind_cpu_input("input_ids", np.array([tree.tokens], np.int64))
        b.bind_cpu_input("past_sequence_length", np.array([n], np.int64))
        b.bind_cpu_input("position_ids", np.array([[n + d for d in tree.depths]], np.int64))
        b.bind_cpu_input("attention_bias", tree.bias(n))
        b.bind_output("tokens")  # rebound each run: their shapes change with the tree's size
        b.bind_output("features")
        self.tree.run_with_iobinding(b)
        out = b.get_outputs()  # the presents, then tokens and features (bound after them)
        return out[-2].numpy()[0], out[-1].numpy()

    def _verify_with_exits(self, state: _TreeState, tree: TokenTree, n: int, candidates: np.ndarray):
        """Tree verification through the tree segments (merged mapping): after each active
        predictor layer, the walk from the root follows every node's exit token while the
        node's exit flag is set; when it ends at a settled node (the token is not a child, or
        a leaf) the path is settled there, the rest of the layers are skipped and the path's
        K/V for them comes from its exit hidden states (state propagation). Returns the
        accepted path, every node's token, features [1, S, d] and the layer it left from."""
        s = len(tree)
        positions = np.array([[n + d for d in tree.depths]], np.int64)
        values = {"input_ids": np.array([tree.tokens], np.int64), "past_sequence_length": np.array([n], np.int64),
                  "position_ids": positions, "attention_bias": tree.bias(n), "draft_ids": candidates,
                  "active_layers": self.active_layers(state.history), "exit_threshold": self._threshold}
        active = values["active_layers"]
        if state.tree_seg_bindings is None:
            state.tree_seg_bindings = state.cache_bindings(self.tree_segments, self.tree_segment_layers)
        for k, exit_at in enumerate(self.tree_segment_exit):
            outs = run_bound(self.tree_segments[k], state.tree_seg_bindings[k], self.tree_segment_inputs[k],
                             self.tree_segment_outputs[k], values)
            values.update(outs)
            if exit_at is None or not active[exit_at]:
                continue
            flags = np.broadcast_to(outs[f"exit_flag.{exit_at}"].numpy(), (s,))
            if not flags[0]:
                continue
            tokens = np.broadcast_to(outs[f"exit_token.{exit_at}"].numpy(), (s,))
            path = tree.accepted(tokens, settled=flags)
            if path is None:
                continue
            hidden = outs[f"layers.{exit_at}.output"].numpy()[0]
            for node in (0, *path):
                self._propagate(state, hidden[node], exit_at, n + node, positions[0, node])
            return path, tokens, outs[f"exit_feature.{exit_at}"].numpy()[None], exit_at
        tokens = values["tokens"].numpy()[0]
        return tree.accepted(tokens), tokens, values["features"].numpy(), self.num_layers - 1
