"""One benchmark run, top to bottom.

    bundles (given, or compiled from configurations) -> systems -> warm-up
    -> timed runs, interleaved prompt by prompt in a rotating order
    -> quality against dense greedy (free-running, teacher-forced, held-out perplexity)
    -> ORT profile of the SpecEE segments -> step time vs its parts -> optional threshold sweep
    -> report + plots
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specee_compile import load as model_load
from specee_compile import resources
from specee_compile.bench import measure
from specee_compile.bench.systems import (KINDS, System, bundle_system, genai_system, llama_cpp_system,
                                          transformers_system)
from specee_compile.bundle import read_manifest
from specee_compile.calibrate import CalibrationSettings, calibrate, data
from specee_compile.calibrate.pipeline import META
from specee_compile.config import CompileConfig, with_overrides
from specee_compile.errors import ConfigError, SpecEEError
from specee_compile.contract import TREE_MAX_WIDTH
from specee_compile.runtimes import check_threads, load, share_threads
from specee_compile.runtimes.tree import TreeShape
from specee_compile.runtimes.tree_choice import timed_in_turn

logger = logging.getLogger(__name__)

SHAREGPT_HELD_OUT = 1000  # ShareGPT records from here on are never seen by calibration (it reads the first few hundred)
MAX_PROMPT_TOKENS = 512
# --quick: enough of everything to exercise every code path in a couple of minutes
QUICK = dict(limit=2, new_tokens=16, warmup=1, repeats=1, sweep_prompts=2, ppl_samples=2, profile_prompts=1,
             genai=False, llama_cpp=False)
QUICK_SWEEP = (0.5, 0.9)
QUICK_CALIBRATION = dict(draft_sequences=12, predictor_sequences=6, max_seq_len=128, draft_epochs=1,
                         predictor_epochs=5, positions_per_sequence=32, draft_vocab=2048)
PACKAGES = ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-genai",
            "llama-cpp-python", "numpy")


@dataclass(frozen=True)
class BenchSettings:
    """What ``specee-bench`` runs. See ``specee-bench --help`` for each field."""

    model: str
    out: Path = Path("bench-results")
    bundles: tuple[str, ...] = ()
    configs: tuple[str, ...] = ()  # "key=value,..." compile overrides, one SpecEE bundle each
    prompts: str = "mtbench"  # mtbench | sharegpt | a JSONL file
    limit: int = 80
    max_prompt_tokens: int = MAX_PROMPT_TOKENS  # longer prompts are left out
    new_tokens: int = 128
    repeats: int = 1
    warmup: int = 2
    threads: int | None = 2
    transformers: bool = True
    genai: bool = True
    sweep: tuple[float, ...] = ()
    sweep_prompts: int = 20
    ppl_samples: int = 40
    profile_prompts: int = 3
    max_context: int = 1024
    quick: bool = False
    force: bool = False
    shared_threads: bool = False  # one ONNX Runtime thread pool for the whole process (runtimes.share_threads)
    reference: bool = False  # compare every SpecEE bundle with the eager reference decoder, step by step
    tree_shapes: tuple = ()  # tree speculation with trees of these shapes (TreeShape), with every SpecEE bundle made with --tree
    tree_sizes: tuple[int, ...] = (1, 2, 3, 4, 5, 8, 16)  # tree sizes whose verification cost is timed
    verify_contexts: tuple[int, ...] = ()  # context lengths at which that cost is timed against the dense step
    quantized: tuple[str, ...] = ()  # dense bundles compiled with --quant, measured next to the fp32 one
    llama_cpp: bool = True  # with --quantized and a GGUF model: llama.cpp on that GGUF (if llama-cpp-python is there)

    def resolved(self) -> "BenchSettings":
        """Apply --quick's presets and check every field."""
        s = dataclasses.replace(self, **QUICK, sweep=self.sweep or QUICK_SWEEP) if self.quick else self
        for name in ("limit", "max_prompt_tokens", "new_tokens", "repeats", "sweep_prompts", "max_context"):
            if getattr(s, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(s, name)}.")
        if any(type(n) is not int or n <= 0 for n in s.verify_contexts):
            raise ConfigError(f"--verify-contexts takes positive token counts, got {list(s.verify_contexts)}.")
        for name in ("warmup", "ppl_samples", "profile_prompts"):
            if getattr(s, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(s, name)}.")
        check_threads(s.threads)
        for shape in s.tree_shapes:
            TreeShape.parse(shape).check(TREE_MAX_WIDTH)
        bad = [t for t in s.sweep if not 0.0 <= t <= 1.0]
        if bad:
            raise ConfigError(f"sweep thresholds must be in [0, 1]; got {bad}.")
        if s.prompts not in ("mtbench", "sharegpt") and not Path(s.prompts).is_file():
            raise ConfigError(f"--prompts must be 'mtbench', 'sharegpt' or a JSONL file; {s.prompts} is none of them.")
        return s


@dataclass
class _Bundle:
    name: str
    path: Path
    specee: bool
    settings: dict = field(default_factory=dict)


def run(settings: BenchSettings, progress: bool = True) -> dict:
    """Run the benchmark and write report.json, report.md and the plots into ``settings.out``."""
    from specee_compile.bench import report

    s = settings.resolved()
    out = Path(s.out)
    if (out / report.JSON).exists() and not s.force:
        raise ConfigError(f"{out} already holds a benchmark report; pass --force to replace it or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()[0]
    if s.shared_threads:
        share_threads(s.threads)
    torch.set_num_threads(s.threads or torch.get_num_threads())
    model_dir = model_load.resolve(s.model)
    model_load.inspect(model_dir)

    bundles = _bundles(s, out, progress)
    spec = [b for b in bundles if b.specee]
    dense_bundle = next((b for b in bundles if not b.specee), None)
    dense_engine = load(dense_bundle.path if dense_bundle else spec[0].path, threads=s.threads, dense=True)
    systems = [bundle_system("dense", "dense", dense_engine, s.new_tokens)]
    own_dense = {}  # a quantized SpecEE bundle's path -> the system running its own (quantized) dense graph
    for b in spec:
        engine = load(b.path, threads=s.threads)
        if engine.manifest.quant != dense_engine.manifest.quant:  # weights unlike the dense bundle's
            own_dense[str(b.path)] = f"dense@{b.name}"
            systems.append(bundle_system(own_dense[str(b.path)], "quantized" if engine.manifest.quant else "dense",
                                         load(b.path, threads=s.threads, dense=True), s.new_tokens,
                                         {"quant": engine.manifest.quant, "path": str(b.path)}))
        if s.reference and not Path(engine.manifest.specee.calibration).is_dir():
            raise ConfigError(f"--reference needs the calibration {b.path} was compiled from, and "
                              f"{engine.manifest.specee.calibration} is gone; recompile the bundle or leave "
                              "out --reference.")
        systems.append(bundle_system(b.name, "specee", engine, s.new_tokens,
                                     {**b.settings, "threshold": engine.threshold, "path": str(b.path)}))
    for path in s.quantized:
        engine = load(path, threads=s.threads, dense=True)
        quant = engine.manifest.quant
        if quant is None:
            raise ConfigError(f"--quantized {path} holds fp32 weights; pass a bundle compiled with --quant (or give it "
                              "with --bundle).")
        name = f"dense-{quant['weights']}"
        if any(x.name == name for x in systems):  # several of one precision: told apart by their folders
            name = f"{name}@{Path(path).stem}"
        systems.append(bundle_system(name, "quantized", engine, s.new_tokens, {"quant": quant, "path": str(path)}))
    if s.tree_shapes:
        with_tree = [b for b in spec if "tree" in read_manifest(b.path, verify=False)["specee"]]
        if not with_tree:
            raise ConfigError("--tree needs a SpecEE bundle compiled with --tree; compile one (specee-compile --specee "
                              "--tree) and pass it with --bundle, or let specee-bench compile it (--config).")
        for b in with_tree:  # every tree bundle runs every shape: drafts compared side by side
            for shape in s.tree_shapes:
                engine = load(b.path, threads=s.threads, tree=shape)
                name = f"tree-{engine.shape}" + (f"@{b.name}" if len(with_tree) > 1 else "")
                systems.append(bundle_system(name, "tree", engine, s.new_tokens,
                                             {"shape": str(engine.shape), "path": str(b.path)}))
    hf, _ = model_load.load(model_dir)
    eos = dense_engine.eos_token_ids
    if s.transformers:
        systems.append(transformers_system(hf, s.new_tokens, eos))
    if s.genai:
        genai = genai_system(model_dir, out / "genai-model", s.threads, s.new_tokens, eos)
        if genai is not None:
            systems.append(genai)
        if s.quantized:
            genai = genai_system(model_dir, out / "genai-model-int4", s.threads, s.new_tokens, eos, "int4")
            systems.append(genai)
    gguf = model_load.gguf_source(s.model)
    if s.quantized and s.llama_cpp and gguf is not None:
        llama = llama_cpp_system(gguf, s.threads, s.new_tokens, eos, s.max_context + s.new_tokens)
        if llama is not None:
            systems.append(llama)

    prompts = _prompts(s, dense_engine)
    for ids in tqdm(prompts[: s.warmup], desc="warm-up", disable=not progress):
        for system in systems:
            system.generate(ids)
    runs: dict[str, list] = {x.name: [] for x in systems}
    bar = tqdm(total=len(prompts) * s.repeats * len(systems), desc="timed runs", disable=not progress)
    for rep in range(s.repeats):
        for k, ids in enumerate(prompts):
            turn = (k + rep) % len(systems)  # rotate who goes first, so no system always runs after another
            for system in systems[turn:] + systems[:turn]:
                runs[system.name].append(system.generate(ids))
                bar.update()
    bar.close()
    n = len(prompts)
    dense_tokens = [r.token_ids for r in runs["dense"][:n]]

    head = hf.get_output_embeddings().weight.detach().numpy()
    ppl_set = _perplexity_set(s, dense_engine)
    L = dense_engine.num_layers
    results, heads, context_costs = {}, None, {}
    genai_name = next((x.name for x in systems if x.kind == "genai"), None)
    for system in systems:
        r = runs[system.name]
        row = {"kind": system.kind, "description": KINDS[system.kind], **system.settings, **measure.speed(r),
               "speedup_vs_dense": measure.paired_ratio(r, runs["dense"]),
               **measure.agreement_free_running(r[:n], dense_tokens)}
        if "transformers" in runs:
            row["speedup_vs_transformers"] = measure.paired_ratio(r, runs["transformers"])
        if genai_name:
            row["speedup_vs_genai"] = measure.paired_ratio(r, runs[genai_name])
        if "ort-genai-int4" in runs:
            row["speedup_vs_genai_int4"] = measure.paired_ratio(r, runs["ort-genai-int4"])
        if "llama-cpp" in runs:
            row["speedup_vs_llama_cpp"] = measure.paired_ratio(r, runs["llama-cpp"])
        own = own_dense.get(system.settings.get("path")) if system.kind in ("specee", "tree") else None
        if own:  # against its own dense graph too: the speed-up its quantized weights leave to early exit or trees
            own_tokens = [x.token_ids for x in runs[own][:n]]
            row.update(own_dense=own, speedup_vs_own_dense=measure.paired_ratio(r, runs[own]),
                       exact_match_vs_own_dense=measure.agreement_free_running(r[:n], own_tokens)["exact_match"])
        if system.kind == "tree":
            row.update(measure.tree(r), **measure.time_shares(r),
                       forward_cost=measure.forward_cost(r, runs[own or "dense"]))
            if inexact := system.engine.manifest.specee.tree.inexact:
                row["inexact"] = inexact
            if system.engine.shape.exits:  # merged mapping: lossy, so measured like the early-exit bundles
                row.update(measure.exits(r, L), threshold=system.engine.threshold)
                row["teacher_forced_agreement"] = _agreement(system.engine, prompts, dense_tokens, progress,
                                                             system.name)
            row["draft"] = _draft_quality(system.engine.manifest.specee.calibration)
            sizes = [t for t in s.tree_sizes if t <= system.engine.capacity - len(prompts[0])]
            row["verification_ms"] = {str(k): 1000 * v for k, v in timed_in_turn(None, system.engine, prompts[0],
                                                                                  sizes)[1].items()}
            if s.verify_contexts and system.settings["path"] not in context_costs:  # once per bundle
                context_costs[system.settings["path"]] = row["context_costs"] = _context_costs(
                    s, system, dense_engine, prompts, out, progress)
        elif system.engine is not None:
            row["perplexity"] = _perplexity(system.engine, ppl_set, head, progress, system.name)
        if system.kind == "quantized":
            row["teacher_forced_agreement"] = _agreement(system.engine, prompts, dense_tokens, progress, system.name)
        if system.kind == "specee":
            row.update(measure.exits(r, L))
            row["teacher_forced_agreement"] = _agreement(system.engine, prompts, dense_tokens, progress, system.name)
            if s.reference:
                row["reference"] = _reference(s, system, hf, prompts, r[:n], progress)
            row.update(measure.time_shares(r, _profile(s, system, prompts, out, progress)))
            if system.engine.manifest.quant is None:
                heads = heads or _head_seconds(head, system.engine.manifest.specee.draft.vocab_size)
                row.update(measure.step_parts(r, runs["dense"], row, system.engine.active_layers, L,
                                              system.settings.get("rule", "full"), *heads))
            else:  # its layers and head are not the fp32 ones the parts are timed on
                row["step_parts_skipped"] = ("its weights are quantized, and the parts (a decoder layer, the LM "
                                             "head) are timed on the fp32 dense bundle")
        results[system.name] = row
    if "transformers" in results and ppl_set:
        results["transformers"]["perplexity"] = _perplexity_hf(hf, ppl_set)

    sweep = _sweep(s, systems, prompts, dense_tokens, progress) if s.sweep and spec else []
    rep = {
        "command": _command(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**_machine(s.threads, s.shared_threads), "load_average_start": round(load_at_start, 2),
                    "load_average_end": round(os.getloadavg()[0], 2)},
        "versions": {p: metadata.version(p) for p in PACKAGES if _installed(p)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(s).items()},
        "model": {"source": s.model, "num_layers": L, "prompts": n, "prompt_set": s.prompts,
                  "perplexity_samples": len(ppl_set), "perplexity_tokens": sum(len(c) for _, c in ppl_set)},
        "systems": results,
        "sweep": sweep,
        "runs": {name: [dataclasses.asdict(x) for x in r] for name, r in runs.items()},
    }
    report.write(rep, out)
    return rep


def _bundles(s: BenchSettings, out: Path, progress: bool) -> list[_Bundle]:
    found = []
    for path in s.bundles:
        manifest = read_manifest(Path(path), verify=False)
        specee = "specee" in manifest
        name = Path(path).stem if specee else "dense"
        settings = {"rule": manifest["specee"]["rule"]} if specee else {}
        found.append(_Bundle(name, Path(path), specee, settings))
    if sum(not b.specee for b in found) > 1:
        raise ConfigError("give at most one dense bundle; SpecEE bundles hold their own dense graph as well.")
    configs = list(s.configs) or ([] if any(b.specee for b in found) or s.quantized else [""])
    calibration = None
    if s.quick and configs:
        calibration = calibrate(s.model, CalibrationSettings(**QUICK_CALIBRATION), progress=progress)
    for k, overrides in enumerate(configs):
        pairs = [p for p in overrides.split(",") if p.strip()]
        label = ",".join(p for p in pairs if not p.startswith("calibration="))  # paths make poor names
        name = "specee" + (f"[{label}]" if label else "")
        if any(b.name == name for b in found):
            name = f"{name}#{k}"
        path = out / "bundles" / (f"specee-{k}.onnx" if pairs else "specee.onnx")
        config = with_overrides(CompileConfig(model=s.model, out=path, specee=True, max_context=s.max_context,
                                              calibration=calibration, force=True, tree=bool(s.tree_shapes),
                                              # the bench runs its own shapes: no compile-time choice
                                              tree_shape=str(s.tree_shapes[0]) if s.tree_shapes else ""), pairs)
        if not _matches(path, config):
            from specee_compile.compiler import compile as compile_bundle

            logger.info("compiling %s into %s", name, path)
            path.parent.mkdir(parents=True, exist_ok=True)
            compile_bundle(config, progress=progress)
        found.append(_Bundle(name, path, True, {"rule": config.exit_rule, "compile": overrides or "defaults"}))
    return found


def _matches(path: Path, config: CompileConfig) -> bool:
    """An earlier run's bundle at ``path`` compiled from the same configuration can be reused."""
    keys = ("model", "max_context", "opt_level", "specee", "calib_file", "exit_rule", "threshold", "calibration",
            "skip_passes", "tree")
    try:
        recorded = read_manifest(path, verify=False)["compile"]
    except (SpecEEError, KeyError):
        return False
    want = config.to_dict()
    return all(recorded.get(k) == want.get(k) for k in keys)


def _prompts(s: BenchSettings, engine) -> list[list[int]]:
    if s.prompts == "mtbench":
        texts = resources.mtbench_questions(s.limit)
    elif s.prompts == "sharegpt":
        texts = [e.prompt for e in data.sharegpt(s.limit, skip=SHAREGPT_HELD_OUT)]
    else:
        texts = [e.prompt for e in data.jsonl(s.prompts)][: s.limit]
    ids = [engine.encode(t) for t in texts]
    longest = min(s.max_prompt_tokens, engine.capacity - s.new_tokens)
    kept = [x for x in ids if len(x) <= longest]
    if len(kept) < len(ids):
        logger.warning("left out %d prompts longer than %d tokens", len(ids) - len(kept), longest)
    if not kept:
        raise ConfigError(f"no prompt of {s.prompts} fits the bundle's context with {s.new_tokens} new tokens.")
    return kept


def _perplexity_set(s: BenchSettings, engine) -> list[tuple[list[int], list[int]]]:
    """Held-out ShareGPT (prompt ids, response ids) pairs, the response cut to new_tokens."""
    if not s.ppl_samples:
        return []
    out = []
    for ex in data.sharegpt(4 * s.ppl_samples, skip=SHAREGPT_HELD_OUT):
        prompt = engine.encode(ex.prompt)
        response = engine.tokenizer(ex.response, add_special_tokens=False)["input_ids"][: s.new_tokens]
        if len(prompt) <= MAX_PROMPT_TOKENS and len(response) >= 2:
            out.append((prompt, response))
        if len(out) == s.ppl_samples:
            break
    return out


def _perplexity(engine, samples, head, progress: bool, name: str) -> float:
    nlls = []
    for prompt, response in tqdm(samples, desc=f"perplexity {name}", disable=not progress):
        scored = engine.score(prompt, response)
        nlls += measure.nll(scored.features, head, response)
    return measure.perplexity(nlls) if nlls else float("nan")


@torch.no_grad()
def _perplexity_hf(model, samples) -> float:
    nlls = []
    for prompt, response in samples:
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
        nlls += torch.nn.functional.cross_entropy(logits.double(), torch.tensor(response), reduction="none").tolist()
    return measure.perplexity(nlls)


def _draft_quality(calibration: str) -> dict | None:
    """How the bundle's draft was trained and how often it was right on the calibration's
    held-out text, when that calibration is still on disk."""
    try:
        meta = json.loads((Path(calibration) / META).read_text())
    except (OSError, ValueError):
        return None
    settings = meta["settings"]
    return {"sequences": settings["draft_sequences"], "epochs": settings["draft_epochs"],
            "unroll": settings.get("draft_unroll", 1), "supplied": bool(settings.get("draft_file")),
            **{k: meta["draft"].get(k) for k in ("top1_after_full", "top4_after_full", "top1_depth2")}}


def _agreement(engine, prompts, dense_tokens, progress: bool, name: str) -> float:
    """Teacher-forced: fed the dense greedy prefix, how often does the engine emit the dense token."""
    agree = total = 0
    for ids, ref in tqdm(list(zip(prompts, dense_tokens)), desc=f"teacher-forced {name}", disable=not progress):
        if not ref:
            continue
        predicted = engine.score(ids, ref).predicted
        agree += sum(a == b for a, b in zip(predicted, ref))
        total += len(ref)
    return agree / total if total else float("nan")


def _reference(s: BenchSettings, system: System, hf, prompts, runs, progress: bool) -> dict:
    """The eager reference decoder (calibration's draft, predictors and schedule, the bundle's
    rule, K/V policy and threshold) on the same prompts: the steps where the compiled engine
    emits the same token from the same exit layer. Steps are compared up to a prompt's first
    difference; everything after it counts as different (the contexts no longer match)."""
    from specee_compile.calibrate import load_calibration
    from specee_compile.reference import DecodeSettings, ReferenceDecoder

    engine = system.engine
    spec = engine.manifest.specee
    cal = load_calibration(Path(spec.calibration), hf)
    ref = ReferenceDecoder(hf, cal.draft, cal.bank, cal.schedule,
                           DecodeSettings(rule=spec.rule, kv_policy=spec.kv_policy, threshold=engine.threshold),
                           capacity=engine.capacity)
    same = total = identical = 0
    differences = []
    for k, (ids, run) in enumerate(tqdm(list(zip(prompts, runs)), desc=f"reference {system.name}",
                                        disable=not progress)):
        want = ref.generate(ids, s.new_tokens, eos_ids=engine.eos_token_ids)
        got, expected = list(zip(run.token_ids, run.exit_layers)), list(zip(want.tokens, want.exit_layers))
        agree = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        same += agree
        total += max(len(got), len(expected))
        identical += got == expected
        if got != expected:
            differences.append({"prompt": k, "step": agree,
                                "compiled": list(got[agree]) if agree < len(got) else None,
                                "reference": list(expected[agree]) if agree < len(expected) else None})
    return {"step_agreement": same / max(total, 1), "identical_prompts": identical, "prompts": len(runs),
            "steps": total, "differences": differences}


def _profile(s: BenchSettings, system: System, prompts, out: Path, progress: bool) -> dict:
    """Predictor and exit-check shares of segment time, from ONNX Runtime's per-node profile."""
    if not s.profile_prompts:
        return {}
    engine = load(system.settings["path"], threads=s.threads, verify=False, threshold=system.engine.threshold,
                  profile_dir=out / "profiles" / system.name)
    for ids in tqdm(prompts[: s.profile_prompts], desc=f"profile {system.name}", disable=not progress):
        engine.generate(ids, max_new_tokens=s.new_tokens)
    traces = engine.end_profiling()
    return measure.profile_node_shares(traces[2:])  # step (prefill), draft, then the segments


def _context_costs(s: BenchSettings, system: System, dense_engine, prompts, out: Path, progress: bool,
                   repeats: int = 20) -> dict:
    """What one tree forward costs against the context length: at each ``verify_contexts`` n
    (the prompts run together, cut to n tokens), the dense bundle's median step and the tree
    graph's median forward per tree size, also in dense steps, timed in turn (a dense step,
    then one forward of each size, ``repeats`` times) so a slow spell of the machine weighs on
    all of them. With ``profile_prompts``, ONNX Runtime's per-operator time (ms per forward) of
    the dense step and of a tree as large as the system's shape, each at every n."""
    from specee_compile.runtimes.tree_choice import nodes

    text = [t for ids in prompts for t in ids]
    text = text * (max(s.verify_contexts) // max(len(text), 1) + 1)
    capacity, rows, fits = system.engine.capacity, {}, []
    for n in tqdm(s.verify_contexts, desc=f"context costs {system.name}", disable=not progress):
        sizes = [k for k in s.tree_sizes if n + max(k, repeats + 1) <= capacity]
        if not sizes:
            rows[str(n)] = {"skipped": f"{n} tokens leave no room in the cache ({capacity})"}
            continue
        fits.append((n, min(nodes(system.engine.shape), max(sizes))))
        dense, curve = timed_in_turn(dense_engine, system.engine, text[:n], sizes, repeats)
        rows[str(n)] = {"dense_step_ms": 1000 * dense, "verification_ms": {str(k): 1000 * v for k, v in curve.items()},
                        "dense_steps": {str(k): v / dense for k, v in curve.items()}}
    if s.profile_prompts and fits:
        rows["operators"] = _context_profile(system, fits, text, out / "profiles" / f"context-{system.name}", repeats)
    return rows


def _context_profile(system: System, fits: list[tuple[int, int]], text: list[int], folder: Path,
                     repeats: int) -> dict:
    """ONNX Runtime's per-operator ms per forward of the step graph's decode step and of the
    tree graph's forward over ``size`` nodes, at each (n, size) of ``fits``."""
    path = system.settings["path"]
    dense = load(path, verify=False, dense=True, profile_dir=folder / "dense")
    tree = load(path, verify=False, tree=str(system.engine.shape), profile_dir=folder / "tree")
    for n, size in fits:
        timed_in_turn(dense, tree, text[:n], [size], repeats)
    step_runs = measure.operator_times(Path(dense.decoder.backend.session.end_profiling()))  # per n: prefill, steps
    tree_runs = measure.operator_times(Path(tree.decoder.backend.tree.end_profiling()))
    rows = {}
    for i, (n, size) in enumerate(fits):
        steps = step_runs[i * (repeats + 2) + 2:(i + 1) * (repeats + 2)]  # the prefill and the first step left out
        forwards = tree_runs[i * (repeats + 1) + 1:(i + 1) * (repeats + 1)]
        rows[str(n)] = {"tree_nodes": size, "dense_step": measure.mean_operators(steps),
                        "tree_forward": measure.mean_operators(forwards)}
    return rows


def _head_seconds(head, reduced_vocab: int, repeats: int = 50) -> tuple[float, float]:
    """Median time of the LM-head product alone (a Gemm with the head weight, then ArgMax, as
    the compiled graphs do it) in ONNX Runtime: the full head and the draft's reduced one."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from specee_compile.runtimes.backends.ort import session_options

    times = []
    for rows in (head, head[:reduced_vocab]):
        graph = helper.make_graph(
            [helper.make_node("Gemm", ["x", "w"], ["logits"], transB=1),
             helper.make_node("ArgMax", ["logits"], ["token"], axis=-1)], "head",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows.shape[1]])],
            [helper.make_tensor_value_info("token", TensorProto.INT64, [1, 1])],
            [numpy_helper.from_array(np.ascontiguousarray(rows, np.float32), "w")])
        session = ort.InferenceSession(helper.make_model(graph).SerializeToString(), session_options(),
                                       providers=["CPUExecutionProvider"])
        feed = {"x": np.random.default_rng(0).standard_normal((1, rows.shape[1])).astype(np.float32)}
        session.run(None, feed)
        laps = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feed)
            laps.append(time.perf_counter() - start)
        times.append(statistics.median(laps))
    return times[0], times[1]


def _sweep(s: BenchSettings, systems: list[System], prompts, dense_tokens, progress: bool) -> list[dict]:
    """Speed (interleaved with the dense bundle) and teacher-forced agreement per threshold."""
    dense = next(x for x in systems if x.name == "dense")
    spec = next(x for x in systems if x.kind == "specee")
    engine, default = spec.engine, spec.engine.threshold
    prompts, refs = prompts[: s.sweep_prompts], dense_tokens[: s.sweep_prompts]
    order = ["dense", *s.sweep]
    runs: dict = {t: [] for t in order}
    try:
        for k, ids in enumerate(tqdm(prompts, desc=f"sweep {spec.name}", disable=not progress)):
            turn = k % len(order)
            for t in order[turn:] + order[:turn]:
                if t == "dense":
                    runs[t].append(dense.generate(ids))
                else:
                    engine.threshold = t
                    runs[t].append(spec.generate(ids))
        rows = []
        for t in s.sweep:
            engine.threshold = t
            rows.append({"system": spec.name, "threshold": t, **measure.speed(runs[t]),
                         "speedup_vs_dense": measure.paired_ratio(runs[t], runs["dense"]),
                         "teacher_forced_agreement": _agreement(engine, prompts, refs, False, spec.name),
                         **measure.agreement_free_running(runs[t], refs),
                         "mean_executed_layers": measure.exits(runs[t], engine.num_layers)["mean_executed_layers"]})
    finally:
        engine.threshold = default
    return rows


def _command() -> str:
    return " ".join(["specee-bench", *sys.argv[1:]]) if Path(sys.argv[0]).name == "specee-bench" else \
        " ".join(sys.argv)


def _machine(threads, shared: bool) -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
            "threads": threads, "thread_pool": "shared" if shared else "per-session",
            "python": platform.python_version()}


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False
