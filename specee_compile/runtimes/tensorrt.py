"""TensorRT engine: greedy generation over a bundle's serialized engine with device buffers.

The step engine (built from the standard-ONNX graph, see ``lower/tensorrt.py``) writes the
whole cache with the new positions scattered in into its ``present.*`` outputs. TensorRT
does not alias an input and an output, so every request owns two sets of CUDA buffers per
cache and swaps them after each step: the last step's present is the next step's past.
All tensors live on the GPU (torch CUDA tensors); a step copies the token id in and the
argmax out. Tokenization, the decode loop, stopping and streaming are OrtEngine's: only
how one step runs differs.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from specee_compile.errors import BackendError, BundleError, GenerationError
from specee_compile.lower.tensorrt import unavailable_reason
from specee_compile.runtimes.ort import OrtEngine

logger = logging.getLogger(__name__)


class _TrtState:
    """One request's execution context, its two cache buffer sets and its fixed I/O buffers."""

    def __init__(self, engine: "TrtEngine"):
        import torch

        cuda = torch.device("cuda")
        self.context = engine.engine.create_execution_context()
        n = 2 * engine.num_layers
        self.caches = [[torch.zeros(engine._cache_shape, dtype=torch.float32, device=cuda) for _ in range(n)]
                       for _ in range(2)]  # [set][2 * layer + (0 key | 1 value)]
        self.current = 0  # caches[current] holds the cache; a step writes caches[1 - current]
        self.logits = torch.zeros((1, engine.vocab_size), dtype=torch.float32, device=cuda)
        self.step_features = torch.zeros((1, 1, engine.hidden_size), dtype=torch.float32, device=cuda)
        self.token = torch.zeros((1, 1), dtype=torch.int64, device=cuda)
        self.past_len = torch.zeros((1,), dtype=torch.int64, device=cuda)
        self.last_features = self.step_features
        self.breakdown: dict[str, float] = {}
        self.context.set_tensor_address("logits", self.logits.data_ptr())


class TrtEngine(OrtEngine):
    """A loaded TensorRT bundle. Use :func:`specee_compile.runtimes.load` to create one."""

    def __init__(self, path: Path, manifest: dict, tokenizer, threads: int | None = None,
                 profile_dir: Path | None = None):
        # OrtEngine.__init__ opens an ONNX Runtime session; this engine shares only its
        # tokenization and decode loop, so it sets the same attributes itself.
        self.path = Path(path)
        self.profile_dir = None
        self.manifest = manifest
        self.tokenizer = tokenizer
        m = manifest["model"]
        self.num_layers = int(m["num_layers"])
        self.vocab_size = int(m["vocab_size"])
        self.hidden_size = int(m["hidden_size"])
        self.eos_token_ids = set(m["eos_token_ids"])
        self.capacity = int(manifest["cache"]["capacity"])
        self._cache_shape = (1, int(m["num_kv_heads"]), self.capacity, int(m["head_dim"]))
        graph = manifest["graphs"]["step"]
        reason = unavailable_reason()
        if reason:
            raise BackendError(
                f"{self.path} is a TensorRT bundle, which runs only with TensorRT 10 and an NVIDIA GPU: {reason}. "
                f"Its graph {graph.get('onnx', 'model.onnx')} runs on ONNX Runtime: compile the model with "
                "--out NAME.onnx --check trt for the same graph in an ONNX Runtime bundle."
            )
        self.engine = _deserialize(self.path / graph["file"], manifest.get("engine", {}))
        _check_engine_io(self.engine, graph, self._cache_shape, self.vocab_size, self.path / graph["file"])
        self._pool: list[_TrtState] = []
        self._lock = threading.Lock()

    def _new_state(self) -> _TrtState:
        return _TrtState(self)

    def _sessions(self) -> list:
        return []  # no ONNX Runtime sessions to profile

    def _last_feature(self, state: _TrtState) -> np.ndarray:
        return state.last_features[0, -1].float().cpu().numpy()

    def _first_token(self, state: _TrtState, ids: list[int]) -> int:
        import torch

        tokens = torch.tensor([ids], dtype=torch.int64, device="cuda")
        state.past_len.zero_()
        features = torch.empty((1, len(ids), self.hidden_size), dtype=torch.float32, device="cuda")
        self._step(state, tokens, features)
        return int(state.logits[0].argmax())

    def _next_token(self, state: _TrtState, token: int, past_len: int) -> tuple[int, int]:
        state.token.fill_(token)
        state.past_len.fill_(past_len)
        self._step(state, state.token, state.step_features)
        return int(state.logits[0].argmax()), self.num_layers - 1

    def _step(self, state: _TrtState, tokens, features) -> None:
        """Run the engine once: past = the current cache set, present = the other; then swap."""
        import torch

        ctx = state.context
        ctx.set_input_shape("input_ids", tuple(tokens.shape))
        ctx.set_tensor_address("input_ids", tokens.data_ptr())
        ctx.set_tensor_address("past_sequence_length", state.past_len.data_ptr())
        ctx.set_tensor_address("features", features.data_ptr())
        past, present = state.caches[state.current], state.caches[1 - state.current]
        for i in range(self.num_layers):
            for j, kind in enumerate(("key", "value")):
                ctx.set_tensor_address(f"past_key_values.{i}.{kind}", past[2 * i + j].data_ptr())
                ctx.set_tensor_address(f"present.{i}.{kind}", present[2 * i + j].data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise GenerationError(f"TensorRT failed to run a step of {self.path} (its log above says why).")
        state.current = 1 - state.current
        state.last_features = features


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
    expected = {name: cache_shape for name in names if name.startswith(("past_key_values.", "present."))}
    expected["logits"] = (1, vocab)
    for name, shape in expected.items():
        if tuple(engine.get_tensor_shape(name)) != tuple(shape):
            raise BundleError(f"{file}: {name} has shape {tuple(engine.get_tensor_shape(name))} but the manifest "
                              f"implies {tuple(shape)}; the bundle is damaged. Recompile it.")
