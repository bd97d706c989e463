"""Median decode-step time of a SpecEE bundle: dense, SpecEE, and SpecEE with no predictor active.

    python step_parts.py BUNDLE QUESTIONS.jsonl [PROMPTS]

The first PROMPTS (default 6) MT-Bench questions, 96 new tokens each, in one process whose
sessions share one ONNX Runtime thread pool (as specee-run). "no predictors" replaces the
schedule's active layers with none, so every step runs the draft and all segments but no
predictor or exit check: what the SpecEE step costs besides its exits. The draft call is timed
on its own as well.
"""

import json
import statistics
import sys
import time

import numpy as np

from specee_compile.runtimes import load, share_threads


def main(bundle: str, questions: str, count: int = 6) -> None:
    share_threads(2)
    prompts = [json.loads(line)["turns"][0] for line in open(questions, encoding="utf-8")][:count]
    dense = load(bundle, verify="none", dense=True)
    specee = load(bundle, verify="none")
    idle = load(bundle, verify="none")
    idle.decoder.active_layers = lambda history: np.zeros(idle.decoder.num_layers, dtype=bool)
    backend, draft_step, drafts = specee.decoder.backend, specee.decoder.backend.draft_step, []

    def timed(*args):
        start = time.perf_counter()
        out = draft_step(*args)
        drafts.append(time.perf_counter() - start)
        return out

    backend.draft_step = timed
    steps = {"dense": [], "specee": [], "specee, no predictors": []}
    for prompt in prompts:
        for name, engine in zip(steps, (dense, specee, idle)):
            steps[name] += engine.generate(prompt, max_new_tokens=96).step_seconds
    for name, laps in steps.items():
        print(f"{name}: {1000 * statistics.median(laps):.2f} ms per step")
    print(f"draft call: {1000 * statistics.median(drafts):.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
