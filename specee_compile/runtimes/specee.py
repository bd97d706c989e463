"""The SpecEE engine: dense prefill, then draft -> segments with early exit, per token.

Per decode step (batch 1, greedy):
1. the draft graph proposes 4 candidate target ids from the newest token and the feature
   the previous token left from (its exit layer's normed hidden state);
2. the active predictor layers come from this request's exit history (offline set first,
   then the online window) and are passed as the ``active_layers`` mask;
3. the segments run in order over the shared in-place KV buffers; after each, the
   ``exit_flag`` of its predictor is read and the first set flag ends the step with that
   segment's ``exit_token`` and ``exit_feature``;
4. the layers the token skipped get K/V computed from the exit hidden state (state
   propagation), so every cache stays complete.

``SegmentedDecode`` holds these steps whatever runs the graphs; ``SpecEEEngine`` runs them
with ONNX Runtime, ``runtimes.tensorrt.TrtSpecEEEngine`` with one TensorRT engine per graph.
A bundle of exit mode "graph" (``SpecEEGraphEngine``) replaces 3 and 4 with one decode
graph whose nested ``If`` nodes stop at the first exit and propagate the K/V themselves.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from specee_compile.errors import BundleError
from specee_compile.runtimes.ort import OrtEngine, CacheState, check_io, open_session, session_options
from specee_compile.schedule import Schedule


class SpecEEState(CacheState):
    def __init__(self, engine: "SpecEEEngine"):
        super().__init__(engine.session, engine.num_layers, engine._cache_shape, engine.vocab_size,
                         engine.hidden_size)
        self.seg_bindings = self.cache_bindings(engine.segments, engine.segment_layers)
        d_shape = (1, engine.draft_kv_heads, engine.capacity, engine.draft_head_dim)
        self.draft_arrays = [np.zeros(d_shape, np.float32), np.zeros(d_shape, np.float32)]
        self.draft_buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.draft_arrays]
        self.draft_binding = self.draft_cache_binding(engine.draft)
        self.history: list[int] = []
        self.feature = None  # [1, 1, d]
        self.draft_len = 0

    def cache_bindings(self, sessions, layer_ranges) -> list:
        """One IOBinding per session with its layers' K/V buffers bound in place (input and output)."""
        bindings = []
        for sess, layers in zip(sessions, layer_ranges):
            b = sess.io_binding()
            for i in layers:
                for j, kind in enumerate(("key", "value")):
                    b.bind_ortvalue_input(f"past_key_values.{i}.{kind}", self.buffers[2 * i + j])
                    b.bind_ortvalue_output(f"present.{i}.{kind}", self.buffers[2 * i + j])
            bindings.append(b)
        return bindings

    def draft_cache_binding(self, session):
        """An IOBinding of a draft graph with the draft's K/V buffers bound in place."""
        b = session.io_binding()
        for j, kind in enumerate(("key", "value")):
            b.bind_ortvalue_input(f"past_key_values.0.{kind}", self.draft_buffers[j])
            b.bind_ortvalue_output(f"present.0.{kind}", self.draft_buffers[j])
        return b


class SegmentedDecode:
    """Exit mode "segments" whatever runs the graphs: the manifest's ``specee`` section, the
    threshold, the active predictors, prefill + draft, and the decode step (draft, then
    segment after segment until the first exit, then K/V propagation).

    An engine class lists it before its backend engine (``class E(SegmentedDecode, OrtEngine)``,
    so these ``_first_token`` and ``_next_token`` are the ones that run) and supplies how a
    graph runs:
    ``_prefill_features(state, ids) -> (first token, features [1, S, d])``;
    ``_draft(state, ids, features) -> draft_ids``; ``_step_values(state, token, n, draft_ids,
    active) -> the step inputs by name``; ``_run_segment(state, k, values) -> its outputs by
    name``; ``_array(output)``, an array of the output that indexing, ``bool``, ``int`` and
    ``argmax`` read (a numpy array, or a torch tensor still on the GPU); and
    ``_propagate(state, h, exit_layer, n)``.
    """

    def _read_specee(self, manifest: dict, threshold: float | None) -> tuple[list[str], str, str]:
        """Read the ``specee`` section; return the decode graphs' files, the draft's and kv_fill's."""
        try:
            spec = manifest["specee"]
            default_threshold = float(spec["threshold"])
            files = self._read_decode_graphs(spec)
            self.candidates = frozenset(spec["predictor_layers"])
            self.schedule = Schedule.from_dict(spec["schedule"])
            draft_file, kv_file = spec["draft"]["file"], spec["kv_fill"]["file"]
            self.draft_kv_heads = int(spec["draft"]["kv_heads"])
            self.draft_head_dim = int(spec["draft"]["head_dim"])
            self.kv_eps = float(spec["kv_fill"]["eps"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"the 'specee' section of {self.path}'s manifest is damaged ({type(e).__name__}: {e}); "
                              "recompile the bundle.") from e
        self.threshold = default_threshold if threshold is None else threshold
        self.kv_heads = int(manifest["model"]["num_kv_heads"])
        return files, draft_file, kv_file

    def _read_decode_graphs(self, spec: dict) -> list[str]:
        """The decode graphs' files, in run order; sets the layers and exit layer of each."""
        self.segment_layers = [range(g["first_layer"], g["last_layer"] + 1) for g in spec["segments"]]
        self.segment_exit = [g["exit_layer"] for g in spec["segments"]]
        return [g["file"] for g in spec["segments"]]

    @property
    def threshold(self) -> float:
        """The predictor score a layer must exceed to exit (the graphs' ``exit_threshold``)."""
        return float(self._threshold[0])

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise BundleError(f"the exit threshold must be in [0, 1], got {value}.")
        self._threshold = np.array([value], np.float32)

    def active_layers(self, history: list[int]) -> np.ndarray:
        """[L] bool: the predictors that run this step (the schedule's set, those that exist)."""
        active = np.zeros(self.num_layers, dtype=bool)
        active[[i for i in self.schedule.active(history) if i in self.candidates]] = True
        return active

    def _first_token(self, state, ids: list[int]) -> int:
        token, features = self._prefill_features(state, ids)
        state.history = []
        state.feature = features[:, -1:]
        state.draft_len = 0
        if len(ids) > 1:
            self._draft(state, ids[1:], features[:, :-1])
        return token

    def _next_token(self, state, token: int, n: int) -> tuple[int, int]:
        clock = time.perf_counter()
        draft_ids = self._draft(state, [token], state.feature)
        clock = lap(state.breakdown, "draft", clock)
        active = self.active_layers(state.history)
        values = self._step_values(state, token, n, draft_ids, active)
        for k, exit_at in enumerate(self.segment_exit):
            outs = self._run_segment(state, k, values)
            values.update(outs)
            if exit_at is not None and active[exit_at] and bool(self._array(outs[f"exit_flag.{exit_at}"])[0]):
                result = int(self._array(outs[f"exit_token.{exit_at}"])[0])
                state.feature = self._array(outs[f"exit_feature.{exit_at}"])[:, None, :]
                clock = lap(state.breakdown, "segments", clock)
                self._propagate(state, self._array(outs[f"layers.{exit_at}.output"])[0, -1], exit_at, n)
                lap(state.breakdown, "kv_propagation", clock)
                state.history.append(exit_at)
                return result, exit_at
        result = int(self._array(values["logits"])[0].argmax())
        state.feature = self._array(values["features"])[:, -1:]
        lap(state.breakdown, "segments", clock)
        state.history.append(self.num_layers - 1)
        return result, self.num_layers - 1


def propagated_kv(xp, kv: dict, j: int, h, cos, sin, eps: float, kv_heads: int):
    """Layer j's K (after RoPE) and V, each [kv_heads, D], for the exit hidden state h [d].

    ``xp`` is numpy or torch, ``kv`` the kv_fill tensors as its arrays, ``cos``/``sin`` the
    RoPE rows [D/2] of the position. The same operations in the same order for both.
    """
    x = h / xp.sqrt(xp.mean(h * h) + eps) * kv[f"{j}.norm"]
    k = x @ kv[f"{j}.k"].T + kv.get(f"{j}.k_bias", 0.0)
    v = x @ kv[f"{j}.v"].T + kv.get(f"{j}.v_bias", 0.0)
    k = k.reshape(kv_heads, -1)
    half = k.shape[1] // 2
    k1, k2 = k[:, :half], k[:, half:]
    k = xp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=1)
    return k, v.reshape(kv_heads, -1)


class SpecEEEngine(SegmentedDecode, OrtEngine):
    """A SpecEE bundle: ``generate`` returns ``exit_layers`` for every token."""

    spinning = "never"  # several sessions per step: an idle pool must not spin while another runs

    def __init__(self, path: Path, manifest: dict, tokenizer, threads: int | None = None,
                 profile_dir: Path | None = None, threshold: float | None = None):
        super().__init__(path, manifest, tokenizer, threads, profile_dir)
        files, draft_file, kv_file = self._read_specee(manifest, threshold)
        so = session_options(threads, self.spinning, profile_dir)
        self.segments = [open_session(self.file(f, "specee.segments.file"), so) for f in files]
        self.draft = open_session(self.file(draft_file, "specee.draft.file"), so)
        draft_cache = [1, self.draft_kv_heads, self.capacity, self.draft_head_dim]
        for i in self.draft.get_inputs():
            if i.name.startswith("past_key_values.") and [d if isinstance(d, int) else p for d, p in
                                                           zip(i.shape, draft_cache)] != draft_cache:
                raise BundleError(f"{self.path / draft_file}: {i.name} has shape {i.shape} but the manifest "
                                  f"('specee.draft.kv_heads', 'specee.draft.head_dim', 'cache.capacity') implies "
                                  f"{draft_cache}; the bundle is damaged. Recompile it.")
        kv_path = self.file(kv_file, "specee.kv_fill.file")
        try:
            self.kv = load_file(kv_path)
        except Exception as e:  # safetensors raises its own error types
            raise BundleError(f"{kv_path} is not a readable safetensors file ({e}); recompile the bundle.") from e
        self.segment_inputs = [[i.name for i in s.get_inputs() if not i.name.startswith("past_key_values.")]
                               for s in self.segments]
        self.segment_outputs = [[o.name for o in s.get_outputs() if not o.name.startswith("present.")]
                                for s in self.segments]

    def _sessions(self) -> list[ort.InferenceSession]:
        return [self.session, self.draft, *self.segments]

    def _last_feature(self, state: SpecEEState) -> np.ndarray:
        return state.feature[0, -1].copy()

    def _new_state(self) -> SpecEEState:
        return SpecEEState(self)

    def _array(self, value: ort.OrtValue) -> np.ndarray:
        return value.numpy()

    def _prefill_features(self, state: SpecEEState, ids: list[int]) -> tuple[int, np.ndarray]:
        logits = self._prefill(state, ids)
        features = state.binding.get_outputs()[-1].numpy()  # [1, n, d]: bound last, so listed last
        return int(logits[0].argmax()), features

    def _draft(self, state: SpecEEState, ids: list[int], features: np.ndarray) -> np.ndarray:
        b = state.draft_binding
        b.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
        b.bind_cpu_input("features", np.ascontiguousarray(features, np.float32))
        b.bind_cpu_input("past_sequence_length", np.array([state.draft_len], np.int64))
        b.bind_output("draft_ids")
        self.draft.run_with_iobinding(b)
        state.draft_len += len(ids)
        return b.get_outputs()[-1].numpy()  # bound after the presents, so listed last

    def _step_values(self, state: SpecEEState, token: int, n: int, draft_ids: np.ndarray,
                     active: np.ndarray) -> dict:
        return {"input_ids": np.array([[token]], np.int64), "past_sequence_length": np.array([n], np.int64),
                "draft_ids": draft_ids.astype(np.int64), "active_layers": active,
                "exit_threshold": self._threshold}

    def _run_segment(self, state: SpecEEState, k: int, values: dict) -> dict[str, ort.OrtValue]:
        return run_bound(self.segments[k], state.seg_bindings[k], self.segment_inputs[k], self.segment_outputs[k],
                         values)

    def _propagate(self, state: SpecEEState, h: np.ndarray, exit_layer: int, n: int,
                   position: int | None = None) -> None:
        """K/V of the skipped layers at cache row n from the exit hidden state h [d], rotated
        for ``position`` (n unless given: a tree node's position is the root's plus its depth)."""
        position = n if position is None else position
        cos, sin = self.kv["cos"][position], self.kv["sin"][position]
        for j in range(exit_layer + 1, self.num_layers):
            k, v = propagated_kv(np, self.kv, j, h, cos, sin, self.kv_eps, self.kv_heads)
            state.arrays[2 * j][0, :, n, :] = k
            state.arrays[2 * j + 1][0, :, n, :] = v


def run_bound(session: ort.InferenceSession, binding, inputs: list[str], outputs: list[str],
              values: dict) -> dict[str, ort.OrtValue]:
    """Run a graph whose K/V buffers are bound in place: bind ``inputs`` from ``values``
    (arrays or OrtValues), return ``outputs`` by name as OrtValues."""
    for name in inputs:
        v = values[name]
        if isinstance(v, np.ndarray):
            binding.bind_cpu_input(name, v)
        else:
            binding.bind_ortvalue_input(name, v)
    for name in outputs:
        binding.bind_output(name)
    session.run_with_iobinding(binding)
    got = binding.get_outputs()  # in first-bind order: the presents, then these
    return dict(zip(outputs, got[len(got) - len(outputs):]))


class _SpecEEGraphState(SpecEEState):
    """The graph-mode decode graph's token, exit layer and feature land in preallocated buffers."""

    def __init__(self, engine: "SpecEEGraphEngine"):
        super().__init__(engine)
        self.out_token = np.zeros(1, np.int64)
        self.out_layer = np.zeros(1, np.int64)
        self.out_feature = np.zeros((1, 1, engine.hidden_size), np.float32)
        self.out_values = []
        for name, array in (("token", self.out_token), ("exit_layer", self.out_layer), ("feature", self.out_feature)):
            value = ort.OrtValue.ortvalue_from_numpy(array)  # a view of the array
            self.seg_bindings[0].bind_ortvalue_output(name, value)
            self.out_values.append(value)


class SpecEEGraphEngine(SpecEEEngine):
    """A SpecEE bundle of exit mode "graph": per step, the draft then ONE decode graph whose
    nested ``If`` nodes stop at the first exit and propagate the skipped layers' K/V
    themselves; the graph reports the token, the exit layer and the draft's next feature."""

    def __init__(self, path: Path, manifest: dict, tokenizer, threads: int | None = None,
                 profile_dir: Path | None = None, threshold: float | None = None):
        super().__init__(path, manifest, tokenizer, threads, profile_dir, threshold)
        decode = manifest["specee"]["decode"]
        check_io(self.segments[0], decode, self.file(decode["file"], "specee.decode.file"))

    def _read_decode_graphs(self, spec: dict) -> list[str]:
        self.segment_layers = [range(self.num_layers)]  # every layer's cache is an input and output
        self.segment_exit = [None]
        return [spec["decode"]["file"]]

    def _new_state(self) -> _SpecEEGraphState:
        return _SpecEEGraphState(self)

    def _next_token(self, state: _SpecEEGraphState, token: int, n: int) -> tuple[int, int]:
        clock = time.perf_counter()
        draft_ids = self._draft(state, [token], state.feature)
        clock = lap(state.breakdown, "draft", clock)
        values = self._step_values(state, token, n, draft_ids, self.active_layers(state.history))
        b = state.seg_bindings[0]
        for name in self.segment_inputs[0]:
            b.bind_cpu_input(name, values[name])
        self.segments[0].run_with_iobinding(b)
        lap(state.breakdown, "segments", clock)  # the one decode graph, K/V propagation included
        exit_layer = int(state.out_layer[0])
        state.feature = state.out_feature.copy()
        state.history.append(exit_layer)
        return int(state.out_token[0]), exit_layer


def lap(breakdown: dict[str, float], part: str, since: float) -> float:
    now = time.perf_counter()
    breakdown[part] = breakdown.get(part, 0.0) + now - since
    return now
