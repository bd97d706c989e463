"""Teacher-forced agreement of the eager reference decoder, step by step (each step sees the
K/V the earlier steps wrote: with "propagate", an exited position's deeper K/V come from its
exit state, as in the bundles), on SmolLM2's own greedy answers to 24 MT-Bench questions
(the answers' tokens are the dense greedy ones, made by transformers ``generate`` in batches).

    python docs/benchmarks/agreement-gap/decode.py ARTIFACT_DIR THRESHOLD [KV_POLICY ...]
"""

import json
import sys
from pathlib import Path

import torch

from specee_compile import drafts
from specee_compile import load as model_load
from specee_compile.calibrate.pipeline import load_calibration
from specee_compile.drafts.train import OWN_ANSWERS, answer_starts
from specee_compile.reference import DecodeSettings, ReferenceDecoder

torch.set_num_threads(2)
art, threshold, policies = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:] or ["propagate"]
target, tok = model_load.load(model_load.resolve("smollm2"))
cal = load_calibration(art, target)
own = json.loads((drafts.ROOT / "smollm2" / OWN_ANSWERS).read_text())
L = target.config.num_hidden_layers
for policy in policies:
    dec = ReferenceDecoder(target, cal.draft, cal.bank, cal.schedule,
                           DecodeSettings(kv_policy=policy, threshold=threshold))
    same = total = exits = 0
    for ids, start in zip(own, answer_starts(tok, own)):
        state = dec.prefill(ids[:start])
        for t in range(start, len(ids) - 1):  # fed the answer's token, does the step emit the answer's next one
            state.token = ids[t]
            dec.step(state)
            same += state.token == ids[t + 1]
            exits += state.history[-1] < L - 1
            total += 1
    print(policy, threshold, f"agreement {same / total:.4f}, exits {exits / total:.3f}, positions {total}", flush=True)
