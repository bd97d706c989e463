"""Time tree verification inside real tree decodes against star trees of the same size.

    python insitu.py BUNDLE SHAPE COUNT    # run next to long.jsonl (prompts.py)

One process holds the bundle's dense and tree engines only. The first COUNT prompts of
long.jsonl are decoded (128 tokens) by the dense engine and then by tree speculation of SHAPE,
with every verification forward timed by its node count and every draft call timed. Then star
trees of each node count seen are timed after the first prompt and 150 more tokens
(``tree_choice.timed_in_turn``). Medians, in ms and in dense steps (the median dense decode step).
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
import time

from specee_compile.runtimes import load, share_threads
from specee_compile.runtimes.tree_choice import timed_in_turn


def timed(fn, laps):
    def run(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        laps(args, time.perf_counter() - start)
        return out
    return run


def main(bundle: str, shape: str, count: int) -> None:
    share_threads(2)
    prompts = [json.loads(line)["prompt"] for line in open("long.jsonl", encoding="utf-8")][:count]
    tree = load(bundle, verify="none", tree=shape)
    dense = load(bundle, verify="none", dense=True)
    backend = tree.decoder.backend
    verify, draft = backend.verify, backend.run_draft_tree
    by_nodes, drafts = collections.defaultdict(list), []
    backend.verify = timed(verify, lambda args, s: by_nodes[len(args[1])].append(s))
    backend.run_draft_tree = timed(draft, lambda args, s: drafts.append(s))
    steps = []
    for prompt in prompts:
        ids = tree.encode(prompt)
        steps += dense.generate(ids, max_new_tokens=128).step_seconds
        tree.generate(ids, max_new_tokens=128)
    backend.verify, backend.run_draft_tree = verify, draft
    step = statistics.median(steps)
    ids = tree.encode(prompts[0])
    _, star = timed_in_turn(None, tree, ids + ids[:150], sorted(by_nodes))
    print(f"dense step {1000 * step:.2f} ms; {len(drafts)} draft calls, median {1000 * statistics.median(drafts):.3f} ms")
    print("| nodes | forwards | in the decodes, ms (dense steps) | star tree, ms (dense steps) |")
    print("|---|---|---|---|")
    for k, laps in sorted(by_nodes.items()):
        m = statistics.median(laps)
        print(f"| {k} | {len(laps)} | {1000 * m:.2f} ({m / step:.3f}) | {1000 * star[k]:.2f} ({star[k] / step:.3f}) |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
