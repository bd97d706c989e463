"""Lossless tree speculation over a SpecEE bundle's draft and tree verification graph.

Per target forward (batch 1, greedy), with ``t`` the newest token, not yet in the cache, at
position n:

1. the draft proposes its top ``width`` candidates c_1..c_k for the token after ``t`` (from
   ``t`` and the feature that produced it, as in SpecEE's decode step);
2. the tree graph (``specee/tree.onnx``) runs the target once over the tree [t, c_1..c_k]:
   t at position n, every c_i at n+1 seeing the past, t and itself only (``attention_bias``);
   it returns the greedy token of every node and writes node s's K/V at row n+s;
3. g1, t's greedy token, is exactly what dense decoding emits next. If g1 is some c_j, the
   greedy token g2 at c_j is the one after it, so both are emitted; c_j's K/V row is copied
   to row n+1 (the accepted path stays contiguous) and the other rows are left to be
   overwritten. Otherwise only g1 is emitted.

The tree has depth 1: the draft predicts from the target's features, and deeper nodes would
need the features of tokens the target has not run yet (an EAGLE draft that regresses
features could go deeper). The output equals dense greedy decoding token for token, up to
floating-point differences between the one-token and the many-token kernels.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from specee_compile.errors import BundleError, GenerationError
from specee_compile.runtimes.ort import _check_io, providers, session_options
from specee_compile.runtimes.specee import SpecEEEngine, _lap, _SpecEEState

HIDDEN = -1e9  # attention bias of a key a tree node must not see


class _TreeState(_SpecEEState):
    def __init__(self, engine: "TreeEngine"):
        super().__init__(engine)
        self.tree_binding = engine.tree.io_binding()
        for i in range(engine.num_layers):
            for j, kind in enumerate(("key", "value")):
                self.tree_binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", self.buffers[2 * i + j])
                self.tree_binding.bind_ortvalue_output(f"present.{i}.{kind}", self.buffers[2 * i + j])
        self.pending: list[int] = []  # an accepted token already in the cache, to return next
        self.draft_prefix: list[tuple[int, np.ndarray]] = []  # (token, feature that produced it) for the draft


class TreeEngine(SpecEEEngine):
    """A SpecEE bundle compiled with ``--tree``, decoding by lossless tree speculation of
    ``width`` draft candidates per step. ``generate`` reports ``accepted_lengths``."""

    def __init__(self, path: Path, manifest: dict, tokenizer, threads: int | None = None,
                 profile_dir: Path | None = None, width: int = 4):
        super().__init__(path, manifest, tokenizer, threads, profile_dir)
        spec = manifest["specee"].get("tree")
        if not isinstance(spec, dict) or "file" not in spec:
            raise BundleError(f"{self.path} has no tree verification graph; recompile it with --specee --tree.")
        self.max_width = int(spec.get("max_width", 4))
        self.width = width
        try:
            self.tree = ort.InferenceSession(str(self.path / spec["file"]), session_options(threads, self.spinning,
                                                                                             profile_dir),
                                             providers=providers())
        except Exception as e:
            raise BundleError(f"ONNX Runtime cannot load {self.path / spec['file']}: {e}") from e
        _check_io(self.tree, spec, self.path / spec["file"])

    @property
    def width(self) -> int:
        """Draft candidates verified per step (the tree's children of the newest token)."""
        return self._width

    @width.setter
    def width(self, value: int) -> None:
        if not isinstance(value, int) or not 1 <= value <= self.max_width:
            raise BundleError(f"the tree width must be an integer from 1 to {self.max_width} (the draft's "
                              f"candidates), got {value!r}.")
        self._width = value

    def _read_decode_graphs(self, spec: dict) -> list[str]:
        self.segment_layers, self.segment_exit = [], []  # no segments: the tree graph runs every layer
        return []

    def _sessions(self) -> list[ort.InferenceSession]:
        return [self.session, self.draft, self.tree]

    def _new_state(self) -> _TreeState:
        return _TreeState(self)

    def _first_token(self, state: _TreeState, ids: list[int]) -> int:
        state.pending, state.draft_prefix = [], []
        return super()._first_token(state, ids)

    def _next_token(self, state: _TreeState, token: int, n: int) -> tuple[int, int]:
        last = self.num_layers - 1
        if state.pending:  # accepted by the last tree step: ``token`` is already in the cache at n
            return state.pending.pop(), last
        clock = time.perf_counter()
        ids = [t for t, _ in state.draft_prefix] + [token]
        features = np.concatenate([f for _, f in state.draft_prefix] + [state.feature], axis=1)
        state.draft_prefix = []
        candidates = [int(c) for c in self._draft(state, ids, features)[: self.width]]
        candidates = candidates[: max(0, self.capacity - n - 1)]  # the tree's rows must fit the cache
        clock = _lap(state.breakdown, "draft", clock)
        tokens, feats = self._verify(state, token, candidates, n)
        _lap(state.breakdown, "verify", clock)
        first = int(tokens[0])
        if first in candidates:
            j = candidates.index(first) + 1
            if j != 1:
                for array in state.arrays:  # the accepted child's K/V goes to the path's next row
                    array[0, :, n + 1, :] = array[0, :, n + j, :]
            state.pending = [int(tokens[j])]
            state.draft_prefix = [(first, feats[:, :1].copy())]
            state.feature = feats[:, j:j + 1].copy()
            state.accepted.append(2)
        else:
            state.feature = feats[:, :1].copy()
            state.accepted.append(1)
        return first, last

    def score(self, prompt, continuation, chat=None):
        raise GenerationError("tree speculation is lossless: its teacher-forced predictions are the dense graph's; "
                              "score with load(bundle, dense=True).")

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
                    candidates = [int(c) for c in rng.integers(0, self.vocab_size, size - 1)]
                    start = time.perf_counter()
                    self._verify(state, token, candidates, n)
                    laps.append(time.perf_counter() - start)
                out[size] = statistics.median(laps[1:])  # the first run of a new shape warms up
            return out
        finally:
            self._release(state)

    def _verify(self, state: _TreeState, token: int, candidates: list[int], n: int):
        """One target forward over the tree [token, *candidates]; its nodes' greedy tokens [S]
        and features [1, S, d]."""
        s = 1 + len(candidates)
        bias = np.zeros((1, 1, s, n + s), np.float32)
        children = bias[0, 0, 1:, n + 1:]  # a child sees the past, the root and itself
        children[...] = HIDDEN
        np.fill_diagonal(children, 0.0)
        b = state.tree_binding
        b.bind_cpu_input("input_ids", np.array([[token, *candidates]], np.int64))
        b.bind_cpu_input("past_sequence_length", np.array([n], np.int64))
        b.bind_cpu_input("position_ids", np.array([[n] + [n + 1] * len(candidates)], np.int64))
        b.bind_cpu_input("attention_bias", bias)
        b.bind_output("tokens")  # rebound each run: their shapes change with the tree's size
        b.bind_output("features")
        self.tree.run_with_iobinding(b)
        out = b.get_outputs()  # the presents, then tokens and features (bound after them)
        return out[-2].numpy()[0], out[-1].numpy()
