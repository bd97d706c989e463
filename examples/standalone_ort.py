"""Greedy decoding of a specee-compile bundle with nothing but onnxruntime, numpy and tokenizers.

An engine outside this package can drive a bundle from its manifest alone; this script is
that engine, written to be read next to docs/bundle-format.md, whose steps it follows in
order. It never imports specee_compile, transformers or torch, and its tokens equal
``specee_compile.runtimes.load(BUNDLE).generate(...)`` (the tests check it).

    python examples/standalone_ort.py BUNDLE --prompt TEXT [--max-new-tokens N] [--chat]
                                      [--no-exit] [--tree SHAPE] [--threads N] [--json]

- A dense bundle runs its step graph (``model.onnx``): prefill, then one step per token.
- A SpecEE bundle (manifest section ``specee``) prefills with the step graph, then runs
  draft -> segments per token, stops at the first segment whose exit flag is set, and fills
  the skipped layers' K/V by state propagation. A bundle of exit mode "graph" runs draft ->
  its one decode graph instead, which does both itself. ``--no-exit`` runs the step graph.
- ``--tree SHAPE`` (a SpecEE bundle compiled with ``--tree``): lossless tree speculation,
  the draft's token tree verified by ``tree.onnx`` in one forward; the tokens are the
  dense ones, and ``--json`` adds ``accepted_lengths`` (tokens per target forward). A
  shape ending in ``:exit`` verifies through the tree segments with per-node exits
  instead (early exit inside verification; lossy).
- The prompt is tokenized as is (``specee-run --no-chat``). ``--chat`` wraps it as one user
  message in the bundle's chat template, as ``specee-run`` does by default for models that
  have one; that needs jinja2, the language chat templates are written in.
- ``--json`` prints ``{"token_ids": [...], "exit_layers": [...], "stop_reason": ...}``
  instead of the text.

Two sibling modules hold what needs no ONNX Runtime, so this file keeps the sessions, the
cache and the loops: examples/standalone_files.py reads the bundle's files (the file rules,
safetensors, the chat template), and examples/standalone_algorithms.py holds the loops' pure
algorithms (the exit schedule, K/V state propagation, the tree shape, the context lookup and
the token tree), which tests/test_golden.py checks, with the package's own versions, against
the same recorded outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

# The sibling modules (this script's folder is on sys.path when it runs as a script).
from standalone_algorithms import (HIDDEN, TokenTree, lookup_chain, parse_shape, propagated_kv, rope_rows,
                                   scheduled_layers)
from standalone_files import listed, read_manifest, read_safetensors, render_chat

# ---- 1. the bundle's files (standalone_files.py: file rules, safetensors, chat template) -----


def encode(bundle: Path, tokenizer: Tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt: raw text with the tokenizer's special tokens, or a chat turn."""
    if not chat:
        return tokenizer.encode(prompt, add_special_tokens=True).ids
    return tokenizer.encode(render_chat(bundle, prompt), add_special_tokens=False).ids


def session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---- 2. the KV cache: preallocated buffers, written in place ---------------------------------


class KVCache:
    """Per layer, a key and a value buffer [1, kv_heads, capacity, head_dim] (float32, zeros).

    ``arrays`` are numpy views of the same memory the OrtValues hold, so a graph that writes
    ``present.*`` into a bound buffer changes the array, and numpy writes reach the graph.
    """

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int):
        self.arrays = [np.zeros((1, kv_heads, capacity, head_dim), np.float32) for _ in range(2 * layers)]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]  # key 0, value 0, key 1, ...

    def key(self, layer: int) -> np.ndarray:
        return self.arrays[2 * layer]

    def value(self, layer: int) -> np.ndarray:
        return self.arrays[2 * layer + 1]

    def binding(self, sess: ort.InferenceSession, layers) -> ort.IOBinding:
        """An IOBinding with past_key_values.{i}.* and present.{i}.* bound to the same buffer."""
        binding = sess.io_binding()
        for i in layers:
            for j, kind in enumerate(("key", "value")):
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", self.values[2 * i + j])
                binding.bind_ortvalue_output(f"present.{i}.{kind}", self.values[2 * i + j])
        return binding


def run(sess: ort.InferenceSession, binding: ort.IOBinding, feeds: dict[str, np.ndarray],
        fetch: list[str]) -> dict[str, np.ndarray]:
    """Run with the cache bound in place; feed ``feeds`` and return the ``fetch`` outputs."""
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    for name in fetch:
        binding.bind_output(name)  # ORT allocates it for this step's shape
    sess.run_with_iobinding(binding)
    outputs = binding.get_outputs()  # in first-bind order: the presents, then ``fetch``
    return {name: value.numpy() for name, value in zip(fetch, outputs[len(outputs) - len(fetch):])}


def step_feeds(ids: list[int], past_len: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.array([ids], np.int64),  # [1, S]
            "past_sequence_length": np.array([past_len], np.int64)}  # [1]


# ---- 3. the dense decode loop ----------------------------------------------------------------


class DenseDecoder:
    """The step graph: prefill over the prompt, then one token per step."""

    def __init__(self, bundle: Path, manifest: dict, threads: int | None):
        m = manifest["model"]
        self.num_layers = m["num_layers"]
        self.capacity = manifest["cache"]["capacity"]
        self.step = session(listed(bundle, manifest, manifest["graphs"]["step"]["file"]), threads)
        self.cache = KVCache(self.num_layers, m["num_kv_heads"], self.capacity, m["head_dim"])
        self.binding = self.cache.binding(self.step, range(self.num_layers))

    def prefill(self, ids: list[int]) -> int:
        """Positions 0..S-1 of the prompt; returns the first generated token."""
        out = run(self.step, self.binding, step_feeds(ids, 0), ["logits"])
        return int(out["logits"][0].argmax())  # logits [1, V]: the last position's

    def next_token(self, token: int, position: int) -> tuple[int, int]:
        """Feed ``token`` at ``position``; return (next token, the layer it left from)."""
        out = run(self.step, self.binding, step_feeds([token], position), ["logits"])
        return int(out["logits"][0].argmax()), self.num_layers - 1


# ---- 4. the SpecEE decode loop ---------------------------------------------------------------


class SpecEEDecoder(DenseDecoder):
    """Dense prefill, then per token: draft -> segments with early exit -> K/V propagation."""

    def __init__(self, bundle: Path, manifest: dict, threads: int | None):
        super().__init__(bundle, manifest, threads)
        spec = self.spec = manifest["specee"]
        m = manifest["model"]
        self.draft = session(listed(bundle, manifest, spec["draft"]["file"]), threads)
        self.draft_cache = KVCache(1, spec["draft"]["kv_heads"], self.capacity, spec["draft"]["head_dim"])
        self.draft_binding = self.draft_cache.binding(self.draft, [0])
        # exit mode "graph" has no segments: see SpecEEGraphDecoder
        self.segments = self.open_segments(bundle, manifest, spec.get("segments", []), threads)
        self.kv_fill = read_safetensors(listed(bundle, manifest, spec["kv_fill"]["file"]))
        self.eps = float(spec["kv_fill"]["eps"])
        self.kv_heads = m["num_kv_heads"]
        self.threshold = np.array([spec["threshold"]], np.float32)
        self.history: list[int] = []  # the exit layer of every decode step so far
        self.feature = None  # [1, 1, d]: the draft's next input (the normed state the last token came from, or fused)
        self.draft_len = 0  # positions in the draft's cache

    def open_segments(self, bundle: Path, manifest: dict, specs: list[dict], threads: int | None) -> list[tuple]:
        """Per segment of ``specs``: (session, binding of its layers' cache, exit layer or None,
        its other inputs, its other outputs)."""
        segments = []
        for seg in specs:
            sess = session(listed(bundle, manifest, seg["file"]), threads)
            layers = range(seg["first_layer"], seg["last_layer"] + 1)
            inputs = [i.name for i in sess.get_inputs() if not i.name.startswith("past_key_values.")]
            outputs = [o.name for o in sess.get_outputs() if not o.name.startswith("present.")]
            segments.append((sess, self.cache.binding(sess, layers), seg["exit_layer"], inputs, outputs))
        return segments

    def prefill(self, ids: list[int]) -> int:
        out = run(self.step, self.binding, step_feeds(ids, 0), ["logits", "features"])
        features = out["features"]  # [1, S, d]
        self.history, self.feature, self.draft_len = [], features[:, -1:], 0
        if len(ids) > 1:  # the draft sees token t+1 with the feature of position t
            self.propose(ids[1:], features[:, :-1])
        return int(out["logits"][0].argmax())

    def propose(self, ids: list[int], features: np.ndarray) -> np.ndarray:
        """Run the draft over new positions; returns draft_ids [4], the top-4 target ids."""
        feeds = {"input_ids": np.array([ids], np.int64), "features": np.ascontiguousarray(features, np.float32),
                 "past_sequence_length": np.array([self.draft_len], np.int64)}
        out = run(self.draft, self.draft_binding, feeds, ["draft_ids"])
        self.draft_len += len(ids)
        return out["draft_ids"]

    def active_layers(self) -> np.ndarray:
        """active_layers [L] bool: the schedule's layers that have a predictor."""
        layers = scheduled_layers(self.spec["schedule"], self.history)
        mask = np.zeros(self.num_layers, dtype=bool)
        mask[sorted(layers & set(self.spec["predictor_layers"]))] = True
        return mask

    def next_token(self, token: int, position: int) -> tuple[int, int]:
        draft_ids = self.propose([token], self.feature)
        active = self.active_layers()
        values = {**step_feeds([token], position), "draft_ids": draft_ids.astype(np.int64),
                  "active_layers": active, "exit_threshold": self.threshold}
        for sess, binding, exit_layer, inputs, outputs in self.segments:
            # A segment's inputs are step inputs or outputs of earlier segments, by name.
            out = run(sess, binding, {name: values[name] for name in inputs}, outputs)
            values.update(out)
            if exit_layer is not None and active[exit_layer] and out[f"exit_flag.{exit_layer}"][0]:
                self.feature = out[f"exit_feature.{exit_layer}"][:, None, :]  # [1, d] -> [1, 1, d]
                h = out[f"layers.{exit_layer}.output"][0, -1]  # [d]: the exit layer's hidden state
                self.propagate(h, exit_layer, position)
                self.history.append(exit_layer)
                return int(out[f"exit_token.{exit_layer}"][0]), exit_layer
        self.feature = values["features"][:, -1:]  # no exit: the last segment ran the LM head
        self.history.append(self.num_layers - 1)
        return int(values["logits"][0].argmax()), self.num_layers - 1

    def propagate(self, h: np.ndarray, exit_layer: int, position: int, row: int | None = None) -> None:
        """K/V at ``position`` of every layer after ``exit_layer``, computed from h [d], into
        cache row ``row`` (the position unless given: a tree node's row differs)."""
        row = position if row is None else row
        for j in range(exit_layer + 1, self.num_layers):
            cos, sin = rope_rows(self.kv_fill, j, position)  # [R/2] each, or None
            k, v = propagated_kv(self.kv_fill, j, h, cos, sin, self.eps, self.kv_heads)  # [kv_heads, D] each
            self.cache.key(j)[0, :, row, :] = k
            self.cache.value(j)[0, :, row, :] = v


class SpecEEGraphDecoder(SpecEEDecoder):
    """Exit mode "graph": per token, draft -> ONE decode graph whose nested If nodes stop at the
    first exit and fill the skipped layers' K/V themselves."""

    def __init__(self, bundle: Path, manifest: dict, threads: int | None):
        super().__init__(bundle, manifest, threads)
        self.decode = session(listed(bundle, manifest, self.spec["decode"]["file"]), threads)
        self.decode_binding = self.cache.binding(self.decode, range(self.num_layers))  # every layer, in place

    def next_token(self, token: int, position: int) -> tuple[int, int]:
        draft_ids = self.propose([token], self.feature)
        feeds = {**step_feeds([token], position), "draft_ids": draft_ids.astype(np.int64),
                 "active_layers": self.active_layers(), "exit_threshold": self.threshold}
        out = run(self.decode, self.decode_binding, feeds, ["token", "feature", "exit_layer"])
        self.feature = out["feature"]  # [1, 1, d]
        exit_layer = int(out["exit_layer"][0])
        self.history.append(exit_layer)
        return int(out["token"][0]), exit_layer


# ---- 5. lossless tree speculation (SpecEE bundles compiled with --tree) ----------------------


class TreeDecoder(SpecEEDecoder):
    """Per target forward: the tree draft graph grows a token tree (EAGLE-2 style, plus a
    context-lookup chain), tree.onnx verifies it in one forward, and the longest path of the
    target's greedy tokens plus one more token is emitted: dense greedy decoding's output."""

    def __init__(self, bundle: Path, manifest: dict, threads: int | None, shape: str):
        super().__init__(bundle, manifest, threads)
        spec = self.spec["tree"]
        self.tree = session(listed(bundle, manifest, spec["file"]), threads)
        self.tree_binding = self.cache.binding(self.tree, range(self.num_layers))
        self.draft_tree = session(listed(bundle, manifest, spec["draft"]["file"]), threads)
        self.draft_tree_binding = self.draft_cache.binding(self.draft_tree, [0])  # the draft's cache, shared
        try:
            self.width, self.depth, self.budget, self.lookup, self.exits = parse_shape(shape)
        except ValueError as e:
            sys.exit(str(e))
        # the tree step with per-node exits, for :exit
        self.tree_segments = self.open_segments(bundle, manifest, spec.get("segments", []) if self.exits else [],
                                                threads)
        if self.exits and not self.tree_segments:
            sys.exit(f"{bundle} has no tree segments; compile it with --specee --tree in exit mode segments")
        self.root_top, self.fed, self.free_row = None, [], 0  # for the :exit candidates
        self.pending: list[tuple[int, int]] = []  # (token, exit layer) already in the cache, one per call
        self.prefix: list[tuple[int, np.ndarray]] = []  # (token, feature that produced it) the draft has not seen
        self.context: list[int] = []
        self.accepted: list[int] = []  # tokens emitted per target forward

    def prefill(self, ids: list[int]) -> int:
        token = super().prefill(ids)
        self.pending, self.prefix, self.context, self.accepted = [], [], [*ids, token], []
        return token

    def run_draft(self, ids, features, positions, bias, past):
        feeds = {"input_ids": np.array([ids], np.int64), "features": np.ascontiguousarray(features, np.float32),
                 "past_sequence_length": np.array([past], np.int64),
                 "position_ids": np.array([positions], np.int64), "attention_bias": bias}
        out = run(self.draft_tree, self.draft_tree_binding, feeds, ["draft_ids", "draft_logprobs", "draft_features"])
        return out["draft_ids"], out["draft_logprobs"], out["draft_features"][0]

    def grow(self, token: int, n: int) -> TokenTree:
        """The tree after ``token`` at position n, the lookup chain merged in."""
        w = self.width
        root = n - 1  # the draft's row r holds position r + 1, and its graph rotates by row
        ids = [t for t, _ in self.prefix] + [token]
        feats = np.concatenate([f for _, f in self.prefix] + [self.feature], axis=1)
        self.prefix = []
        top, logp, f = self.run_draft(ids, feats, list(range(self.draft_len, root + 1)),
                                      np.zeros((1, 1, len(ids), root + 1), np.float32), self.draft_len)
        self.draft_len = root + 1
        self.root_top, root_feature = top[-1, :4], f[-1]
        tokens, parents, depths = [int(t) for t in top[-1, :w]], [-1] * w, [1] * w
        scores, inputs, rows = list(logp[-1, :w]), [f[-1]] * w, [None] * w
        frontier, row = list(range(w)), root + 1
        for d in range(2, self.depth + 1):  # expand the w best nodes of the last depth
            expand = sorted(frontier, key=lambda i: -scores[i])[:min(w, self.capacity - row)]
            if not expand:
                break
            bias = np.full((1, 1, len(expand), row + len(expand)), HIDDEN, np.float32)
            bias[0, 0, :, :root + 1] = 0.0
            for j, node in enumerate(expand):
                rows[node] = row + j
                a = node
                while a >= 0:  # the node's own row and its ancestors'
                    bias[0, 0, j, rows[a]] = 0.0
                    a = parents[a]
            top, logp, f = self.run_draft([tokens[i] for i in expand], np.stack([inputs[i] for i in expand])[None],
                                          [root + d - 1] * len(expand), bias, row)
            row += len(expand)
            frontier = []
            for j, node in enumerate(expand):
                for k in range(w):
                    frontier.append(len(tokens))
                    tokens.append(int(top[j, k]))
                    parents.append(node)
                    depths.append(d)
                    scores.append(scores[node] + logp[j, k])
                    inputs.append(f[j])
                    rows.append(None)
        best = sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i], i))
        order = sorted(best[:min(self.budget, self.capacity - n - 1)], key=lambda i: (depths[i], i))
        index = {node: s + 1 for s, node in enumerate(order)}
        tree = TokenTree([token, *(tokens[i] for i in order)], [-1, *(index.get(parents[i], 0) for i in order)],
                         [0, *(depths[i] for i in order)])
        tree.add_chain(lookup_chain(self.context, min(self.lookup, self.capacity - n - len(tree))))
        self.free_row = row  # the draft's rows from here are free for the :exit candidates
        self.fed = [None, *(inputs[i] for i in order)]  # the feature each node is fed (its parent's)
        for s in range(len(self.fed), len(tree)):  # lookup nodes: the draft never ran on their parents
            self.fed.append(root_feature if tree.parents[s] == 0 else self.fed[tree.parents[s]])
        return tree

    def candidates(self, tree: TokenTree, n: int) -> np.ndarray | None:
        """[S, 4]: each node's draft top-4, its exit candidates (root: from growing the tree;
        the others: one more draft run over all of them). None if the draft cache is full."""
        root, row, m = n - 1, self.free_row, len(tree) - 1
        if m == 0:
            return self.root_top[None].astype(np.int64)
        if row + m > self.capacity:
            return None
        bias = np.full((1, 1, m, row + m), HIDDEN, np.float32)
        bias[0, 0, :, :root + 1] = 0.0
        for s in range(1, m + 1):
            a = s
            while a > 0:  # its ancestors among these nodes, and itself
                bias[0, 0, s - 1, row + a - 1] = 0.0
                a = tree.parents[a]
        top, _, _ = self.run_draft(tree.tokens[1:], np.stack(self.fed[1:])[None], [root + d for d in tree.depths[1:]],
                                   bias, row)
        return np.concatenate([self.root_top[None], top[:, :4]]).astype(np.int64)

    def verify_with_exits(self, feeds: dict, tree: TokenTree, cands: np.ndarray, n: int):
        """The tree segments in order; stop at the first active predictor layer where the walk
        is settled, propagating the path's K/V for the skipped layers. Returns (path, each
        node's token, features [1, S, d], exit layer)."""
        s = len(tree)
        active = self.active_layers()
        values = {**feeds, "draft_ids": cands, "active_layers": active, "exit_threshold": self.threshold}
        for sess, binding, e, inputs, outputs in self.tree_segments:
            out = run(sess, binding, {name: values[name] for name in inputs}, outputs)
            values.update(out)
            if e is None or not active[e]:
                continue
            flags = np.broadcast_to(out[f"exit_flag.{e}"], (s,))  # [1] (= none) or one per node
            choice = np.broadcast_to(out[f"exit_token.{e}"], (s,))
            path = tree.accepted(choice, flags) if flags[0] else None
            if path is None:
                continue
            for node in (0, *path):  # the path's K/V of layers e+1.. at its rows, RoPE at its positions
                self.propagate(out[f"layers.{e}.output"][0, node], e, int(feeds["position_ids"][0, node]), n + node)
            return path, choice, out[f"exit_feature.{e}"][None], e
        greedy = values["tokens"][0]
        return tree.accepted(greedy), greedy, values["features"], self.num_layers - 1

    def next_token(self, token: int, position: int) -> tuple[int, int]:
        if self.pending:  # accepted by the last forward; ``token`` is already in the cache
            return self.pending.pop(0)
        n = position
        tree = self.grow(token, n)
        feeds = {"input_ids": np.array([tree.tokens], np.int64), "past_sequence_length": np.array([n], np.int64),
                 "position_ids": np.array([[n + d for d in tree.depths]], np.int64), "attention_bias": tree.bias(n)}
        cands = self.candidates(tree, n) if self.exits else None
        if cands is not None:
            path, greedy, feats, layer = self.verify_with_exits(feeds, tree, cands, n)
        else:
            out = run(self.tree, self.tree_binding, feeds, ["tokens", "features"])
            greedy, feats, layer = out["tokens"][0], out["features"], self.num_layers - 1
            path = tree.accepted(greedy)  # follow the child holding its parent's greedy token
        for k, a in enumerate(path, start=1):  # the accepted nodes' K/V to rows n+1 .. n+m
            if a != k:
                for array in self.cache.arrays:
                    array[0, :, n + k, :] = array[0, :, n + a, :]
        producers = [0, *path]
        emitted = [int(greedy[p]) for p in producers]
        self.pending = [(t, layer) for t in emitted[1:]]
        self.history.append(layer)
        self.prefix = [(emitted[i], feats[:, producers[i]:producers[i] + 1]) for i in range(len(path))]
        self.feature = feats[:, producers[-1]:producers[-1] + 1]
        self.context += emitted
        self.accepted.append(len(emitted))
        return emitted[0], layer


# ---- 6. greedy generation --------------------------------------------------------------------


def generate(decoder: DenseDecoder, ids: list[int], max_new_tokens: int, eos: set[int]) -> dict:
    """Greedy until EOS (not emitted), ``max_new_tokens`` or a full cache."""
    if len(ids) >= decoder.capacity:
        sys.exit(f"the prompt has {len(ids)} tokens; the bundle's cache holds {decoder.capacity}")
    token = decoder.prefill(ids)
    out, exits, stop = [], [decoder.num_layers - 1], "max_new_tokens"
    position = len(ids)  # tokens in the cache
    while True:
        if token in eos:
            stop = "eos"
            break
        out.append(token)
        if len(out) >= max_new_tokens:
            break
        if position >= decoder.capacity:
            stop = "capacity"
            break
        token, exit_layer = decoder.next_token(token, position)
        exits.append(exit_layer)
        position += 1
    return {"token_ids": out, "exit_layers": exits[:len(out)], "stop_reason": stop}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Greedy decoding of a specee bundle with onnxruntime only.")
    p.add_argument("bundle", type=Path, help="bundle directory written by specee-compile")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chat", action="store_true", help="apply the bundle's chat template (needs jinja2)")
    p.add_argument("--no-exit", action="store_true", help="run a SpecEE bundle's dense step graph")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--tree", default=None, metavar="SHAPE",
                   help="tree speculation, WIDTHxDEPTHxBUDGET[+LOOKUP][:exit] (a bundle compiled with --tree; :exit for "
                        "early exit inside verification)")
    p.add_argument("--json", action="store_true", help="print token ids, exit layers and stop reason as JSON")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0:
        p.error("--max-new-tokens must be positive")

    manifest = read_manifest(args.bundle)
    tokenizer = Tokenizer.from_file(str(args.bundle / "tokenizer.json"))
    ids = encode(args.bundle, tokenizer, args.prompt, args.chat)
    if args.tree:
        if "tree" not in manifest.get("specee", {}):
            sys.exit(f"{args.bundle} has no tree graphs; compile it with specee-compile --specee --tree")
        decoder = TreeDecoder(args.bundle, manifest, args.threads, args.tree)
    elif "specee" in manifest and not args.no_exit:
        kind = SpecEEGraphDecoder if manifest["specee"].get("exit_mode") == "graph" else SpecEEDecoder
        decoder = kind(args.bundle, manifest, args.threads)
    else:
        decoder = DenseDecoder(args.bundle, manifest, args.threads)
    result = generate(decoder, ids, args.max_new_tokens, set(manifest["model"]["eos_token_ids"]))
    if args.tree:
        result["accepted_lengths"] = decoder.accepted
    if args.json:
        print(json.dumps(result))
    else:
        print(tokenizer.decode(result["token_ids"], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
