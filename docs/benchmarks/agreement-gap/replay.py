"""The calibration's own agreement estimate (teacher-forced replay over dense passes, so every
earlier position's K/V is the dense one) for a calibration artifact's schedule at several
thresholds, on two texts: the calibration's own (ShareGPT records past the shipped draft's)
and SmolLM2's own greedy answers to 24 MT-Bench questions (the shipped held-out file).

    python docs/benchmarks/agreement-gap/replay.py ARTIFACT_DIR
"""

import json
import sys
from pathlib import Path

import torch

from specee_compile import drafts
from specee_compile import load as model_load
from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.pipeline import CalibrationSettings, _summarize, calibration_examples, load_calibration
from specee_compile.calibrate.simulate import CostModel, replay_windows, rule_tokens
from specee_compile.drafts.train import OWN_ANSWERS, answer_starts
from specee_compile.reference import DecodeSettings

torch.set_num_threads(2)
art = Path(sys.argv[1])
target, tok = model_load.load(model_load.resolve("smollm2"))
cal = load_calibration(art, target)
meta = json.loads((art / "calibration.json").read_text())
costs = CostModel(**meta["cost_model"])
dense = costs.dense_cost(target.config.num_hidden_layers)
own = json.loads((drafts.ROOT / "smollm2" / OWN_ANSWERS).read_text())
settings = CalibrationSettings(**{k: tuple(v) if k == "offsets" else v for k, v in meta["settings"].items()})
texts = {  # (ids, where the window starts)
    "own answers": [(ids, start) for ids, start in zip(own, answer_starts(tok, own))],
    "calibration text": [(ids, max(1, len(ids) - settings.positions_per_sequence)) for ids, _ in
                         calibration_examples(target, tok, settings, False, meta["text"]["from"], 48)],
}
for name, examples in texts.items():
    windows = []
    for ids, lo in examples:
        p = target_pass(target, ids)
        windows.append((p, lo, None, rule_tokens(target, cal.draft, p.z[:, lo:], "full")))
    for threshold in (0.8, 0.9, 0.95):
        runs = replay_windows(target, cal.draft, cal.bank, [(cal.schedule, DecodeSettings(threshold=threshold))],
                              windows)
        row = _summarize([r[0] for r in runs], [(p, lo, h) for p, lo, _, h in windows], costs, dense,
                         settings.agreement_confidence)
        print(name, threshold, {k: round(v, 4) for k, v in row.items()}, flush=True)
