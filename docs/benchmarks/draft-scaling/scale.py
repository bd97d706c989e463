"""One-off: how the draft's hit rate grows with its training text (same recipe as the default
calibration: 2 epochs, unroll 2, 6144-token vocabulary), on one held-out set."""
import json, sys, time
import torch
from specee_compile import load as model_load
from specee_compile.calibrate.pipeline import CalibrationSettings, draft_metrics, calibration_sequences
from specee_compile.calibrate.store import example
from specee_compile.calibrate.train import train_draft
from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.draft import EagleDraft, reduced_vocabulary

SIZES = [int(x) for x in sys.argv[1].split(",")]
HELD = 48
t0 = time.time()
target, tok = model_load.load(model_load.resolve("smollm2"))
for p in target.parameters():
    p.requires_grad_(False)
L = target.config.num_hidden_layers
exit_lo = L // 2


N = max(SIZES)
# the calibration's own sequences: the first N ShareGPT conversations, then the HELD after them
sequences = calibration_sequences(target, tok, CalibrationSettings(draft_sequences=N, predictor_sequences=HELD), False)
with torch.no_grad():
    held = [target_pass(target, ids) for ids in sequences[N:]]
    own = [target_pass(target, s) for s, _ in json.load(open("/work/runs/sd/eval_seqs.json"))]
    passes = []
    for i, ids in enumerate(sequences[:N]):
        passes.append(example(target_pass(target, ids), i, exit_lo, 0))
        if i % 200 == 0:
            print("pass", i, round(time.time() - t0), flush=True)
print("passes done", round(time.time() - t0), flush=True)
res = {}
for n in SIZES:
    torch.manual_seed(0)
    sub = passes[:n]
    vocab = reduced_vocabulary(torch.cat([p.next_token for p in sub]), 6144, target.config.vocab_size)
    draft = EagleDraft(target, vocab)
    t = time.time()
    train_draft(draft, sub, CalibrationSettings(), progress=False)
    res[n] = {"train_seconds": time.time() - t, "sharegpt_heldout": draft_metrics(draft, held, exit_lo),
              "mtbench_own_answers": draft_metrics(draft, own, exit_lo)}
    print(n, json.dumps(res[n]), flush=True)
    json.dump(res, open("/work/runs/scale/scale.json", "w"), indent=1)
