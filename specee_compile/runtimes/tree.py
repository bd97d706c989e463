"""Lossless tree speculation (EAGLE-2 style) over a SpecEE bundle's draft and tree graphs.

``TreeDecoder`` is the algorithm; ``backends/ort_tree.py`` (ONNX Runtime) or
``backends/tensorrt_tree.py`` (TensorRT engines) runs its graphs and
``speculation.py`` holds the pure pieces (tree shapes, token trees, context lookup).

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
   earlier occurrence of the newest 1-3 tokens in the context (after a match of k < 3
   tokens, at most k of them; merged in as a chain from t),
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

import time
from dataclasses import dataclass, field

import numpy as np

from specee_compile.contract import (ACTIVE_LAYERS, ATTENTION_BIAS, DRAFT_IDS, EXIT_THRESHOLD, FEATURES, INPUT_IDS,
                                     NORMED_FEATURES, PAST_LENGTH, POSITION_IDS, TOKENS, exit_feature, exit_flag,
                                     exit_token, layer_output, normed_exit_feature)
from specee_compile.errors import ConfigError
from specee_compile.runtimes.decoders import Request, SegmentedDecoder, lap
from specee_compile.runtimes.engine import Forward
from specee_compile.runtimes.speculation import DEFAULT_TREE, HIDDEN, TokenTree, TreeShape, context_lookup

__all__ = ["DEFAULT_TREE", "TokenTree", "TreeDecoder", "TreeShape", "context_lookup"]


@dataclass
class TreeRequest(Request):
    shape: TreeShape = DEFAULT_TREE  # this call's trees
    fed: list = field(default_factory=list)  # per tree node: the feature the draft feeds it (for its candidates)
    root_top: object = None  # the draft's top-K after the newest token
    draft_row: int = 0  # the draft cache's first free row after growing the tree
    context: list[int] = field(default_factory=list)  # the prompt and every token decided so far (for lookup)
    draft_prefix: list = field(default_factory=list)  # (token, feature that produced it) the draft has not seen


class TreeDecoder(SegmentedDecoder):
    """Decoding by lossless tree speculation with trees of ``shape`` over a SpecEE bundle
    compiled with ``--tree`` (the backend: ``backends.ort_tree.OrtTree`` or, for a TensorRT
    bundle, ``backends.tensorrt_tree.TrtTree``)."""

    speculative = True

    def __init__(self, backend, bundle, spec, shape=DEFAULT_TREE, threshold: float | None = None):
        super().__init__(backend, bundle, spec, threshold)
        self.capacity, self.vocab_size = bundle.capacity, bundle.vocab_size
        self.shape = shape

    @property
    def shape(self) -> TreeShape:
        """The trees this decoder drafts and verifies unless a call asks for others."""
        return self._shape

    @shape.setter
    def shape(self, value) -> None:
        self._shape = self._checked(value)

    def _checked(self, value) -> TreeShape:
        shape = TreeShape.parse(value).check(self.backend.max_width)
        if shape.exits:
            self.backend.load_tree_segments()
        return shape

    def new_request(self) -> TreeRequest:
        return TreeRequest(self.backend.new_buffers())

    def configure(self, request: TreeRequest, tree=None, **options) -> None:
        """``tree``: this call's shape (concurrent calls may use different shapes)."""
        if options:
            raise ConfigError(f"tree speculation takes the per-call option tree=SHAPE; got {sorted(options)}.")
        request.shape = self.shape if tree is None else self._checked(tree)

    def prefill(self, request: TreeRequest, ids: list[int]) -> int:
        request.draft_prefix = []
        token = super().prefill(request, ids)
        request.context = [*ids, token]
        return token

    def step(self, request: TreeRequest, token: int, n: int) -> Forward:
        emitted, producers, feats, layer = self._tree_step(request, token, n)
        self._commit(request, emitted, producers, feats)
        return Forward(emitted, layer)

    def score(self, request: TreeRequest, ids: list[int], continuation: list[int]):
        """Teacher forcing by tree steps: after the prompt and the continuation's first k
        tokens, a tree step runs; its emitted tokens are the predictions at k, k+1, ... up to
        and including the first that differs from the continuation (the rest depended on it).
        Each position is predicted once. Lossless shapes predict the dense tokens; with
        ``:exit`` this measures what early exit inside verification changes."""
        predicted, exits = [self.prefill(request, ids)], [self.num_layers - 1]
        features = [self.backend.feature(request.buffers)]  # the normed states the predictions came from
        while len(predicted) < len(continuation):
            k = len(predicted)
            request.context[-1] = continuation[k - 1]  # fed the reference's token, not the prediction
            emitted, producers, feats, layer = self._tree_step(request, continuation[k - 1], len(ids) + k - 1)
            count = next((j + 1 for j, t in enumerate(emitted) if t != continuation[k + j]
                          or k + j + 1 == len(continuation)), len(emitted))
            self._commit(request, emitted[:count], producers, feats)
            predicted += emitted[:count]
            exits += [layer] * count
            features += [request.buffers.tree_normed[0, p].copy() for p in producers[:count]]
        return predicted, exits, features

    def known_features(self, request: TreeRequest, ids: list[int], known: list[int]) -> tuple[list[int], np.ndarray]:
        """One step-graph pass over a prompt and its known greedy continuation (a dense decode's
        tokens): the sequence with the target's next greedy token appended, and the feature the
        draft is fed at every position but that last one [1, S - 1, d]. What ``accepted_lengths``
        replays; one pass serves every shape."""
        sequence = [*ids, *known]
        after = self.backend.prefill(request.buffers, sequence)
        return [*sequence, after], np.array(self.backend.prompt_features(request.buffers), np.float32)

    def accepted_lengths(self, request: TreeRequest, prompt_tokens: int, sequence: list[int], features: np.ndarray,
                         max_new_tokens: int, stop_tokens=()) -> list[int]:
        """Tree speculation of ``request``'s shape on a known text (``known_features``), what
        ``Engine.generate`` would accept per target forward without running the target: being
        lossless, the forwards emit the known greedy tokens, so each tree's accepted path is the
        longest that follows the text, and the draft is fed the text's features where a
        forward would hand it the tree's (the same states, up to the kernels' rounding). The
        draft's trees are grown for real (their seconds go to ``request.breakdown``). Shapes
        with ``:exit`` change the tokens and are not replayed. ``stop_tokens``: the end-of-text
        ids, which end it as they end a decode."""
        if request.shape.exits:
            raise ConfigError(f"a tree shape with ':exit' ({request.shape}) is not lossless; run it to measure it.")
        n = prompt_tokens
        request.history, request.draft_len, request.draft_prefix = [], 0, []
        request.feature = features[:, n - 1:n]
        if n > 1:
            self.draft(request, sequence[1:n], features[:, :n - 1])
        request.context = sequence[:n + 1]
        token, out, queue, accepted = sequence[n], 0, [], []
        while token not in stop_tokens:  # Engine._generate's loop
            out += 1
            if out >= max_new_tokens or n >= self.capacity or n + 1 >= len(sequence):
                break
            if not queue:
                queue = self._known_step(request, token, n, sequence, features)
                accepted.append(len(queue))
            token = queue.pop(0)
            n += 1
        return accepted

    def _known_step(self, request: TreeRequest, token: int, n: int, sequence: list[int], features: np.ndarray):
        clock = time.perf_counter()
        tree = self._draft_tree(request, token, n)
        lap(request.breakdown, "draft", clock)
        on_text = [True]  # node s holds the text's token at its position, and so do its ancestors
        for s in range(1, len(tree)):
            position = n + tree.depths[s]
            on_text.append(on_text[tree.parents[s]] and position < len(sequence)
                           and tree.tokens[s] == sequence[position])
        greedy = [sequence[n + d + 1] if ok and n + d + 1 < len(sequence) else -1
                  for ok, d in zip(on_text, tree.depths)]
        # past the text's end (its end-of-text token) the bonus token is unknown (-1): a decode
        # would emit one there too (and may accept more after the end-of-text token, which it
        # never outputs and this does not count)
        producers = [0, *tree.accepted(greedy)]
        feats = np.zeros((1, len(tree), features.shape[-1]), np.float32)
        for s in producers:
            if n + tree.depths[s] < features.shape[1]:  # else the end-of-text token's, never fed on
                feats[0, s] = features[0, n + tree.depths[s]]
        emitted = [greedy[s] for s in producers]
        self._commit(request, emitted, producers, feats)
        return emitted

    def _tree_step(self, request: TreeRequest, token: int, n: int):
        """Draft a tree after ``token`` at position n, verify it (with early exit when the
        shape asks) and move the accepted nodes' K/V rows to n+1..; return the emitted tokens,
        the node that produced each, every node's feature [1, S, d] and the exit layer."""
        clock = time.perf_counter()
        tree = self._draft_tree(request, token, n)
        candidates = self._candidates(request, tree, n) if request.shape.exits else None
        clock = lap(request.breakdown, "draft", clock)
        if candidates is not None:
            path, greedy, feats, layer = self._verify_with_exits(request, tree, n, candidates)
        else:
            greedy, feats = self.verify(request, tree, n)
            path, layer = tree.accepted(greedy), self.num_layers - 1
        lap(request.breakdown, "verify", clock)
        rows = [n + s for s in path]
        if rows != list(range(n + 1, n + 1 + len(path))):  # the accepted nodes' K/V goes to the path's rows
            self.backend.keep_path(request.buffers, n, rows)
        producers = [0, *path]  # the node whose target feature produced each emitted token
        request.history.append(layer)
        return [int(greedy[s]) for s in producers], producers, feats, layer

    def _commit(self, request: TreeRequest, emitted: list[int], producers: list[int], feats: np.ndarray) -> None:
        """Keep the first ``len(emitted)`` tokens of a tree step: the draft is fed all but the
        last with the features that produced them, the last's feature waits for the next step."""
        request.context += emitted
        request.draft_prefix = [(emitted[i], feats[:, producers[i]:producers[i] + 1].copy())
                                for i in range(len(emitted) - 1)]
        last = producers[len(emitted) - 1]
        request.feature = feats[:, last:last + 1].copy()

    def _draft_tree(self, request: TreeRequest, token: int, n: int) -> TokenTree:
        """Grow the draft's tree after ``token`` at position n (module docstring, step 1) and
        keep the budget's best nodes, parents first."""
        shape = request.shape
        w, depth, budget = shape.width, shape.depth, shape.budget
        # The draft's cache row r holds the token at position r + 1 (it starts at the prompt's second
        # token), and its graph rotates by row: t goes to row n - 1, expanded nodes from row n on.
        root = n - 1
        ids = [t for t, _ in request.draft_prefix] + [token]
        feats = np.concatenate([f for _, f in request.draft_prefix] + [request.feature], axis=1)
        request.draft_prefix = []
        start = request.draft_len
        top, logp, f = self.backend.run_draft_tree(request.buffers, ids, feats, list(range(start, root + 1)),
                                                   np.zeros((1, 1, len(ids), root + 1), np.float32), start)
        request.draft_len = root + 1
        request.root_top, root_feature = top[-1].copy(), f[0, -1]
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
            top, logp, f = self.backend.run_draft_tree(
                request.buffers, [int(tokens[i]) for i in expand], np.stack([inputs[i] for i in expand])[None],
                [root + d - 1] * len(expand), bias, row)
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
        tree.add_chain(context_lookup(request.context, min(shape.lookup, room)))
        request.draft_row = row
        request.fed = [None, *(inputs[i] for i in order)]
        for s in range(len(request.fed), len(tree)):  # the lookup chain's nodes: the draft never ran on their parents
            parent = tree.parents[s]
            request.fed.append(root_feature if parent == 0 else request.fed[parent])
        return tree

    def _candidates(self, request: TreeRequest, tree: TokenTree, n: int) -> np.ndarray | None:
        """[S, 4]: every node's own exit candidates, the draft's top-4 after it (what the
        predictors were trained on): the root's from growing the tree, the other nodes' from
        one more draft run over all of them (tree attention, each fed its parent's draft
        feature; a lookup node deeper than 1, whose parent the draft never ran on, takes its
        parent's input feature). None when the draft's cache has no room for them."""
        root, row, m = n - 1, request.draft_row, len(tree) - 1
        if m == 0:
            return request.root_top[None, :4].astype(np.int64)
        if row + m > self.capacity:
            return None
        bias = np.full((1, 1, m, row + m), HIDDEN, np.float32)
        bias[0, 0, :, :root + 1] = 0.0
        for s in range(1, len(tree)):
            a = s
            while a > 0:
                bias[0, 0, s - 1, row + a - 1] = 0.0
                a = tree.parents[a]
        top, _, _ = self.backend.run_draft_tree(request.buffers, tree.tokens[1:], np.stack(request.fed[1:])[None],
                                    [root + d for d in tree.depths[1:]], bias, row)
        return np.concatenate([request.root_top[None, :4], top[:, :4]]).astype(np.int64)

    def verify(self, request: TreeRequest, tree: TokenTree, n: int):
        """One target forward over ``tree`` rooted at position n; its nodes' greedy tokens [S]
        and features [1, S, d]."""
        positions = np.array([[n + d for d in tree.depths]], np.int64)
        return self.backend.verify(request.buffers, tree.tokens, n, positions, tree.bias(n))

    def _verify_with_exits(self, request: TreeRequest, tree: TokenTree, n: int, candidates: np.ndarray):
        """Tree verification through the tree segments (merged mapping): after each active
        predictor layer, the walk from the root follows every node's exit token while the
        node's exit flag is set; when it ends at a settled node (the token is not a child, or
        a leaf) the path is settled there, the rest of the layers are skipped and the path's
        K/V for them comes from its exit hidden states (state propagation). Returns the
        accepted path, every node's token, features [1, S, d] and the layer it left from."""
        s = len(tree)
        positions = np.array([[n + d for d in tree.depths]], np.int64)
        active = self.active_layers(request.history)
        values = {INPUT_IDS: np.array([tree.tokens], np.int64), PAST_LENGTH: np.array([n], np.int64),
                  POSITION_IDS: positions, ATTENTION_BIAS: tree.bias(n), DRAFT_IDS: candidates,
                  ACTIVE_LAYERS: active, EXIT_THRESHOLD: self._threshold}
        backend = self.backend
        for k, exit_at in enumerate(backend.tree_segment_exit):
            outs = backend.run_tree_segment(request.buffers, k, values)
            values.update(outs)
            if exit_at is None or not active[exit_at]:
                continue
            flags = np.broadcast_to(outs[exit_flag(exit_at)].numpy(), (s,))
            if not flags[0]:
                continue
            tokens = np.broadcast_to(outs[exit_token(exit_at)].numpy(), (s,))
            path = tree.accepted(tokens, settled=flags)
            if path is None:
                continue
            hidden = outs[layer_output(exit_at)].numpy()[0]
            for node in (0, *path):
                backend.propagate(request.buffers, hidden[node], exit_at, n + node, positions[0, node])
            normed = outs.get(normed_exit_feature(exit_at), outs[exit_feature(exit_at)])
            request.buffers.tree_normed = normed.numpy()[None]
            return path, tokens, outs[exit_feature(exit_at)].numpy()[None], exit_at
        tokens = values[TOKENS].numpy()[0]
        request.buffers.tree_normed = values.get(NORMED_FEATURES, values[FEATURES]).numpy()
        return tree.accepted(tokens), tokens, values[FEATURES].numpy(), self.num_layers - 1
