"""Teacher-forced agreement with the fp32 bundle and decode speed of `gguf` bundle variants that
differ only in MatMulNBits' accuracy level (see README.md next to this file).

    python accuracy.py FP32_BUNDLE GGUF_BUNDLE [NAME=BUNDLE ...] [--variants] [--prompts N] [--base-name NAME]

``--variants`` also writes copies of GGUF_BUNDLE's step graph with level 0 (fp32 activations)
on some of its MatMulNBits nodes only, next to it: ``down0`` (the MLP's down projections) and
``layers0`` (every 4-bit product, the 8-bit head left at level 4). The copies change node
attributes only, so they are loaded without checking the manifest's file hashes.

Per MT-Bench prompt, the fp32 bundle's greedy 128 tokens are the reference; every variant
scores them (fed the reference prefix) and decodes 64 tokens on its own, the variants in a
rotating order; the speed ratio is the median over prompts of each prompt's ratio to
GGUF_BUNDLE (named ``--base-name``, default ``gguf``; docs/benchmarks/quant-defaults passes an
int4 bundle there).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

import onnx

from specee_compile.resources import mtbench_questions
from specee_compile.runtimes import load, share_threads


def variant(source: Path, name: str, which) -> Path:
    out = source.with_name(f"{source.stem}-{name}.onnx")
    if not out.exists():
        shutil.copytree(source, out)
        model = onnx.load(out / "model.onnx", load_external_data=False)
        for node in model.graph.node:
            attrs = {a.name: a for a in node.attribute}
            if node.op_type == "MatMulNBits" and which({k: a.i for k, a in attrs.items()}):
                attrs["accuracy_level"].i = 0
        onnx.save(model, out / "model.onnx")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fp32", type=Path)
    ap.add_argument("gguf", type=Path)
    ap.add_argument("more", nargs="*", help="NAME=BUNDLE")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--base-name", default="gguf", help="what the second bundle, the speed ratios' base, is called")
    args = ap.parse_args()
    base = args.base_name
    bundles = {base: args.gguf, **dict(m.split("=", 1) for m in args.more)}
    if args.variants:
        bundles["down0"] = variant(args.gguf, "down0", lambda a: a["bits"] == 4 and a["N"] < a["K"])
        bundles["layers0"] = variant(args.gguf, "layers0", lambda a: a["bits"] == 4)
    share_threads(None)
    ref = load(args.fp32, dense=True)
    engines = {k: load(v, dense=True, verify="none" if k in ("down0", "layers0") else "full")
               for k, v in bundles.items()}
    names = list(engines)
    agree = {k: [0, 0] for k in names}
    speed = {k: [] for k in names}
    for i, q in enumerate(mtbench_questions(args.prompts)):
        ids = ref.encode(q)
        want = ref.generate(ids, max_new_tokens=128).token_ids
        for k in names[i % len(names):] + names[:i % len(names)]:
            speed[k].append(engines[k].generate(ids, max_new_tokens=64).decode_tokens_per_second)
            predicted = engines[k].score(ids, want).predicted
            agree[k][0] += sum(a == b for a, b in zip(predicted, want))
            agree[k][1] += len(want)
        print(i, {k: round(a / max(n, 1), 4) for k, (a, n) in agree.items()}, flush=True)
    print(f"| bundle | teacher-forced agreement | decode tok/s (median) | x {base} |")
    print("|---|---|---|---|")
    for k in names:
        ratio = statistics.median(a / b for a, b in zip(speed[k], speed[base]))
        print(f"| {k} | {100 * agree[k][0] / agree[k][1]:.2f}% ({agree[k][1]} positions) | "
              f"{statistics.median(speed[k]):.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
