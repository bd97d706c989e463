"""ONNX Runtime backend: sessions, the KV buffers they share, and how each graph is bound and run.

The KV cache lives in preallocated OrtValues bound both as ``past_key_values.*`` inputs and
``present.*`` outputs of every graph that runs a layer, so attention writes each new
position in place and a step neither reallocates nor copies the cache. Every request owns
its buffers and bindings (:class:`OrtBuffers`), so one engine serves several threads.

    OrtStep      the step graph: prefill and dense decode steps
    OrtSpecEE    + the draft and the segments (or the one decode graph of exit mode "graph")
                 and state propagation, what runtimes/decoders.py's SpecEE decoders call
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from specee_compile.bundle.manifest import Graph
from specee_compile.contract import (ACTIVE_LAYERS, DRAFT_IDS, EXIT_THRESHOLD, FEATURES, GRAPH_EXIT_OUTPUTS, INPUT_IDS,
                                     KINDS, NORMED_FEATURES, LOGITS, PAST, PAST_LENGTH, is_cache, past, present)
from specee_compile.errors import BundleError
from specee_compile.runtimes.backends.exchange import exchange_buffers
from specee_compile.runtimes.propagation import propagated_kv, rope_rows

logger = logging.getLogger(__name__)

SPINNING = ("always", "during_run", "never")
NUMPY_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_}  # exchanged values
_shared_pool: dict = {}  # set by share_threads: {"threads": n}


def share_threads(threads: int | None = None) -> None:
    """Run every session this package creates from now on in ONE process-wide ONNX Runtime
    intra-op thread pool of ``threads`` threads (default: ONNX Runtime's choice, the physical
    cores), instead of a pool per session.

    A SpecEE engine runs several sessions per decode step (the draft, then the segments). Each
    with its own pool, the idle pools' threads must sleep so as not to spin against the running
    one, and are woken again for every op; one shared pool stays warm across sessions. This is
    process-wide: once it is on, ONNX Runtime refuses any session, ours or another library's,
    that asks for a pool of its own. So programs turn it on (the ``specee-run`` and
    ``specee-bench`` commands do, first thing); a library should leave that choice to its caller.
    """
    if _shared_pool:
        if _shared_pool["threads"] != threads:
            logger.warning("the shared thread pool already has %s threads; keeping it", _shared_pool["threads"])
        return
    ort.set_global_thread_pool_sizes(threads or 0, 1)
    _shared_pool["threads"] = threads


def shared_pool() -> bool:
    """Whether :func:`share_threads` turned the process-wide pool on."""
    return bool(_shared_pool)


def session_options(threads: int | None = None, spinning: str = "always",
                    profile_dir: Path | None = None) -> ort.SessionOptions:
    """Options for every session.

    ``spinning`` says when idle intra-op threads busy-wait for work instead of sleeping:
    ``always`` (between runs too: the lowest latency when one session runs per step),
    ``during_run`` (between the ops of a run, stopping when the run returns: for engines that
    run several sessions per step, whose pools would otherwise spin against each other) or
    ``never``. ``profile_dir``: write ONNX Runtime's per-node profile (Chrome trace JSON) there.
    After :func:`share_threads` every session runs in the shared pool: ``threads`` and
    ``spinning`` are then the pool's, not the session's.
    """
    if spinning not in SPINNING:
        raise ValueError(f"spinning must be one of {SPINNING}, got {spinning!r}")
    so = ort.SessionOptions()
    if profile_dir is not None:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile_dir) / "ort")
    if _shared_pool:
        so.use_per_session_threads = False
    else:
        if threads:
            so.intra_op_num_threads = threads
        if spinning == "never":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        elif spinning == "during_run":
            so.add_session_config_entry("session.force_spinning_stop", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def providers() -> list[str]:
    """TensorRT and CUDA execution providers when onnxruntime-gpu has them, then the CPU.

    ORT assigns each node to the first provider that can run it, so the com.microsoft
    GroupQueryAttention nodes TensorRT cannot take fall back to CUDA.
    """
    available = ort.get_available_providers()
    wanted = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in wanted if p in available]


def open_session(file: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    """An ONNX Runtime session of a bundle graph; a graph ORT cannot load is a BundleError."""
    try:
        return ort.InferenceSession(str(file), options, providers=providers())
    except Exception as e:  # ORT raises its own exception types for damaged graphs
        raise BundleError(f"ONNX Runtime cannot load {file}: {e}; the bundle is damaged. Recompile it.") from e


def check_io(session: ort.InferenceSession, graph: Graph, file: Path) -> None:
    """The graph's inputs/outputs must be exactly those the manifest promises."""
    actual = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    promised = ([v.name for v in graph.inputs], [v.name for v in graph.outputs])
    if actual != promised:
        raise BundleError(
            f"{file} has inputs/outputs {actual} but the manifest promises {promised}; "
            "the bundle is damaged or mixed from two compiles. Recompile it."
        )


def check_cache_shapes(session: ort.InferenceSession, file: Path, layers: int, cache: list[int], fields: str,
                       vocab: int | None = None) -> None:
    """The graph's cache inputs (and ``logits``) must have the shapes the manifest implies."""
    cached = [i for i in session.get_inputs() if i.name.startswith(PAST)]
    if len(cached) != 2 * layers:
        raise BundleError(f"{file} has {len(cached) // 2} layers of cache inputs but the manifest's 'model.num_layers' "
                          f"says {layers}; the bundle is damaged. Recompile it.")
    checks = [(i, cache, fields) for i in cached]
    if vocab is not None:
        checks += [(o, [1, vocab], "'model.vocab_size'") for o in session.get_outputs() if o.name == LOGITS]
    for value, promised, where in checks:
        shape = value.shape  # symbolic dims are strings and match anything
        if len(shape) != len(promised) or any(isinstance(d, int) and d != p for d, p in zip(shape, promised)):
            raise BundleError(f"{file}: {value.name} has shape {shape} but the manifest ({where}) implies "
                              f"{promised}; the bundle is damaged. Recompile it.")


class OrtGraphs:
    """Opens a bundle's graphs as sessions with one set of options, checked against the manifest."""

    def __init__(self, bundle, threads: int | None, spinning: str, profile_dir: Path | None):
        self.bundle = bundle
        self.options = session_options(threads, spinning, profile_dir)
        level = (bundle.manifest.quant or {}).get("accuracy_level")
        if level is not None:  # a TensorRT-ready graph's DequantizeLinear + MatMul become MatMulNBits at this level
            self.options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        self.opened: list[ort.InferenceSession] = []

    def open(self, graph: Graph, field: str) -> ort.InferenceSession:
        file = self.bundle.file(graph.file, field)
        session = open_session(file, self.options)
        check_io(session, graph, file)
        self.opened.append(session)
        return session


class KVBuffers:
    """``layers`` pairs of float32 cache buffers [1, kv_heads, capacity, D]: numpy arrays and
    OrtValues viewing them (``arrays[2 * i + j]``: layer i's key (j = 0) or value)."""

    def __init__(self, layers: int, shape: tuple):
        self.arrays = [np.zeros(shape, np.float32) for _ in range(2 * layers)]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]

    def bind(self, binding: ort.IOBinding, layers, first: int = 0) -> ort.IOBinding:
        """Bind these layers' buffers in place: as past input and present output of the same layer."""
        for i in layers:
            for j, kind in enumerate(KINDS):
                buffer = self.values[2 * (i - first) + j]
                binding.bind_ortvalue_input(past(i, kind), buffer)
                binding.bind_ortvalue_output(present(i, kind), buffer)
        return binding


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


def io_names(session: ort.InferenceSession) -> tuple[list[str], list[str]]:
    """A graph's inputs and outputs other than the cache: what a run binds each time."""
    return ([i.name for i in session.get_inputs() if not is_cache(i.name)],
            [o.name for o in session.get_outputs() if not is_cache(o.name)])


class OrtBuffers:
    """One request's buffers and bindings: the cache, the step graph's binding with its logits
    and feature buffers, and (SpecEE) the draft's cache and the other graphs' bindings."""

    def __init__(self, step: ort.InferenceSession, bundle):
        self.cache = KVBuffers(bundle.num_layers, bundle.cache_shape)
        self.binding = self.cache.bind(step.io_binding(), range(bundle.num_layers))
        self.logits = np.zeros((1, bundle.vocab_size), np.float32)
        self.binding.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(self.logits))
        # decode steps write the [1, 1, d] features into one preallocated buffer
        self.step_features = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, bundle.hidden_size), np.float32))
        self.step_normed = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, bundle.hidden_size), np.float32))
        self.token = np.zeros((1, 1), np.int64)
        self.past_len = np.zeros((1,), np.int64)
        self.token_value = ort.OrtValue.ortvalue_from_numpy(self.token)
        self.past_len_value = ort.OrtValue.ortvalue_from_numpy(self.past_len)
        self.last_features = self.step_features
        self.last_normed = self.step_features  # the normed states (features, unless the draft fuses)
        self.extra: dict = {}  # bindings of the other graphs, made by the backend that runs them


class OrtStep:
    """The step graph: prefill over the prompt and dense decode steps."""

    spinning = "always"  # one session per step: let its threads spin between runs

    def __init__(self, bundle, threads: int | None = None, profile_dir: Path | None = None,
                 spinning: str | None = None):
        self.bundle = bundle
        self.graphs = OrtGraphs(bundle, threads, spinning or self.spinning, profile_dir)
        graph = bundle.manifest.step
        self.session = self.graphs.open(graph, "graphs.step.file")
        check_cache_shapes(self.session, bundle.file(graph.file, "graphs.step.file"), bundle.num_layers,
                           list(bundle.cache_shape), "'model.num_kv_heads', 'cache.capacity', 'model.head_dim'",
                           bundle.vocab_size)
        # a fusion draft's step graph: features is the draft's input, the normed states a second output
        self.normed = NORMED_FEATURES in {o.name for o in self.session.get_outputs()}

    def sessions(self) -> list[ort.InferenceSession]:
        return self.graphs.opened

    def new_buffers(self) -> OrtBuffers:
        return OrtBuffers(self.session, self.bundle)

    def prefill(self, buf: OrtBuffers, ids: list[int]) -> int:
        b = buf.binding
        b.bind_cpu_input(INPUT_IDS, np.asarray([ids], dtype=np.int64))
        b.bind_cpu_input(PAST_LENGTH, np.zeros((1,), np.int64))
        b.bind_output(FEATURES)  # [1, S, d], allocated by ORT for this shape
        if self.normed:
            b.bind_output(NORMED_FEATURES)
        self.session.run_with_iobinding(b)
        outs = b.get_outputs()  # in first-bind order: these were bound last
        buf.last_features = buf.last_normed = outs[-1]
        if self.normed:
            buf.last_features = outs[-2]
        return int(buf.logits[0].argmax())

    def prompt_features(self, buf: OrtBuffers) -> np.ndarray:
        """[1, S, d]: the prefill's features of every prompt position."""
        return buf.last_features.numpy()

    def decode(self, buf: OrtBuffers, token: int, past_len: int) -> int:
        buf.token[0, 0] = token
        buf.past_len[0] = past_len
        b = buf.binding
        b.bind_ortvalue_input(INPUT_IDS, buf.token_value)
        b.bind_ortvalue_input(PAST_LENGTH, buf.past_len_value)
        b.bind_ortvalue_output(FEATURES, buf.step_features)
        if self.normed:
            b.bind_ortvalue_output(NORMED_FEATURES, buf.step_normed)
        self.session.run_with_iobinding(b)
        buf.last_features = buf.last_normed = buf.step_features
        if self.normed:
            buf.last_normed = buf.step_normed
        return int(buf.logits[0].argmax())

    def feature(self, buf: OrtBuffers) -> np.ndarray:
        """[d]: the final-normed hidden state the last prediction came from."""
        return buf.last_normed.numpy()[0, -1].copy()


class OrtSpecEE(OrtStep):
    """The SpecEE graphs besides the step graph: the draft, the segments (or exit mode
    "graph"'s one decode graph) and the K/V-propagation tensors."""

    spinning = "never"  # several sessions per step: an idle pool must not spin while another runs

    def __init__(self, bundle, spec, threads: int | None = None, profile_dir: Path | None = None,
                 decode_graphs: bool = True):
        """``decode_graphs``: open the segments or the decode graph (tree speculation runs none)."""
        super().__init__(bundle, threads, profile_dir)
        self.spec = spec  # decoders.SpecEEFacts
        manifest = bundle.manifest.specee
        self.draft = self.graphs.open(manifest.draft, "specee.draft.file")
        draft_file = bundle.file(manifest.draft.file, "specee.draft.file")
        check_cache_shapes(self.draft, draft_file, 1, list(spec.draft_cache_shape),
                           "'specee.draft.kv_heads', 'specee.draft.head_dim', 'cache.capacity'")
        graphs = manifest.segments if spec.exit_mode == "segments" else [manifest.decode]
        field = "specee.segments.file" if spec.exit_mode == "segments" else "specee.decode.file"
        self.segments = [self.graphs.open(g, field) for g in graphs] if decode_graphs else []
        self.segment_io = [io_names(s) for s in self.segments]
        # exit mode "segments": the values the draft and the segments pass each other, in fixed buffers
        self.exchange = exchange_buffers([g.to_json() for g in graphs], manifest.draft.to_json(), bundle.path,
                                         tuple(NUMPY_DTYPES)) if self.segments and spec.exit_mode == "segments" else {}
        kv_path = bundle.file(manifest.kv_fill_file, "specee.kv_fill.file")
        try:
            self.kv = load_file(kv_path)
        except Exception as e:  # safetensors raises its own error types
            raise BundleError(f"{kv_path} is not a readable safetensors file ({e}); recompile the bundle.") from e

    def new_buffers(self) -> OrtBuffers:
        buf = super().new_buffers()
        buf.draft_cache = KVBuffers(1, self.spec.draft_cache_shape)
        buf.draft_binding = buf.draft_cache.bind(self.draft.io_binding(), [0])
        buf.segment_bindings = [buf.cache.bind(s.io_binding(), layers)
                                for s, layers in zip(self.segments, self.spec.segment_layers)]
        if self.exchange:  # bound once: a decode step writes its inputs in place and runs the graphs
            buf.values = {name: np.zeros(shape, NUMPY_DTYPES[dtype]) for name, (shape, dtype) in self.exchange.items()}
            bound = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in buf.values.items()}
            for binding, (inputs, outputs) in zip(buf.segment_bindings, self.segment_io):
                for name in inputs:
                    binding.bind_ortvalue_input(name, bound[name])
                for name in outputs:
                    binding.bind_ortvalue_output(name, bound[name])
            buf.segment_outputs = [{name: buf.values[name] for name in outputs} for _, outputs in self.segment_io]
            buf.draft_binding.bind_ortvalue_output(DRAFT_IDS, bound[DRAFT_IDS])
        if self.spec.exit_mode == "graph" and self.segments:  # the decode graph's results land in fixed buffers
            buf.out = {"token": np.zeros(1, np.int64), "exit_layer": np.zeros(1, np.int64),
                       "feature": np.zeros((1, 1, self.bundle.hidden_size), np.float32),
                       "normed_feature": np.zeros((1, 1, self.bundle.hidden_size), np.float32)}
            outputs = {o.name for o in self.segments[0].get_outputs()}  # normed_feature: since the fusion draft
            for name in GRAPH_EXIT_OUTPUTS:
                if name in outputs:
                    buf.segment_bindings[0].bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buf.out[name]))
                else:
                    buf.out[name] = buf.out["feature"]
        return buf

    def array(self, value) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy()

    def draft_step(self, buf: OrtBuffers, ids: list[int], features: np.ndarray, past_len: int) -> np.ndarray:
        """The draft's candidates after ``ids`` (fed ``features``) written from row ``past_len``."""
        b = buf.draft_binding
        b.bind_cpu_input(INPUT_IDS, np.asarray([ids], np.int64))
        b.bind_cpu_input(FEATURES, np.ascontiguousarray(features, np.float32))
        b.bind_cpu_input(PAST_LENGTH, np.array([past_len], np.int64))
        if self.exchange:  # its fixed buffer, bound once
            self.draft.run_with_iobinding(b)
            return buf.values[DRAFT_IDS]
        b.bind_output(DRAFT_IDS)
        self.draft.run_with_iobinding(b)
        return b.get_outputs()[-1].numpy()  # bound after the presents, so listed last

    def step_values(self, buf: OrtBuffers, token: int, n: int, draft_ids: np.ndarray, active: np.ndarray,
                    threshold: np.ndarray) -> dict:
        if not self.exchange:
            return {INPUT_IDS: np.array([[token]], np.int64), PAST_LENGTH: np.array([n], np.int64),
                    DRAFT_IDS: draft_ids.astype(np.int64), ACTIVE_LAYERS: active, EXIT_THRESHOLD: threshold}
        values = buf.values  # the fixed buffers the graphs read
        if draft_ids is not values[DRAFT_IDS]:  # draft_step writes its candidates there itself
            values[DRAFT_IDS][...] = draft_ids
        for name, value in ((INPUT_IDS, token), (PAST_LENGTH, n), (ACTIVE_LAYERS, active), (EXIT_THRESHOLD, threshold)):
            if name in values:
                values[name][...] = value
        return values

    def run_segment(self, buf: OrtBuffers, k: int, values: dict) -> dict:
        if self.exchange:  # every input and output is bound to its fixed buffer
            self.segments[k].run_with_iobinding(buf.segment_bindings[k])
            return buf.segment_outputs[k]
        inputs, outputs = self.segment_io[k]
        return run_bound(self.segments[k], buf.segment_bindings[k], inputs, outputs, values)

    def run_decode_graph(self, buf: OrtBuffers, values: dict) -> tuple[int, int, np.ndarray, np.ndarray]:
        """Exit mode "graph": the one decode graph; its token, exit layer, next feature and normed state."""
        b = buf.segment_bindings[0]
        for name in self.segment_io[0][0]:
            b.bind_cpu_input(name, values[name])
        self.segments[0].run_with_iobinding(b)
        return (int(buf.out["token"][0]), int(buf.out["exit_layer"][0]), buf.out["feature"].copy(),
                buf.out["normed_feature"].copy())

    def propagate(self, buf: OrtBuffers, h: np.ndarray, exit_layer: int, row: int, position: int | None = None):
        """K/V of the layers after ``exit_layer`` at cache row ``row`` from the exit hidden state
        h [d], rotated for ``position`` (``row`` unless given: a tree node's position is the
        root's plus its depth)."""
        position = row if position is None else position
        for j in range(exit_layer + 1, self.bundle.num_layers):
            k, v = propagated_kv(np, self.kv, j, h, *rope_rows(self.kv, j, position), self.spec.kv_eps,
                                 self.spec.kv_heads)
            buf.cache.arrays[2 * j][0, :, row, :] = k
            buf.cache.arrays[2 * j + 1][0, :, row, :] = v
