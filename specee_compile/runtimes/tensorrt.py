"""TensorRT engines: greedy generation over a bundle's serialized engines with device buffers.

The step engine (built from the standard-ONNX graph, see ``lower/tensorrt.py``) writes the
whole cache with the new positions scattered in into its ``present.*`` outputs. TensorRT
does not alias an input and an output, so every request owns two sets of CUDA buffers per
cache and swaps them after each step: the last step's present is the next step's past.
All tensors live on the GPU (torch CUDA tensors); a step copies the token id in and the
argmax out. Tokenization, the decode loop, stopping and streaming are OrtEngine's: only
how one step runs differs.

A SpecEE bundle (``TrtSpecEEEngine``) adds one engine per segment and one for the draft.
Its decode step is ``SegmentedDecode``'s, as in the ONNX Runtime engine: the draft, then
segment after segment (each swapping only its own layers' two buffer sets), reading the
exit flag of a segment whose predictor is active (a one-byte device-to-host copy) and
stopping at the first set one; the K/V of the skipped layers are then computed on the GPU
from ``kv_fill`` and written into the buffers the next step reads. The values the graphs
pass each other (draft ids, hidden states at the cuts, exit flags, ...) live in fixed
buffers bound once per request.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from specee_compile.errors import BackendError, BundleError, GenerationError
from specee_compile.lower.tensorrt import unavailable_reason
from specee_compile.runtimes.ort import OrtEngine
from specee_compile.runtimes.specee import SegmentedDecode, propagated_kv

logger = logging.getLogger(__name__)

CACHE_PREFIXES = ("past_key_values.", "present.")
STEP_INPUTS = ("input_ids", "past_sequence_length", "active_layers", "exit_threshold")  # fed by the runtime
_DTYPES = ("float32", "int64", "bool")  # of the values the graphs exchange


class _SwapCaches:
    """Two buffer sets per cache and, per layer, which set holds the cache. A graph that runs
    layer i reads its current set (past) and writes the other (present); then layer i swaps."""

    def __init__(self, layers: int, shape: tuple, device: str):
        import torch

        self.sets = [[[torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(2)] for _ in range(2)]
                     for _ in range(layers)]  # [layer][set][0 key | 1 value]
        self.current = [0] * layers

    def bind(self, context, layers) -> None:
        """Bind layers' current sets as ``past_key_values.*`` and the others as ``present.*``."""
        for i in layers:
            past, present = self.sets[i][self.current[i]], self.sets[i][1 - self.current[i]]
            for j, kind in enumerate(("key", "value")):
                context.set_tensor_address(f"past_key_values.{i}.{kind}", past[j].data_ptr())
                context.set_tensor_address(f"present.{i}.{kind}", present[j].data_ptr())

    def swap(self, layers) -> None:
        for i in layers:
            self.current[i] = 1 - self.current[i]

    def cache(self, i: int, j: int):
        """Layer i's key (j = 0) or value (j = 1) buffer, the one the next graph reads."""
        return self.sets[i][self.current[i]][j]


class _TrtState:
    """One request's execution context, its two cache buffer sets and its fixed I/O buffers."""

    def __init__(self, engine: "TrtEngine"):
        import torch

        device = engine.device
        self.context = engine.engine.create_execution_context()
        self.caches = _SwapCaches(engine.num_layers, engine._cache_shape, device)
        self.logits = torch.zeros((1, engine.vocab_size), dtype=torch.float32, device=device)
        self.step_features = torch.zeros((1, 1, engine.hidden_size), dtype=torch.float32, device=device)
        self.token = torch.zeros((1, 1), dtype=torch.int64, device=device)
        self.past_len = torch.zeros((1,), dtype=torch.int64, device=device)
        self.last_features = self.step_features
        self.breakdown: dict[str, float] = {}
        self.context.set_tensor_address("logits", self.logits.data_ptr())


class TrtEngine(OrtEngine):
    """A loaded TensorRT bundle. Use :func:`specee_compile.runtimes.load` to create one."""

    device = "cuda"  # where every buffer lives (torch device); the engines run only on CUDA

    def __init__(self, path: Path, manifest: dict, tokenizer, threads: int | None = None,
                 profile_dir: Path | None = None):
        # OrtEngine.__init__ opens an ONNX Runtime session; this engine shares only its
        # tokenization and decode loop, so it sets the same attributes itself.
        self._read_manifest(path, manifest, tokenizer)
        self.profile_dir = None
        graph = manifest["graphs"]["step"]
        reason = unavailable_reason()
        if reason:
            specee = " --specee" if "specee" in manifest else ""
            raise BackendError(
                f"{self.path} is a TensorRT bundle, which runs only with TensorRT 10 and an NVIDIA GPU: {reason}. "
                f"Its graph {graph.get('onnx', 'model.onnx')} runs on ONNX Runtime: compile the model with "
                f"--out NAME.onnx{specee} --check trt for the same graphs in an ONNX Runtime bundle."
            )
        self.engine = self._open(graph, self._cache_shape)
        self._pool: list[_TrtState] = []
        self._lock = threading.Lock()

    def _open(self, graph: dict, cache_shape: tuple):
        """Deserialize ``graph['file']`` and check its tensors against the manifest's I/O."""
        file = self.file(graph["file"], "the engine file of a graph")
        engine = _deserialize(file, self.manifest.get("engine", {}))
        _check_engine_io(engine, graph, cache_shape, self.vocab_size, file)
        return engine

    def _new_state(self) -> _TrtState:
        return _TrtState(self)

    def _sessions(self) -> list:
        return []  # no ONNX Runtime sessions to profile

    def _last_feature(self, state: _TrtState) -> np.ndarray:
        return state.last_features[0, -1].float().cpu().numpy()

    def _first_token(self, state: _TrtState, ids: list[int]) -> int:
        self._prefill(state, ids)
        return int(state.logits[0].argmax())

    def _prefill(self, state: _TrtState, ids: list[int]):
        """Run the step engine over the prompt at position 0; returns its features [1, S, d]."""
        import torch

        tokens = torch.tensor([ids], dtype=torch.int64, device=self.device)
        state.past_len.zero_()
        features = torch.empty((1, len(ids), self.hidden_size), dtype=torch.float32, device=self.device)
        self._step(state, tokens, features)
        return features

    def _next_token(self, state: _TrtState, token: int, past_len: int) -> tuple[int, int]:
        state.token.fill_(token)
        state.past_len.fill_(past_len)
        self._step(state, state.token, state.step_features)
        return int(state.logits[0].argmax()), self.num_layers - 1

    def _step(self, state: _TrtState, tokens, features) -> None:
        """Run the engine once: past = the current cache set, present = the other; then swap."""
        ctx = state.context
        ctx.set_input_shape("input_ids", tuple(tokens.shape))
        ctx.set_tensor_address("input_ids", tokens.data_ptr())
        ctx.set_tensor_address("past_sequence_length", state.past_len.data_ptr())
        ctx.set_tensor_address("features", features.data_ptr())
        layers = range(self.num_layers)
        state.caches.bind(ctx, layers)
        self._execute(ctx, "a step")
        state.caches.swap(layers)
        state.last_features = features

    def _execute(self, context, what: str) -> None:
        """Enqueue a run on torch's current stream, which orders it with the torch copies around it."""
        import torch

        stream = torch.cuda.current_stream().cuda_stream if self.device == "cuda" else 0
        if not context.execute_async_v3(stream):
            raise GenerationError(f"TensorRT failed to run {what} of {self.path} (its log above says why).")


class _TrtSpecEEState(_TrtState):
    """Adds the draft's context and caches, one context per segment, and one buffer per value
    the graphs pass each other, bound once: only the cache buffers are bound per run."""

    def __init__(self, engine: "TrtSpecEEEngine"):
        import torch

        super().__init__(engine)
        device = engine.device
        self.values = {name: torch.zeros(shape, dtype=_torch_dtype(dtype), device=device)
                       for name, (shape, dtype) in engine.buffers.items()}
        self.draft_context = engine.draft_engine.create_execution_context()
        self.draft_context.set_tensor_address("draft_ids", self.values["draft_ids"].data_ptr())
        self.draft_caches = _SwapCaches(1, engine._draft_cache_shape, device)
        self.draft_pos = torch.zeros((1,), dtype=torch.int64, device=device)
        self.segment_contexts, self.segment_outputs = [], []
        for seg, graph in zip(engine.segment_engines, engine.segment_graphs):
            ctx = seg.create_execution_context()
            for v in graph["inputs"]:
                if v["name"].startswith(CACHE_PREFIXES):
                    continue
                buffer = self.values[v["name"]]
                if not all(isinstance(d, int) for d in v["shape"]):
                    ctx.set_input_shape(v["name"], tuple(buffer.shape))
                ctx.set_tensor_address(v["name"], buffer.data_ptr())
            outputs = {v["name"]: self.values[v["name"]] for v in graph["outputs"]
                       if not v["name"].startswith(CACHE_PREFIXES)}
            for name, buffer in outputs.items():
                ctx.set_tensor_address(name, buffer.data_ptr())
            self.segment_contexts.append(ctx)
            self.segment_outputs.append(outputs)
        self.history: list[int] = []
        self.feature = None  # [1, 1, d] on the device
        self.draft_len = 0


class TrtSpecEEEngine(SegmentedDecode, TrtEngine):
    """A TensorRT SpecEE bundle: the step engine for prefill, then per token the draft's engine
    and the segments' engines up to the first exit; ``generate`` returns ``exit_layers`` and
    ``threshold`` is settable, as for :class:`specee_compile.runtimes.specee.SpecEEEngine`."""

    def __init__(self, path: Path, manifest: dict, tokenizer, threads: int | None = None,
                 profile_dir: Path | None = None, threshold: float | None = None):
        import torch
        from safetensors.numpy import load_file

        super().__init__(path, manifest, tokenizer)  # the hardware check, then the step engine
        _, _, kv_file = self._read_specee(manifest, threshold)
        spec = manifest["specee"]
        self.segment_graphs, draft_graph = spec["segments"], spec["draft"]
        self._draft_cache_shape = (1, self.draft_kv_heads, self.capacity, self.draft_head_dim)
        self.buffers = exchange_buffers(self.segment_graphs, draft_graph, self.path)
        self.segment_engines = [self._open(g, self._cache_shape) for g in self.segment_graphs]
        self.draft_engine = self._open(draft_graph, self._draft_cache_shape)
        kv_path = self.file(kv_file, "specee.kv_fill.file")
        try:
            kv = load_file(kv_path)
        except Exception as e:  # safetensors raises its own error types
            raise BundleError(f"{kv_path} cannot be read ({e}); recompile the bundle.") from e
        self.kv = {name: torch.from_numpy(a).to(self.device) for name, a in kv.items()}

    def _new_state(self) -> _TrtSpecEEState:
        return _TrtSpecEEState(self)

    def _array(self, value):
        return value  # a torch tensor on the device: reading one element is the device-to-host copy

    def _last_feature(self, state: _TrtSpecEEState) -> np.ndarray:
        return state.feature[0, -1].float().cpu().numpy()

    def _prefill_features(self, state: _TrtSpecEEState, ids: list[int]):
        features = self._prefill(state, ids)
        return int(state.logits[0].argmax()), features

    def _draft(self, state: _TrtSpecEEState, ids: list[int], features):
        import torch

        ctx = state.draft_context
        tokens = torch.tensor([ids], dtype=torch.int64, device=self.device)
        features = features.contiguous()
        ctx.set_input_shape("input_ids", tuple(tokens.shape))
        ctx.set_input_shape("features", tuple(features.shape))
        ctx.set_tensor_address("input_ids", tokens.data_ptr())
        ctx.set_tensor_address("features", features.data_ptr())
        state.draft_pos.fill_(state.draft_len)
        ctx.set_tensor_address("past_sequence_length", state.draft_pos.data_ptr())
        state.draft_caches.bind(ctx, [0])
        self._execute(ctx, "the draft")
        state.draft_caches.swap([0])
        state.draft_len += len(ids)
        return state.values["draft_ids"]

    def _step_values(self, state: _TrtSpecEEState, token: int, n: int, draft_ids, active: np.ndarray) -> dict:
        import torch

        values = state.values  # draft_ids is already in its buffer
        fills = {"input_ids": token, "past_sequence_length": n, "exit_threshold": self.threshold}
        for name, value in fills.items():
            if name in values:
                values[name].fill_(value)
        if "active_layers" in values:
            values["active_layers"].copy_(torch.from_numpy(active))
        return values

    def _run_segment(self, state: _TrtSpecEEState, k: int, values: dict) -> dict:
        ctx, layers = state.segment_contexts[k], self.segment_layers[k]
        state.caches.bind(ctx, layers)
        self._execute(ctx, f"segment {k}")
        state.caches.swap(layers)
        return state.segment_outputs[k]

    def _propagate(self, state: _TrtSpecEEState, h, exit_layer: int, n: int) -> None:
        """K/V of the skipped layers at position n from the exit hidden state h [d], on the device."""
        import torch

        cos, sin = self.kv["cos"][n], self.kv["sin"][n]
        for j in range(exit_layer + 1, self.num_layers):
            k, v = propagated_kv(torch, self.kv, j, h, cos, sin, self.kv_eps, self.kv_heads)
            state.caches.cache(j, 0)[0, :, n, :] = k
            state.caches.cache(j, 1)[0, :, n, :] = v


def exchange_buffers(segments: list[dict], draft: dict, bundle: Path | str = "the bundle") -> dict[str, tuple]:
    """name -> (shape, dtype) of every value the graphs of a decode step pass each other.

    From the manifest's I/O lists: the draft's ``draft_ids``, the step inputs the runtime
    feeds (``STEP_INPUTS``) and every segment output but the caches, at their decode-step
    shape (symbolic dimensions are 1). Segments run in manifest order, so a segment input
    must be a step input or an output of the draft or of an earlier segment, with the same
    shape and dtype; anything else is a damaged bundle.
    """
    buffers: dict[str, tuple] = {}

    def entry(v: dict) -> tuple:
        return tuple(d if isinstance(d, int) else 1 for d in v["shape"]), v["dtype"]

    def damaged(what: str) -> BundleError:
        return BundleError(f"{bundle}: {what}; the bundle is damaged or mixed from two compiles. Recompile it.")

    for v in draft["outputs"]:
        if not v["name"].startswith(CACHE_PREFIXES):
            buffers[v["name"]] = entry(v)
    for k, seg in enumerate(segments):
        for v in seg["inputs"]:
            name = v["name"]
            if name.startswith(CACHE_PREFIXES):
                continue
            if name in buffers:
                if buffers[name] != entry(v):
                    raise damaged(f"segment {k} reads '{name}' as {entry(v)}, but it is written as {buffers[name]}")
            elif name in STEP_INPUTS:
                buffers[name] = entry(v)
            else:
                raise damaged(f"segment {k} reads '{name}', which neither the runtime, the draft nor an earlier "
                              "segment provides")
        for v in seg["outputs"]:
            if v["name"].startswith(CACHE_PREFIXES):
                continue
            if v["name"] in buffers:
                raise damaged(f"segment {k} writes '{v['name']}', which an earlier graph or the runtime provides")
            buffers[v["name"]] = entry(v)
    for name, (_, dtype) in buffers.items():
        if dtype not in _DTYPES:
            raise damaged(f"'{name}' has dtype {dtype!r}; the engines exchange {sorted(_DTYPES)}")
    return buffers


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}[name]


def _deserialize(plan: Path, facts: dict):
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(trt_logger).deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        import torch

        raise BundleError(
            f"TensorRT {trt.__version__} cannot load {plan}, built with TensorRT {facts.get('tensorrt', '?')} for "
            f"{facts.get('device', '?')} (compute capability {facts.get('compute_capability', '?')}); this GPU is "
            f"{torch.cuda.get_device_name()}. Engines run only where they were built: recompile the bundle here."
        )
    return engine


def _check_engine_io(engine, graph: dict, cache_shape: tuple, vocab: int, file: Path) -> None:
    """The engine's tensors must be the manifest's I/O contract, with the cache and logits shapes."""
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    promised = {v["name"] for v in graph["inputs"] + graph["outputs"]}
    if names != promised:
        raise BundleError(f"{file} has tensors {sorted(names)} but the manifest promises {sorted(promised)}; "
                          "the bundle is damaged or mixed from two compiles. Recompile it.")
    expected = {name: cache_shape for name in names if name.startswith(CACHE_PREFIXES)}
    if "logits" in names:
        expected["logits"] = (1, vocab)
    for name, shape in expected.items():
        if tuple(engine.get_tensor_shape(name)) != tuple(shape):
            raise BundleError(f"{file}: {name} has shape {tuple(engine.get_tensor_shape(name))} but the manifest "
                              f"implies {tuple(shape)}; the bundle is damaged. Recompile it.")
