"""Which draft recipes pay on SmolLM2: one run, every arm trained on the same amount of text
and scored on the same held-out sets (see README.md next to this file for the results).

    python docs/benchmarks/draft-recipes/recipes.py RUN_DIR [N] [ARM ...]

Every stage writes its result into RUN_DIR and is skipped when that result exists, so the
run resumes after an interruption. Arms:

- ``base``: today's recipe (calibration defaults) on N ShareGPT conversations;
- ``self``: the same recipe on SmolLM2's own greedy answers to the same N prompts
  (self-distillation: the text the draft sees when it drafts);
- ``fusion``: EAGLE-3's multi-layer input: the first step is fed fc(low, middle, last
  layer's features) instead of the last layer's only (layers 2 and L/2);
- ``noreg3``: EAGLE-3's loss: no feature regression, unrolled 3 steps;
- ``epochs4``: the base recipe for 4 epochs;
- ``distill``: EAGLE's original classification loss: cross-entropy against the target's whole
  distribution over the draft vocabulary (softmax of its head on its final feature) instead
  of its greedy token alone;
- ``vocab12k``: ``distill`` with a 12288-token draft vocabulary instead of 6144 (FR-Spec's
  question from the other side: does a larger vocabulary's coverage pay for its larger head).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from specee_compile import load as model_load
from specee_compile.calibrate import data
from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.draft import EagleDraft, reduced_vocabulary
from specee_compile.calibrate.pipeline import CalibrationSettings, _chat_ids, draft_metrics, calibration_sequences
from specee_compile.calibrate.store import FeatureStore
from specee_compile.calibrate.train import train_draft
from specee_compile.resources import mtbench_questions

RUN = Path(sys.argv[1])
N = int(sys.argv[2]) if len(sys.argv) > 2 else 640
ARMS = sys.argv[3:] or ["base", "fusion", "noreg3", "self", "epochs4"]
HELD_SKIP, HELD, OWN = 4000, 48, 24
LOW = 2
RUN.mkdir(parents=True, exist_ok=True)
t0 = time.time()


def say(*a):
    print(f"[{time.time() - t0:7.0f}s]", *a, flush=True)


def cached_json(name, make):
    path = RUN / name
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.write_text(json.dumps(value))
    return value


torch.manual_seed(0)
target, tok = model_load.load(model_load.resolve("smollm2"))
for p in target.parameters():
    p.requires_grad_(False)
L = target.config.num_hidden_layers
exit_lo, mid = L // 2, L // 2
# today's recipe as these arms first measured it: the greedy token as the label
settings = CalibrationSettings(draft_sequences=N, predictor_sequences=1, draft_soft_labels=False)


@torch.no_grad()
def greedy(prompts: list[list[int]], limit, batch: int = 16) -> list[list[int]]:
    """SmolLM2's greedy continuation of each prompt, cut at EOS and at ``limit(prompt length)``
    tokens in all; batched with left padding, prompts of similar length together."""
    out = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        new = max(limit(len(prompts[i])) - len(prompts[i]) for i in idx)
        gen = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              pad_token_id=pad, eos_token_id=tok.eos_token_id)
        for row, i in enumerate(idx):
            reply = gen[row, width:].tolist()
            if tok.eos_token_id in reply:
                reply = reply[: reply.index(tok.eos_token_id) + 1]
            out[i] = (prompts[i] + reply)[: limit(len(prompts[i]))]
        say(f"generated {b + len(idx)}/{len(prompts)}")
    return out


# --- text ---------------------------------------------------------------------------------
sharegpt = cached_json(f"sharegpt-{N}.json", lambda: calibration_sequences(target, tok, settings, False)[:N])
held_prompts = [ids[: settings.max_seq_len // 2] for ids in _chat_ids(tok, [ex.prompt for ex in
                                                                          data.sharegpt(HELD, skip=HELD_SKIP)])]
held = cached_json("held_sharegpt.json", lambda: [
    (prompt + tok(ex.response, add_special_tokens=False)["input_ids"])[: settings.max_seq_len]
    for prompt, ex in zip(held_prompts, data.sharegpt(HELD, skip=HELD_SKIP))])
own = cached_json("held_own_answers.json", lambda: greedy(
    _chat_ids(tok, mtbench_questions(OWN)), lambda n: n + 128, batch=8))
say("text ready", len(sharegpt), len(held), len(own))
held_passes = {"sharegpt": [target_pass(target, s) for s in held], "own_answers": [target_pass(target, s) for s in own]}
# the scores count the responses only (what the draft drafts at decode time), from each prompt's end
starts = {"sharegpt": [len(x) for x in held_prompts], "own_answers": [len(x) for x in _chat_ids(tok, mtbench_questions(OWN))]}
say("held-out passes")


def prompt_part(seq: list[int]) -> list[int]:
    """The chat-formatted prompt of a calibration sequence (up to the assistant turn's header)."""
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for k in range(len(seq) - len(header), -1, -1):
        if seq[k:k + len(header)] == header:
            return seq[: k + len(header)]
    return seq[: settings.max_seq_len // 2]


def selfdistilled():
    """SmolLM2's own greedy answers to the N training prompts (in chunks, so it resumes)."""
    prompts = [prompt_part(s) for s in sharegpt]
    done = []
    for c in range(0, N, 64):  # N a multiple of 64: every chunk file holds 64 answers
        done += cached_json(f"self-{c:05d}.json", lambda: greedy(prompts[c:c + 64], lambda n: settings.max_seq_len,
                                                                 batch=64))
    return done


# --- drafts -------------------------------------------------------------------------------
class FusionDraft(EagleDraft):
    """EAGLE-3's input: the first step reads fc3(layer 2, layer L/2, last-or-exit layer) [3d -> d]."""

    def __init__(self, target, vocab_map):
        super().__init__(target, vocab_map)
        d = target.config.hidden_size
        self.fuse = nn.Linear(3 * d, d, bias=False)
        with torch.no_grad():  # start as "the last layer's feature"
            self.fuse.weight.zero_()
            self.fuse.weight[:, 2 * d:].copy_(torch.eye(d))

    def fed_features(self, ex, use_exit):
        last = super().fed_features(ex, use_exit)
        return torch.cat([ex.layers[LOW][:-1], ex.layers[mid][:-1], last], dim=-1)

    def forward(self, tokens, features, cache=None, start=0):
        if features.shape[-1] != self.fc.out_features:
            features = self.fuse(features)
        return super().forward(tokens, features, cache, start)


@torch.no_grad()
def fused_passes(draft: FusionDraft, passes):
    """Held-out passes whose every layer's feature is the fused input the draft reads after
    leaving at that layer, so ``draft_metrics`` scores the fusion draft unchanged."""
    out = []
    for p in passes:
        lo, mi = p.z[LOW], p.z[mid]
        z = torch.stack([draft.fuse(torch.cat([lo, mi, p.z[l]], -1)) for l in range(L)])
        out.append(dataclasses.replace(p, z=z))
    return out


def score(draft, fusion=False):
    """draft_metrics on both held-out sets (the fusion draft reads held-out features fused already)."""
    return {name: draft_metrics(draft, fused_passes(draft, passes) if fusion else passes, exit_lo, starts[name])
            for name, passes in held_passes.items()}


def run_arm(arm: str) -> dict:
    text = selfdistilled() if arm == "self" else sharegpt
    # one store per text; the ShareGPT one keeps the fusion's layers for every arm
    store = FeatureStore(RUN / "store-self", ()) if arm == "self" else FeatureStore(RUN / "store-sharegpt", (LOW, mid))
    t = time.time()
    store.fill(target, text, exit_lo, 0, progress=False)
    pass_s = time.time() - t
    examples = store.read(len(text))
    s = settings
    if arm == "noreg3":
        s = dataclasses.replace(s, feature_loss_weight=0.0, draft_unroll=3)
    if arm == "epochs4":
        s = dataclasses.replace(s, draft_epochs=4)
    if arm in ("distill", "vocab12k"):
        s = dataclasses.replace(s, draft_soft_labels=True)
    if arm == "vocab12k":
        s = dataclasses.replace(s, draft_vocab=12288)
    torch.manual_seed(0)
    vocab = reduced_vocabulary(examples.next_tokens(), s.draft_vocab, target.config.vocab_size)
    draft = (FusionDraft if arm == "fusion" else EagleDraft)(target, vocab)
    t = time.time()
    log = train_draft(draft, examples, s, RUN / f"ck-{arm}", progress=False, checkpoint_seconds=300)
    train_s = time.time() - t
    return {"arm": arm, "sequences": len(text), "tokens": sum(len(x) for x in text), "pass_seconds": pass_s,
            "train_seconds": train_s, "log": log["epochs"], "scores": score(draft, fusion=arm == "fusion")}


for arm in ARMS:
    result = cached_json(f"result-{arm}-{N}-responses.json", lambda: run_arm(arm))
    sc = result["scores"]
    say(arm, {k: {m: round(v, 3) for m, v in sc[k].items() if m.startswith("top")} for k in sc})
