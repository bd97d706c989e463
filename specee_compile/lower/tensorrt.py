"""TensorRT lowering: a checked standard-ONNX graph -> a serialized engine (``.plan`` bytes).

    static check (trt_check) -> OnnxParser (every error with its node) -> builder config
    (precision flag, one optimization profile) -> build_serialized_network

The graph must be the TensorRT-ready export (``target="trt"``: standard ONNX attention,
no ONNX Runtime fusions). Only ``build_engine`` needs the ``tensorrt`` package and a GPU;
the profile, the precision flags and the parser-error report are plain Python, so the
steps up to the hardware call are exercised without one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401

from specee_compile.contract import io_contract
from specee_compile.errors import BackendError
from specee_compile.lower.trt_check import TensorRTCompatibilityError, Version, find_problems, oldest_target

logger = logging.getLogger(__name__)

PRECISION_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}  # BuilderFlag names
ENGINE_FILE = "model.plan"


def unavailable_reason() -> str | None:
    """Why TensorRT engines cannot be built or run here (what is missing), or None."""
    try:
        import tensorrt
    except ImportError:
        return "the TensorRT Python package is not installed (pip install 'specee-compile[gpu]')"
    except OSError as e:  # the package is there but its CUDA libraries are not
        return f"the TensorRT Python package cannot load its libraries ({e})"
    version = installed_version(tensorrt)
    if version is None or version[0] != 10:
        return f"TensorRT {getattr(tensorrt, '__version__', '?')} is installed; specee-compile needs TensorRT 10.x"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no NVIDIA GPU is visible to CUDA (torch.cuda.is_available() is False; a CUDA build of torch is needed)"
    return None


def installed_version(module=None) -> Version | None:
    """(major, minor) of the importable tensorrt package, or None."""
    if module is None:
        try:
            import tensorrt as module
        except ImportError:
            return None
    try:
        major, minor = str(module.__version__).split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


def optimization_profile(model: ir.Model, capacity: int) -> dict[str, list[list[int]]]:
    """min / opt / max shape of every input of ``model`` with symbolic dimensions.

    Every symbolic dimension is a sequence length: 1 to ``capacity``, tuned for 1 (the
    decode step, the hot path; prefill runs the same engine at its prompt length).
    """
    return io_profile(io_contract(model)["inputs"], capacity)


def io_profile(inputs: list[dict], longest: int, opt: int = 1) -> dict[str, list[list[int]]]:
    """The same from a manifest's I/O entries (``{name, dtype, shape}``, symbolic dims as
    strings): each symbolic dimension 1 to ``longest``, tuned for ``opt`` (default 1).
    ``longest=1`` fixes them all at 1, for a graph that only runs decode steps (a SpecEE
    segment). Every symbolic dimension takes the same value at each point, which keeps the
    shapes consistent (a tree graph's attention bias spans past + rows: at past 0, its rows)."""
    opt = min(opt, longest)
    profile = {}
    for v in inputs:
        dims = list(v["shape"])
        if all(isinstance(d, int) for d in dims):
            continue
        pick = lambda n: [d if isinstance(d, int) else n for d in dims]  # noqa: E731
        profile[v["name"]] = [pick(1), pick(opt), pick(longest)]
    return profile


def format_parser_errors(errors, path: Path) -> str:
    """One line per TensorRT parser error, with the node it names (index, name, operator)."""
    lines = []
    for e in errors:
        node = _call(e, "node", -1)
        name, op = _call(e, "node_name", ""), _call(e, "node_operator", "")
        where = f"node {node} '{name}' ({op})" if node is not None and node >= 0 else "the graph"
        lines.append(f"  - {where}: {_call(e, 'desc', '?')} [{_call(e, 'code', '?')}]")
    return (f"TensorRT's ONNX parser rejected {path} with {len(lines)} error(s):\n" + "\n".join(lines) +
            "\nThe static check (--check trt) passed, so this is a gap in specee-compile's TensorRT table: "
            "report it with your TensorRT version; meanwhile compile an ONNX Runtime bundle (--out NAME.onnx).")


def _call(obj, method: str, default):
    try:
        return getattr(obj, method)()
    except Exception:  # older releases lack node_name / node_operator
        return default


def check_graphs(graphs: dict[str, ir.Model], target: Version | None = None) -> Version:
    """The static TensorRT check of every graph (step, segments, draft) before any build.

    Problems of all graphs are reported together in one TensorRTCompatibilityError. The
    target is the installed TensorRT release, else the oldest 10.x whose documented opsets
    hold the graphs' (10.0 for the exported graphs: what every 10.x parses).
    """
    installed = installed_version()
    target = target or (installed if installed and installed[0] == 10 else oldest_target(graphs.values()))
    problems = []
    for name, model in graphs.items():
        ir.passes.common.ShapeInferencePass(strict_mode=False)(model)  # types and ranks for the check
        problems += find_problems(model, target, name)
    if problems:
        bad = sorted({p.graph.split("/")[0] for p in problems}, key=list(graphs).index)
        raise TensorRTCompatibilityError(", ".join(bad), problems, target)
    return target


def build_engine(onnx_path: Path, profile: dict[str, list[list[int]]], precision: str) -> bytes:
    """Parse ``onnx_path`` (external data beside it) with TensorRT and build a serialized engine."""
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch: the only mode of TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise BackendError(format_parser_errors([parser.get_error(i) for i in range(parser.num_errors)], onnx_path))
    config = builder.create_builder_config()
    for flag in PRECISION_FLAGS[precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if PRECISION_FLAGS[precision]:
        pinned = _pin_float32(network, trt)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        logger.info("%d Pow/Reduce/Softmax layers kept in float32 in the %s engine", pinned, precision)
    shapes = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        shapes.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(shapes)
    logger.info("building the TensorRT engine of %s (%s)", onnx_path.name, precision)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(
            f"TensorRT could not build an engine from {onnx_path} at {precision} (the builder's log above says "
            "why); try --precision fp32, a smaller --max-context, or an ONNX Runtime bundle (--out NAME.onnx)."
        )
    return bytes(plan)


def _pin_float32(network, trt) -> int:
    """Keep the RMSNorm statistics (x ** 2, its mean) and the softmax in float32.

    In a half-precision engine x ** 2 overflows fp16 once |x| > 256, which LLM hidden states
    reach; TensorRT may still pick half precision elsewhere. Returns the layers pinned.
    """
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.num_outputs == 0 or layer.get_output(0).dtype != trt.float32:
            continue  # integer and boolean layers keep their types
        if layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer  # the Python API's downcast, to read .op
            if layer.op != trt.ElementWiseOperation.POW:
                continue
        elif layer.type not in (trt.LayerType.REDUCE, trt.LayerType.SOFTMAX):
            continue
        layer.precision = trt.float32
        layer.set_output_type(0, trt.float32)
        pinned += 1
    return pinned


def engine_facts(precision: str, profile: dict) -> dict:
    """What the manifest records about an engine: it only runs where it was built."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": trt.__version__, "precision": precision, "device": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}", "profile": profile}


# ---- the engines of a SpecEE bundle ----------------------------------------------------------
@dataclass(frozen=True)
class EngineJob:
    """One TensorRT engine of a SpecEE bundle (paths relative to the bundle)."""

    name: str  # "segment_{k}" or "draft", as the TensorRT check names the graph
    onnx: str  # the graph it is built from
    engine: str  # where its serialized engine goes: the graph's file with the suffix .plan
    profile: dict[str, list[list[int]]]  # min / opt / max shape of every input with symbolic dimensions


TREE_OPT_ROWS = 8  # what the tree engines are tuned for: a tree of about the size the default shapes verify


def engine_jobs(spec: dict, capacity: int) -> list[EngineJob]:
    """The engines of a TensorRT SpecEE bundle, from the ``specee`` section ``save`` returned.

    One per segment, in run order, with every symbolic dimension fixed at 1: segments run
    decode steps only (prefill uses the step engine), so the token and the hidden states
    crossing a cut are [1, 1] and [1, 1, d]. One for the draft, which also runs over the
    prompt at prefill: its sequence dimension spans 1 to ``capacity``, tuned for 1. With tree
    speculation, one for the tree verification graph and one for the tree draft: their rows
    (the tree's nodes, or the tokens the draft catches up on) and the attention bias's
    columns (past + rows) span 1 to ``capacity``, tuned for ``TREE_OPT_ROWS``.
    """
    if "segments" not in spec:
        raise BackendError(f"TensorRT SpecEE engines are built per segment; exit mode '{spec.get('exit_mode')}' "
                           "has none. Compile with --exit-mode segments.")
    jobs = [EngineJob(f"segment_{k}", g["file"], _engine_file(g["file"]), io_profile(g["inputs"], 1))
            for k, g in enumerate(spec["segments"])]
    draft = spec["draft"]
    jobs.append(EngineJob("draft", draft["file"], _engine_file(draft["file"]), io_profile(draft["inputs"], capacity)))
    tree = spec.get("tree")
    if tree is not None:
        if tree.get("segments"):
            raise BackendError("TensorRT bundles take the lossless tree graphs only; the tree segments (early exit "
                               "inside verification) run on ONNX Runtime bundles. Recompile without them.")
        for name, g in (("tree", tree), ("draft_tree", tree["draft"])):
            jobs.append(EngineJob(name, g["file"], _engine_file(g["file"]),
                                  io_profile(g["inputs"], capacity, TREE_OPT_ROWS)))
    return jobs


def with_engines(spec: dict, jobs: list[EngineJob]) -> dict:
    """The ``specee`` section of a TensorRT bundle: each segment's, the draft's and the tree
    graphs' ``file`` is its engine, ``onnx`` the graph it was built from and ``profile`` the
    shapes it takes."""
    spec = copy.deepcopy(spec)
    graphs = {f"segment_{k}": g for k, g in enumerate(spec["segments"])}
    graphs["draft"] = spec["draft"]
    if spec.get("tree") is not None:
        graphs.update(tree=spec["tree"], draft_tree=spec["tree"]["draft"])
    for job in jobs:
        graphs[job.name].update(file=job.engine, onnx=job.onnx, profile=job.profile)
    return spec


def _engine_file(onnx_file: str) -> str:
    return str(Path(onnx_file).with_suffix(".plan"))
