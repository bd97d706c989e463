"""Decoders: the decoding algorithms, over a backend that runs the graphs.

``DenseDecoder``: prefill, then one step graph run per token.

``SegmentedDecoder`` (SpecEE, exit mode "segments"), per decode step (batch 1, greedy):

1. the draft graph proposes 4 candidate target ids from the newest token and the feature
   the previous token left from (its exit layer's normed hidden state);
2. the active predictor layers come from this request's exit history (offline set first,
   then the online window) and are passed as the ``active_layers`` mask;
3. the segments run in order over the shared KV buffers; after each, the ``exit_flag`` of
   its predictor is read and the first set flag ends the step with that segment's
   ``exit_token`` and ``exit_feature``;
4. the layers the token skipped get K/V computed from the exit hidden state (state
   propagation), so every cache stays complete.

``GraphExitDecoder`` (exit mode "graph", ONNX Runtime) replaces 3 and 4 with one decode
graph whose nested ``If`` nodes stop at the first exit and propagate the K/V themselves.

A SpecEE backend (``backends.ort.OrtSpecEE``, ``backends.tensorrt.TrtSpecEE``) supplies
``new_buffers()``, ``prefill(buf, ids)``, ``prompt_features(buf)``, ``draft_step(buf, ids,
features, past_len)``, ``step_values(buf, token, n, draft_ids, active, threshold)``,
``run_segment(buf, k, values)``, ``array(output)`` (indexing, ``bool``, ``int`` and
``argmax`` read it: a numpy array, or a torch tensor still on the GPU) and ``propagate(buf,
h, exit_layer, n)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from specee_compile.contract import (FEATURES, LOGITS, NORMED_FEATURES, exit_feature, exit_flag, exit_token,
                                     layer_output, normed_exit_feature)
from specee_compile.errors import BundleError, ConfigError
from specee_compile.runtimes.engine import Forward, teacher_force
from specee_compile.schedule import Schedule


@dataclass
class Request:
    """One generate or score call's state: the backend's buffers and the algorithm's own."""

    buffers: object
    breakdown: dict[str, float] = field(default_factory=dict)  # decode seconds per part (SpecEE)
    history: list[int] = field(default_factory=list)  # exit layer of every decode step
    feature: object = None  # [1, 1, d]: the feature the draft is fed next
    normed: object = None  # [.., d]: the normed state the last token came from (feature, unless the draft fuses)
    draft_len: int = 0  # rows of the draft's cache in use
    extra: dict = field(default_factory=dict)  # a decoder's further fields (tree speculation)


class DenseDecoder:
    """Every layer for every token: the step graph per token."""

    speculative = False

    def __init__(self, backend, bundle):
        self.backend, self.num_layers = backend, bundle.num_layers

    def sessions(self) -> list:
        return self.backend.sessions()

    def new_request(self) -> Request:
        return Request(self.backend.new_buffers())

    def configure(self, request: Request, **options) -> None:
        _no_options(options, "a dense decoder")

    def prefill(self, request: Request, ids: list[int]) -> int:
        return self.backend.prefill(request.buffers, ids)

    def step(self, request: Request, token: int, n: int) -> Forward:
        return Forward([self.backend.decode(request.buffers, token, n)], self.num_layers - 1)

    def feature(self, request: Request) -> np.ndarray:
        return self.backend.feature(request.buffers)

    def score(self, request: Request, ids: list[int], continuation: list[int]):
        return teacher_force(self, request, ids, continuation)


@dataclass
class SpecEEFacts:
    """The ``specee`` section of a manifest as the decoders and backends read it."""

    threshold: float
    candidates: frozenset[int]  # layers with a predictor
    schedule: Schedule
    exit_mode: str
    segment_layers: list[range]  # per decode graph, the layers whose cache it reads and writes
    segment_exit: list[int | None]  # per decode graph, the predictor layer it ends with
    draft_cache_shape: tuple[int, int, int, int]
    kv_eps: float
    kv_heads: int

    @classmethod
    def read(cls, bundle) -> "SpecEEFacts":
        spec, model = bundle.manifest.specee, bundle.manifest.model
        if spec.exit_mode == "graph":
            layers, exits = [range(bundle.num_layers)], [None]  # every layer's cache is an input and output
        else:
            layers, exits = [s.layers for s in spec.segments], [s.exit_layer for s in spec.segments]
        try:
            schedule = Schedule.from_dict(spec.schedule)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"the 'specee.schedule' of {bundle.path}'s manifest is damaged ({type(e).__name__}: "
                              f"{e}); recompile the bundle.") from e
        return cls(spec.threshold, frozenset(spec.predictor_layers), schedule, spec.exit_mode, layers, exits,
                   (1, spec.draft.kv_heads, bundle.capacity, spec.draft.head_dim), spec.kv_fill_eps, model.num_kv_heads)


class SegmentedDecoder:
    """SpecEE with the segments run one after another up to the first exit (module docstring)."""

    speculative = False

    def __init__(self, backend, bundle, spec: SpecEEFacts, threshold: float | None = None):
        self.backend, self.spec, self.num_layers = backend, spec, bundle.num_layers
        self.threshold = spec.threshold if threshold is None else threshold

    @property
    def threshold(self) -> float:
        """The predictor score a layer must exceed to exit (the graphs' ``exit_threshold``)."""
        return float(self._threshold[0])

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise BundleError(f"the exit threshold must be in [0, 1], got {value}.")
        self._threshold = np.array([value], np.float32)

    def sessions(self) -> list:
        return self.backend.sessions()

    def new_request(self) -> Request:
        return Request(self.backend.new_buffers())

    def configure(self, request: Request, **options) -> None:
        _no_options(options, "a SpecEE decoder")

    def active_layers(self, history: list[int]) -> np.ndarray:
        """[L] bool: the predictors that run this step (the schedule's set, those that exist)."""
        active = np.zeros(self.num_layers, dtype=bool)
        active[[i for i in self.spec.schedule.active(history) if i in self.spec.candidates]] = True
        return active

    def prefill(self, request: Request, ids: list[int]) -> int:
        """The step graph over the prompt, then the draft over it (fed the prompt's features)."""
        token = self.backend.prefill(request.buffers, ids)
        features = self.backend.prompt_features(request.buffers)  # [1, S, d]
        request.history, request.feature, request.draft_len = [], features[:, -1:], 0
        request.normed = self.backend.feature(request.buffers)
        if len(ids) > 1:
            self.draft(request, ids[1:], features[:, :-1])
        return token

    def draft(self, request: Request, ids: list[int], features):
        draft_ids = self.backend.draft_step(request.buffers, ids, features, request.draft_len)
        request.draft_len += len(ids)
        return draft_ids

    def feature(self, request: Request) -> np.ndarray:
        f = request.normed.reshape(-1, request.normed.shape[-1])[-1]
        return f.float().cpu().numpy() if hasattr(f, "cpu") else f.copy()

    def step(self, request: Request, token: int, n: int) -> Forward:
        backend, buf = self.backend, request.buffers
        clock = time.perf_counter()
        draft_ids = self.draft(request, [token], request.feature)
        clock = lap(request.breakdown, "draft", clock)
        active = self.active_layers(request.history)
        values = backend.step_values(buf, token, n, draft_ids, active, self._threshold)
        for k, exit_at in enumerate(self.spec.segment_exit):
            outs = backend.run_segment(buf, k, values)
            values.update(outs)
            if exit_at is not None and active[exit_at] and bool(backend.array(outs[exit_flag(exit_at)])[0]):
                result = int(backend.array(outs[exit_token(exit_at)])[0])
                request.feature = backend.array(outs[exit_feature(exit_at)])[:, None, :]
                normed = normed_exit_feature(exit_at)  # a fusion draft's bundle: the state the token came from
                request.normed = backend.array(outs[normed]) if normed in outs else request.feature
                clock = lap(request.breakdown, "segments", clock)
                backend.propagate(buf, backend.array(outs[layer_output(exit_at)])[0, -1], exit_at, n)
                lap(request.breakdown, "kv_propagation", clock)
                request.history.append(exit_at)
                return Forward([result], exit_at)
        result = int(backend.array(values[LOGITS])[0].argmax())
        request.feature = backend.array(values[FEATURES])[:, -1:]
        request.normed = backend.array(values[NORMED_FEATURES])[:, -1:] if NORMED_FEATURES in values else request.feature
        lap(request.breakdown, "segments", clock)
        request.history.append(self.num_layers - 1)
        return Forward([result], self.num_layers - 1)

    def score(self, request: Request, ids: list[int], continuation: list[int]):
        return teacher_force(self, request, ids, continuation)


class GraphExitDecoder(SegmentedDecoder):
    """SpecEE with exit mode "graph": per step the draft, then ONE decode graph whose nested
    ``If`` nodes stop at the first exit and propagate the skipped layers' K/V themselves; the
    graph reports the token, the exit layer and the draft's next feature."""

    def step(self, request: Request, token: int, n: int) -> Forward:
        clock = time.perf_counter()
        draft_ids = self.draft(request, [token], request.feature)
        clock = lap(request.breakdown, "draft", clock)
        values = self.backend.step_values(request.buffers, token, n, draft_ids,
                                          self.active_layers(request.history), self._threshold)
        result, exit_layer, request.feature, request.normed = self.backend.run_decode_graph(request.buffers, values)
        lap(request.breakdown, "segments", clock)  # the one decode graph, K/V propagation included
        request.history.append(exit_layer)
        return Forward([result], exit_layer)


def lap(breakdown: dict[str, float], part: str, since: float) -> float:
    now = time.perf_counter()
    breakdown[part] = breakdown.get(part, 0.0) + now - since
    return now


def _no_options(options: dict, what: str) -> None:
    if options:
        raise ConfigError(f"{what} takes no per-call options; got {sorted(options)} (tree=... needs a bundle compiled "
                          "with --specee --tree, loaded with tree=...).")
