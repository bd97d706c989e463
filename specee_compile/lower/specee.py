"""Build the SpecEE graphs of a bundle: predictors and exits by passes, then segments.

    calibration (cached) -> export decode step -> specee passes (insert_predictors,
    insert_early_exit, fuse_draft_gathers) -> segments (one per predictor layer + the rest)
    -> per-segment ORT fusions [-> exit mode "graph": the segments nested into one decode
    graph with an If after every cut];  draft step export;  K/V-propagation weights

A TensorRT bundle adds one engine per segment and one for the draft (``engine_jobs`` plans
them from the saved graphs' I/O, the compiler builds them, ``with_engines`` records them).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from safetensors.numpy import save_file

from specee_compile.bundle import io_contract
from specee_compile.calibrate import CalibrationSettings, calibrate, load_calibration
from specee_compile.errors import BackendError
from specee_compile.export import export_draft, export_step, export_tree
from specee_compile.functional import rope_tables
from specee_compile.lower.exit_graph import nest_segments
from specee_compile.lower.segments import Segment, save_segments, split_segments
from specee_compile.lower.tensorrt import io_profile
from specee_compile.passes import FuseOrtTransformersPass, Pipeline
from specee_compile.passes.fuse_draft_gathers import FuseDraftGathersPass
from specee_compile.passes.insert_early_exit import InsertEarlyExitPass
from specee_compile.passes.insert_predictors import InsertPredictorsPass

logger = logging.getLogger(__name__)

FOLDER = "specee"
EXIT_MODES = ("segments", "graph")
DECODE_FILE = "decode.onnx"
TREE_FILE = "tree.onnx"
DRAFT_TREE_FILE = "draft_tree.onnx"
TREE_SEGMENTS = "tree_segment"  # the tree step with per-node exits: tree_segment_{k}.onnx
TREE_MAX_WIDTH = 8  # the tree draft graph's top-K children per node: the widest a tree can branch


@dataclass
class SpecEEGraphs:
    segments: list[Segment]  # exit mode "segments"; empty in "graph" mode
    decode: ir.Model | None  # exit mode "graph": the one decode graph with nested If exits
    draft: ir.Model
    kv_fill: dict[str, np.ndarray]
    manifest: dict
    pass_log: list[dict]
    tree: ir.Model | None = None  # the tree verification step, when asked for
    draft_tree: ir.Model | None = None  # the draft over a token tree's nodes, with ``tree``
    tree_segments: list[Segment] = field(default_factory=list)  # the tree step with per-node exits, cut


def specee_pipeline(cal, layers: tuple[int, ...], rule: str, per_node: bool = False) -> Pipeline:
    """The SpecEE passes; ``per_node`` for the tree verification graph (a decision per node)."""
    state = {k: v.detach().numpy() for k, v in cal.bank.state_dict().items()}
    return Pipeline({"specee": [
        InsertPredictorsPass(layers=layers, per_node=per_node, **state),
        InsertEarlyExitPass(rule=rule, vocab_map=cal.draft.vocab_map.numpy(), per_node=per_node),
        FuseDraftGathersPass(),
    ]})


def build(model_source, hf_model, capacity: int, *, calib_file=None, rule="full", threshold=0.0,
          opt_level="O1", progress=True, calibration: Path | None = None, target="ort",
          exit_mode="segments", tree=False) -> SpecEEGraphs:
    """``target`` "trt" exports standard ONNX attention and skips the ONNX Runtime fusions;
    ``exit_mode`` "graph" nests the segments into one decode graph (see lower/exit_graph.py)."""
    cal_dir = calibration or calibrate(model_source, CalibrationSettings(calib_file=calib_file, rule=rule),
                                       progress=progress)
    cal = load_calibration(cal_dir, hf_model)
    L = hf_model.config.num_hidden_layers
    _warn_if_slower(cal.meta.get("chosen", {}), L)
    threshold = threshold or cal.threshold
    reach = max(0, -min(cal.schedule.offsets, default=0))
    lo = max(0, min(cal.schedule.offline_layers, default=0) - reach)
    layers = tuple(range(lo, L - 1))  # every layer the online window can reach from the offline set
    model, _ = export_step(hf_model, capacity, target)
    model, log = specee_pipeline(cal, layers, rule)(model)
    input_names = [v.name for v in model.graph.inputs]
    segments = _segments(model, layers, L, opt_level, target)
    kv_fill = _kv_fill(hf_model, capacity)
    decode = None
    if exit_mode == "graph":
        kv_heads = hf_model.config.num_key_value_heads or hf_model.config.num_attention_heads
        decode = nest_segments(segments, input_names, kv_fill, _eps(hf_model), L, kv_heads, rows=target == "trt")
        segments = []
    draft = export_draft(cal.draft, capacity, target)
    tree_model = draft_tree = None
    tree_segments = []
    if tree:
        tree_model = export_tree(hf_model, capacity, target)
        if exit_mode == "segments":  # merged mapping: early exit inside tree verification, on a copy of the export
            exits = ir.from_proto(ir.to_proto(tree_model))
            exits, tree_log = specee_pipeline(cal, layers, rule, per_node=True)(exits)
            log += [{**entry, "graph": "tree"} for entry in tree_log]
            tree_segments = _segments(exits, layers, L, opt_level, target)
        if opt_level != "O0" and target == "ort":
            FuseOrtTransformersPass()(tree_model)
        draft_tree = export_draft(cal.draft, capacity, target, tree_top_k=TREE_MAX_WIDTH)
    spec = {
        "calibration": str(cal_dir),
        "rule": rule,
        "threshold": threshold,
        "kv_policy": "propagate",
        "exit_mode": exit_mode,
        "predictor_layers": list(layers),
        "schedule": cal.schedule.to_dict(),
        "cost_model": {k: v for k, v in cal.meta["cost_model"].items() if k != "seconds_per_layer"},
        "draft": {"file": f"{FOLDER}/draft.onnx", "vocab_size": int(len(cal.draft.vocab_map)),
                  "kv_heads": cal.draft.kv_heads, "head_dim": cal.draft.head_dim},
        "kv_fill": {"file": f"{FOLDER}/kv_fill.safetensors", "eps": _eps(hf_model)},
    }
    return SpecEEGraphs(segments, decode, draft, kv_fill, spec, log, tree_model, draft_tree, tree_segments)


def _segments(model: ir.Model, layers: tuple[int, ...], num_layers: int, opt_level: str, target: str) -> list[Segment]:
    """Cut ``model`` after every predictor layer; ONNX Runtime fusions per segment."""
    segments = split_segments(model, list(layers), num_layers)
    if opt_level != "O0" and target == "ort":
        for s in segments:
            FuseOrtTransformersPass()(s.model)
    return segments


def _warn_if_slower(chosen: dict, num_layers: int) -> None:
    """Say so when the calibration itself predicts no speedup for this model."""
    cost = chosen.get("relative_cost")
    if cost is not None and cost >= 1.0:
        logger.warning(
            "the calibration predicts SpecEE decode steps at %.1f%% of the dense cost on this model (%.1f%% "
            "agreement, %.2f of %d layers executed on average): expect no speedup over the dense graph, which the "
            "bundle keeps (specee-run --no-exit). A draft that hits more often lets exits come earlier.",
            100 * cost, 100 * chosen.get("agreement", float("nan")), chosen.get("mean_layers", float("nan")),
            num_layers)


def save(graphs: SpecEEGraphs, bundle_dir: Path) -> dict:
    folder = bundle_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    names = save_segments(graphs.segments, folder) if graphs.segments else []
    if graphs.decode is not None:
        ir.save(graphs.decode, folder / DECODE_FILE, external_data=DECODE_FILE + ".data")
    ir.save(graphs.draft, folder / "draft.onnx", external_data="draft.onnx.data")
    save_file(graphs.kv_fill, folder / "kv_fill.safetensors")
    spec = dict(graphs.manifest)
    spec["draft"] = {**spec["draft"], **io_contract(graphs.draft)}
    if graphs.tree is not None:
        ir.save(graphs.tree, folder / TREE_FILE, external_data=TREE_FILE + ".data")
        ir.save(graphs.draft_tree, folder / DRAFT_TREE_FILE, external_data=DRAFT_TREE_FILE + ".data")
        spec["tree"] = {"file": f"{FOLDER}/{TREE_FILE}", "max_width": TREE_MAX_WIDTH, **io_contract(graphs.tree),
                        "draft": {"file": f"{FOLDER}/{DRAFT_TREE_FILE}", **io_contract(graphs.draft_tree)}}
        if graphs.tree_segments:
            spec["tree"]["segments"] = _segment_entries(graphs.tree_segments,
                                                        save_segments(graphs.tree_segments, folder, TREE_SEGMENTS))
    if graphs.decode is not None:
        spec["decode"] = {"file": f"{FOLDER}/{DECODE_FILE}", **io_contract(graphs.decode)}
    else:
        spec["segments"] = _segment_entries(graphs.segments, names)
    return spec


def _segment_entries(segments: list[Segment], names: list[str]) -> list[dict]:
    return [{"file": f"{FOLDER}/{n}", "first_layer": s.first_layer, "last_layer": s.last_layer,
             "exit_layer": s.exit_layer, **io_contract(s.model)} for n, s in zip(names, segments)]


@dataclass(frozen=True)
class EngineJob:
    """One TensorRT engine of a SpecEE bundle (paths relative to the bundle)."""

    name: str  # "segment_{k}" or "draft", as the TensorRT check names the graph
    onnx: str  # the graph it is built from
    engine: str  # where its serialized engine goes: the graph's file with the suffix .plan
    profile: dict[str, list[list[int]]]  # min / opt / max shape of every input with symbolic dimensions


def engine_jobs(spec: dict, capacity: int) -> list[EngineJob]:
    """The engines of a TensorRT SpecEE bundle, from the ``specee`` section ``save`` returned.

    One per segment, in run order, with every symbolic dimension fixed at 1: segments run
    decode steps only (prefill uses the step engine), so the token and the hidden states
    crossing a cut are [1, 1] and [1, 1, d]. One for the draft, which also runs over the
    prompt at prefill: its sequence dimension spans 1 to ``capacity``, tuned for 1.
    """
    if "segments" not in spec:
        raise BackendError(f"TensorRT SpecEE engines are built per segment; exit mode '{spec.get('exit_mode')}' "
                           "has none. Compile with --exit-mode segments.")
    jobs = [EngineJob(f"segment_{k}", g["file"], _engine_file(g["file"]), io_profile(g["inputs"], 1))
            for k, g in enumerate(spec["segments"])]
    draft = spec["draft"]
    jobs.append(EngineJob("draft", draft["file"], _engine_file(draft["file"]), io_profile(draft["inputs"], capacity)))
    return jobs


def with_engines(spec: dict, jobs: list[EngineJob]) -> dict:
    """The ``specee`` section of a TensorRT bundle: each segment's and the draft's ``file`` is
    its engine, ``onnx`` the graph it was built from and ``profile`` the shapes it takes."""
    spec = copy.deepcopy(spec)
    graphs = {f"segment_{k}": g for k, g in enumerate(spec["segments"])}
    graphs["draft"] = spec["draft"]
    for job in jobs:
        graphs[job.name].update(file=job.engine, onnx=job.onnx, profile=job.profile)
    return spec


def _engine_file(onnx_file: str) -> str:
    return str(Path(onnx_file).with_suffix(".plan"))


def _eps(hf_model) -> float:
    return float(getattr(hf_model.config, "rms_norm_eps", 1e-6))


@torch.no_grad()
def _kv_fill(hf_model, capacity: int) -> dict[str, np.ndarray]:
    """What state propagation needs per layer: input norm weight, K and V projections; RoPE tables."""
    out = {}
    for j, layer in enumerate(hf_model.model.layers):
        attn = layer.self_attn
        out[f"{j}.norm"] = layer.input_layernorm.weight.numpy().copy()
        out[f"{j}.k"] = attn.k_proj.weight.numpy().copy()
        out[f"{j}.v"] = attn.v_proj.weight.numpy().copy()
        if attn.k_proj.bias is not None:
            out[f"{j}.k_bias"] = attn.k_proj.bias.numpy().copy()
            out[f"{j}.v_bias"] = attn.v_proj.bias.numpy().copy()
    head_dim = hf_model.model.layers[0].self_attn.head_dim
    cos, sin = rope_tables(hf_model.model.rotary_emb, capacity, head_dim)
    out["cos"], out["sin"] = cos.numpy().copy(), sin.numpy().copy()
    return out
