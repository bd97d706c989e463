"""ONNX Runtime engine: greedy generation over a bundle's step graph with IOBinding.

The KV cache lives in preallocated OrtValues bound both as ``past_key_values.*`` inputs and
``present.*`` outputs, so GroupQueryAttention writes each new position in place and a
decode step neither reallocates nor copies the cache. Each ``generate`` call takes its own
cache state from a pool, so one engine can serve several threads at once.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from specee_compile.bundle import member
from specee_compile.errors import BundleError, GenerationError
from specee_compile.tokenizer import chat_ids

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS_LIMIT = 1 << 20


@dataclass
class Generation:
    """The result of one ``generate`` call."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    stop_reason: str  # "eos", "max_new_tokens" or "capacity"
    time_to_first_token: float  # seconds, prefill included
    decode_seconds: float  # time of the decode steps (all steps after prefill)
    decode_steps: int = 0
    exit_layers: list[int] = field(default_factory=list)  # per token; L-1 for prefill and full depth
    breakdown: dict[str, float] = field(default_factory=dict)  # decode seconds per engine part (SpecEE)
    accepted_lengths: list[int] = field(default_factory=list)  # tree speculation: tokens per target forward
    step_seconds: list[float] = field(default_factory=list)  # per decode step; step k made token k + 1

    @property
    def decode_tokens_per_second(self) -> float:
        if self.decode_steps <= 0 or self.decode_seconds <= 0:
            return float("nan")
        return self.decode_steps / self.decode_seconds


@dataclass
class Scored:
    """The result of ``score``: what the engine predicts at every position of a given text."""

    predicted: list[int]  # predicted[k]: the engine's token after prompt + continuation[:k]
    exit_layers: list[int]  # the layer each prediction left from
    features: np.ndarray  # [len(continuation), d]: the normed hidden state each prediction came from


SPINNING = ("always", "during_run", "never")
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


class CacheState:
    """One request's KV buffers, bound once to an IOBinding that later steps reuse."""

    def __init__(self, session: ort.InferenceSession, layers: int, shape: tuple, vocab: int, hidden: int):
        self.binding = session.io_binding()
        self.arrays = [np.zeros(shape, np.float32) for _ in range(2 * layers)]  # key_0, value_0, key_1, ...
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]  # views of the arrays
        for i in range(layers):
            for j, kind in enumerate(("key", "value")):
                buf = self.buffers[2 * i + j]
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                self.binding.bind_ortvalue_output(f"present.{i}.{kind}", buf)
        self.logits = np.zeros((1, vocab), np.float32)
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        # decode steps write the [1, 1, d] features into one preallocated buffer
        self.step_features = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, hidden), np.float32))
        self.token = np.zeros((1, 1), np.int64)
        self.past_len = np.zeros((1,), np.int64)
        self.token_value = ort.OrtValue.ortvalue_from_numpy(self.token)
        self.past_len_value = ort.OrtValue.ortvalue_from_numpy(self.past_len)
        self.last_features = self.step_features
        self.breakdown: dict[str, float] = {}  # decode seconds per engine part, for engines that split a step
        self.accepted: list[int] = []  # tokens emitted per target forward, for engines that speculate


class OrtEngine:
    """A loaded ONNX Runtime bundle. Use :func:`specee_compile.runtimes.load` to create one."""

    spinning = "always"  # one session per step: let its threads spin between runs

    def __init__(self, path: Path, manifest: dict, tokenizer, threads: int | None = None,
                 profile_dir: Path | None = None):
        self._read_manifest(path, manifest, tokenizer)
        self.profile_dir = profile_dir
        graph = manifest["graphs"]["step"]
        file = self.file(graph["file"], "graphs.step.file")
        self.session = open_session(file, session_options(threads, self.spinning, profile_dir))
        check_io(self.session, graph, file)
        _check_shapes(self.session, manifest, file)
        self._pool: list[CacheState] = []
        self._lock = threading.Lock()

    def file(self, name, field: str) -> Path:
        """The bundle file a manifest field names; only files the manifest lists (and checked)."""
        return member(self.path, self.manifest, name, field)

    def _read_manifest(self, path: Path, manifest: dict, tokenizer) -> None:
        """The model and cache facts every engine of a bundle needs, from its manifest."""
        self.path = Path(path)
        self.manifest = manifest
        self.tokenizer = tokenizer
        m = manifest["model"]
        self.num_layers = int(m["num_layers"])
        self.vocab_size = int(m["vocab_size"])
        self.hidden_size = int(m["hidden_size"])
        self.eos_token_ids = set(m["eos_token_ids"])
        self.capacity = int(manifest["cache"]["capacity"])
        self._cache_shape = (1, int(m["num_kv_heads"]), self.capacity, int(m["head_dim"]))

    # ---- tokens -----------------------------------------------------------------------
    def encode(self, prompt, chat: bool | None = None) -> list[int]:
        """Prompt text, chat messages or token ids -> token ids (chat template for instruct models)."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise GenerationError(
                    f"token id(s) {bad[:5]} are outside the vocabulary [0, {self.vocab_size})."
                )
            return ids
        has_template = bool(self.manifest["model"].get("chat_template"))
        if isinstance(prompt, str):
            if not prompt.strip():
                raise GenerationError("the prompt is empty; give some text, messages or token ids.")
            if chat is None:
                chat = has_template
            if not chat:
                return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            if not has_template:
                raise GenerationError("this model has no chat template; pass plain text instead of messages.")
            return chat_ids(self.tokenizer, list(prompt), f"the bundle {self.path}")
        raise GenerationError(
            "the prompt must be a non-empty string, a list of chat messages "
            "({'role': ..., 'content': ...}) or a list of token ids."
        )

    # ---- generation -------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[dict] | Sequence[int],
        max_new_tokens: int = 128,
        stream: Callable[[str], None] | None = None,
        chat: bool | None = None,
    ) -> Generation:
        """Greedy generation until EOS, ``max_new_tokens`` or the cache capacity."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if max_new_tokens > MAX_NEW_TOKENS_LIMIT:
            raise GenerationError(f"max_new_tokens={max_new_tokens} is absurd; the limit is {MAX_NEW_TOKENS_LIMIT}.")
        ids = self.encode(prompt, chat)
        if len(ids) >= self.capacity:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens but the bundle's context holds {self.capacity} "
                "(prompt + generated); shorten the prompt or recompile with a larger --max-context."
            )
        state = self._acquire()
        try:
            return self._generate(state, ids, max_new_tokens, stream)
        finally:
            self._release(state)

    def score(self, prompt, continuation: Sequence[int], chat: bool | None = None) -> Scored:
        """Teacher forcing: feed ``continuation`` after the prompt token by token, whatever the
        engine would have emitted, and record what it predicts at every position (and from
        which layer). Agreement with a reference and perplexity are computed from this."""
        ids = self.encode(prompt, chat)
        continuation = self._check_continuation(ids, continuation)
        state = self._acquire()
        try:
            state.breakdown = {}
            predicted = [self._first_token(state, ids)]
            exits = [self.num_layers - 1]
            features = [self._last_feature(state)]
            for n, token in enumerate(continuation[:-1], start=len(ids)):
                nxt, layer = self._next_token(state, token, n)
                predicted.append(nxt)
                exits.append(layer)
                features.append(self._last_feature(state))
        finally:
            self._release(state)
        return Scored(predicted, exits, np.stack(features))

    def _check_continuation(self, ids: list[int], continuation: Sequence[int]) -> list[int]:
        continuation = [int(t) for t in continuation]
        if not continuation:
            raise GenerationError("score needs a non-empty continuation.")
        if len(ids) + len(continuation) > self.capacity:
            raise GenerationError(
                f"prompt ({len(ids)}) + continuation ({len(continuation)}) tokens exceed the bundle's context "
                f"of {self.capacity}; shorten them or recompile with a larger --max-context."
            )
        return continuation

    def _last_feature(self, state: CacheState) -> np.ndarray:
        """[d]: the final-normed hidden state the last prediction came from."""
        return state.last_features.numpy()[0, -1].copy()

    def _generate(self, state: CacheState, ids: list[int], max_new_tokens: int, stream) -> Generation:
        state.breakdown, state.accepted = {}, []
        start = time.perf_counter()
        token = self._first_token(state, ids)
        first_token_at = time.perf_counter()
        exits: list[int] = []
        step_seconds: list[float] = []
        out: list[int] = []
        stop = "max_new_tokens"
        printed = ""
        n = len(ids)
        steps = 0
        while True:
            if token in self.eos_token_ids:
                stop = "eos"
                break
            out.append(token)
            if stream is not None:
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                if not text.endswith("\ufffd"):
                    stream(text[len(printed):])
                    printed = text
            if len(out) >= max_new_tokens:
                break
            if n >= self.capacity:
                stop = "capacity"
                break
            step_start = time.perf_counter()
            token, exit_layer = self._next_token(state, token, n)
            step_seconds.append(time.perf_counter() - step_start)
            exits.append(exit_layer)
            n += 1
            steps += 1
        end = time.perf_counter()
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        if stream is not None and len(text) > len(printed):
            stream(text[len(printed):])  # what was held back as an incomplete character
        return Generation(
            token_ids=out,
            text=text,
            prompt_tokens=len(ids),
            stop_reason=stop,
            time_to_first_token=first_token_at - start,
            decode_seconds=end - first_token_at,
            decode_steps=steps,
            exit_layers=[self.num_layers - 1] + exits[: max(len(out) - 1, 0)],
            breakdown=dict(state.breakdown),
            step_seconds=step_seconds,
            accepted_lengths=list(state.accepted),
        )

    def _first_token(self, state: CacheState, ids: list[int]) -> int:
        return int(self._prefill(state, ids)[0].argmax())

    def _next_token(self, state: CacheState, token: int, past_len: int) -> tuple[int, int]:
        """Feed ``token`` at position ``past_len``; return (next token, layer it left from)."""
        return int(self._decode(state, token, past_len)[0].argmax()), self.num_layers - 1

    def _prefill(self, state: CacheState, ids: list[int]) -> np.ndarray:
        b = state.binding
        b.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        b.bind_cpu_input("past_sequence_length", np.zeros((1,), np.int64))
        b.bind_output("features")  # [1, S, d], allocated by ORT for this shape
        self.session.run_with_iobinding(b)
        state.last_features = b.get_outputs()[-1]  # bound last, so listed last
        return state.logits

    def _decode(self, state: CacheState, token: int, past_len: int) -> np.ndarray:
        state.token[0, 0] = token
        state.past_len[0] = past_len
        b = state.binding
        b.bind_ortvalue_input("input_ids", state.token_value)
        b.bind_ortvalue_input("past_sequence_length", state.past_len_value)
        b.bind_ortvalue_output("features", state.step_features)
        self.session.run_with_iobinding(b)
        state.last_features = state.step_features
        return state.logits

    def end_profiling(self) -> list[Path]:
        """Stop profiling (``load(..., profile_dir=)``) and return the trace files written."""
        return [Path(s.end_profiling()) for s in self._sessions() if s.get_session_options().enable_profiling]

    def _sessions(self) -> list[ort.InferenceSession]:
        return [self.session]

    def _acquire(self) -> CacheState:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return self._new_state()

    def _new_state(self) -> CacheState:
        return CacheState(self.session, self.num_layers, self._cache_shape, self.vocab_size, self.hidden_size)

    def _release(self, state: CacheState) -> None:
        with self._lock:
            self._pool.append(state)


def check_io(session: ort.InferenceSession, graph: dict, file: Path) -> None:
    """The graph's inputs/outputs must be exactly those the manifest promises."""
    actual = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    promised = ([i["name"] for i in graph["inputs"]], [o["name"] for o in graph["outputs"]])
    if actual != promised:
        raise BundleError(
            f"{file} has inputs/outputs {actual} but the manifest promises {promised}; "
            "the bundle is damaged or mixed from two compiles. Recompile it."
        )


def _check_shapes(session: ort.InferenceSession, manifest: dict, file: Path) -> None:
    """The layer count, cache and vocabulary sizes in the manifest must be those of the graph."""
    m = manifest["model"]
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if len(past) != 2 * m["num_layers"]:
        raise BundleError(
            f"{file} has {len(past) // 2} layers of cache inputs but the manifest's 'model.num_layers' "
            f"says {m['num_layers']}; the bundle is damaged. Recompile it."
        )
    cache = [1, m["num_kv_heads"], manifest["cache"]["capacity"], m["head_dim"]]
    checks = [(i, cache, "'model.num_kv_heads', 'cache.capacity', 'model.head_dim'") for i in past]
    logits = [o for o in session.get_outputs() if o.name == "logits"]
    checks += [(o, [1, m["vocab_size"]], "'model.vocab_size'") for o in logits]
    for value, promised, fields in checks:
        shape = value.shape  # symbolic dims are strings and match anything
        if len(shape) != len(promised) or any(isinstance(d, int) and d != p for d, p in zip(shape, promised)):
            raise BundleError(
                f"{file}: {value.name} has shape {shape} but the manifest ({fields}) implies "
                f"{promised}; the bundle is damaged. Recompile it."
            )
