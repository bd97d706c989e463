"""compile(): the one orchestrator. Each stage is a function below, called in this order:

    resolve and load   the model directory, its weights and tokenizer        (load.py)
    calibrate          the draft, predictors and schedule, cached (--specee)  (calibrate/)
    export             every graph family once                                (export/)
    passes             one pipeline per family; the SpecEE decode graphs are
                       cut after every predictor layer and their segments
                       run a pipeline of their own                            (passes/, lower/segments.py)
    lower              exit mode "graph": segments nested into one graph;
                       TensorRT: the parser check, engines from the saved
                       graphs                                                 (lower/)
    write the bundle   graphs, manifest, tokenizer; renamed into place        (bundle/)

Stages hand each other plain data (:class:`Source`, a dict of graphs per family,
:class:`Lowered`); no stage calls another.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

import specee_compile.load as load
from specee_compile.bundle import check_output
from specee_compile.bundle.assemble import Facts, write_bundle
from specee_compile.config import CompileConfig
from specee_compile.contract import NORMED_FEATURES, TREE_MAX_WIDTH, exit_flag
from specee_compile.errors import BackendError, ConfigError, PassError
from specee_compile.lower import tensorrt as trt_lowering
from specee_compile.lower.exit_graph import nest_segments
from specee_compile.lower.segments import Segmented, split_segments
from specee_compile.passes import ExitWeights, PassPlan, Pipeline, default_plan
from specee_compile.passes.quantize_weights import QuantizeWeightsPass
from specee_compile.quant import KeptBlocks
from specee_compile.quant.spec import ROLES

logger = logging.getLogger(__name__)


@dataclass
class Source:
    """The loaded model and what the later stages need to know about it."""

    model_dir: Path
    info: load.ModelInfo
    hf_model: object
    tokenizer: object
    capacity: int


@dataclass
class Lowered:
    """What the bundle stage writes: graphs per family (the cut families' segments), the
    K/V-propagation tensors, and the TensorRT parser check's facts."""

    graphs: dict[str, ir.Model | Segmented]
    kv_fill: dict[str, np.ndarray] = field(default_factory=dict)
    trt_check: dict | None = None


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
    check_output(config.out, config.force)
    plan_pass_names(config)  # unknown --skip-pass names fail before anything is loaded
    kept = kept_blocks(config)  # --quant gguf without a GGUF fails here too
    with tqdm(total=5 + config.specee, desc="compile", unit="stage", disable=not progress) as bar:
        def stage(name: str):  # the stage that starts now, after the one before it is done
            bar.update()
            bar.set_postfix_str(name)

        bar.set_postfix_str("resolve and load")
        source = resolve_and_load(config)
        calibration = None
        if config.specee:
            stage("calibrate")
            calibration = calibrate(config, source, progress)
        stage("export (torch.export + ONNX)")
        graphs, shapes, kv_fill = export(config, source, calibration)
        stage("passes")
        plan = pass_plan(config, calibration, kept)
        graphs, pass_log = run_passes(config, plan, graphs)
        stage("lower")
        lowered = lower(config, source, graphs, kv_fill)
        stage("write bundle" + (" and build TensorRT engines" if config.backend == "trt" else ""))
        layers = plan.exits.layers if plan.exits is not None else ()
        facts = Facts(config, source.info.family, shapes, source.hf_model, source.tokenizer, pass_log, calibration,
                      layers, quant_facts(config, kept, pass_log), tree_prompts(config, calibration),
                      draft_weight_facts(config, pass_log))
        out = write_bundle(config, facts, lowered, progress)
        bar.update()
        return out


# ---- 1. resolve and load ----------------------------------------------------------------------
def resolve_and_load(config: CompileConfig) -> Source:
    model_dir = load.resolve(config.model)
    info = load.inspect(model_dir)
    hf_model, tokenizer = load.load(model_dir)
    spec = config.quant_spec
    if (getattr(hf_model.config, "tie_word_embeddings", False) and config.quant_embedding
            and spec.precision("embedding") != spec.precision("head")):
        raise ConfigError(f"--quant-embedding {config.quant_embedding}: {model_dir} ties its embedding to its LM head "
                          f"(one weight, stored as the head: {spec.precision('head')}). Leave out --quant-embedding, "
                          "or set the precision of both with --quant-head.")
    capacity = min(config.max_context, info.max_positions)  # sliding windows are masks within it
    return Source(model_dir, info, hf_model, tokenizer, capacity)


# ---- 2. calibrate -----------------------------------------------------------------------------
def calibrate(config: CompileConfig, source: Source, progress: bool):
    """The calibration artifact (``config.calibration``, or found in / added to the cache)."""
    from specee_compile.calibrate import CalibrationSettings, calibrate as run_calibration, load_calibration

    folder = config.calibration or run_calibration(
        config.model, CalibrationSettings(calib_file=config.calib_file, rule=config.exit_rule,
                                          budget_minutes=config.budget), progress=progress)
    calibration = load_calibration(folder, source.hf_model)
    calibration.meta["artifact"] = str(folder)
    _warn_if_slower(calibration.meta.get("chosen", {}), source.hf_model.config.num_hidden_layers)
    return calibration


def exit_weights(config: CompileConfig, calibration, num_layers: int) -> ExitWeights:
    """The predictors to insert: after every layer the schedule's online window can reach
    from its offline set, up to the second-to-last."""
    schedule = calibration.schedule
    reach = max(0, -min(schedule.offsets, default=0))
    lo = max(0, min(schedule.offline_layers, default=0) - reach)
    predictors = {k: v.detach().numpy() for k, v in calibration.bank.state_dict().items()}
    draft = calibration.draft
    fusion = None if draft.fusion is None else (draft.fusion, draft.fuse.weight.detach().numpy())
    return ExitWeights(tuple(range(lo, num_layers - 1)), config.exit_rule, predictors, draft.vocab_map.numpy(), fusion)


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


# ---- 3. export --------------------------------------------------------------------------------
def export(config: CompileConfig, source: Source, calibration):
    """Every graph family this compile emits, each exported once (``decode`` is a copy of the
    step for the SpecEE passes to rewrite, ``tree_decode`` a copy of ``tree``), the step's
    shapes and the K/V-propagation tensors."""
    import specee_compile.export as exporter

    target, capacity, hf_model = config.graph_target, source.capacity, source.hf_model
    step, shapes = exporter.export_step(hf_model, capacity, target)
    graphs = {"step": step}
    if calibration is None:
        return graphs, shapes, {}
    graphs["decode"] = _copy(step)
    graphs["draft"] = exporter.export_draft(calibration.draft, capacity, target)
    if config.tree:
        graphs["tree"] = exporter.export_tree(hf_model, capacity, target)
        if config.exit_mode == "segments" and config.backend == "ort":  # TensorRT bundles: lossless trees only
            graphs["tree_decode"] = _copy(graphs["tree"])
        graphs["draft_tree"] = exporter.export_draft(calibration.draft, capacity, target, tree_top_k=TREE_MAX_WIDTH)
    return graphs, shapes, exporter.kv_fill(hf_model, capacity)


GENERATED_NAME = re.compile(r"val_\d+")
DRAFT_FAMILIES = ("draft", "draft_tree")


def _copy(model: ir.Model) -> ir.Model:
    """A deep copy. The copy's graph names the values passes add afterwards from a counter
    started afresh (``val_0``, ``val_1``, ...), which the exporter's own names of that form
    would collide with; so those are renamed here (``copy_val_N``)."""
    copy = ir.from_proto(ir.to_proto(model))
    for node in ir.traversal.RecursiveGraphIterator(copy.graph):
        for value in node.outputs:
            if value.name and GENERATED_NAME.fullmatch(value.name):
                value.name = f"copy_{value.name}"
    return copy


# ---- 4. passes --------------------------------------------------------------------------------
def pass_plan(config: CompileConfig, calibration=None, kept: KeptBlocks | None = None) -> PassPlan:
    """The default plan for ``config`` (SpecEE passes with the calibration's weights, the
    weight quantization with the GGUF blocks ``kept``), as the user's ``config.pipeline`` edits
    or replaces it."""
    exits = None
    if calibration is not None:
        exits = exit_weights(config, calibration, calibration.meta["num_layers"])
    draft_quant = {family: config.draft_quant_spec(family) for family in DRAFT_FAMILIES}
    plan = default_plan(config.opt_level, config.graph_target, config.specee, config.tree, config.exit_mode, exits,
                        config.quant_spec, kept, draft_quant)
    custom = config.pipeline
    if isinstance(custom, Pipeline):  # a pipeline of its own for the step graph
        plan.pipelines["step"] = custom
    elif callable(custom):
        custom(plan)  # edits the plan in place: plan["decode"].append("finalize", MyPass())
    return plan


def plan_pass_names(config: CompileConfig) -> list[str]:
    """Every pass of the compile's plan, as FAMILY:NAME; unknown ``skip_passes`` fail here."""
    plan = pass_plan(config)
    plan.check_skip(config.skip_passes)
    return plan.names()


def kept_blocks(config: CompileConfig) -> KeptBlocks | None:
    """The GGUF whose blocks ``--quant gguf`` keeps (None when no role asks for them)."""
    spec = config.quant_spec
    if "gguf" not in {spec.precision(role) for role in ROLES}:
        return None
    path = config.gguf or load.gguf_source(config.model)
    if path is None:
        raise ConfigError(f"--quant gguf keeps the blocks of a GGUF file, and {config.model} is not one. Pass the .gguf "
                          "as MODEL, name the GGUF this model came from with --gguf FILE, or use --quant int4.")
    return KeptBlocks(Path(path))


def quant_facts(config: CompileConfig, kept: KeptBlocks | None, pass_log: list[dict]) -> dict | None:
    """The manifest's ``quant`` section: the settings, and per graph how many weights are
    stored how (from the quantize_weights entries of the pass log)."""
    spec = config.quant_spec
    if not spec.active:
        return None
    stored: dict[str, dict[str, int]] = {}
    for entry in pass_log:
        if entry.get("pass") == QuantizeWeightsPass.name and entry.get("fired"):
            graph = entry["graph"] if "part" not in entry else f"{entry['graph']}[{entry['part']}]"
            stored[graph] = entry["fired"]
    facts = {**spec.to_json(), "weights_stored": stored}
    if kept is not None:
        facts["gguf"] = {"file": kept.path.name, "tensors_kept": len(kept.kept),
                         "formats": dict(Counter(kept.kept.values())), "kept": dict(sorted(kept.kept.items())),
                         "not_kept": dict(sorted(kept.not_kept().items()))}
    return facts


def draft_weight_facts(config: CompileConfig, pass_log: list[dict]) -> dict:
    """The manifest's ``specee.draft_weights``: per draft graph, the precision of its products'
    weights and how many weights it stores how (from the pass log)."""
    if not config.specee:
        return {}
    facts = {}
    for family in DRAFT_FAMILIES if config.tree else ("draft",):
        spec = config.draft_quant_spec(family)
        stored = next((e["fired"] for e in pass_log if e.get("pass") == QuantizeWeightsPass.name
                       and e.get("graph") == family and e.get("fired")), {})
        facts[family] = {"weights": spec.weights, "head": spec.precision("head"),
                         **({"block_size": spec.block_size, "accuracy_level": spec.accuracy_level} if stored else {}),
                         "stored": stored}
    return facts


def run_passes(config: CompileConfig, plan: PassPlan, graphs: dict[str, ir.Model]
               ) -> tuple[dict[str, ir.Model | Segmented], list[dict]]:
    """Each family's pipeline; ``decode`` and ``tree_decode`` are then cut after every
    predictor layer and each cut runs its family's pipeline (``segments``, ``tree_segments``)."""
    skip, dump = config.skip_passes, config.dump_ir
    out: dict[str, ir.Model | Segmented] = {}
    log: list[dict] = []
    for family, model in graphs.items():
        model, entries = plan.run(family, model, skip, dump)
        log += entries
        _check_fused(plan, family, model)
        cut = {"decode": "segments", "tree_decode": "tree_segments"}.get(family)
        if cut is None:
            out[family] = model
            continue
        segmented = _cut(model, plan.exits.layers, family)
        for k, seg in enumerate(segmented.segments):
            seg.model, entries = plan.run(cut, seg.model, skip, dump, part=k)
            log += entries
        out[cut] = segmented
    return out, log


def _check_fused(plan: PassPlan, family: str, model: ir.Model) -> None:
    """A fusion draft reads the fused input from every graph that feeds it: refuse a plan
    whose edits left ``fuse_draft_input`` out of one (the draft would read unfused features)."""
    if plan.exits is None or plan.exits.fusion is None or family not in ("step", "decode", "tree", "tree_decode"):
        return
    if NORMED_FEATURES not in {v.name for v in model.graph.outputs}:
        raise PassError(f"the '{family}' graph does not hand the draft its fused input: the calibration's draft fuses "
                        f"layers {plan.exits.fusion[0]}, and fuse_draft_input was skipped or a custom pipeline left it "
                        "out. Keep that pass, or calibrate with --set draft_fusion=false.")


def _cut(model: ir.Model, layers: tuple[int, ...], family: str) -> Segmented:
    from specee_compile.passes.analysis import find_decoder

    outputs = {v.name for v in model.graph.outputs}
    missing = [exit_flag(i) for i in layers if exit_flag(i) not in outputs]
    if missing:
        raise PassError(f"the '{family}' graph lacks the exits {missing} to cut at; a custom pipeline removed "
                        "insert_predictors or insert_early_exit, which SpecEE graphs need.")
    inputs = [v.name for v in model.graph.inputs]
    return Segmented(split_segments(model, list(layers), find_decoder(model, f"cutting '{family}'").num_layers), inputs)


def tree_prompts(config: CompileConfig, calibration) -> tuple[str, ...]:
    """Prompts to choose the default tree shape on (``--tree`` without a shape), text its draft
    never trained on: with a draft the calibration trained, the calibration text's examples
    after those it read (ShareGPT's next records; a calibration file's later examples, or all of
    them when it has no more); with a supplied one, the predictors' text, which the calibration
    took from past the draft's training text (trees do not use the predictors)."""
    if not config.tree or config.tree_shape:
        return ()
    from specee_compile.calibrate import data

    settings = calibration.meta.get("settings", {})
    text = calibration.meta.get("text", {})
    if settings.get("draft_file") and "from" in text:
        read = int(text["from"])
    else:
        read = int(settings.get("draft_sequences", 0)) + int(settings.get("predictor_sequences", 0))
    wanted = 4 * config.tree_prompts  # prompts longer than the choice takes are passed over
    calib_file = settings.get("calib_file")
    if calib_file and Path(calib_file).is_file():
        examples = data.jsonl(calib_file)
        examples = examples[read:read + wanted] or examples[:wanted]
    else:
        examples = data.sharegpt(wanted, skip=read)
    return tuple(e.prompt for e in examples)


# ---- 5. lower ---------------------------------------------------------------------------------
def lower(config: CompileConfig, source: Source, graphs: dict, kv_fill: dict) -> Lowered:
    """Exit mode "graph": the segments nested into one decode graph. ``--check trt``: every
    graph checked against TensorRT's ONNX parser (the engines are built from the saved files
    when the bundle is written)."""
    from specee_compile.export import rms_eps

    if config.specee and config.exit_mode == "graph":
        cfg = source.hf_model.config
        cut = graphs["segments"]
        nested = nest_segments(cut.segments, cut.inputs, kv_fill, rms_eps(source.hf_model), cfg.num_hidden_layers,
                               cfg.num_key_value_heads or cfg.num_attention_heads, rows=config.graph_target == "trt")
        graphs = {("decode" if f == "segments" else f): (nested if f == "segments" else g) for f, g in graphs.items()}
    lowered = Lowered(graphs, kv_fill)
    if config.graph_target == "trt":
        flat = {}
        for family, g in graphs.items():
            if isinstance(g, Segmented):
                prefix = "segment" if family == "segments" else "tree_segment"
                flat.update({f"{prefix}_{k}": seg.model for k, seg in enumerate(g.segments)})
            else:
                flat[family] = g
        version = trt_lowering.check_graphs(flat)
        lowered.trt_check = {"tensorrt": f"{version[0]}.{version[1]}", "graphs": list(flat), "problems": 0}
    return lowered

