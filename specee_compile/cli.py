"""Command lines: ``specee-compile`` and ``specee-run``. Argparse only; the work is in the API."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from specee_compile import __version__
from specee_compile.errors import SpecEEError


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)


def _run(main, args) -> int:
    try:
        return main(args)
    except SpecEEError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing partial was kept.", file=sys.stderr)
        return 130


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors, no progress bars")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specee-compile",
        description="Compile a Hugging Face causal LM into an engine bundle.",
    )
    p.add_argument("model", help="model directory, .gguf file, or built-in name (smollm2)")
    p.add_argument("--out", required=True, help="bundle to write: NAME.onnx (ONNX Runtime) or NAME.plan (TensorRT)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle once the new one is complete")
    p.add_argument("--max-context", type=int, default=2048, help="KV-cache capacity in tokens (default 2048)")
    p.add_argument("--opt", choices=["O0", "O1"], default="O1", help="O0: export only; O1: + ORT fusions")
    p.add_argument("--skip-pass", action="append", default=[], metavar="NAME", help="skip a pass by name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    _common(p)
    return p


def _compile_main(args) -> int:
    from specee_compile.compiler import compile as compile_bundle
    from specee_compile.config import CompileConfig, with_overrides

    config = CompileConfig(
        model=args.model, out=args.out, max_context=args.max_context, opt_level=args.opt,
        force=args.force, skip_passes=tuple(args.skip_pass),
    )
    config = with_overrides(config, args.set)
    if not args.quiet:
        print("specee-compile " + json.dumps(config.to_dict()), file=sys.stderr)
    out = compile_bundle(config, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
    return 0


def compile_main(argv=None) -> int:
    args = compile_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return _run(_compile_main, args)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specee-run", description="Generate text with a compiled bundle.")
    p.add_argument("bundle", help="bundle directory written by specee-compile")
    p.add_argument("--prompt", required=True, help="prompt text (the chat template is applied for instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    _common(p)
    return p


def _run_main(args) -> int:
    from specee_compile.runtimes import load

    engine = load(args.bundle, threads=args.threads)
    result = engine.generate(
        args.prompt, max_new_tokens=args.max_new_tokens, chat=False if args.no_chat else None,
        stream=None if args.quiet else lambda s: print(s, end="", flush=True),
    )
    if args.quiet:
        print(result.text)
    else:
        print()
    print(
        f"[{len(result.token_ids)} tokens, stop: {result.stop_reason}, "
        f"decode {result.decode_tokens_per_second:.1f} tok/s, "
        f"time to first token {result.time_to_first_token * 1000:.0f} ms]",
        file=sys.stderr,
    )
    return 0


def run_main(argv=None) -> int:
    args = run_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return _run(_run_main, args)
