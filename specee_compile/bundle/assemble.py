"""The compiler's last stage: save the lowered graphs, build TensorRT engines from them, write
the tokenizer and the manifest, in a staging folder renamed into place when complete.

    model.onnx (+ .data)                       family step
    genai.onnx, genai_config.json              the step for ONNX Runtime GenAI (same weights; bundle/genai.py)
    specee/segment_{k}.onnx, segments.data     family segments (exit mode "segments")
    specee/decode.onnx                         exit mode "graph": the nested decode graph
    specee/draft.onnx, specee/kv_fill.safetensors
    specee/tree.onnx, draft_tree.onnx, tree_segment_{k}.onnx, tree_segments.data
    *.plan                                     TensorRT: one engine per graph it runs
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
from safetensors.numpy import save_file

from specee_compile import __version__
from specee_compile.bundle.genai import write_genai
from specee_compile.bundle.manifest import Cache, Draft, Graph, Manifest, Model, Segment, SpecEE, Tree
from specee_compile.bundle.protocol import CACHE_UPDATE, PROTOCOL
from specee_compile.bundle.write import finish_manifest, staging
from specee_compile.contract import TREE_MAX_WIDTH, io_contract
from specee_compile.errors import OutputError
from specee_compile.lower import tensorrt as trt_lowering
from specee_compile.lower.segments import Segmented, save_segments
from specee_compile.tokenizer import check_folder, end_of_text_ids

logger = logging.getLogger(__name__)
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
    quant: dict | None = None  # the weight quantization: settings and what each graph stores
    tree_prompts: tuple[str, ...] = ()  # held-out prompts the default tree shape is chosen on
    draft_weights: dict = dataclasses.field(default_factory=dict)  # per draft graph: its weights' precision


def write_bundle(config, facts: Facts, lowered, progress: bool = False) -> Path:
    """Write the bundle at ``config.out`` (see the module docstring) and return its path.
    With tree graphs, the default tree shape is ``config.tree_shape`` or chosen by running the
    written bundle (:mod:`specee_compile.runtimes.tree_choice`) before it is moved into place."""
    graphs = lowered.graphs
    with staging(config.out, config.force) as tmp:
        step = save_graph(graphs["step"], tmp, GRAPH_FILE)
        spec = _save_specee(facts, lowered, tmp) if "draft" in graphs else None
        engine = None
        if config.backend == "trt":
            profile = trt_lowering.optimization_profile(graphs["step"], facts.shapes.capacity)
            (tmp / trt_lowering.ENGINE_FILE).write_bytes(
                trt_lowering.build_engine(tmp / GRAPH_FILE, profile, config.precision))
            step = dataclasses.replace(step, file=trt_lowering.ENGINE_FILE, onnx=GRAPH_FILE)
            engine = trt_lowering.engine_facts(config.precision, profile)
            if spec is not None:
                spec = _build_specee_engines(spec, tmp, facts.shapes.capacity, config.precision)
        facts.tokenizer.save_pretrained(tmp)
        _check_tokenizer_files(tmp)
        facts.hf_model.generation_config.save_pretrained(tmp)
        manifest = _manifest(config, facts, step, spec, engine, lowered.trt_check)
        if config.backend == "ort" and config.graph_target == "ort":  # ONNX Runtime GenAI loads the folder too
            cfg = facts.hf_model.config
            manifest = dataclasses.replace(manifest, genai=write_genai(
                tmp, GRAPH_FILE, facts.shapes, cfg.bos_token_id, list(manifest.model.eos_token_ids),
                cfg.pad_token_id))
        finish_manifest(tmp, manifest.to_json())
        if spec is not None and spec.tree is not None:
            tree = spec.tree
            if reason := inexact_tree(config):
                logger.warning(reason)
                tree = dataclasses.replace(tree, inexact=reason)
            tree = _default_tree(config, facts, tree, tmp, progress)
            finish_manifest(tmp, dataclasses.replace(manifest, specee=dataclasses.replace(spec, tree=tree)).to_json())
    return config.out


def inexact_tree(config) -> str | None:
    """Why tree speculation on this bundle does not give its dense decoding's tokens, if it does not.

    With int8 activations ONNX Runtime's MatMulNBits computes a row differently when it shares
    a call with other rows (measured with docs/benchmarks/draft-stage8/rows.py on SmolLM2
    `gguf`: a token's logits differ by a median 0.6 between a 1-row step and a 2-row chunk,
    3e-5 with fp32 activations), so the verification of several nodes can pick other tokens
    than the one-row dense step."""
    if config.quant == "fp32" or config.accuracy_level != 4:
        return None
    return ("tree speculation on int8 activations (--accuracy-level 4) is not token-exact against this bundle's dense "
            "decoding: ONNX Runtime's MatMulNBits computes a row differently when it shares a call with other rows "
            "(on SmolLM2 --quant gguf the trees' greedy tokens part from the dense ones after 16-19 tokens on "
            "average); compile with --accuracy-level 0 for exact trees, at about 3x the cost of the weight products.")


def _default_tree(config, facts: Facts, tree: Tree, bundle_dir: Path, progress: bool) -> Tree:
    """The tree section with its default shape: the one asked for, else the candidate measured
    fastest on the written bundle (its choice recorded), else none (the runtime's default)."""
    if config.tree_shape:
        return dataclasses.replace(tree, default_shape=config.tree_shape, choice={"given": config.tree_shape})
    from specee_compile.runtimes.tree_choice import choose_tree_shared

    choice = choose_tree_shared(bundle_dir, list(facts.tree_prompts), config.tree_prompts, config.tree_new_tokens,
                                progress=progress)
    chosen = next((r for r in choice.get("candidates", []) if r["shape"] == choice["shape"]), None)
    if chosen is not None and chosen["predicted_speedup"] < 1.0:
        logger.warning("tree speculation is predicted slower than the dense bundle on this machine (the best shape, "
                       "%s, at %.2fx: %.2f tokens per forward against a forward cost of %.2f dense steps); decode "
                       "without --tree, or calibrate a draft that is right more often.", chosen["shape"],
                       chosen["predicted_speedup"], chosen["tokens_per_forward"], chosen["forward_cost"])
    return dataclasses.replace(tree, default_shape=choice["shape"] or "", choice=choice)


def save_graph(model: ir.Model, folder: Path, name: str, prefix: str = "") -> Graph:
    """Write ``model`` as ``folder/name`` with its weights in ``name.data``; its manifest entry."""
    ir.save(model, folder / name, external_data=name + ".data")
    return Graph.from_json({"file": prefix + name, **io_contract(model)})


def _manifest(config, facts: Facts, step: Graph, spec: SpecEE | None, engine: dict | None,
              trt_check: dict | None) -> Manifest:
    hf, shapes = facts.hf_model, facts.shapes
    target = config.graph_target
    eos = end_of_text_ids(facts.tokenizer, hf.generation_config.eos_token_id, hf.config.eos_token_id)
    model = Model(source=str(config.model), family=facts.family, num_layers=shapes.num_layers,
                  hidden_size=shapes.hidden_size, num_heads=shapes.num_heads, num_kv_heads=shapes.num_kv_heads,
                  head_dim=shapes.head_dim, vocab_size=shapes.vocab_size,
                  eos_token_ids=tuple(t for t in eos if t < shapes.vocab_size),
                  chat_template=bool(getattr(facts.tokenizer, "chat_template", None)))
    return Manifest(
        backend="tensorrt" if config.backend == "trt" else "onnxruntime", graph_target=target, model=model,
        cache=Cache(capacity=shapes.capacity, update=CACHE_UPDATE[target], sliding_windows=shapes.sliding_windows),
        step=step, protocol=PROTOCOL[target],
        specee=spec, producer=f"specee-compile {__version__}",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        compile=config.to_dict(), passes=facts.pass_log, engine=engine, tensorrt_check=trt_check, quant=facts.quant)


def _save_specee(facts: Facts, lowered, bundle_dir: Path) -> SpecEE:
    """Save the SpecEE graphs; the manifest's ``specee`` section."""
    from specee_compile.export import rms_eps

    config, cal, graphs = facts.config, facts.calibration, lowered.graphs
    folder = bundle_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"{FOLDER}/"
    segments = _save_segments(graphs["segments"], folder) if "segments" in graphs else ()
    decode = save_graph(graphs["decode"], folder, DECODE_FILE, prefix) if "segments" not in graphs else None
    draft = save_graph(graphs["draft"], folder, "draft.onnx", prefix)
    draft = Draft(**vars(draft), vocab_size=int(len(cal.draft.vocab_map)), kv_heads=cal.draft.kv_heads,
                  head_dim=cal.draft.head_dim, fusion_layers=tuple(cal.draft.fusion or ()))
    save_file(lowered.kv_fill, folder / "kv_fill.safetensors")
    tree = None
    if "tree" in graphs:
        tree_segments = _save_segments(graphs["tree_segments"], folder, TREE_SEGMENTS) if "tree_segments" in graphs \
            else ()
        tree = Tree(**vars(save_graph(graphs["tree"], folder, TREE_FILE, prefix)), max_width=TREE_MAX_WIDTH,
                    draft=save_graph(graphs["draft_tree"], folder, DRAFT_TREE_FILE, prefix), segments=tree_segments)
    return SpecEE(calibration=cal.meta.get("artifact", ""), rule=config.exit_rule,
                  threshold=config.threshold or cal.threshold, exit_mode=config.exit_mode,
                  predictor_layers=tuple(facts.predictor_layers), schedule=cal.schedule.to_dict(), draft=draft,
                  kv_fill_file=f"{prefix}kv_fill.safetensors", kv_fill_eps=rms_eps(facts.hf_model),
                  segments=segments, decode=decode, tree=tree, draft_weights=facts.draft_weights,
                  cost_model={k: v for k, v in cal.meta["cost_model"].items() if k != "seconds_per_layer"})


def _save_segments(cut: Segmented, folder: Path, stem: str = "segment") -> tuple[Segment, ...]:
    names = save_segments(cut.segments, folder, stem)
    return tuple(Segment(**vars(Graph.from_json({"file": f"{FOLDER}/{n}", **io_contract(s.model)})),
                         first_layer=s.first_layer, last_layer=s.last_layer, exit_layer=s.exit_layer)
                 for n, s in zip(names, cut.segments))


def _build_specee_engines(spec: SpecEE, bundle_dir: Path, capacity: int, precision: str) -> SpecEE:
    """One TensorRT engine per segment, one for the draft and, with trees, one for each tree
    graph, each next to its ONNX file; returns the ``specee`` manifest section that names them."""
    jobs = trt_lowering.engine_jobs(spec.to_json(), capacity)
    for job in jobs:
        plan = trt_lowering.build_engine(bundle_dir / job.onnx, job.profile, precision)
        (bundle_dir / job.engine).write_bytes(plan)
    return SpecEE.from_json(trt_lowering.with_engines(spec.to_json(), jobs))


def _check_tokenizer_files(bundle_dir: Path) -> None:
    """A bundle's tokenizer is tokenizer.json (+ tokenizer_config.json, chat_template.jinja): what
    the runtimes read. Anything else save_pretrained wrote (code, vocab files) is refused or dropped."""
    check_folder(bundle_dir, "the bundle being written", OutputError)
    if not (bundle_dir / "tokenizer.json").is_file():
        raise OutputError("the model's tokenizer could not be saved as tokenizer.json, which a bundle's runtime reads; "
                          "use a model with a fast tokenizer (tokenizer.json).")
    for extra in ("special_tokens_map.json", "added_tokens.json"):  # folded into tokenizer.json and its config
        (bundle_dir / extra).unlink(missing_ok=True)
