"""Decode speed side by side in one run: dense bundle vs transformers eager vs ORT GenAI,
and a SpecEE bundle when ``--specee BUNDLE`` is given.

For every prompt the three systems run back to back in a rotating order, so machine noise
hits each alike; ratios are computed only between numbers from this run. Usage:

    python benchmarks/dense_speed.py --model smollm2 --prompts 20 --new-tokens 128 --out bench-results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specee_compile import resources
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.load import resolve
from specee_compile.runtimes import load


class _Clock:
    """A transformers streamer that records when the first generated token arrives."""

    def __init__(self):
        self.calls = 0
        self.first_token_at = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


def run_hf(model, ids, new_tokens, eos):
    clock = _Clock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos[0], streamer=clock)
    end = time.perf_counter()
    tokens = out.shape[1] - len(ids)
    return {"tokens": tokens, "ttft": clock.first_token_at - start,
            "decode_tps": (tokens - 1) / (end - clock.first_token_at)}


def run_bundle(engine, ids, new_tokens):
    g = engine.generate(ids, max_new_tokens=new_tokens)
    return {"tokens": len(g.token_ids), "ttft": g.time_to_first_token, "decode_tps": g.decode_tokens_per_second,
            "token_ids": g.token_ids, "exit_layers": g.exit_layers}


def build_genai(model_dir: Path, out: Path, threads: int) -> Path:
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(model_dir),
                        "-i", str(model_dir), "-o", str(out), "-p", "fp32", "-e", "cpu",
                        "-c", str(out) + ".cache"], check=True, capture_output=True)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def run_genai(og, model, ids, new_tokens):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    start = time.perf_counter()
    gen.append_tokens([ids])
    gen.generate_next_token()
    first = time.perf_counter()
    tokens = 1
    while not gen.is_done():
        gen.generate_next_token()
        tokens += 1
    end = time.perf_counter()
    return {"tokens": tokens, "ttft": first - start,
            "decode_tps": (tokens - 1) / (end - first) if tokens > 1 else float("nan")}


def summarize(rows: list[dict]) -> dict:
    tps = [r["decode_tps"] for r in rows]
    q = statistics.quantiles(tps, n=4) if len(tps) > 1 else [tps[0]] * 3
    return {"decode_tps_median": statistics.median(tps), "decode_tps_q1": q[0], "decode_tps_q3": q[2],
            "ttft_median_ms": 1000 * statistics.median(r["ttft"] for r in rows),
            "tokens_total": sum(r["tokens"] for r in rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=20, help="first N MT-Bench questions")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--specee", default=None, metavar="BUNDLE", help="also run this SpecEE bundle")
    ap.add_argument("--no-hf", action="store_true", help="leave out transformers eager (slow)")
    ap.add_argument("--no-genai", action="store_true", help="leave out ONNX Runtime GenAI")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    model_dir = resolve(args.model)
    bundle = out / "dense.onnx"
    if not bundle.is_dir():
        compile_bundle(CompileConfig(model=args.model, out=bundle, max_context=1024))
    engine = load(bundle, threads=args.threads)
    eos = sorted(engine.eos_token_ids)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    systems = {"specee_dense_bundle": lambda ids: run_bundle(engine, ids, args.new_tokens)}
    if not args.no_hf:
        systems["transformers_eager"] = lambda ids: run_hf(hf, ids, args.new_tokens, eos)
    if args.specee:
        spec_engine = load(args.specee, threads=args.threads)
        systems["specee_bundle"] = lambda ids: run_bundle(spec_engine, ids, args.new_tokens)
    try:
        import onnxruntime_genai as og

        if not args.no_genai:
            genai_model = og.Model(str(build_genai(model_dir, out / "genai", args.threads)))
            systems["ort_genai"] = lambda ids: run_genai(og, genai_model, ids, args.new_tokens)
    except ImportError:
        print("onnxruntime-genai is not installed; skipping it", file=sys.stderr)

    prompts = [engine.encode(q) for q in resources.mtbench_questions(args.prompts)]
    for ids in prompts[: args.warmup]:
        for run in systems.values():
            run(ids)
    rows: dict[str, list[dict]] = {name: [] for name in systems}
    names = list(systems)
    for k, ids in enumerate(tqdm(prompts, desc="prompts")):
        order = names[k % len(names):] + names[: k % len(names)]  # rotate who goes first
        for name in order:
            rows[name].append({"prompt": k, **systems[name](ids)})

    summary = {name: summarize(r) for name, r in rows.items()}
    if "specee_bundle" in rows:
        dense_rows, spec_rows = rows["specee_dense_bundle"], rows["specee_bundle"]
        layers = [e + 1 for r in spec_rows for e in r["exit_layers"][1:]]
        pairs = [(d["token_ids"], s["token_ids"]) for d, s in zip(dense_rows, spec_rows)]
        summary["specee_bundle"].update(
            mean_executed_layers=sum(layers) / max(len(layers), 1),
            exit_histogram={str(k): v for k, v in sorted(_count([e for r in spec_rows for e in r["exit_layers"][1:]]).items())},
            exact_match_vs_dense=sum(a == b for a, b in pairs) / len(pairs),
            mean_first_divergence=statistics.mean(
                next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in pairs),
        )
    base = summary["specee_dense_bundle"]["decode_tps_median"]
    for name, s in summary.items():
        s["ratio_vs_dense_bundle"] = s["decode_tps_median"] / base
        paired = [b["decode_tps"] / r["decode_tps"] for b, r in zip(rows["specee_dense_bundle"], rows[name])]
        s["dense_bundle_over_this_paired_median"] = statistics.median(paired)
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": __import__("os").cpu_count(), "threads": args.threads},
        "versions": {p: metadata.version(p) for p in ("torch", "transformers", "onnxruntime", "onnxscript")
                     if _installed(p)} | ({"onnxruntime-genai": metadata.version("onnxruntime-genai")}
                                          if _installed("onnxruntime-genai") else {}),
        "settings": vars(args), "summary": summary, "rows": rows,
    }
    (out / "dense_speed.json").write_text(json.dumps(report, indent=2))
    lines = ["| system | decode tok/s (median) | IQR | TTFT ms | dense bundle / this (paired median) |",
             "|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['decode_tps_median']:.1f} | {s['decode_tps_q1']:.1f}-{s['decode_tps_q3']:.1f} "
                     f"| {s['ttft_median_ms']:.0f} | {s['dense_bundle_over_this_paired_median']:.2f}x |")
    if "specee_bundle" in summary:
        s = summary["specee_bundle"]
        lines.append(f"\nSpecEE: mean executed layers {s['mean_executed_layers']:.2f}, exact match vs dense "
                     f"{s['exact_match_vs_dense']:.0%}, mean first divergence {s['mean_first_divergence']:.1f}, "
                     f"exit histogram {s['exit_histogram']}")
    table = "\n".join(lines)
    (out / "dense_speed.md").write_text(table + "\n")
    print(table)
    return 0


def _count(items):
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
