"""Draft training's resumable parts: the store of target passes and the checkpointed trainer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from specee_compile.calibrate import CalibrationSettings
from specee_compile.calibrate.collect import target_pass
from specee_compile.calibrate.draft import EagleDraft, fusion_layers, reduced_vocabulary
from specee_compile.calibrate.store import SHARD, FeatureStore, example
from specee_compile.calibrate.train import CHECKPOINT, train_draft
from specee_compile.testing import TINY_VOCAB, make_tiny_model

SETTINGS = CalibrationSettings(draft_epochs=2, draft_unroll=2, draft_lr=3e-3)


def sequences(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, TINY_VOCAB, (int(torch.randint(6, 20, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def target():
    model = make_tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_store_holds_each_pass_and_is_not_recomputed(target, tmp_path, monkeypatch):
    seqs = sequences(SHARD + 5)
    store = FeatureStore(tmp_path / "store")
    assert store.missing(seqs) == len(seqs)
    store.fill(target, seqs, exit_lo=1, seed=3, progress=False)
    assert store.missing(seqs) == 0 and store.missing(seqs[:7]) == 0  # a larger store serves a smaller run
    stored = store.read(len(seqs))
    for k in (0, SHARD - 1, SHARD + 4):
        want = example(target_pass(target, seqs[k]), k, 1, 3)
        got = stored[k]
        assert got.ids.tolist() == seqs[k] and torch.equal(got.next_token, want.next_token)
        torch.testing.assert_close(got.final, want.final, rtol=1e-3, atol=1e-3)  # stored as fp16
        torch.testing.assert_close(got.exit, want.exit, rtol=1e-3, atol=1e-3)
    assert torch.equal(stored.next_tokens(), torch.cat([stored[k].next_token for k in range(len(seqs))]))

    calls = []
    monkeypatch.setattr("specee_compile.calibrate.store.target_pass",
                        lambda model, ids: calls.append(ids) or target_pass(model, ids))
    FeatureStore(store.root).fill(target, seqs, exit_lo=1, seed=3, progress=False)
    assert calls == [], "passes on disk must not run again"
    other = [s + [5] for s in seqs[:3]] + seqs[3:]  # other tokens: the first shard is not theirs
    FeatureStore(store.root).fill(target, other, exit_lo=1, seed=3, progress=False)
    assert calls == other[:SHARD]
    store.shard(1).write_bytes(b"damaged")
    FeatureStore(store.root).fill(target, other, exit_lo=1, seed=3, progress=False)
    assert calls[SHARD:] == other[SHARD:]


def _draft(target, examples):
    torch.manual_seed(0)
    return EagleDraft(target, reduced_vocabulary(examples.next_tokens(), 64, TINY_VOCAB))


def _stored(target, folder, seqs, layers=()):
    """The store of the target's passes over ``seqs`` in ``folder``, and its examples."""
    store = FeatureStore(folder, layers)
    store.fill(target, seqs, exit_lo=1, seed=0, progress=False)
    return store, store.read(len(seqs))


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    from specee_compile.calibrate import CalibrationSettings
    from specee_compile.calibrate.store import FeatureStore
    from specee_compile.calibrate.train import train_draft
    from tests.test_draft_training import SETTINGS, _draft
    from specee_compile.testing import make_tiny_model

    target = make_tiny_model("llama")
    for p in target.parameters():
        p.requires_grad_(False)
    examples = FeatureStore(sys.argv[1]).read(int(sys.argv[2]))

    def die(step):
        if step == int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)

    train_draft(_draft(target, examples), examples, SETTINGS, sys.argv[3], progress=False, checkpoint_seconds=0,
                on_step=die)
""")


def test_a_killed_training_resumes_to_the_uninterrupted_weights(target, tmp_path):
    seqs = sequences(20)
    store, examples = _stored(target, tmp_path / "store", seqs)
    whole = _draft(target, examples)
    train_draft(whole, examples, SETTINGS, progress=False)  # 40 steps, with the one-cycle schedule

    checkpoints = tmp_path / "checkpoints"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(store.root), str(len(seqs)), str(checkpoints),
                             "27"], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr  # killed mid-epoch, in the second epoch
    assert (checkpoints / CHECKPOINT).is_file()
    resumed = _draft(target, examples)
    log = train_draft(resumed, examples, SETTINGS, checkpoints, progress=False)
    assert log["resumed_at"] == [27] and len(log["epochs"]) == 2
    for name, tensor in whole.trainable_state().items():
        assert torch.equal(resumed.trainable_state()[name], tensor), name


def test_a_draft_of_a_frozen_target_trains_its_layer_and_norm_but_not_the_shared_embedding(target, tmp_path):
    seqs = sequences(6)
    _, examples = _stored(target, tmp_path / "store", seqs)
    draft = _draft(target, examples)
    before = {n: w.detach().clone() for n, w in draft.named_parameters()}
    train_draft(draft, examples, SETTINGS, progress=False)
    for name, w in draft.named_parameters():
        changed = not torch.equal(w, before[name])
        assert changed != name.startswith("embed."), name
    assert not any(w.requires_grad for w in target.parameters())


def test_a_checkpoint_of_other_settings_is_not_resumed(target, tmp_path):
    seqs = sequences(6)
    _, examples = _stored(target, tmp_path / "store", seqs)
    train_draft(_draft(target, examples), examples, SETTINGS, tmp_path / "ck", progress=False)
    log = train_draft(_draft(target, examples), examples, CalibrationSettings(draft_epochs=1, draft_lr=1e-3),
                      tmp_path / "ck", progress=False)
    assert log["resumed_at"] == [] and len(log["epochs"]) == 1


def test_a_budget_sizes_the_draft_text_and_is_remembered(tiny_dirs, tmp_path, monkeypatch):
    import json

    from specee_compile.calibrate import budget, calibrate, pipeline
    from specee_compile.testing import write_calibration_jsonl

    calib = write_calibration_jsonl(tmp_path / "c.jsonl", examples=40)
    small = dict(predictor_sequences=4, draft_vocab=64, predictor_hidden=16, predictor_epochs=3,
                 positions_per_sequence=16, draft_epochs=1, calib_file=str(calib))
    # the time one conversation costs is measured; make it 3 s a pass and 1 s a step
    times = iter(x for pair in ((0.0, 12.0), (0.0, 4.0)) for x in pair)
    monkeypatch.setattr(budget, "_now", lambda: next(times))
    monkeypatch.setattr(budget, "PREDICTOR_STAGE", 5.0)  # the predictors: 4 x 3 s x 5 = 1 min
    out = calibrate(tiny_dirs["llama"], CalibrationSettings(budget_minutes=2.5, **small), progress=False)
    meta = json.loads((out / pipeline.META).read_text())
    assert meta["budget"]["draft_sequences"] == 22 == meta["settings"]["draft_sequences"]  # 90 s / (3 s + 1 s)
    assert meta["settings"]["budget_minutes"] is None
    monkeypatch.setattr(budget, "fit", None)  # the same budget again: remembered, and the artifact reused
    assert calibrate(tiny_dirs["llama"], CalibrationSettings(budget_minutes=2.5, **small), progress=False) == out


def test_a_budget_too_small_is_refused_with_the_budget_that_fits(tiny_dirs, tmp_path):
    from specee_compile.calibrate import calibrate
    from specee_compile.errors import ConfigError
    from specee_compile.testing import write_calibration_jsonl

    calib = write_calibration_jsonl(tmp_path / "c.jsonl", examples=40)
    with pytest.raises(ConfigError, match=r"fits \d+ draft conversations.*give --budget"):
        calibrate(tiny_dirs["llama"], CalibrationSettings(budget_minutes=1e-4, calib_file=str(calib)),
                  progress=False)


def test_a_fusion_draft_starts_as_its_warm_start_and_trains_on_the_stored_layers(target, tmp_path):
    seqs = sequences(8)
    layers = fusion_layers(target.config.num_hidden_layers)
    _, examples = _stored(target, tmp_path / "store", seqs, layers)
    plain = _draft(target, examples)
    fused = EagleDraft(target, plain.vocab_map, fusion=True)
    fused.load_state_dict(plain.state_dict(), strict=False)
    assert fused.fusion == layers == (0, 1)
    ex, use_exit = examples[0], torch.arange(len(seqs[0]) - 1) % 2 == 0
    torch.testing.assert_close(fused.fed_features(ex, use_exit), plain.fed_features(ex, use_exit))
    start = fused.fuse.weight.detach().clone()
    log = train_draft(fused, examples, SETTINGS, progress=False)
    assert all(torch.isfinite(torch.tensor(e["mean_loss"])) for e in log["epochs"])
    assert not torch.equal(fused.fuse.weight, start), "the fusion layer must learn"


def test_a_fusion_draft_proposes_step_by_step_what_it_computes_batched(target):
    seq = sequences(1, seed=5)[0]
    p = target_pass(target, seq)
    draft = EagleDraft(target, torch.arange(TINY_VOCAB), fusion=True)
    torch.manual_seed(1)
    with torch.no_grad():
        draft.fuse.weight.normal_(0, 0.2)  # not the identity start: every slot counts
    L = target.config.num_hidden_layers
    exits = torch.tensor([(L - 1 if t % 3 else 1) for t in range(len(seq) - 1)])  # some positions left at layer 1
    with torch.no_grad():
        feats = draft.inputs(p.z[:, :-1], exits)
        _, logits, _ = draft(torch.tensor([seq[1:]]), feats[None], None, 1)
        cache = None
        for t in range(1, len(seq)):
            z = p.z[:, t - 1:t]
            one = draft.inputs(z, exits[t - 1:t])  # the feature a step that left at that layer hands over
            ids, cache = draft.propose(seq[t], one[0], cache, t)
            assert ids.tolist() == draft.vocab_map[logits[0, t - 1].topk(4).indices].tolist(), t


def test_soft_labels_are_the_targets_distribution_over_the_draft_vocabulary(target, tmp_path):
    """With soft labels the draft learns the target's distribution over its vocabulary (its
    head on the stored final feature); where that distribution is one-hot (a sharpened
    teacher) the loss is the greedy-token loss, and otherwise it is not."""
    from specee_compile.calibrate.train import example_loss

    seqs = sequences(4, seed=3)
    _, examples = _stored(target, tmp_path / "store", seqs)
    draft = EagleDraft(target, torch.arange(TINY_VOCAB))  # every token in the vocabulary
    torch.testing.assert_close(draft.teacher_head, target.lm_head.weight.float())
    inverse = torch.arange(TINY_VOCAB)
    soft, hard = SETTINGS, CalibrationSettings(**{**SETTINGS.__dict__, "draft_soft_labels": False})
    ex = examples[0]
    torch.testing.assert_close(ex.next_token, (ex.final @ draft.teacher_head.T).argmax(-1))
    with torch.no_grad():
        loss_soft = example_loss(draft, ex, soft, inverse, 0)[0]
        loss_hard = example_loss(draft, ex, hard, inverse, 0)[0]
        assert not torch.isclose(loss_soft, loss_hard)
        draft.teacher_head = draft.teacher_head * 1e4  # one-hot at the greedy token
        torch.testing.assert_close(example_loss(draft, ex, soft, inverse, 0)[0], loss_hard)


def test_own_answers_are_each_prompts_greedy_answer_and_resume_where_they_stopped(target, tmp_path, monkeypatch):
    """``--own``'s text: batched, left-padded greedy answers equal one prompt's greedy answer,
    and a run that stopped after some batches makes only the rest."""
    from specee_compile.drafts.train import greedy_answers
    from specee_compile.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    prompts = sequences(7, seed=5)
    progress = tmp_path / "answers.json"
    got = greedy_answers(target, tokenizer, prompts, 6, progress, batch=3)
    for prompt, ids in zip(prompts, got):
        alone = target.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)[0].tolist()
        eos = [k for k in range(len(prompt), len(alone)) if alone[k] == tokenizer.eos_token_id]
        assert ids == alone[: eos[0] + 1 if eos else None]

    kept = json.loads(progress.read_text())
    progress.write_text(json.dumps({k: v for k, v in kept.items() if int(k) < 4}))  # stopped after 4 answers
    made = []
    real = target.generate
    monkeypatch.setattr(target, "generate", lambda **kw: made.append(len(kw["input_ids"])) or real(**kw))
    assert greedy_answers(target, tokenizer, prompts, 6, progress, batch=3) == got
    assert sum(made) == 3 and json.loads(progress.read_text()) == kept
