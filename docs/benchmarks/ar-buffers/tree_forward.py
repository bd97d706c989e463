"""Median time of one tree-speculation target forward (draft, verification and host loop) and of
one dense decode step, in one process whose sessions share one ONNX Runtime thread pool.

    python tree_forward.py BUNDLE QUESTIONS.jsonl SHAPE [PROMPTS]

The first PROMPTS (default 6) MT-Bench questions, 96 new tokens each, dense then trees per prompt.
"""

import json
import statistics
import sys

from specee_compile.runtimes import load, share_threads


def main(bundle: str, questions: str, shape: str, count: int = 6) -> None:
    share_threads(2)
    prompts = [json.loads(line)["turns"][0] for line in open(questions, encoding="utf-8")][:count]
    dense, tree = load(bundle, verify="none", dense=True), load(bundle, verify="none", tree=shape)
    steps, forwards, tokens = [], [], 0
    for prompt in prompts:
        steps += dense.generate(prompt, max_new_tokens=96).step_seconds
        run = tree.generate(prompt, max_new_tokens=96)
        forwards += run.step_seconds
        tokens += sum(run.accepted_lengths)
    step, forward = statistics.median(steps), statistics.median(forwards)
    print(f"dense step {1000 * step:.2f} ms; {shape} forward {1000 * forward:.2f} ms = {forward / step:.3f} dense "
          f"steps; {tokens / len(forwards):.3f} tokens per forward")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))
