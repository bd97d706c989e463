"""TensorRT backend of tree speculation: engines of the tree verification graph and of the tree
draft graph, besides :class:`TrtSpecEE`'s step and draft engines (no segment engines: trees
decode without them).

Each tree engine runs like the step engine: it reads the current buffer set of the caches it
touches as ``past_key_values.*`` and writes the whole cache, its rows scattered in at
``past_sequence_length``, into the other set, which then becomes the current one. The tree's
tokens, positions and attention bias go in from the host; every node's greedy token and
features come back to it, since the walk over the tree runs there (``runtimes/tree.py``).
The accepted nodes' K/V rows are then moved on the device. Output shapes follow from the
manifest's I/O lists: a symbolic dimension of an output is the size an input gave it.
"""

from __future__ import annotations

import numpy as np

from specee_compile.contract import (ATTENTION_BIAS, DRAFT_FEATURES, DRAFT_IDS, DRAFT_LOGPROBS, FEATURES, INPUT_IDS,
                                     NORMED_FEATURES, PAST_LENGTH, POSITION_IDS, TOKENS)
from specee_compile.errors import BundleError
from specee_compile.runtimes.backends.tensorrt import CACHE_PREFIXES, TrtBuffers, TrtSpecEE, _torch_dtype


class TrtTree(TrtSpecEE):
    """A TensorRT SpecEE bundle's step, draft and tree engines, with the caches they share."""

    def __init__(self, bundle, spec):
        super().__init__(bundle, spec, decode_graphs=False)  # the hardware check, the step and draft engines
        tree = bundle.manifest.specee.tree
        if tree is None:
            raise BundleError(f"{bundle.path} has no tree verification and tree draft engines; recompile it with "
                              "--specee --tree.")
        self.max_width = tree.max_width
        self.tree_graph, self.draft_tree_graph = tree.to_json(), tree.draft.to_json()
        self.tree_engine = self.open(self.tree_graph, bundle.cache_shape)
        self.draft_tree_engine = self.open(self.draft_tree_graph, spec.draft_cache_shape)
        self.tree_normed = NORMED_FEATURES in {o["name"] for o in self.tree_graph["outputs"]}  # a fusion draft's

    def load_tree_segments(self) -> None:
        raise BundleError(f"{self.bundle.path} is a TensorRT bundle, which holds the lossless tree engines only: early "
                          "exit inside verification (a shape with ':exit') runs on ONNX Runtime bundles compiled with "
                          "--specee --tree (--out NAME.onnx). Drop ':exit'.")

    def new_buffers(self) -> TrtBuffers:
        buf = super().new_buffers()
        buf.tree_context = self.tree_engine.create_execution_context()
        buf.draft_tree_context = self.draft_tree_engine.create_execution_context()
        buf.tree_normed = None  # [1, S, d] on the host after a verification
        return buf

    def prompt_features(self, buf: TrtBuffers) -> np.ndarray:
        """[1, S, d] on the host: the tree decoder feeds the draft from there."""
        return buf.last_features.float().cpu().numpy()

    def run_draft_tree(self, buf: TrtBuffers, ids: list[int], features: np.ndarray, positions: list[int],
                       bias: np.ndarray, past: int):
        """The tree draft engine over ``ids`` written from row ``past``: every node's top-K target
        ids [S, K], their log-probabilities [S, K] and the draft's features [1, S, d]."""
        inputs = {INPUT_IDS: np.asarray([ids], np.int64), FEATURES: np.asarray(features, np.float32),
                  PAST_LENGTH: np.array([past], np.int64), POSITION_IDS: np.asarray([positions], np.int64),
                  ATTENTION_BIAS: np.asarray(bias, np.float32)}
        out = self._run(buf.draft_tree_context, self.draft_tree_graph, inputs, buf.draft_caches, [0], "the tree draft")
        return (out[DRAFT_IDS].cpu().numpy(), out[DRAFT_LOGPROBS].cpu().numpy(),
                out[DRAFT_FEATURES].float().cpu().numpy())

    def verify(self, buf: TrtBuffers, tokens: list[int], n: int, positions: np.ndarray, bias: np.ndarray):
        """One target forward over a token tree rooted at position n; its nodes' greedy tokens
        [S] and features [1, S, d] (their normed states stay in ``buf.tree_normed``)."""
        inputs = {INPUT_IDS: np.array([tokens], np.int64), PAST_LENGTH: np.array([n], np.int64),
                  POSITION_IDS: np.asarray(positions, np.int64), ATTENTION_BIAS: np.asarray(bias, np.float32)}
        out = self._run(buf.tree_context, self.tree_graph, inputs, buf.caches, range(self.bundle.num_layers),
                        "the tree verification")
        features = out[FEATURES].float().cpu().numpy()
        buf.tree_normed = out[NORMED_FEATURES].float().cpu().numpy() if self.tree_normed else features
        return out[TOKENS].cpu().numpy()[0], features

    def keep_path(self, buf: TrtBuffers, n: int, rows: list[int]) -> None:
        """Move the K/V of the accepted nodes (cache rows ``rows``) to rows n+1, n+2, ..."""
        import torch

        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        for i in range(self.bundle.num_layers):
            for j in (0, 1):
                cache = buf.caches.cache(i, j)
                cache[0, :, n + 1:n + 1 + len(rows), :] = cache[0].index_select(1, index)

    def _run(self, ctx, graph: dict, inputs: dict[str, np.ndarray], caches, layers, what: str) -> dict:
        """Run one tree engine: ``inputs`` copied to the device, the outputs in new device buffers
        sized from the input shapes, past = the current cache set, present = the other; then swap."""
        import torch

        on_device, symbols = {}, {}
        for v in graph["inputs"]:
            name = v["name"]
            if name.startswith(CACHE_PREFIXES):
                continue
            tensor = on_device[name] = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device)
            if len(v["shape"]) != tensor.dim():
                raise BundleError(f"{self.bundle.path}: {what} takes {name} of shape {v['shape']}, not "
                                  f"{tuple(tensor.shape)}; the bundle is damaged. Recompile it.")
            for dim, size in zip(v["shape"], tensor.shape):
                if isinstance(dim, str):
                    symbols[dim] = int(size)
            if not all(isinstance(d, int) for d in v["shape"]):
                ctx.set_input_shape(name, tuple(tensor.shape))
            ctx.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for v in graph["outputs"]:
            name = v["name"]
            if name.startswith(CACHE_PREFIXES):
                continue
            unknown = [d for d in v["shape"] if isinstance(d, str) and d not in symbols]
            if unknown:
                raise BundleError(f"{self.bundle.path}: the size of {name}'s dimensions {unknown} is not set by any "
                                  f"input of {what}; the bundle is damaged. Recompile it.")
            shape = tuple(symbols[d] if isinstance(d, str) else d for d in v["shape"])
            outputs[name] = torch.empty(shape, dtype=_torch_dtype(v["dtype"]), device=self.device)
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        caches.bind(ctx, layers)
        self.execute(ctx, what)
        caches.swap(layers)
        return outputs
