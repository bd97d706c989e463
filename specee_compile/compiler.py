"""compile(): load -> export -> passes -> lower -> bundle, top to bottom."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import onnx_ir as ir
from tqdm.auto import tqdm

from specee_compile import __version__, bundle, load
from specee_compile.bundle import io_contract
from specee_compile.config import CompileConfig
from specee_compile.errors import BackendError, OutputError
from specee_compile.lower import tensorrt as trt_lowering
from specee_compile.passes import default_pipeline
from specee_compile.tokenizer import check_folder, end_of_text_ids

logger = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
PROTOCOL = """\
Greedy decoding with graph `step` and a preallocated KV cache:
1. Allocate, per layer i, two float32 buffers past_key_values.{i}.key / .value of shape
   [1, kv_heads, capacity, head_dim] (zeros are fine).
2. Prefill: run `step` with input_ids = the prompt ids [1, S] and past_sequence_length = [0].
   Bind each present.{i}.key|value output to the SAME buffer as the matching past input:
   ONNX Runtime's GroupQueryAttention then writes the new positions in place.
   (Without binding, copy present.* into the buffers yourself before the next call.)
3. The next token is argmax(logits[0]). Stop at any of eos_token_ids.
4. Decode: run `step` with input_ids = [[token]] and past_sequence_length = [tokens so far
   in the cache], the same buffers bound as before. Repeat from 3.
5. The cache holds `capacity` positions: prompt + generated tokens must not exceed it.
"""
PROTOCOL_SWAP = """\
Greedy decoding with graph `step` and a preallocated KV cache:
1. Allocate, per layer i, TWO pairs of float32 buffers of shape [1, kv_heads, capacity, head_dim]
   (zeros are fine): A and B for the key, A and B for the value.
2. Prefill: run `step` with input_ids = the prompt ids [1, S], past_sequence_length = [0],
   past_key_values.{i}.* = the A buffers and present.{i}.* = the B buffers. The graph writes
   the whole cache, with the new positions scattered in, into present.
3. The next token is argmax(logits[0]). Stop at any of eos_token_ids.
4. Decode: swap A and B (the last present is the next past) and run `step` with
   input_ids = [[token]] and past_sequence_length = [tokens so far in the cache]. Repeat from 3.
   (ONNX Runtime on CPU may instead bind present to the same buffer as past: its
   ScatterElements then writes in place.)
5. The cache holds `capacity` positions: prompt + generated tokens must not exceed it.
"""
CACHE_UPDATE = {
    "ort": "in place when present.* is bound to the past buffer (shared buffer)",
    "trt": "ScatterElements at past_sequence_length into a copy of past (swap two buffers), or in place "
           "on ONNX Runtime when present.* is bound to the past buffer",
}


def disabled_backend_reason(backend: str) -> str | None:
    """Why a backend cannot run on this machine, or None when it can."""
    return trt_lowering.unavailable_reason() if backend == "trt" else None


def compile(config: CompileConfig, progress: bool = True) -> Path:  # noqa: A001 (the verb)
    """Compile ``config.model`` into a bundle at ``config.out`` and return its path.

    A TensorRT bundle fails here, before anything is loaded or written, when this machine
    lacks the tensorrt package or a GPU.
    """
    reason = disabled_backend_reason(config.backend)
    if reason:
        onnx_out = config.out.with_suffix(".onnx")
        raise BackendError(
            f"cannot build a TensorRT engine: {reason}. Compile an ONNX Runtime bundle instead with "
            f"--out {onnx_out}, or TensorRT-ready graphs checked against TensorRT's ONNX parser with "
            f"--out {onnx_out} --check trt (nothing was loaded or written)."
        )
    bundle.check_output(config.out, config.force)
    total = 5 + (config.graph_target == "trt") + (config.backend == "trt")
    with tqdm(total=total, desc="compile", unit="stage", disable=not progress) as stages:
        return _compile_stages(config, stages)


def _compile_stages(config: CompileConfig, stages) -> Path:
    stages.set_postfix_str("resolve model")
    model_dir = load.resolve(config.model)
    info = load.inspect(model_dir)
    capacity = min(config.max_context, info.max_positions)
    stages.update()

    stages.set_postfix_str("load weights")
    hf_model, tokenizer = load.load(model_dir)
    window = getattr(hf_model.config, "sliding_window", None)
    if window and getattr(hf_model.config, "use_sliding_window", True):
        capacity = min(capacity, int(window))
    stages.update()

    stages.set_postfix_str("export (torch.export + ONNX)")
    from specee_compile.export import export_step

    target = config.graph_target
    model, shapes = export_step(hf_model, capacity, target)
    stages.update()

    stages.set_postfix_str("passes")
    pipeline = config.pipeline or default_pipeline(config.opt_level, target)
    model, pass_log = pipeline(model, skip=config.skip_passes, dump_dir=config.dump_ir)
    stages.update()

    spec_graphs = None
    if config.specee:
        from specee_compile.lower import specee as specee_lowering

        stages.set_postfix_str("SpecEE: calibration, passes, segments, draft")
        spec_graphs = specee_lowering.build(
            config.model, hf_model, capacity, calib_file=config.calib_file, rule=config.exit_rule,
            threshold=config.threshold, opt_level=config.opt_level, progress=stages.disable is False,
            calibration=config.calibration, target=target, exit_mode=config.exit_mode, tree=config.tree)

    checked = None
    if target == "trt":
        stages.set_postfix_str("check against TensorRT's ONNX parser")
        graphs = {"step": model}
        if spec_graphs is not None:
            graphs.update({f"segment_{k}": seg.model for k, seg in enumerate(spec_graphs.segments)})
            if spec_graphs.decode is not None:
                graphs["decode"] = spec_graphs.decode
            graphs["draft"] = spec_graphs.draft
            if spec_graphs.tree is not None:
                graphs.update({"tree": spec_graphs.tree, "draft_tree": spec_graphs.draft_tree})
                graphs.update({f"tree_segment_{k}": seg.model for k, seg in enumerate(spec_graphs.tree_segments)})
        version = trt_lowering.check_graphs(graphs)
        checked = {"tensorrt": f"{version[0]}.{version[1]}", "graphs": list(graphs), "problems": 0}
        stages.update()

    stages.set_postfix_str("write bundle")
    with bundle.staging(config.out, config.force) as tmp:
        ir.save(model, tmp / GRAPH_FILE, external_data=GRAPH_FILE + ".data")
        step = {"file": GRAPH_FILE, **io_contract(model)}
        spec = specee_lowering.save(spec_graphs, tmp) if spec_graphs is not None else None
        engine = None
        if config.backend == "trt":
            stages.set_postfix_str("build TensorRT engines")
            profile = trt_lowering.optimization_profile(model, capacity)
            plan = trt_lowering.build_engine(tmp / GRAPH_FILE, profile, config.precision)
            (tmp / trt_lowering.ENGINE_FILE).write_bytes(plan)
            step = {"file": trt_lowering.ENGINE_FILE, "onnx": GRAPH_FILE, **io_contract(model)}
            engine = trt_lowering.engine_facts(config.precision, profile)
            if spec is not None:
                spec = _build_specee_engines(spec, tmp, capacity, config.precision)
            stages.update()
        tokenizer.save_pretrained(tmp)
        _check_tokenizer_files(tmp)
        hf_model.generation_config.save_pretrained(tmp)
        manifest = {
            "format": bundle.FORMAT,
            "format_version": bundle.FORMAT_VERSION,
            "producer": f"specee-compile {__version__}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": "tensorrt" if config.backend == "trt" else "onnxruntime",
            "graph_target": target,
            "model": {
                "source": str(config.model),
                "family": info.family,
                "num_layers": shapes.num_layers,
                "hidden_size": shapes.hidden_size,
                "num_heads": shapes.num_heads,
                "num_kv_heads": shapes.num_kv_heads,
                "head_dim": shapes.head_dim,
                "vocab_size": shapes.vocab_size,
                "eos_token_ids": [t for t in end_of_text_ids(tokenizer, hf_model.generation_config.eos_token_id,
                                                             hf_model.config.eos_token_id) if t < shapes.vocab_size],
                "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            },
            "cache": {
                "capacity": capacity,
                "layout": "[batch, kv_heads, capacity, head_dim]",
                "dtype": "float32",
                "update": CACHE_UPDATE[target],
            },
            "graphs": {"step": step},
            "protocol": PROTOCOL if target == "ort" else PROTOCOL_SWAP,
            "compile": config.to_dict(),
            "passes": pass_log,
        }
        if checked is not None:
            manifest["tensorrt_check"] = checked
        if engine is not None:
            manifest["engine"] = engine
        if spec is not None:
            manifest["specee"] = spec
            manifest["passes"] = pass_log + spec_graphs.pass_log
        bundle.finish_manifest(tmp, manifest)
    stages.update()
    return config.out


def _check_tokenizer_files(bundle_dir: Path) -> None:
    """A bundle's tokenizer is tokenizer.json (+ tokenizer_config.json, chat_template.jinja): what
    the runtimes read. Anything else save_pretrained wrote (code, vocab files) is refused or dropped."""
    check_folder(bundle_dir, "the bundle being written", OutputError)
    if not (bundle_dir / "tokenizer.json").is_file():
        raise OutputError("the model's tokenizer could not be saved as tokenizer.json, which a bundle's runtime reads; "
                          "use a model with a fast tokenizer (tokenizer.json).")
    for extra in ("special_tokens_map.json", "added_tokens.json"):  # folded into tokenizer.json and its config
        (bundle_dir / extra).unlink(missing_ok=True)


def _build_specee_engines(spec: dict, bundle_dir: Path, capacity: int, precision: str) -> dict:
    """One TensorRT engine per segment and one for the draft, each next to its ONNX file;
    returns the ``specee`` manifest section that names them."""
    from specee_compile.lower import specee as specee_lowering

    jobs = specee_lowering.engine_jobs(spec, capacity)
    for job in jobs:
        plan = trt_lowering.build_engine(bundle_dir / job.onnx, job.profile, precision)
        (bundle_dir / job.engine).write_bytes(plan)
    return specee_lowering.with_engines(spec, jobs)

