"""TensorRT engines: greedy generation over a bundle's serialized engines with device buffers.

The step engine (built from the standard-ONNX graph, see ``lower/tensorrt.py``) writes the
whole cache with the new positions scattered in into its ``present.*`` outputs. TensorRT
does not alias an input and an output, so every request owns two sets of CUDA buffers per
cache and swaps them after each step: the last step's present is the next step's past.
All tensors live on the GPU (torch CUDA tensors); a step copies the token id in and the
argmax out. The decoders (runtimes/decoders.py) are the ONNX Runtime backend's: only how
a graph runs differs.

A SpecEE bundle (``TrtSpecEE``) adds one engine per segment and one for the draft.
Its decode step is ``SegmentedDecoder``'s, as with ONNX Runtime: the draft, then
segment after segment (each swapping only its own layers' two buffer sets), reading the
exit flag of a segment whose predictor is active (a one-byte device-to-host copy) and
stopping at the first set one; the K/V of the skipped layers are then computed on the GPU
from ``kv_fill`` and written into the buffers the next step reads. The values the graphs
pass each other (draft ids, hidden states at the cuts, exit flags, ...) live in fixed
buffers bound once per request.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from specee_compile.contract import (ACTIVE_LAYERS, DRAFT_IDS, EXIT_THRESHOLD, FEATURES, INPUT_IDS, KINDS, LOGITS,
                                     NORMED_FEATURES, PAST_LENGTH, past, present)
from specee_compile.errors import BackendError, BundleError, GenerationError
from specee_compile.lower.tensorrt import unavailable_reason
from specee_compile.runtimes.backends.exchange import CACHE_PREFIXES, exchange_buffers
from specee_compile.runtimes.propagation import propagated_kv, rope_rows

logger = logging.getLogger(__name__)


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
            before, after = self.sets[i][self.current[i]], self.sets[i][1 - self.current[i]]
            for j, kind in enumerate(KINDS):
                context.set_tensor_address(past(i, kind), before[j].data_ptr())
                context.set_tensor_address(present(i, kind), after[j].data_ptr())

    def swap(self, layers) -> None:
        for i in layers:
            self.current[i] = 1 - self.current[i]

    def cache(self, i: int, j: int):
        """Layer i's key (j = 0) or value (j = 1) buffer, the one the next graph reads."""
        return self.sets[i][self.current[i]][j]


class TrtBuffers:
    """One request's execution context, its two cache buffer sets and its fixed I/O buffers."""

    def __init__(self, step: "TrtStep"):
        import torch

        device, bundle = step.device, step.bundle
        self.context = step.engine.create_execution_context()
        self.caches = _SwapCaches(bundle.num_layers, bundle.cache_shape, device)
        self.logits = torch.zeros((1, bundle.vocab_size), dtype=torch.float32, device=device)
        self.step_features = torch.zeros((1, 1, bundle.hidden_size), dtype=torch.float32, device=device)
        self.token = torch.zeros((1, 1), dtype=torch.int64, device=device)
        self.past_len = torch.zeros((1,), dtype=torch.int64, device=device)
        self.last_features = self.last_normed = self.step_features
        self.step_normed = torch.zeros_like(self.step_features)
        self.context.set_tensor_address(LOGITS, self.logits.data_ptr())


class TrtStep:
    """The step engine of a TensorRT bundle: prefill and dense decode steps."""

    device = "cuda"  # where every buffer lives (torch device); the engines run only on CUDA

    def __init__(self, bundle):
        self.bundle = bundle
        graph = bundle.manifest.step.to_json()  # engines are checked against the manifest's JSON form
        reason = unavailable_reason()
        if reason:
            specee = " --specee" if bundle.manifest.specee is not None else ""
            raise BackendError(
                f"{bundle.path} is a TensorRT bundle, which runs only with TensorRT 10 and an NVIDIA GPU: {reason}. "
                f"Its graph {graph.get('onnx', 'model.onnx')} runs on ONNX Runtime: compile the model with "
                f"--out NAME.onnx{specee} --check trt for the same graphs in an ONNX Runtime bundle."
            )
        self.engine = self.open(graph, bundle.cache_shape)
        # a fusion draft's step graph: features is the draft's input, the normed states a second output
        self.normed = NORMED_FEATURES in {o["name"] for o in graph["outputs"]}

    def open(self, graph: dict, cache_shape: tuple):
        """Deserialize ``graph['file']`` and check its tensors against the manifest's I/O."""
        file = self.bundle.file(graph["file"], "the engine file of a graph")
        engine = _deserialize(file, self.bundle.manifest.engine or {})
        _check_engine_io(engine, graph, cache_shape, self.bundle.vocab_size, file)
        return engine

    def sessions(self) -> list:
        return []  # no ONNX Runtime sessions to profile

    def new_buffers(self) -> TrtBuffers:
        return TrtBuffers(self)

    def prefill(self, buf: TrtBuffers, ids: list[int]) -> int:
        """Run the step engine over the prompt at position 0; the features [1, S, d] stay in ``buf``."""
        import torch

        tokens = torch.tensor([ids], dtype=torch.int64, device=self.device)
        buf.past_len.zero_()
        features = torch.empty((1, len(ids), self.bundle.hidden_size), dtype=torch.float32, device=self.device)
        self._step(buf, tokens, features, torch.empty_like(features))
        return int(buf.logits[0].argmax())

    def prompt_features(self, buf: TrtBuffers):
        return buf.last_features

    def decode(self, buf: TrtBuffers, token: int, past_len: int) -> int:
        buf.token.fill_(token)
        buf.past_len.fill_(past_len)
        self._step(buf, buf.token, buf.step_features, buf.step_normed)
        return int(buf.logits[0].argmax())

    def feature(self, buf: TrtBuffers) -> np.ndarray:
        return buf.last_normed[0, -1].float().cpu().numpy()

    def _step(self, buf: TrtBuffers, tokens, features, normed) -> None:
        """Run the engine once: past = the current cache set, present = the other; then swap."""
        ctx = buf.context
        ctx.set_input_shape(INPUT_IDS, tuple(tokens.shape))
        ctx.set_tensor_address(INPUT_IDS, tokens.data_ptr())
        ctx.set_tensor_address(PAST_LENGTH, buf.past_len.data_ptr())
        ctx.set_tensor_address(FEATURES, features.data_ptr())
        if self.normed:
            ctx.set_tensor_address(NORMED_FEATURES, normed.data_ptr())
        layers = range(self.bundle.num_layers)
        buf.caches.bind(ctx, layers)
        self.execute(ctx, "a step")
        buf.caches.swap(layers)
        buf.last_features = features
        buf.last_normed = normed if self.normed else features

    def execute(self, context, what: str) -> None:
        """Enqueue a run on torch's current stream, which orders it with the torch copies around it."""
        import torch

        stream = torch.cuda.current_stream().cuda_stream if self.device == "cuda" else 0
        if not context.execute_async_v3(stream):
            raise GenerationError(f"TensorRT failed to run {what} of {self.bundle.path} (its log above says why).")


class TrtSpecEE(TrtStep):
    """The SpecEE engines besides the step engine: one per segment and one for the draft,
    with the values they pass each other in buffers bound once per request."""

    def __init__(self, bundle, spec, decode_graphs: bool = True):
        import torch
        from safetensors.numpy import load_file

        super().__init__(bundle)  # the hardware check, then the step engine
        self.spec = spec  # decoders.SpecEEFacts
        manifest = bundle.manifest.specee
        # tree speculation (decode_graphs=False) decodes with the tree engines, not the segments
        self.segment_graphs = [g.to_json() for g in manifest.segments] if decode_graphs else []
        draft_graph = manifest.draft.to_json()
        self.buffers = exchange_buffers(self.segment_graphs, draft_graph, bundle.path)
        self.segment_engines = [self.open(g, bundle.cache_shape) for g in self.segment_graphs]
        self.draft_engine = self.open(draft_graph, spec.draft_cache_shape)
        kv_path = bundle.file(manifest.kv_fill_file, "specee.kv_fill.file")
        try:
            kv = load_file(kv_path)
        except Exception as e:  # safetensors raises its own error types
            raise BundleError(f"{kv_path} cannot be read ({e}); recompile the bundle.") from e
        self.kv = {name: torch.from_numpy(a).to(self.device) for name, a in kv.items()}

    def new_buffers(self) -> TrtBuffers:
        """Adds the draft's context and caches, one context per segment, and one buffer per value
        the graphs pass each other, bound once: only the cache buffers are bound per run."""
        import torch

        buf = super().new_buffers()
        device = self.device
        buf.values = {name: torch.zeros(shape, dtype=_torch_dtype(dtype), device=device)
                      for name, (shape, dtype) in self.buffers.items()}
        buf.draft_context = self.draft_engine.create_execution_context()
        buf.draft_context.set_tensor_address(DRAFT_IDS, buf.values[DRAFT_IDS].data_ptr())
        buf.draft_caches = _SwapCaches(1, self.spec.draft_cache_shape, device)
        buf.draft_pos = torch.zeros((1,), dtype=torch.int64, device=device)
        buf.segment_contexts, buf.segment_outputs = [], []
        for seg, graph in zip(self.segment_engines, self.segment_graphs):
            ctx = seg.create_execution_context()
            for v in graph["inputs"]:
                if v["name"].startswith(CACHE_PREFIXES):
                    continue
                buffer = buf.values[v["name"]]
                if not all(isinstance(d, int) for d in v["shape"]):
                    ctx.set_input_shape(v["name"], tuple(buffer.shape))
                ctx.set_tensor_address(v["name"], buffer.data_ptr())
            outputs = {v["name"]: buf.values[v["name"]] for v in graph["outputs"]
                       if not v["name"].startswith(CACHE_PREFIXES)}
            for name, buffer in outputs.items():
                ctx.set_tensor_address(name, buffer.data_ptr())
            buf.segment_contexts.append(ctx)
            buf.segment_outputs.append(outputs)
        return buf

    def array(self, value):
        return value  # a torch tensor on the device: reading one element is the device-to-host copy

    def draft_step(self, buf: TrtBuffers, ids: list[int], features, past_len: int):
        import torch

        ctx = buf.draft_context
        tokens = torch.tensor([ids], dtype=torch.int64, device=self.device)
        features = torch.as_tensor(features, dtype=torch.float32, device=self.device).contiguous()
        ctx.set_input_shape(INPUT_IDS, tuple(tokens.shape))
        ctx.set_input_shape(FEATURES, tuple(features.shape))
        ctx.set_tensor_address(INPUT_IDS, tokens.data_ptr())
        ctx.set_tensor_address(FEATURES, features.data_ptr())
        buf.draft_pos.fill_(past_len)
        ctx.set_tensor_address(PAST_LENGTH, buf.draft_pos.data_ptr())
        buf.draft_caches.bind(ctx, [0])
        self.execute(ctx, "the draft")
        buf.draft_caches.swap([0])
        return buf.values[DRAFT_IDS]

    def step_values(self, buf: TrtBuffers, token: int, n: int, draft_ids, active: np.ndarray, threshold) -> dict:
        import torch

        values = buf.values  # draft_ids is already in its buffer
        fills = {INPUT_IDS: token, PAST_LENGTH: n, EXIT_THRESHOLD: float(threshold[0])}
        for name, value in fills.items():
            if name in values:
                values[name].fill_(value)
        if ACTIVE_LAYERS in values:
            values[ACTIVE_LAYERS].copy_(torch.from_numpy(active))
        return values

    def run_segment(self, buf: TrtBuffers, k: int, values: dict) -> dict:
        ctx, layers = buf.segment_contexts[k], self.spec.segment_layers[k]
        buf.caches.bind(ctx, layers)
        self.execute(ctx, f"segment {k}")
        buf.caches.swap(layers)
        return buf.segment_outputs[k]

    def propagate(self, buf: TrtBuffers, h, exit_layer: int, n: int) -> None:
        """K/V of the skipped layers at position n from the exit hidden state h [d], on the device."""
        import torch

        for j in range(exit_layer + 1, self.bundle.num_layers):
            k, v = propagated_kv(torch, self.kv, j, h, *rope_rows(self.kv, j, n), self.spec.kv_eps,
                                 self.spec.kv_heads)
            buf.caches.cache(j, 0)[0, :, n, :] = k
            buf.caches.cache(j, 1)[0, :, n, :] = v


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
