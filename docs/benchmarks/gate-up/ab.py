"""Interleaved dense decode of two bundles: A (before) and B (after); prints tok/s and B/A."""
import sys, statistics
from specee_compile import resources
from specee_compile.runtimes import load, share_threads
share_threads(None)
a, b = load(sys.argv[1], dense=True), load(sys.argv[2], dense=True)
n = int(sys.argv[3]) if len(sys.argv) > 3 else 10
texts = resources.mtbench_questions(n)
ids = [a.encode(t) for t in texts]
for e in (a, b):
    e.generate(ids[0], max_new_tokens=16)
rates = {"A": [], "B": []}
same = 0
for r, x in enumerate(ids):
    order = (("A", a), ("B", b)) if r % 2 == 0 else (("B", b), ("A", a))
    toks = {}
    for name, e in order:
        res = e.generate(x, max_new_tokens=128)
        rates[name].append(res.decode_steps / res.decode_seconds)
        toks[name] = res.token_ids
    same += toks["A"] == toks["B"]
ra, rb = statistics.mean(rates["A"]), statistics.mean(rates["B"])
ratios = [q / p for p, q in zip(rates["A"], rates["B"])]
print(f"A {ra:.1f} tok/s  B {rb:.1f} tok/s  B/A mean {rb/ra:.3f}  median of paired {statistics.median(ratios):.3f}  same tokens {same}/{len(ids)}")
