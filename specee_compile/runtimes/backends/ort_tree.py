"""ONNX Runtime backend of tree speculation: the tree draft graph, the tree verification
graph and (for shapes with ``:exit``) the tree segments with per-node exits, loaded when
first asked for. Prefill, the plain draft and state propagation are :class:`OrtSpecEE`'s."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

from specee_compile.contract import (ATTENTION_BIAS, DRAFT_FEATURES, DRAFT_IDS, DRAFT_LOGPROBS, FEATURES, INPUT_IDS,
                                     NORMED_FEATURES, PAST_LENGTH, POSITION_IDS, TOKENS)
from specee_compile.errors import BundleError
from specee_compile.runtimes.backends.ort import OrtBuffers, OrtSpecEE, io_names, run_bound


class OrtTree(OrtSpecEE):
    """The SpecEE bundle's step, draft and K/V tensors plus its tree graphs; no decode segments."""

    def __init__(self, bundle, spec, threads=None, profile_dir=None):
        super().__init__(bundle, spec, threads, profile_dir, decode_graphs=False)
        tree = bundle.manifest.specee.tree
        if tree is None:
            raise BundleError(f"{bundle.path} has no tree verification and tree draft graphs; recompile it with "
                              "--specee --tree.")
        self.max_width = tree.max_width
        self.tree = self.graphs.open(tree, "specee.tree.file")
        self.tree_normed = NORMED_FEATURES in {o.name for o in self.tree.get_outputs()}  # a fusion draft's
        self.draft_tree = self.graphs.open(tree.draft, "specee.tree.draft.file")
        self.segment_specs = tree.segments  # the tree step with per-node exits (merged mapping)
        self.tree_segment_layers = [g.layers for g in self.segment_specs]
        self.tree_segment_exit = [g.exit_layer for g in self.segment_specs]
        self.tree_segments: list[ort.InferenceSession] = []
        self._lock = threading.Lock()

    def load_tree_segments(self) -> None:
        """Open the tree segments (the first time a shape with ``:exit`` runs)."""
        if not self.segment_specs:
            raise BundleError(f"{self.bundle.path} has no tree segments with per-node exits; recompile it with "
                              "--specee --tree and exit mode segments, or drop ':exit'.")
        with self._lock:
            if not self.tree_segments:
                sessions = [self.graphs.open(g, "specee.tree.segments.file") for g in self.segment_specs]
                self.tree_segment_io = [io_names(s) for s in sessions]
                self.tree_segments = sessions

    def new_buffers(self) -> OrtBuffers:
        buf = super().new_buffers()
        buf.tree_binding = buf.cache.bind(self.tree.io_binding(), range(self.bundle.num_layers))
        buf.draft_tree_binding = buf.draft_cache.bind(self.draft_tree.io_binding(), [0])
        buf.tree_segment_bindings = None  # bound when the first shape with ':exit' runs
        buf.tree_outputs = {}  # per tree size: the verification's output buffers
        return buf

    def run_draft_tree(self, buf: OrtBuffers, ids: list[int], features: np.ndarray, positions: list[int],
                       bias: np.ndarray, past: int):
        """The tree draft graph over ``ids`` written from row ``past``: every node's top-K target
        ids [S, K], their log-probabilities [S, K] and the draft's features [1, S, d]."""
        b = buf.draft_tree_binding
        b.bind_cpu_input(INPUT_IDS, np.asarray([ids], np.int64))
        b.bind_cpu_input(FEATURES, np.ascontiguousarray(features, np.float32))
        b.bind_cpu_input(PAST_LENGTH, np.array([past], np.int64))
        b.bind_cpu_input(POSITION_IDS, np.asarray([positions], np.int64))
        b.bind_cpu_input(ATTENTION_BIAS, bias)
        for name in (DRAFT_IDS, DRAFT_LOGPROBS, DRAFT_FEATURES):
            b.bind_output(name)  # rebound each run: their shapes change with the number of nodes
        self.draft_tree.run_with_iobinding(b)
        out = b.get_outputs()  # the presents, then these three (bound after them)
        return out[-3].numpy(), out[-2].numpy(), out[-1].numpy()

    def verify(self, buf: OrtBuffers, tokens: list[int], n: int, positions: np.ndarray, bias: np.ndarray):
        """One target forward over a token tree rooted at position n; its nodes' greedy tokens
        [S] and features [1, S, d] (their normed states stay in ``buf.tree_normed``). The arrays
        are the request's buffers for trees of S nodes: the next forward of that size reuses them."""
        b = buf.tree_binding
        b.bind_cpu_input(INPUT_IDS, np.array([tokens], np.int64))
        b.bind_cpu_input(PAST_LENGTH, np.array([n], np.int64))
        b.bind_cpu_input(POSITION_IDS, positions)
        b.bind_cpu_input(ATTENTION_BIAS, bias)
        out = self._tree_outputs(buf, len(tokens))
        for name, (_, value) in out.items():  # rebound each run: their shapes change with the tree's size
            b.bind_ortvalue_output(name, value)
        self.tree.run_with_iobinding(b)
        features = out[FEATURES][0]
        buf.tree_normed = out[NORMED_FEATURES][0] if self.tree_normed else features
        return out[TOKENS][0][0], features

    def _tree_outputs(self, buf: OrtBuffers, s: int) -> dict:
        """name -> (array, OrtValue over it): the verification's outputs for trees of s nodes,
        made the first time a tree of that size runs (reading them back is then no copy)."""
        out = buf.tree_outputs.get(s)
        if out is None:
            d = self.bundle.hidden_size
            arrays = {TOKENS: np.zeros((1, s), np.int64), FEATURES: np.zeros((1, s, d), np.float32)}
            if self.tree_normed:
                arrays[NORMED_FEATURES] = np.zeros((1, s, d), np.float32)
            out = buf.tree_outputs[s] = {name: (a, ort.OrtValue.ortvalue_from_numpy(a)) for name, a in arrays.items()}
        return out

    def keep_path(self, buf: OrtBuffers, n: int, rows: list[int]) -> None:
        """Move the K/V of the accepted nodes (cache rows ``rows``) to rows n+1, n+2, ..."""
        for array in buf.cache.arrays:
            array[0, :, n + 1:n + 1 + len(rows), :] = array[0][:, rows, :]

    def run_tree_segment(self, buf: OrtBuffers, k: int, values: dict) -> dict:
        if buf.tree_segment_bindings is None:
            buf.tree_segment_bindings = [buf.cache.bind(s.io_binding(), layers)
                                         for s, layers in zip(self.tree_segments, self.tree_segment_layers)]
        inputs, outputs = self.tree_segment_io[k]
        return run_bound(self.tree_segments[k], buf.tree_segment_bindings[k], inputs, outputs, values)
