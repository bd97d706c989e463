"""Command lines: ``specee-compile``, ``specee-run``, ``specee-calibrate`` and ``specee-bench``.
Argparse only; the work is in the API."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import reprlib
import signal
import sys
import threading

from specee_compile import __version__
from specee_compile.errors import SpecEEError, disk_full


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT, raised in the main thread so that ``finally`` blocks clean up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise():
    """Turn SIGTERM and SIGINT into :class:`Interrupted` while the command runs.

    Python's default SIGTERM action kills the process without unwinding, which would leave
    temporary folders behind. The first signal raises; later ones are ignored so that the
    cleanup it starts is not cut short. The previous handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    received = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)  # None: set outside Python


def _run(main, args) -> int:
    with _signals_raise():
        try:
            return main(args)
        except SpecEEError as e:
            if args.verbose:
                raise
            print(f"error: {terminal_safe(str(e))}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            from tqdm import tqdm

            signum = getattr(e, "signum", signal.SIGINT)
            name = signal.Signals(signum).name
            # tqdm.write clears a progress bar left open by the interruption: the message gets its own line.
            tqdm.write(f"interrupted by {name}; nothing partial was kept. Run the command again.", file=sys.stderr)
            return 128 + signum
        except BrokenPipeError:
            # The reader went away (`specee-run ... | head`): stop quietly, as command-line tools do.
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python's exit flush must not raise again)
            return 128 + signal.SIGPIPE
        except Exception as e:  # not a SpecEEError: one line all the same, a traceback only with -v
            if args.verbose:
                raise
            print(f"error: {_unexpected(e)}", file=sys.stderr)
            return 1


def _unexpected(e: Exception) -> str:
    """The one-line message for an error that is not a SpecEEError."""
    if isinstance(e, MemoryError):
        return (f"out of memory ({e or 'an allocation failed'}). Free memory, use a smaller model, a smaller "
                "--max-context, or a machine with more memory.")
    if disk_full(e):
        return (f"the disk is full ({reprlib.repr(str(e))}). Free disk space (or point "
                "--out and XDG_CACHE_HOME at a disk with room), then run the command again.")
    if isinstance(e, OSError):
        return (f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}. Check the path, its permissions and "
                "the free disk space, then run the command again.")
    return (f"internal error ({type(e).__name__}: {reprlib.repr(str(e))}). This is a bug in specee-compile "
            f"{__version__}: run the command again with -v for the traceback and report it.")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors, no progress bars")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


THREAD_POOL_HELP = ("shared (default): every ONNX Runtime session of the process runs in one thread pool, which "
                    "keeps a SpecEE engine's several sessions per step warm; per-session: a pool each")


def _thread_pool(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--thread-pool", choices=("shared", "per-session"), default="shared", help=THREAD_POOL_HELP)


def compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specee-compile",
        description="Compile a Hugging Face causal LM into an engine bundle.",
    )
    p.add_argument("model", nargs="?", help="model directory, .gguf file, or built-in name (smollm2)")
    p.add_argument("--out", help="bundle to write: NAME.onnx (ONNX Runtime) or NAME.plan / NAME.engine (TensorRT)")
    p.add_argument("--backend", choices=["ort", "trt"], default="",
                   help="ort (ONNX Runtime) or trt (TensorRT; needs tensorrt and an NVIDIA GPU); default: from --out")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="",
                   help="TensorRT engine precision (default fp16); ONNX Runtime bundles are fp32")
    p.add_argument("--check", choices=["trt"], default="",
                   help="trt: emit TensorRT-ready graphs (standard ONNX attention, no ORT fusions) and check every "
                        "graph against TensorRT 10's ONNX parser; implied by a TensorRT --out")
    p.add_argument("--quant", choices=["fp32", "int8", "int4", "gguf"], default="fp32",
                   help="weight precision: int8/int4 (ONNX Runtime's block quantizer, MatMulNBits), gguf (keep a GGUF's "
                        "own Q4_0/Q4_1/Q8_0 blocks exactly, re-quantize the rest), fp32 (default)")
    p.add_argument("--quant-head", choices=["fp32", "int8", "int4", "gguf"], default="",
                   help="the LM head's precision (default: as --quant; a tied embedding follows it)")
    p.add_argument("--quant-embedding", choices=["fp32", "int8", "int4", "gguf"], default="",
                   help="the embedding's precision (default: as the head)")
    p.add_argument("--quant-draft", choices=["fp32", "int8", "int4"], default="",
                   help="the SpecEE draft graphs' weight precision (default: int8 for the tree draft, whose tokens the "
                        "target verifies, and --quant's for the autoregressive draft, whose candidates decide exits)")
    p.add_argument("--quant-block", type=int, default=0,
                   help="int4/int8 block size (default 32; TensorRT-ready graphs: 128, or 64 where 128 does not "
                        "divide a weight's inputs)")
    p.add_argument("--quant-asymmetric", action="store_true",
                   help="int4/int8 blocks with zero points (default: symmetric, no zero points)")
    p.add_argument("--accuracy-level", type=int, choices=[0, 4], default=4,
                   help="MatMulNBits activations: 4 int8 (default), 0 fp32")
    p.add_argument("--gguf", default=None, metavar="FILE.gguf",
                   help="with --quant gguf: the GGUF whose blocks to keep (default: MODEL when it is a .gguf or built-in)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle once the new one is complete")
    p.add_argument("--max-context", type=int, default=2048, help="KV-cache capacity in tokens (default 2048)")
    p.add_argument("--opt", choices=["O0", "O1"], default="O1", help="O0: export only; O1: + ORT fusions")
    p.add_argument("--skip-pass", action="append", default=[], metavar="NAME",
                   help="skip a pass by name in every graph family, or in one as FAMILY:NAME (see --list-passes)")
    p.add_argument("--specee", action="store_true",
                   help="build the SpecEE early-exit graphs too (calibrates first, cached)")
    p.add_argument("--calib", default=None, metavar="FILE.jsonl", help="calibration prompts (default: ShareGPT)")
    p.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="with --specee: size the calibration's draft text to fit MINUTES on this machine")
    p.add_argument("--exit-rule", choices=["full", "reduced", "draft"], default="full",
                   help="check at an exit: full LM head (paper), the draft's reduced vocabulary, or none")
    p.add_argument("--threshold", type=float, default=0.0, help="predictor threshold (default: calibrated)")
    p.add_argument("--exit-mode", choices=["segments", "graph"], default=None,
                   help="with --specee: segments (one graph per block of layers, the runtime stops at the first "
                        "exit; default) or graph (one decode graph with a nested If exit after every predictor)")
    p.add_argument("--tree", action="store_true",
                   help="with --specee: also export the tree verification graph for lossless tree speculation "
                        "(specee-run --tree; a TensorRT output builds engines of it and of the tree draft) and, in an "
                        "ONNX Runtime bundle with exit mode segments, its segments with per-node predictors for early "
                        "exit inside verification (specee-run --tree SHAPE:exit); the bundle's default shape is "
                        "the candidate measured fastest on this machine")
    p.add_argument("--tree-shape", default="", metavar="SHAPE",
                   help="with --tree: the bundle's default tree shape, without measuring (e.g. 1x1x1+4)")
    p.add_argument("--list-passes", action="store_true",
                   help="print the pass pipeline of every graph family these options emit, and exit")
    p.add_argument("--dump-ir", default=None, metavar="DIR",
                   help="write every graph's text IR after every phase to DIR/FAMILY/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    _common(p)
    return p


def _compile_main(args) -> int:
    from specee_compile.compiler import compile as compile_bundle
    from specee_compile.config import CompileConfig, with_overrides

    config = CompileConfig(
        model=args.model, out=args.out, max_context=args.max_context, opt_level=args.opt,
        force=args.force, skip_passes=tuple(args.skip_pass), dump_ir=args.dump_ir,
        specee=args.specee, calib_file=args.calib, budget=args.budget, exit_rule=args.exit_rule, threshold=args.threshold,
        exit_mode=args.exit_mode or "segments", tree=args.tree, tree_shape=args.tree_shape, backend=args.backend, precision=args.precision,
        check=args.check, quant=args.quant, quant_head=args.quant_head, quant_embedding=args.quant_embedding,
        quant_draft=args.quant_draft, quant_block=args.quant_block, quant_symmetric=not args.quant_asymmetric, accuracy_level=args.accuracy_level,
        gguf=args.gguf,
    )
    config = with_overrides(config, args.set)
    if not args.quiet:
        print("specee-compile " + json.dumps(config.to_dict()), file=sys.stderr)
    out = compile_bundle(config, progress=not args.quiet)
    if not args.quiet:
        manifest = json.loads((out / "manifest.json").read_text())
        quant = manifest.get("quant") or {}
        families: dict[str, dict[str, int]] = {}  # segments[0], segments[1], ... summed as segments
        for graph, stored in quant.get("weights_stored", {}).items():
            counts = families.setdefault(graph.split("[")[0], {})
            for how, n in stored.items():
                counts[how] = counts.get(how, 0) + n
        for family, weights in ((manifest.get("specee") or {}).get("draft_weights") or {}).items():
            if weights["stored"] and family not in families:  # a quantized draft in an fp32 bundle
                families[family] = weights["stored"]
        for family, counts in families.items():
            print(f"{family} weights: " + ", ".join(f"{n} {how}" for how, n in counts.items()), file=sys.stderr)
        if "gguf" in quant:
            g = quant["gguf"]
            print(f"GGUF {g['file']}: {len(g['kept'])} tensors kept as they are stored "
                  f"({', '.join(f'{n} {f}' for f, n in g['formats'].items())})"
                  + (f"; not kept: {', '.join(f'{t} ({f})' for t, f in g['not_kept'].items())}" if g["not_kept"]
                     else ""), file=sys.stderr)
        tree = (manifest.get("specee") or {}).get("tree") or {}
        if "choice" in tree:
            print(_tree_choice_line(tree), file=sys.stderr)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _tree_choice_line(tree: dict) -> str:
    choice = tree["choice"]
    if "given" in choice:
        return f"default tree shape: {choice['given']} (given)"
    if not tree.get("default_shape"):
        from specee_compile.runtimes.speculation import DEFAULT_TREE

        return f"default tree shape: not measured ({choice.get('reason')}); runs {DEFAULT_TREE}"
    rows = ", ".join(f"{r['shape']} {r['predicted_speedup']:.2f}x" for r in choice["candidates"])
    line = (f"default tree shape: {tree['default_shape']}, the highest predicted speed-up over dense on this machine "
            f"({rows})")
    if max(r["predicted_speedup"] for r in choice["candidates"]) < 1:
        line += ("\nwarning: no tree shape is predicted faster than this bundle's dense decoding here; decode "
                 "without --tree (each tree forward costs more dense steps than the tokens it emits)")
    return line


def compile_main(argv=None) -> int:
    parser = compile_parser()
    args = parser.parse_args(argv)
    if args.list_passes:
        from specee_compile.passes import default_plan

        trt = args.check == "trt" or args.backend == "trt" or str(args.out or "").endswith((".plan", ".engine"))
        from specee_compile.quant import QuantSpec

        print(default_plan(args.opt, "trt" if trt else "ort", args.specee, args.tree and args.specee,
                           args.exit_mode or "segments", quant=QuantSpec(args.quant)).describe())
        return 0
    if not args.model or not args.out:
        parser.error("MODEL and --out are required (or use --list-passes)")
    if args.exit_mode and not args.specee:
        parser.error(f"--exit-mode {args.exit_mode} applies to SpecEE bundles only: add --specee, or drop --exit-mode")
    _setup_logging(args.verbose, args.quiet)
    return _run(_compile_main, args)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specee-run", description="Generate text with a compiled bundle.")
    p.add_argument("bundle", help="bundle directory written by specee-compile")
    p.add_argument("--prompt", required=True, help="prompt text (the chat template is applied for instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--show-exits", action="store_true", help="annotate every token with its exit layer")
    p.add_argument("--no-exit", action="store_true", help="run a SpecEE bundle densely (no early exit)")
    p.add_argument("--verify", action="store_true",
                   help="hash every file of the bundle against its manifest (default: hash once, then trust a "
                        "record of that check while each file's size, mtime, ctime and inode are unchanged)")
    p.add_argument("--threshold", type=float, default=None,
                   help="a SpecEE bundle's exit threshold (default: the calibrated one in its manifest)")
    p.add_argument("--tree", nargs="?", const=True, default=None, metavar="SHAPE",
                   help="lossless tree speculation (a SpecEE bundle compiled with --tree) with trees of draft tokens "
                        "WIDTHxDEPTHxBUDGET (e.g. 4x2x6; one number W is Wx1xW), +L for L context-lookup nodes "
                        "(e.g. 4+4), :exit for early exit inside verification (lossy, e.g. 1+4:exit; --threshold "
                        "sets its threshold); alone: the measured default")
    _thread_pool(p)
    _common(p)
    return p


def _run_main(args) -> int:
    from specee_compile.runtimes import check_threads, load, share_threads

    check_threads(args.threads)
    if args.thread_pool == "shared":
        share_threads(args.threads)
    engine = load(args.bundle, threads=args.threads, dense=args.no_exit, threshold=args.threshold,
                  tree=args.tree, verify="full" if args.verify else "cached")
    out = terminal_safe if sys.stdout.isatty() else str
    result = engine.generate(
        args.prompt, max_new_tokens=args.max_new_tokens, chat=False if args.no_chat else None,
        stream=None if args.quiet or args.show_exits else lambda s: print(out(s), end="", flush=True),
    )
    if args.show_exits:
        print(out(annotate_exits(engine.tokenizer, result.token_ids, result.exit_layers, engine.num_layers)))
    elif args.quiet:
        print(out(result.text))
    else:
        print()
    if result.accepted_lengths:
        mean = sum(result.accepted_lengths) / len(result.accepted_lengths)
        layers = ""
        if engine.shape.exits:
            layers = f", mean executed layers {sum(e + 1 for e in result.exit_layers) / len(result.exit_layers):.2f}"
        print(f"[tree {engine.shape}: {mean:.2f} tokens per target forward{layers}]", file=sys.stderr)
    elif result.exit_layers and not args.no_exit and engine.manifest.specee is not None:
        mean = sum(e + 1 for e in result.exit_layers) / len(result.exit_layers)
        print(f"[mean executed layers {mean:.2f} of {engine.num_layers}]", file=sys.stderr)
    speed = (f"decode {result.decode_tokens_per_second:.1f} tok/s" if result.decode_steps > 0
             else "no decode step after the first token")
    print(
        f"[{len(result.token_ids)} tokens, stop: {result.stop_reason}, {speed}, "
        f"time to first token {result.time_to_first_token * 1000:.0f} ms]",
        file=sys.stderr,
    )
    return 0


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """``text`` with control characters other than newline and tab shown as \\xNN escapes.

    Generated text comes from a bundle's tokenizer, which could map tokens to terminal escape
    sequences (moving the cursor, setting the window title, writing the clipboard); a terminal
    gets them as visible escapes instead.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def annotate_exits(tokenizer, tokens: list[int], exits: list[int], num_layers: int) -> str:
    """Text with each early-exited token followed by its exit layer, e.g. ``Paris⁽²¹⁾``."""
    sup = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
    parts = []
    for token, layer in zip(tokens, exits):
        piece = tokenizer.decode([token], skip_special_tokens=True)
        parts.append(piece if layer == num_layers - 1 else f"{piece}⁽{str(layer).translate(sup)}⁾")
    return "".join(parts)


def run_main(argv=None) -> int:
    args = run_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return _run(_run_main, args)


def calibrate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specee-calibrate",
        description="Train the draft and exit predictors of MODEL and choose the schedule (cached).",
    )
    p.add_argument("model", help="model directory, .gguf file, or built-in name (smollm2)")
    p.add_argument("--calib", default=None, metavar="FILE.jsonl", help="calibration prompts (default: ShareGPT)")
    p.add_argument("--draft", default=None, metavar="FILE.safetensors",
                   help="use this trained draft instead of training one (this project's draft layout)")
    p.add_argument("--recalibrate", action="store_true", help="ignore a cached calibration and train again")
    p.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="size the draft's training text to fit MINUTES on this machine (measured first)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a calibration setting")
    p.add_argument("--evaluate", type=int, default=0, metavar="N",
                   help="then measure quality on the first N MT-Bench questions (teacher-forced sweep)")
    p.add_argument("--free-running", type=int, default=0, metavar="M",
                   help="also decode the first M of them free-running with every rule and KV policy")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per question for --evaluate")
    p.add_argument("--dense-bundle", default=None,
                   help="a compiled bundle (dense, or SpecEE: its dense graph) for fast dense-greedy references")
    _common(p)
    return p


def _calibrate_main(args) -> int:
    from specee_compile.calibrate import CalibrationSettings, calibrate
    from specee_compile.calibrate.report import format_report
    from specee_compile.config import apply_overrides

    settings = apply_overrides(CalibrationSettings(calib_file=args.calib, draft_file=args.draft,
                                                   budget_minutes=args.budget), args.set,
                               frozen=("calib_file", "draft_file", "budget_minutes"))
    out = calibrate(args.model, settings, force=args.recalibrate, progress=not args.quiet)
    print(format_report(out), file=sys.stderr if args.quiet else sys.stdout)
    print(f"calibration: {out}", file=sys.stderr)
    if args.evaluate > 0:
        from specee_compile.calibrate.report import evaluate_and_report

        print(evaluate_and_report(args.model, out, args.evaluate, args.free_running, args.new_tokens,
                                  args.dense_bundle, progress=not args.quiet))
    return 0


def calibrate_main(argv=None) -> int:
    args = calibrate_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return _run(_calibrate_main, args)


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specee-bench",
        description="Speed and quality of SpecEE bundles side by side with the dense bundle, transformers eager "
                    "and ONNX Runtime GenAI, in one interleaved run; writes report.json, report.md and PNG plots.",
    )
    p.add_argument("model", help="model directory, .gguf file, or built-in name (smollm2), as specee-compile takes it")
    p.add_argument("--bundle", action="append", default=[], metavar="PATH",
                   help="a compiled bundle to measure (repeatable; SpecEE bundles, at most one dense)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE,...",
                   help="compile a SpecEE bundle with these overrides and measure it (repeatable); with neither "
                        "--bundle nor --config, one is compiled with the defaults")
    p.add_argument("--prompts", default="mtbench", help="mtbench (default), sharegpt (held out) or a JSONL file")
    p.add_argument("--limit", type=int, default=80, help="number of prompts (default 80: all of MT-Bench)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="leave out prompts longer than this (default 512); raise it to time long contexts, up to the "
                        "bundle's capacity less --new-tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per prompt and system")
    p.add_argument("--warmup", type=int, default=2, help="prompts run once untimed first")
    p.add_argument("--threads", type=int, default=2, help="threads for every system")
    p.add_argument("--no-transformers", action="store_true", help="leave out transformers eager (the slowest)")
    p.add_argument("--no-genai", action="store_true", help="leave out ONNX Runtime GenAI")
    p.add_argument("--no-llama-cpp", action="store_true",
                   help="leave out llama.cpp (run with --quantized on a GGUF model when llama-cpp-python is installed)")
    p.add_argument("--quantized", action="append", default=[], metavar="PATH",
                   help="a dense bundle compiled with --quant to measure next to the fp32 one (repeatable); adds "
                        "ONNX Runtime GenAI's own int4 build of the model")
    p.add_argument("--sweep", default="", metavar="T1,T2,...", help="thresholds for the speed/agreement frontier")
    p.add_argument("--sweep-prompts", type=int, default=20, help="prompts per sweep threshold")
    p.add_argument("--ppl-samples", type=int, default=40, help="held-out ShareGPT responses for perplexity")
    p.add_argument("--profile-prompts", type=int, default=3, help="prompts run under the ONNX Runtime profiler")
    p.add_argument("--reference", action="store_true",
                   help="also run the eager reference decoder (PyTorch; slow) on the prompts and report on how many "
                        "steps each SpecEE bundle emits the same token from the same exit layer")
    p.add_argument("--tree", default="", metavar="SHAPE1,SHAPE2,...",
                   help="also time tree speculation with trees of these shapes (WIDTHxDEPTHxBUDGET, or a width W "
                        "for Wx1xW; +L context lookup; :exit for early exit inside verification), with every "
                        "SpecEE bundle compiled with --tree (named tree-SHAPE@BUNDLE when there are several)")
    p.add_argument("--verify-contexts", default="", metavar="N1,N2,...",
                   help="with --tree: also time one tree forward per tree size against the dense step after N tokens "
                        "of context (e.g. 100,500,1000), with ONNX Runtime's per-operator time of both unless "
                        "--profile-prompts 0")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 prompts x 16 tokens, quick calibration, small sweep, no GenAI")
    p.add_argument("--out", default="bench-results", help="folder for the report, plots and compiled bundles")
    p.add_argument("--force", action="store_true", help="replace a report already in --out")
    _thread_pool(p)
    _common(p)
    return p


def _bench_main(args) -> int:
    from pathlib import Path

    from specee_compile.bench import BenchSettings, run
    from specee_compile.errors import ConfigError

    try:
        sweep = tuple(float(t) for t in args.sweep.split(",") if t.strip())
    except ValueError as e:
        raise ConfigError(f"--sweep takes comma-separated thresholds like 0.5,0.7,0.9 ({e}).") from e
    try:
        contexts = tuple(int(n) for n in args.verify_contexts.split(",") if n.strip())
    except ValueError as e:
        raise ConfigError(f"--verify-contexts takes comma-separated token counts like 100,500,1000 ({e}).") from e
    from specee_compile.runtimes.tree import TreeShape

    shapes = tuple(TreeShape.parse(t) for t in args.tree.split(",") if t.strip())
    settings = BenchSettings(
        model=args.model, out=Path(args.out), bundles=tuple(args.bundle), configs=tuple(args.config),
        prompts=args.prompts, limit=args.limit,
        **({} if args.max_prompt_tokens is None else {"max_prompt_tokens": args.max_prompt_tokens}),
        new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
        threads=args.threads, transformers=not args.no_transformers, genai=not args.no_genai,
        llama_cpp=not args.no_llama_cpp, sweep=sweep, sweep_prompts=args.sweep_prompts, ppl_samples=args.ppl_samples, profile_prompts=args.profile_prompts,
        quick=args.quick, force=args.force, shared_threads=args.thread_pool == "shared",
        reference=args.reference, tree_shapes=shapes, quantized=tuple(args.quantized),
        verify_contexts=contexts)
    run(settings, progress=not args.quiet)
    out = Path(args.out)
    print((out / "report.md").read_text() if not args.quiet else "", end="")
    print(f"report: {out / 'report.md'} (and report.json, plots)", file=sys.stderr)
    return 0


def bench_main(argv=None) -> int:
    args = bench_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return _run(_bench_main, args)


if __name__ == "__main__":  # python -m specee_compile.cli MODEL --out NAME.onnx
    sys.exit(compile_main())
