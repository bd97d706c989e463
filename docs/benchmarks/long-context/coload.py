"""Does keeping other engines of the bundle loaded slow a 2x2x3+4 tree engine down?

    python coload.py    # next to long.jsonl (prompts.py) and i8.onnx

Times 2x2x3+4 tree decodes (ms per target forward) and dense decodes (ms per step) of the first
4 long prompts x 128 tokens: alone, with a 1x1x1+4 tree engine loaded and run, with the SpecEE
engine loaded too, and after dropping both.
"""

import gc
import json

from specee_compile.runtimes import load, share_threads
share_threads(2)
prompts = [json.loads(l)["prompt"] for l in open("long.jsonl")][:4]
A = load("i8.onnx", verify="none", tree="2x2x3+4")
D = load("i8.onnx", verify="none", dense=True)
def fwd_ms(engine):
    tot, F = 0.0, 0
    for p in prompts:
        g = engine.generate(engine.encode(p), max_new_tokens=128)
        tot += g.decode_seconds; F += len(g.accepted_lengths)
    return 1000 * tot / F
def dense_ms():
    tot, F = 0.0, 0
    for p in prompts:
        g = D.generate(D.encode(p), max_new_tokens=128); tot += g.decode_seconds; F += len(g.step_seconds)
    return 1000 * tot / F
fwd_ms(A)
print("alone: tree fwd %.2f dense %.2f" % (fwd_ms(A), dense_ms()), flush=True)
B = load("i8.onnx", verify="none", tree="1x1x1+4")
fwd_ms(B)
print("with a second tree engine loaded (and run once): tree fwd %.2f dense %.2f" % (fwd_ms(A), dense_ms()), flush=True)
S = load("i8.onnx", verify="none")
S.generate(S.encode(prompts[0]), max_new_tokens=32)
print("plus the SpecEE engine: tree fwd %.2f dense %.2f" % (fwd_ms(A), dense_ms()), flush=True)
del B, S
gc.collect()
print("after dropping them: tree fwd %.2f dense %.2f" % (fwd_ms(A), dense_ms()), flush=True)
