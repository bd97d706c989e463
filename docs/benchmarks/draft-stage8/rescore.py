"""Score a draft folder's draft on both held-out sets, responses only and every position."""
import json, sys, torch
from pathlib import Path
from specee_compile import drafts
from specee_compile import load as model_load
from specee_compile.calibrate import data
from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.pipeline import CalibrationSettings, calibration_examples, draft_metrics, load_draft
from specee_compile.drafts.train import HELD_SHAREGPT, OWN_ANSWERS, answer_starts

torch.set_num_threads(1)
folder = Path(sys.argv[1])
target, tok = model_load.load(model_load.resolve("smollm2"))
draft = load_draft(folder / drafts.WEIGHTS, target).float()
L = target.config.num_hidden_layers
usable = len(data.sharegpt(1 << 30))
held = calibration_examples(target, tok, CalibrationSettings(draft_sequences=HELD_SHAREGPT - 1, predictor_sequences=1), False,
                            skip=usable - HELD_SHAREGPT)
own = json.loads((folder / OWN_ANSWERS).read_text())
sets = {"sharegpt": ([target_pass(target, s) for s, _ in held], [s for _, s in held]),
        "own_answers": ([target_pass(target, s) for s in own], answer_starts(tok, own))}
out = {}
for name, (passes, starts) in sets.items():
    for scored, st in (("responses", starts), ("every position", None)):
        m = draft_metrics(draft, passes, L // 2, st)
        out[f"{name} ({scored})"] = {k: round(v, 4) for k, v in m.items()}
print(json.dumps(out, indent=1))
