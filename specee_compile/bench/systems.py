"""The systems a benchmark times: transformers eager, compiled bundles, ONNX Runtime GenAI.

Every system is a callable ``ids -> Run`` doing batch-1 greedy decoding of the same number
of new tokens, so the benchmark can interleave them prompt by prompt.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from specee_compile.errors import BackendError

logger = logging.getLogger(__name__)

# what each kind of system is, in the report
KINDS = {"transformers": "Hugging Face transformers, eager, greedy generate",
         "dense": "this compiler's dense bundle (ONNX Runtime)",
         "specee": "this compiler's SpecEE bundle (ONNX Runtime)",
         "tree": "lossless tree speculation with a SpecEE bundle's draft (ONNX Runtime)",
         "quantized": "this compiler's dense bundle with quantized weights (--quant; ONNX Runtime)",
         "genai": "ONNX Runtime GenAI, fp32 CPU build of the same model",
         "genai-int4": "ONNX Runtime GenAI, int4 CPU build of the same model (its builder's defaults)",
         "llama-cpp": "llama.cpp (llama-cpp-python) on the model's own GGUF file"}


@dataclass
class Run:
    """One timed generation."""

    token_ids: list[int]
    ttft: float  # seconds to the first token, prefill included
    decode_tps: float  # tokens/s after the first token
    exit_layers: list[int] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)
    decode_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    accepted_lengths: list[int] = field(default_factory=list)  # tree speculation: tokens per target forward


@dataclass
class System:
    name: str
    kind: str  # a key of KINDS
    generate: Callable[[list[int]], Run]
    engine: object | None = None  # the bundle engine, for scoring
    settings: dict = field(default_factory=dict)  # what the report says about it (threshold, rule, ...)


class _FirstTokenClock:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.calls = 0
        self.first_token_at = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


def transformers_system(model, new_tokens: int, eos_ids) -> System:
    eos = sorted(eos_ids)

    @torch.no_grad()
    def generate(ids: list[int]) -> Run:
        clock = _FirstTokenClock()
        start = time.perf_counter()
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos[0], streamer=clock)
        end = time.perf_counter()
        first = clock.first_token_at or end
        return _run(out[0, len(ids):].tolist(), eos_ids, start, first, end)

    return System("transformers", "transformers", generate)


def bundle_system(name: str, kind: str, engine, new_tokens: int, settings: dict | None = None) -> System:
    def generate(ids: list[int]) -> Run:
        g = engine.generate(ids, max_new_tokens=new_tokens)
        return Run(g.token_ids, g.time_to_first_token, g.decode_tokens_per_second, g.exit_layers, g.breakdown,
                   g.decode_seconds, g.step_seconds, g.accepted_lengths)

    return System(name, kind, generate, engine, settings or {})


def genai_system(model_dir: Path, folder: Path, threads: int | None, new_tokens: int, eos_ids,
                 precision: str = "fp32") -> System | None:
    """ONNX Runtime GenAI's CPU build of the model at ``precision`` (its builder's fp32 or int4),
    or None when it is not installed."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        logger.warning("onnxruntime-genai is not installed; leaving it out (pip install 'specee-compile[bench]')")
        return None
    if not (folder / "genai_config.json").is_file():
        proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(model_dir),
                               "-i", str(model_dir), "-o", str(folder), "-p", precision, "-e", "cpu",
                               "-c", str(folder) + ".cache"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BackendError(f"ONNX Runtime GenAI's model builder failed on {model_dir}: "
                               f"{(proc.stderr or proc.stdout).strip()[-600:]}. Run with --no-genai to leave it out.")
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    if threads:
        cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    model = og.Model(str(folder))

    def generate(ids: list[int]) -> Run:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens([ids])
        gen.generate_next_token()
        first = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        end = time.perf_counter()
        return _run(gen.get_sequence(0)[len(ids):].tolist(), eos_ids, start, first, end)

    if precision == "fp32":
        return System("ort-genai", "genai", generate)
    return System(f"ort-genai-{precision}", f"genai-{precision}", generate)


def llama_cpp_system(gguf: Path, threads: int | None, new_tokens: int, eos_ids, context: int) -> System | None:
    """llama.cpp on the GGUF file itself (batch-1 greedy, the same prompt ids), or None when
    llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        logger.warning("llama-cpp-python is not installed; leaving llama.cpp out (pip install "
                       "'specee-compile[llama]', a source build of a few minutes)")
        return None
    threads = threads or os.cpu_count()
    model = llama_cpp.Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                            n_batch=512, verbose=False)

    def generate(ids: list[int]) -> Run:
        model.reset()
        out = []
        start = time.perf_counter()
        first = None
        for token in model.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                    reset=True):
            if first is None:
                first = time.perf_counter()
            out.append(int(token))
            if len(out) == new_tokens or token in eos_ids:
                break
        end = time.perf_counter()
        return _run(out, eos_ids, start, first or end, end)

    return System("llama-cpp", "llama-cpp", generate, settings={"gguf": str(gguf), "llama_cpp": llama_cpp.__version__})


def _run(generated: list[int], eos_ids, start: float, first: float, end: float) -> Run:
    """Like the bundle engines count: every step after the first token is a decode step (a final
    EOS included), and the tokens stop before the first EOS."""
    stop = next((k for k, t in enumerate(generated) if t in eos_ids), len(generated))
    steps = len(generated) - 1
    return Run(generated[:stop], first - start, steps / (end - first) if steps > 0 else float("nan"),
               decode_seconds=end - first)
