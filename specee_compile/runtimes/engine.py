"""The generation loop every loaded bundle shares, over one decoder.

    Engine       tokens in and out: prompts, stop rules, streaming, timing per target
                 forward, a pool of per-request states (one engine serves many threads)
    Decoder      the decoding algorithm (runtimes/decoders.py: dense, SpecEE segments or
                 graph; runtimes/tree.py: tree speculation), on
    Backend      how graphs run (runtimes/backends: ONNX Runtime, TensorRT)

A decoder has ``new_request()``, ``prefill(request, ids) -> first token``, ``step(request,
token, n) -> Forward`` (one target forward from ``token`` at position n, emitting one token
or, for tree speculation, several), ``feature(request)`` (the normed hidden state the last
prediction came from), ``score(request, ids, continuation)`` and ``sessions()``; per call
options (``tree=``) go to ``configure(request, **options)``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from specee_compile.bundle import member
from specee_compile.bundle.manifest import Manifest
from specee_compile.errors import GenerationError
from specee_compile.tokenizer import chat_ids

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
    decode_steps: int = 0  # tokens the decode forwards made
    exit_layers: list[int] = field(default_factory=list)  # per token; L-1 for prefill and full depth
    breakdown: dict[str, float] = field(default_factory=dict)  # decode seconds per engine part (SpecEE)
    accepted_lengths: list[int] = field(default_factory=list)  # tree speculation: tokens per target forward
    step_seconds: list[float] = field(default_factory=list)  # per target forward after prefill

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


@dataclass
class Forward:
    """One target forward: the tokens it emits, in order, and the layer they left from."""

    tokens: list[int]
    exit_layer: int


@dataclass(frozen=True)
class BundleFacts:
    """What every layer of a runtime reads from a bundle: its folder, typed manifest
    (:class:`specee_compile.bundle.manifest.Manifest`, checked) and tokenizer."""

    path: Path
    manifest: Manifest
    tokenizer: object

    @property
    def num_layers(self) -> int:
        return self.manifest.model.num_layers

    @property
    def vocab_size(self) -> int:
        return self.manifest.model.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.manifest.model.hidden_size

    @property
    def capacity(self) -> int:
        return self.manifest.cache.capacity

    @property
    def cache_shape(self) -> tuple[int, int, int, int]:
        m = self.manifest.model
        return 1, m.num_kv_heads, self.capacity, m.head_dim

    def file(self, name, field: str) -> Path:
        """The bundle file a manifest field names; only files the manifest lists (and checked)."""
        return member(self.path, {"files": self.manifest.files}, name, field)


class Engine:
    """A loaded bundle. Use :func:`specee_compile.runtimes.load` to create one."""

    def __init__(self, bundle: BundleFacts, decoder):
        self.bundle = bundle
        self.decoder = decoder
        self.path, self.manifest, self.tokenizer = bundle.path, bundle.manifest, bundle.tokenizer
        self.num_layers, self.vocab_size, self.capacity = bundle.num_layers, bundle.vocab_size, bundle.capacity
        self.hidden_size = bundle.hidden_size
        self.eos_token_ids = set(self.manifest.model.eos_token_ids)
        self._pool: list = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        """The decoder's settings (``threshold``, ``shape``, ``active_layers``, ...)."""
        if name.startswith("_") or name in ("decoder", "bundle"):
            raise AttributeError(name)
        return getattr(self.decoder, name)

    def __setattr__(self, name: str, value) -> None:
        if name in ("threshold", "shape"):  # settable on the decoder, checked there
            setattr(self.decoder, name, value)
        else:
            object.__setattr__(self, name, value)

    def file(self, name, field: str) -> Path:
        return self.bundle.file(name, field)

    # ---- tokens -----------------------------------------------------------------------
    def encode(self, prompt, chat: bool | None = None) -> list[int]:
        """Prompt text, chat messages or token ids -> token ids (chat template for instruct models)."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise GenerationError(f"token id(s) {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
            return ids
        has_template = self.manifest.model.chat_template
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
    def generate(self, prompt: str | Sequence[dict] | Sequence[int], max_new_tokens: int = 128,
                 stream: Callable[[str], None] | None = None, chat: bool | None = None, **options) -> Generation:
        """Greedy generation until EOS, ``max_new_tokens`` or the cache capacity. ``options``
        are the decoder's per-call settings (tree speculation: ``tree=SHAPE``)."""
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
        request = self._acquire()
        try:
            self.decoder.configure(request, **options)
            return self._generate(request, ids, max_new_tokens, stream)
        finally:
            self._release(request)

    def score(self, prompt, continuation: Sequence[int], chat: bool | None = None, **options) -> Scored:
        """Teacher forcing: feed ``continuation`` after the prompt, whatever the engine would
        have emitted, and record what it predicts at every position (and from which layer).
        Agreement with a reference and perplexity are computed from this."""
        ids = self.encode(prompt, chat)
        continuation = [int(t) for t in continuation]
        if not continuation:
            raise GenerationError("score needs a non-empty continuation.")
        if len(ids) + len(continuation) > self.capacity:
            raise GenerationError(
                f"prompt ({len(ids)}) + continuation ({len(continuation)}) tokens exceed the bundle's context "
                f"of {self.capacity}; shorten them or recompile with a larger --max-context."
            )
        request = self._acquire()
        try:
            self.decoder.configure(request, **options)
            predicted, exits, features = self.decoder.score(request, ids, continuation)
        finally:
            self._release(request)
        return Scored(predicted, exits, np.stack(features))

    def _generate(self, request, ids: list[int], max_new_tokens: int, stream) -> Generation:
        start = time.perf_counter()
        token = self.decoder.prefill(request, ids)
        first_token_at = time.perf_counter()
        out: list[int] = []
        exits: list[int] = []
        step_seconds: list[float] = []
        accepted: list[int] = []
        queue: list[int] = []  # tokens the last forward emitted that the loop has not taken yet
        layer = self.num_layers - 1
        stop, printed, n = "max_new_tokens", "", len(ids)
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
            if not queue:  # one target forward from ``token`` at position n
                step_start = time.perf_counter()
                forward = self.decoder.step(request, token, n)
                step_seconds.append(time.perf_counter() - step_start)
                queue, layer = list(forward.tokens), forward.exit_layer
                if self.decoder.speculative:
                    accepted.append(len(queue))
            token = queue.pop(0)  # a later token of a forward is already in the cache at n
            exits.append(layer)
            n += 1
        end = time.perf_counter()
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        if stream is not None and len(text) > len(printed):
            stream(text[len(printed):])  # what was held back as an incomplete character
        return Generation(
            token_ids=out, text=text, prompt_tokens=len(ids), stop_reason=stop,
            time_to_first_token=first_token_at - start, decode_seconds=end - first_token_at,
            decode_steps=len(exits), exit_layers=[self.num_layers - 1] + exits[: max(len(out) - 1, 0)],
            breakdown=dict(request.breakdown), step_seconds=step_seconds, accepted_lengths=accepted,
        )

    def end_profiling(self) -> list[Path]:
        """Stop profiling (``load(..., profile_dir=)``) and return the trace files written."""
        return [Path(s.end_profiling()) for s in self.decoder.sessions() if s.get_session_options().enable_profiling]

    def _acquire(self):
        with self._lock:
            if self._pool:
                request = self._pool.pop()
                request.breakdown = {}
                return request
        return self.decoder.new_request()

    def _release(self, request) -> None:
        with self._lock:
            self._pool.append(request)


def teacher_force(decoder, request, ids: list[int], continuation: list[int]):
    """Score by one decode step per continuation token: predictions, exit layers, features."""
    predicted = [decoder.prefill(request, ids)]
    exits = [decoder.num_layers - 1]
    features = [decoder.feature(request)]
    for n, token in enumerate(continuation[:-1], start=len(ids)):
        forward = decoder.step(request, token, n)
        predicted.append(forward.tokens[0])
        exits.append(forward.exit_layer)
        features.append(decoder.feature(request))
    return predicted, exits, features
