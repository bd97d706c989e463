"""The compiler's last stage: save the lowered graphs, build TensorRT engines from them, write
the tokenizer and the manifest, in a staging folder renamed into place when complete.

    model.onnx (+ .data)                       family step
    specee/segment_{k}.onnx, segments.data     family segments (exit mode "segments")
    specee/decode.onnx                         exit mode "graph": the nested decode graph
    specee/draft.onnx, specee/kv_fill.safetensors
    specee/tree.onnx, draft_tree.onnx, tree_segment_{k}.onnx, tree_segments.data
    *.plan                                     TensorRT: one engine per graph it runs
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
from safetensors.numpy import save_file

from specee_compile import __version__
from specee_compile.bundle.files import FORMAT, FORMAT_VERSION
from specee_compile.bundle.protocol import CACHE_UPDATE, PROTOCOL
from specee_compile.bundle.write import finish_manifest, staging
from specee_compile.contract import TREE_MAX_WIDTH, io_contract
from specee_compile.errors import OutputError
from specee_compile.lower import tensorrt as trt_lowering
from specee_compile.lower.segments import Segmented, save_segments
from specee_compile.tokenizer import check_folder, end_of_text_ids

GRAPH_FILE = "model.onnx"
FOLDER = "specee"
DECODE_FILE = "decode.onnx"
TREE_FILE = "tree.onnx"
DRAFT_TREE_FILE = "draft_tree.onnx"
TREE_SEGMENTS = "tree_segment"  # the tree step with per-node exits: tree_segment_{k}.onnx


@dataclass
class Facts:
    """What the manifest records besides the graphs: the compile's settings, the model, the
    passes that ran and the calibration (None for a dense bundle)."""

    config: object  # CompileConfig
    family: str  # the model's architecture family
    shapes: object  # export.StepShapes: layers, heads, sizes, cache capacity
    hf_model: object
    tokenizer: object
    pass_log: list[dict]
    calibration: object | None
    predictor_layers: tuple[int, ...] = ()


def write_bundle(config, facts: Facts, lowered) -> Path:
    """Write the bundle at ``config.out`` (see the module docstring) and return its path."""
    graphs = lowered.graphs
    with staging(config.out, config.force) as tmp:
        step = save_graph(graphs["step"], tmp, GRAPH_FILE)
        spec = _save_specee(facts, lowered, tmp) if "draft" in graphs else None
        engine = None
        if config.backend == "trt":
            profile = trt_lowering.optimization_profile(graphs["step"], facts.shapes.capacity)
            (tmp / trt_lowering.ENGINE_FILE).write_bytes(
                trt_lowering.build_engine(tmp / GRAPH_FILE, profile, config.precision))
            step = {"file": trt_lowering.ENGINE_FILE, "onnx": GRAPH_FILE, **io_contract(graphs["step"])}
            engine = trt_lowering.engine_facts(config.precision, profile)
            if spec is not None:
                spec = _build_specee_engines(spec, tmp, facts.shapes.capacity, config.precision)
        facts.tokenizer.save_pretrained(tmp)
        _check_tokenizer_files(tmp)
        facts.hf_model.generation_config.save_pretrained(tmp)
        manifest = _manifest(config, facts, step)
        if lowered.trt_check is not None:
            manifest["tensorrt_check"] = lowered.trt_check
        if engine is not None:
            manifest["engine"] = engine
        if spec is not None:
            manifest["specee"] = spec
        finish_manifest(tmp, manifest)
    return config.out


def save_graph(model: ir.Model, folder: Path, name: str, prefix: str = "") -> dict:
    """Write ``model`` as ``folder/name`` with its weights in ``name.data``; its manifest entry."""
    ir.save(model, folder / name, external_data=name + ".data")
    return {"file": prefix + name, **io_contract(model)}


def _manifest(config, facts: Facts, step: dict) -> dict:
    hf, shapes = facts.hf_model, facts.shapes
    target = config.graph_target
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": f"specee-compile {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": "tensorrt" if config.backend == "trt" else "onnxruntime",
        "graph_target": target,
        "model": {
            "source": str(config.model),
            "family": facts.family,
            "num_layers": shapes.num_layers,
            "hidden_size": shapes.hidden_size,
            "num_heads": shapes.num_heads,
            "num_kv_heads": shapes.num_kv_heads,
            "head_dim": shapes.head_dim,
            "vocab_size": shapes.vocab_size,
            "eos_token_ids": [t for t in end_of_text_ids(facts.tokenizer, hf.generation_config.eos_token_id,
                                                         hf.config.eos_token_id) if t < shapes.vocab_size],
            "chat_template": bool(getattr(facts.tokenizer, "chat_template", None)),
        },
        "cache": {
            "capacity": shapes.capacity,
            "layout": "[batch, kv_heads, capacity, head_dim]",
            "dtype": "float32",
            "update": CACHE_UPDATE[target],
        },
        "graphs": {"step": step},
        "protocol": PROTOCOL[target],
        "compile": config.to_dict(),
        "passes": facts.pass_log,
    }


def _save_specee(facts: Facts, lowered, bundle_dir: Path) -> dict:
    """Save the SpecEE graphs and return the manifest's ``specee`` section."""
    from specee_compile.export import rms_eps

    config, cal, graphs = facts.config, facts.calibration, lowered.graphs
    folder = bundle_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "calibration": cal.meta.get("artifact", ""),
        "rule": config.exit_rule,
        "threshold": config.threshold or cal.threshold,
        "kv_policy": "propagate",
        "exit_mode": config.exit_mode,
        "predictor_layers": list(facts.predictor_layers),
        "schedule": cal.schedule.to_dict(),
        "cost_model": {k: v for k, v in cal.meta["cost_model"].items() if k != "seconds_per_layer"},
    }
    if "segments" in graphs:
        spec["segments"] = _save_segments(graphs["segments"], folder)
    else:
        spec["decode"] = save_graph(graphs["decode"], folder, DECODE_FILE, f"{FOLDER}/")
    spec["draft"] = {**save_graph(graphs["draft"], folder, "draft.onnx", f"{FOLDER}/"),
                     "vocab_size": int(len(cal.draft.vocab_map)), "kv_heads": cal.draft.kv_heads,
                     "head_dim": cal.draft.head_dim}
    save_file(lowered.kv_fill, folder / "kv_fill.safetensors")
    spec["kv_fill"] = {"file": f"{FOLDER}/kv_fill.safetensors", "eps": rms_eps(facts.hf_model)}
    if "tree" in graphs:
        spec["tree"] = {**save_graph(graphs["tree"], folder, TREE_FILE, f"{FOLDER}/"), "max_width": TREE_MAX_WIDTH,
                        "draft": save_graph(graphs["draft_tree"], folder, DRAFT_TREE_FILE, f"{FOLDER}/")}
        if "tree_segments" in graphs:
            spec["tree"]["segments"] = _save_segments(graphs["tree_segments"], folder, TREE_SEGMENTS)
    return spec


def _save_segments(cut: Segmented, folder: Path, stem: str = "segment") -> list[dict]:
    names = save_segments(cut.segments, folder, stem)
    return [{"file": f"{FOLDER}/{n}", "first_layer": s.first_layer, "last_layer": s.last_layer,
             "exit_layer": s.exit_layer, **io_contract(s.model)} for n, s in zip(names, cut.segments)]


def _build_specee_engines(spec: dict, bundle_dir: Path, capacity: int, precision: str) -> dict:
    """One TensorRT engine per segment and one for the draft, each next to its ONNX file;
    returns the ``specee`` manifest section that names them."""
    jobs = trt_lowering.engine_jobs(spec, capacity)
    for job in jobs:
        plan = trt_lowering.build_engine(bundle_dir / job.onnx, job.profile, precision)
        (bundle_dir / job.engine).write_bytes(plan)
    return trt_lowering.with_engines(spec, jobs)


def _check_tokenizer_files(bundle_dir: Path) -> None:
    """A bundle's tokenizer is tokenizer.json (+ tokenizer_config.json, chat_template.jinja): what
    the runtimes read. Anything else save_pretrained wrote (code, vocab files) is refused or dropped."""
    check_folder(bundle_dir, "the bundle being written", OutputError)
    if not (bundle_dir / "tokenizer.json").is_file():
        raise OutputError("the model's tokenizer could not be saved as tokenizer.json, which a bundle's runtime reads; "
                          "use a model with a fast tokenizer (tokenizer.json).")
    for extra in ("special_tokens_map.json", "added_tokens.json"):  # folded into tokenizer.json and its config
        (bundle_dir / extra).unlink(missing_ok=True)
