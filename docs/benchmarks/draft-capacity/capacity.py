"""Does a second draft layer pay on SmolLM2? (see README.md next to this file for the results)

    python docs/benchmarks/draft-capacity/capacity.py RUN_DIR A:B [LR]

RUN_DIR holds the shipped draft the arm starts from (``draft.safetensors``, copied there
before the stage that trains the same text with one layer) and the held-out own answers
(``held_out_own_answers.json``). The arm adds a second decoder layer after the draft's one,
started as the identity (a copy of the first with its attention output and MLP down
projections zeroed, so the two-layer draft starts out computing exactly what the one-layer
draft does), and trains it the way ``python -m specee_compile.drafts.train smollm2
--conversations A:B --later --fusion --lr LR`` trains the one-layer draft: the same feature
store (that stage fills it), settings, seed and held-out sets. It resumes from its checkpoints
in RUN_DIR and writes ``result-two-layers-A-B.json``.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

from specee_compile import load as model_load
from specee_compile.architecture import LayerSpec
from specee_compile.calibrate import data
from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.draft import EagleDraft, fusion_layers
from specee_compile.calibrate.pipeline import (CalibrationSettings, calibration_examples, draft_metrics, load_draft,
                                               model_key)
from specee_compile.calibrate.store import FeatureStore
from specee_compile.calibrate.train import train_draft
from specee_compile.functional import layer_step
from specee_compile.drafts.train import HELD_SHAREGPT, SLICE, answer_starts, own_answers


class TwoLayerDraft(EagleDraft):
    """The draft with a second decoder layer (its own K/V cache) between its layer and its norm."""

    def __init__(self, one: EagleDraft, target):
        super().__init__(target, one.vocab_map, fusion=one.fusion is not None)
        self.load_state_dict(one.state_dict())
        self.second = copy.deepcopy(one.layer)
        with torch.no_grad():  # start as the identity: the residual branches add nothing
            self.second.self_attn.o_proj.weight.zero_()
            self.second.mlp.down_proj.weight.zero_()

    @property
    def second_spec(self) -> LayerSpec:
        return LayerSpec(self.second, self.attention, self.num_heads, self.kv_heads, self.head_dim, self.cos, self.sin,
                         self.residual_scale)

    def empty_cache(self, batch: int = 1):
        return super().empty_cache(batch), super().empty_cache(batch)

    def decode(self, x, cache, positions, mask=None):
        h, k1, v1 = layer_step(self.spec, x, *cache[0], positions, mask=mask)
        h, k2, v2 = layer_step(self.second_spec, h, *cache[1], positions, mask=mask)
        return self.norm(h), ((k1, v1), (k2, v2))


def main() -> None:
    run = Path(sys.argv[1])
    a, b = (int(x) for x in sys.argv[2].split(":"))
    lr = float(sys.argv[3]) if len(sys.argv) > 3 else 2.5e-4
    started = time.time()
    target, tokenizer = model_load.load(model_load.resolve("smollm2"))
    for w in target.parameters():
        w.requires_grad_(False)
    L = target.config.num_hidden_layers
    exit_lo = L // 2
    settings = CalibrationSettings(draft_sequences=b - a, predictor_sequences=1, draft_epochs=2, draft_lr=lr,
                                   draft_unroll=2, draft_vocab=6144, draft_fusion=True)
    usable = len(data.sharegpt(1 << 30))
    held = calibration_examples(target, tokenizer, settings, False, skip=usable - HELD_SHAREGPT, count=HELD_SHAREGPT)
    own = own_answers(run, target, tokenizer)
    passes = {"sharegpt": [target_pass(target, s) for s, _ in held], "own_answers": [target_pass(target, s) for s in own]}
    starts = {"sharegpt": [start for _, start in held], "own_answers": answer_starts(tokenizer, own)}

    store = FeatureStore.locate(model_key(model_load.resolve("smollm2")),
                                ["sharegpt-later", a, settings.max_seq_len, settings.generate_tokens], exit_lo,
                                settings.seed, fusion_layers(L))
    examples = store.read(b - a)  # filled by the one-layer stage on the same text
    draft = TwoLayerDraft(load_draft(run / "draft.safetensors", target).float(), target)
    t = time.time()
    log = train_draft(draft, examples, settings, run / f"checkpoints-two-layers-{a}-{b}", True)
    train_seconds = time.time() - t
    draft = draft.half().float()  # score what would be shipped: fp16 weights
    scores = {name: draft_metrics(draft, p, exit_lo, starts[name]) for name, p in passes.items()}
    scores["own_answers_slice"] = draft_metrics(draft, passes["own_answers"][:SLICE], exit_lo,
                                                starts["own_answers"][:SLICE])
    result = {"arm": "two-layers", "conversations": [a, b], "lr": lr, "training": log,
              "train_seconds": round(train_seconds, 1), "held_out": scores,
              "draft_parameters": sum(p.numel() for n, p in draft.named_parameters() if not n.startswith("embed."))}
    (run / f"result-two-layers-{a}-{b}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {m: round(v, 4) for m, v in s.items() if m.startswith("top")} for k, s in scores.items()}))
    print(f"done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
