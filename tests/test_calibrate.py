"""Calibration end to end on a tiny random model with a JSONL calibration file."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from specee_compile.calibrate import CalibrationSettings, calibrate, load_calibration
from specee_compile.calibrate import pipeline
from specee_compile.calibrate.report import format_report
from specee_compile.calibrate.store import DraftExample
from specee_compile.calibrate.train import train_draft
from specee_compile.errors import ConfigError
from specee_compile.reference import DecodeSettings, ReferenceDecoder
from tests.conftest import make_tiny_model
from specee_compile.testing import FAMILIES, MORE_FAMILIES

TINY = dict(draft_sequences=8, predictor_sequences=4, draft_vocab=64, predictor_hidden=16, predictor_epochs=3,
            positions_per_sequence=16, draft_epochs=1)


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.jsonl"
    rows = [{"prompt": f"hello world {i}", "response": "the quick brown fox jumps over the lazy dog " * 3}
            for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def settings(calib_file):
    return CalibrationSettings(calib_file=str(calib_file), **TINY)


def test_calibration_writes_a_loadable_artifact_and_reuses_it(tiny_dirs, settings):
    out = calibrate(tiny_dirs["llama"], settings, progress=False)
    meta = json.loads((out / pipeline.META).read_text())
    assert meta["num_layers"] == 3 and len(meta["predictors"]["per_layer"]) == 3
    assert set(meta["draft"]) >= {"top1_after_full", "top4_after_full", "top1_after_exit", "top4_after_exit",
                                  "top1_depth2"}
    assert meta["cost_model"]["full_head"] > 0
    mtime = (out / pipeline.WEIGHTS).stat().st_mtime_ns
    assert calibrate(tiny_dirs["llama"], settings, progress=False) == out
    assert (out / pipeline.WEIGHTS).stat().st_mtime_ns == mtime, "a cached calibration must be reused"
    target = make_tiny_model("llama")
    cal = load_calibration(out, target)
    result = ReferenceDecoder(target, cal.draft, cal.bank, cal.schedule,
                              DecodeSettings(threshold=cal.threshold)).generate([1, 40, 41], 6)
    assert len(result.tokens) == len(result.exit_layers) <= 6
    report = format_report(out)
    assert "teacher-forced on held-out windows" in report and "lower bound at 95% confidence" in report
    assert meta["chosen"]["agreement_low"] <= meta["chosen"]["agreement"]


def test_two_runs_that_calibrate_the_same_model_at_once_calibrate_it_once(tiny_dirs, settings, tmp_path,
                                                                           monkeypatch):
    import concurrent.futures

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real, runs = pipeline._calibrate, []

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_calibrate", counted)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: calibrate(tiny_dirs["llama"], settings, progress=False), range(2)))
    assert outs[0] == outs[1] and (outs[0] / pipeline.META).is_file() and len(runs) == 1


def test_recalibration_replaces_the_artifact(tiny_dirs, settings):
    out = calibrate(tiny_dirs["llama"], settings, progress=False)
    before = (out / pipeline.WEIGHTS).stat().st_mtime_ns
    calibrate(tiny_dirs["llama"], settings, force=True, progress=False)
    assert (out / pipeline.WEIGHTS).stat().st_mtime_ns != before


def test_failed_save_leaves_no_artifact_and_no_partial(tiny_dirs, calib_file, monkeypatch):
    settings = CalibrationSettings(calib_file=str(calib_file), seed=7, **TINY)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        calibrate(tiny_dirs["llama"], settings, progress=False)
    out = pipeline.artifact_dir(tiny_dirs["llama"], settings)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_settings_change_the_cache_key(calib_file):
    a = CalibrationSettings(calib_file=str(calib_file), **TINY)
    b = CalibrationSettings(calib_file=str(calib_file), **{**TINY, "draft_vocab": 32})
    assert a.key() != b.key()


@pytest.mark.parametrize("field, value", [("draft_vocab", 0), ("predictor_epochs", -1), ("target_agreement", 1.5),
                                          ("agreement_confidence", 1.0)])
def test_bad_calibration_settings_raise(field, value):
    with pytest.raises(ConfigError, match=field if field != "target_agreement" else "target_agreement"):
        CalibrationSettings(**{field: value})


def test_unknown_rule_in_settings_raises():
    with pytest.raises(ValueError, match="exit rule"):
        CalibrationSettings(rule="sometimes")


def test_artifact_from_another_version_is_refused(tiny_dirs, settings, tmp_path):
    from specee_compile.errors import ModelLoadError

    out = calibrate(tiny_dirs["llama"], settings, progress=False)
    meta = json.loads((out / pipeline.META).read_text())
    meta["artifact_version"] = 99
    copy = tmp_path / "cal"
    copy.mkdir()
    (copy / pipeline.META).write_text(json.dumps(meta))
    (copy / pipeline.WEIGHTS).write_bytes((out / pipeline.WEIGHTS).read_bytes())
    with pytest.raises(ModelLoadError, match="version 99"):
        load_calibration(copy, make_tiny_model("llama"))
    # calibrate() does not reuse a cached artifact of another version: it calibrates again
    (out / pipeline.META).write_text(json.dumps(meta))
    assert calibrate(tiny_dirs["llama"], settings, progress=False) == out
    assert json.loads((out / pipeline.META).read_text())["artifact_version"] == pipeline.ARTIFACT_VERSION


def test_evaluation_reports_bounds_sweep_and_free_running(tiny_dirs, settings):
    from specee_compile.calibrate.evaluate import dense_greedy, free_running, teacher_forced
    from specee_compile.calibrate.simulate import CostModel

    target = make_tiny_model("llama")
    cal = load_calibration(calibrate(tiny_dirs["llama"], settings, progress=False), target)
    costs = CostModel(**cal.meta["cost_model"])
    prompts = [[1, 40, 41, 42], [1, 7, 8, 9]]
    dense = dense_greedy(target, prompts, 8, {2}, progress=False)
    rows = teacher_forced(target, cal, costs, prompts, dense, [0.5, 0.9], progress=False)
    bounds, sweep = rows[0], rows[1:]
    assert bounds["rule"] == "bounds" and 1 <= bounds["ideal_mean_layers"] <= bounds["oracle_mean_layers"] <= 3
    assert len(sweep) == 6 and all(0 <= r["agreement"] <= 1 and r["relative_cost_mask"] > 0 for r in sweep)
    free = free_running(target, cal, prompts, dense, 8, {2}, 0.5, progress=False)
    assert len(free) == 6 and all(0 <= r["exact_match"] <= 1 for r in free)


def test_a_supplied_draft_is_used_instead_of_training(tiny_dirs, settings, tmp_path):
    from specee_compile.calibrate.pipeline import save_draft

    target = make_tiny_model("llama")
    trained = load_calibration(calibrate(tiny_dirs["llama"], settings, progress=False), target)
    path = tmp_path / "draft.safetensors"
    save_draft(trained.draft, path)
    supplied = dataclasses.replace(settings, draft_file=str(path))
    out = calibrate(tiny_dirs["llama"], supplied, progress=False)
    meta = json.loads((out / pipeline.META).read_text())
    assert meta["draft"]["training"] == {"supplied": str(path)}
    again = load_calibration(out, target)
    for name, tensor in trained.draft.trainable_state().items():
        assert (again.draft.state_dict()[name] == tensor).all(), name


def test_a_draft_of_another_shape_is_refused(tiny_dirs, settings, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"vocab_map": torch.arange(4), "head.weight": torch.zeros(4, 7)}, path)
    with pytest.raises(ConfigError, match="does not fit this model"):
        pipeline.load_draft(path, make_tiny_model("llama"))


def _tiny_draft():
    """A draft over a tiny Llama with its weights moved off their warm start."""
    from specee_compile.calibrate.draft import EagleDraft

    target = make_tiny_model("llama")
    torch.manual_seed(0)
    draft = EagleDraft(target, torch.arange(0, 320, 2))
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return draft


def test_draft_training_forward_sees_no_future_position():
    """The batched forward calibration trains with must equal step-by-step decoding: a draft
    whose cache starts at position 1 once let every position attend to the next one."""
    draft = _tiny_draft()
    with torch.no_grad():
        ids = torch.tensor([[3, 17, 42, 99, 7, 250, 31]])
        feats = torch.randn(1, ids.shape[1], 64)
        _, batched, _ = draft(ids, feats, None, 1)
        _, first, cache = draft(ids[:, :2], feats[:, :2], None, 1)
        stepwise = [first[0, 0], first[0, 1]]
        for t in range(2, ids.shape[1]):
            _, logits, cache = draft(ids[:, t:t + 1], feats[:, t:t + 1], cache, 1 + t)
            stepwise.append(logits[0, 0])
    torch.testing.assert_close(batched[0], torch.stack(stepwise), atol=1e-5, rtol=1e-5)
    _, _, empty = draft(ids[:, :0], feats[:, :0], None, 1)  # a prompt of one token leaves the draft nothing
    assert empty[0].shape[2] == 0


def test_unrolled_draft_steps_equal_decoding_a_chain_on_its_own_guesses():
    """Step j of training's unrolled draft at position t must be what the draft computes at depth
    j of a tree step: the decoded context up to t-j+1 fed the target's features, then j-1 nodes
    each fed the feature its parent predicted."""
    draft = _tiny_draft()
    with torch.no_grad():
        ids = torch.tensor([3, 17, 42, 99, 7, 250, 31, 5])
        feats = torch.randn(ids.shape[0], 64)
        steps = draft.unrolled(ids, feats, 3)
        assert [s[1].shape[0] for s in steps] == [8, 7, 6]
        for j in (1, 2, 3):
            for t in range(j, ids.shape[0] + 1):  # positions are 1-based: ids[t - 1] sits at t
                f, logits, cache = draft(ids[None, :t - j + 1], feats[None, :t - j + 1], None, 1)
                for p in range(t - j + 2, t + 1):
                    f, logits, cache = draft(ids[None, p - 1:p], f[:, -1:], cache, p)
                torch.testing.assert_close(steps[j - 1][1][t - j], logits[0, -1], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(steps[j - 1][0][t - j], f[0, -1], atol=1e-5, rtol=1e-5)


def test_draft_unroll_trains_on_its_own_guesses_under_its_own_cache_key(tiny_dirs, settings):
    deeper = dataclasses.replace(settings, draft_unroll=3)
    assert deeper.key() != settings.key()
    meta = json.loads((calibrate(tiny_dirs["llama"], deeper, progress=False) / pipeline.META).read_text())
    assert meta["settings"]["draft_unroll"] == 3
    assert 0 <= meta["draft"]["top1_depth2"] <= 1


def test_cache_keys_change_only_on_purpose():
    """A new default calibrates every model again (28 minutes for SmolLM2): the default key is
    pinned. A setting added later stays out of the key at the value that trains as before it
    existed, so calibrations made before it are still found."""
    assert CalibrationSettings().key() == "29a3d454541a"  # since soft labels and the agreement bound
    before = {"draft_soft_labels": False, "agreement_confidence": 0.5}  # the keys from before those two
    assert CalibrationSettings(**before).key() == "7ce629f35444"
    assert CalibrationSettings(draft_fusion=False, **before).key() == "0002fb64cac4"
    assert CalibrationSettings(draft_sequences=320, draft_epochs=8, draft_unroll=1, draft_fusion=False,
                               **before).key() == "8730294e7620"


def test_sequences_too_short_for_every_unrolled_step_are_left_out_of_training():
    """A four-token sequence leaves a 4-step unroll nothing at its last step (a NaN loss if fed)."""
    draft = _tiny_draft()
    passes = [DraftExample(torch.arange(3, 3 + n), torch.randn(n, 64), torch.randn(n, 64), torch.arange(4, 4 + n) * 2)
              for n in (4, 9)]
    settings = CalibrationSettings(**{**TINY, "draft_unroll": 4})
    log = train_draft(draft, passes, settings, progress=False)
    assert all(math.isfinite(e["mean_loss"]) for e in log["epochs"])


def test_sequences_too_short_for_the_predictors_are_a_clear_error(tiny_dirs, calib_file):
    settings = CalibrationSettings(calib_file=str(calib_file), **{**TINY, "max_seq_len": 6})
    with pytest.raises(ConfigError, match="8 tokens or more"):
        calibrate(tiny_dirs["llama"], settings, progress=False)


def test_a_shipped_draft_for_the_models_weights_is_used_unless_declined(tiny_dirs, settings, tmp_path, monkeypatch):
    from specee_compile import drafts
    from specee_compile.calibrate.pipeline import save_draft

    target = make_tiny_model("llama")
    trained = load_calibration(calibrate(tiny_dirs["llama"], settings, progress=False), target)
    folder = tmp_path / "shipped" / "tiny"
    folder.mkdir(parents=True)
    save_draft(trained.draft, folder / drafts.WEIGHTS)
    (folder / drafts.RECORD).write_text(json.dumps({"weights_key": drafts.weights_key(tiny_dirs["llama"])}))
    (tmp_path / "shipped" / "other").mkdir()
    (tmp_path / "shipped" / "other" / drafts.RECORD).write_text(json.dumps({"weights_key": "0" * 16}))
    monkeypatch.setattr(drafts, "ROOT", tmp_path / "shipped")
    seeded = dataclasses.replace(settings, seed=5)  # not the artifact above
    meta = json.loads((calibrate(tiny_dirs["llama"], seeded, progress=False) / pipeline.META).read_text())
    assert meta["draft"]["training"] == {"supplied": str(folder / drafts.WEIGHTS)}
    assert drafts.find(tiny_dirs["qwen2"]) is None
    declined = dataclasses.replace(seeded, shipped_draft=False)
    meta = json.loads((calibrate(tiny_dirs["llama"], declined, progress=False) / pipeline.META).read_text())
    assert "epochs" in meta["draft"]["training"]


def test_draft_scores_count_only_the_positions_from_each_start():
    """draft_metrics with starts scores the rows that draft a response token: a start of 1 is
    every position, a start of k leaves S - k, and the hits of a later start are a subset."""
    from specee_compile.calibrate.collect import target_pass

    draft = _tiny_draft()
    target = make_tiny_model("llama")
    torch.manual_seed(1)
    passes = [target_pass(target, torch.randint(1, 300, (n,)).tolist()) for n in (12, 9)]
    every = pipeline.draft_metrics(draft, passes, 1)
    assert pipeline.draft_metrics(draft, passes, 1, [1, 1]) == every
    assert every["positions"] == 11 + 8
    later = pipeline.draft_metrics(draft, passes, 1, [5, 8])  # the second pass keeps its last row only
    assert later["positions"] == (12 - 5) + (9 - 8)
    for name in ("top1_after_full", "top4_after_full"):
        assert later[name] * later["positions"] <= every[name] * every["positions"] + 1e-9
    none = pipeline.draft_metrics(draft, passes, 1, [12, 9])  # prompts only: nothing to score
    assert none["positions"] == 0 and none["top1_after_full"] == 0


def test_a_supplied_drafts_predictor_text_begins_after_what_it_trained_on(tmp_path, calib_file):
    from specee_compile import drafts

    draft = tmp_path / drafts.WEIGHTS
    draft.write_bytes(b"not read here")
    sharegpt = CalibrationSettings(draft_file=str(draft), **TINY)
    assert pipeline._unseen_from(sharegpt) == TINY["draft_sequences"]  # no record: after a calibration's draft text
    (tmp_path / drafts.RECORD).write_text(json.dumps({"conversations_trained": [[0, 1280], [8960, 10240]]}))
    assert pipeline._unseen_from(sharegpt) == 10240
    (tmp_path / drafts.RECORD).write_text(json.dumps({"conversations_trained": [["x"]]}))
    assert pipeline._unseen_from(sharegpt) == TINY["draft_sequences"]
    assert pipeline._unseen_from(dataclasses.replace(sharegpt, calib_file=str(calib_file))) == 0


def _replay_setup(tokens: int, keep_prefix: int = 0):
    """A tiny Llama, a tiny draft, a dense pass over ``tokens`` random ids (keeping the K/V of
    ``keep_prefix`` positions) and a predictor bank biased so that some layers fire and others do not."""
    from specee_compile.calibrate.collect import target_pass
    from specee_compile.predictor import PredictorBank

    torch.manual_seed(0)
    target = make_tiny_model("llama")
    draft = _tiny_draft()
    p = target_pass(target, torch.randint(1, 300, (tokens,)).tolist(), keep_prefix)
    bank = PredictorBank(p.z.shape[0], 16)
    with torch.no_grad():
        bank.b2.copy_(torch.tensor([0.25, 0.15, 0.0]))  # some layers fire, others not
    return target, draft, p, bank


@pytest.mark.parametrize("rule, precomputed", [("full", True), ("full", False), ("reduced", True),
                                               ("reduced", False), ("draft", True)])
def test_replay_decides_as_the_reference_decoders_layer_by_layer_exit(rule, precomputed):
    """The calibration's replay scores a position's active layers in one batch; every exit,
    emitted token and count must be what ``reference.exit_decision`` gives layer by layer,
    with the head tokens given or computed at the step (where predictors fired)."""
    from specee_compile.calibrate.simulate import replay_window, rule_tokens
    from specee_compile.reference import DecodeSettings, exit_decision
    from specee_compile.schedule import Schedule

    target, draft, p, bank = _replay_setup(40)
    L = p.z.shape[0]
    schedule = Schedule(L, (0, 1), 2, (-1, 0, 1), online=True)
    settings = DecodeSettings(rule=rule, threshold=0.55)
    lo = 10
    heads = rule_tokens(target, draft, p.z[:, lo:], rule) if precomputed else None
    got = replay_window(target, draft, bank, schedule, settings, p, lo, head_tokens=heads)

    w, history, exits, fired = target.lm_head.weight, [], [], 0
    _, _, cache = draft(p.ids[None, 1:lo], p.z[-1, : lo - 1][None], None, 1)
    feature = p.z[-1, lo - 1]
    for t in range(lo, p.ids.numel()):
        ids, cache = draft.propose(int(p.ids[t]), feature, cache, t)
        prev, exit_layer, predictors = None, L - 1, 0
        for layer in sorted(schedule.active(history)):
            token, prev, c = exit_decision(p.z[layer, t], w[ids], ids, prev, bank, layer, settings, w, draft.vocab_map)
            predictors += 1
            fired += c.full_heads + c.reduced_heads
            if token is not None:
                exit_layer = layer
                break
        exits.append((exit_layer, token if exit_layer < L - 1 else int(p.next_token[t]), predictors))
        feature = p.z[exit_layer, t]
        history.append(exit_layer)
    assert [(e, tok, s.predictors) for e, tok, s in zip(got.exit_layers, got.emitted, got.steps)] == exits
    full_depth = sum(e == L - 1 for e in got.exit_layers)  # these steps ran the head once more
    assert sum(s.full_heads + s.reduced_heads for s in got.steps) == fired + full_depth
    # predictors fired somewhere (the draft rule then exits; the random model's head argmax is
    # rarely a draft candidate, so the other rules mostly go on), and some steps ran to the end
    assert (full_depth < len(got.exit_layers) if rule == "draft" else fired > 0) and full_depth > 0


def test_a_schedule_sweep_replayed_in_lockstep_equals_one_replay_per_policy():
    """The schedule search replays its policies over a window as one batch of draft steps;
    every policy's exits, tokens, counts and draft hits must be what its own replay gives."""
    from specee_compile.calibrate.simulate import replay_window, replay_window_many, rule_tokens
    from specee_compile.reference import DecodeSettings
    from specee_compile.schedule import Schedule

    target, draft, p, bank = _replay_setup(48)
    L = p.z.shape[0]
    lo = 12
    heads = rule_tokens(target, draft, p.z[:, lo:], "draft")
    policies = [(Schedule(L, layers, 2, (-1, 0, 1), online=True), DecodeSettings(rule="draft", threshold=t))
                for layers in ((0, 1), (0,), tuple(range(L - 1))) for t in (0.5, 0.55)]
    together = replay_window_many(target, draft, bank, policies, p, lo, head_tokens=heads)
    alone = [replay_window(target, draft, bank, s, d, p, lo, head_tokens=heads) for s, d in policies]
    assert together == alone
    assert len({tuple(r.exit_layers) for r in alone}) > 1  # the policies took different paths


def test_windows_replayed_as_one_batch_equal_each_window_alone():
    """The schedule search batches the draft steps of many windows with prefixes of different
    lengths (left-padded, positions shifted); each window's replay must be what it gives alone,
    including a window that ends before the others."""
    from specee_compile.calibrate.collect import target_pass
    from specee_compile.calibrate.simulate import replay_window_many, replay_windows, rule_tokens
    from specee_compile.reference import DecodeSettings
    from specee_compile.schedule import Schedule

    target, draft, p, bank = _replay_setup(48)
    q = target_pass(target, torch.randint(1, 300, (30,)).tolist())  # a shorter sequence
    L = p.z.shape[0]
    policies = [(Schedule(L, layers, 2, (-1, 0, 1), online=True), DecodeSettings(rule=rule, threshold=t))
                for layers, rule in (((0, 1), "draft"), (tuple(range(L - 1)), "full")) for t in (0.5, 0.55)]
    windows = [(p, lo, end, rule_tokens(target, draft, p.z[:, lo:end], "full")) for lo, end in ((12, None), (30, 44))]
    windows.append((q, 5, None, rule_tokens(target, draft, q.z[:, 5:], "full")))
    together = replay_windows(target, draft, bank, policies, windows, rows=len(policies) * len(windows))
    alone = [replay_window_many(target, draft, bank, policies, *w) for w in windows]
    assert together == alone
    assert [len(r[0].exit_layers) for r in together] == [36, 14, 25]
    assert all(min(r[0].exit_layers) < L - 1 for r in alone)  # early exits change what the draft is fed next
    assert len({tuple(r.exit_layers) for rs in alone for r in rs}) > 3  # the policies and windows differ


@pytest.mark.parametrize("threshold, kept", [(0.53, False), (0.55, False), (0.55, True)])
def test_replays_with_propagated_kv_decide_as_the_reference_decoder_step_by_step(threshold, kept, monkeypatch):
    """A decoder's exited position writes its deeper K/V from its exit state, which the dense
    replay ignores. Replays on passes recomputed with their own exits, once settled, must make
    the reference decoder's teacher-forced decisions (kv_policy propagate) step by step. (The
    draft rule: on a random model the head's argmax is rarely a draft token, so the others
    seldom exit.) ``kept``: the dense pass kept its window's prefix K/V, and the replays start
    from it without a pass of their own."""
    from specee_compile.architecture import Architecture
    from specee_compile.calibrate import simulate
    from specee_compile.calibrate.simulate import propagated_pass, propagated_replays, replay_window
    from specee_compile.reference import DecodeSettings, ReferenceDecoder
    from specee_compile.schedule import Schedule

    lo = 10
    target, draft, p, bank = _replay_setup(40, keep_prefix=lo if kept else 0)
    L = p.z.shape[0]
    if kept:
        keys, values = simulate.dense_prefix(target, p.ids[:lo], Architecture(target).specs(lo))
        for got, want in zip(p.prefix[0] + p.prefix[1], keys + values):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(simulate, "dense_prefix", None)  # a pass of its own would fail
    no_exit = propagated_pass(target, p.ids, torch.full((40,), L - 1))
    torch.testing.assert_close(no_exit.z, p.z, atol=1e-5, rtol=1e-5)
    assert torch.equal(no_exit.next_token, p.next_token)

    schedule = Schedule(L, (0, 1), 2, (-1, 0, 1), online=True)
    settings = DecodeSettings(rule="draft", kv_policy="propagate", threshold=threshold)
    (got,), unsettled = propagated_replays(target, draft, bank, (schedule, settings), [(p, lo, None)], rounds=40)
    assert unsettled == 0
    decoder = ReferenceDecoder(target, draft, bank, schedule, settings)
    state = decoder.prefill(p.ids[:lo].tolist())
    tokens, exits = [], []
    for t in range(lo, p.ids.numel()):  # fed the text's token, what does the step emit, from which layer
        state.token = int(p.ids[t])
        decoder.step(state)
        tokens.append(state.token)
        exits.append(state.history[-1])
    assert (got.exit_layers, got.emitted) == (exits, tokens)
    assert min(exits) < L - 1  # some steps exited, so later steps read propagated K/V
    dense = replay_window(target, draft, bank, schedule, settings, p, lo)
    assert (dense.exit_layers, dense.emitted) != (exits, tokens)  # and that changed decisions


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_a_pass_keeps_the_dense_prefix_kv_or_none(family):
    """A target pass hands on the K/V its cache holds for the first positions: the same as
    ``dense_prefix`` computes, in every family. A sliding-window cache keeps only its window's
    last positions, which must not be handed on as a whole prefix."""
    from specee_compile.architecture import Architecture
    from specee_compile.calibrate.collect import target_pass
    from specee_compile.calibrate.simulate import dense_prefix

    target = make_tiny_model(family)
    ids = torch.randint(3, 300, (30,))
    kept = target_pass(target, ids.tolist(), keep_prefix=20).prefix
    window = getattr(target.config, "sliding_window", None)
    if window and window < 30:
        assert kept is None
        return
    keys, values = dense_prefix(target, ids[:20], Architecture(target).specs(30))
    assert len(kept[0]) == len(keys) == target.config.num_hidden_layers
    for got, want in zip(kept[0] + kept[1], keys + values):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_schedule_search_passes_over_a_policy_whose_propagated_kv_misses_the_target(monkeypatch):
    """The search checks its cheapest policies with propagated K/V: one that falls below the
    target there is not chosen, the next that holds is, and the choice reports the check's
    figures next to the dense-K/V replay's."""
    from specee_compile.calibrate import simulate
    from specee_compile.calibrate.simulate import CostModel, rule_tokens

    target, draft, p, bank = _replay_setup(40)
    L, lo = p.z.shape[0], 10
    windows = [(p, lo, rule_tokens(target, draft, p.z[:, lo:], "draft"))]
    settings = CalibrationSettings(rule="draft", target_agreement=0.5, **TINY)
    costs = CostModel(full_head=2.0, predictor=0.01, draft=0.1, kv_projection=0.05)
    calls = []

    def spoiled_first(*args, **kwargs):  # the first policy checked emits a wrong token at every step
        runs, unsettled = simulate.propagated_replays(*args, **kwargs)
        if not calls:
            runs = [dataclasses.replace(r, emitted=[t + 1 for t in r.emitted]) for r in runs]
        calls.append(args[3])
        return runs, unsettled

    monkeypatch.setattr(pipeline, "propagated_replays", spoiled_first)
    chosen, search = pipeline._choose_schedule(target, draft, bank, windows, settings, costs, L, False)
    rows = search["rows"]
    checked = [r for r in rows if "propagated" in r]
    assert len(calls) == len(checked) == 2
    reaching = sorted((r for r in rows if r["agreement_low"] >= 0.5), key=lambda r: r["relative_cost"])
    first = reaching[0]
    assert first["propagated"]["agreement"] == 0.0

    def dominated(r):  # the failed policy's predictors and more, at a threshold no higher: not checked
        return r["top_n"] >= first["top_n"] and r["threshold"] <= first["threshold"]

    second = next(r for r in reaching[1:] if not dominated(r))
    assert not any(dominated(r) for r in checked if r is not first)
    assert (chosen["top_n"], chosen["threshold"]) == (second["top_n"], second["threshold"])
    assert chosen["agreement"] == second["propagated"]["agreement"] >= 0.5
    assert chosen["dense_kv_replay"]["agreement"] == second["agreement"]
    assert all(policy[1].kv_policy == "propagate" for policy in calls)


def test_the_propagated_check_passes_over_policies_that_exit_wherever_a_failed_one_does():
    """Once a policy fails the propagated check, one with its predictors and more at a
    threshold no higher is not checked; the next cheaper policy that is not is, and after
    PROPAGATED_CHECKS failures only the replay's most agreeing one."""
    policies = [(4, 0.8), (8, 0.8), (4, 0.9), (8, 0.9), (4, 0.95), (8, 0.95)]
    costs = [1.00, 1.01, 1.02, 1.03, 1.04, 1.05]
    agreement = [0.981, 0.981, 0.99, 0.99, 0.995, 0.994]
    sweep = [{"agreement": a, "agreement_low": a - 0.001, "relative_cost": c} for a, c in zip(agreement, costs)]

    def run(holds):
        rows = [dict(r) for r in sweep]
        checked = []

        def check(i):
            checked.append(policies[i])
            agree = 0.99 if holds(policies[i]) else 0.9 + 0.05 * policies[i][1]  # failing: higher t, higher
            return {"agreement": agree, "agreement_low": agree - 0.005, "relative_cost": costs[i]}

        return policies[pipeline._check_policies(policies, rows, 0.98, check)], checked

    assert run(lambda p: p[1] >= 0.9) == ((4, 0.9), [(4, 0.8), (4, 0.9)])  # (8, 0.8) is passed over
    assert run(lambda p: p[1] >= 0.95) == ((4, 0.95), [(4, 0.8), (4, 0.9), (4, 0.95)])  # the most agreeing, last
    assert run(lambda p: p == (8, 0.95)) == ((4, 0.95), [(4, 0.8), (4, 0.9), (4, 0.95)])  # none holds: most agreeing
    costs[0], costs[1] = 1.0003, 1.0001  # (8, 0.8) a hair cheaper: the same cost, so (4, 0.8) still goes first
    sweep[0]["relative_cost"], sweep[1]["relative_cost"] = costs[0], costs[1]
    assert run(lambda p: p[1] >= 0.9) == ((4, 0.9), [(4, 0.8), (4, 0.9)])


def test_agreement_bound_is_the_clustered_lower_confidence_bound():
    """The search's agreement must hold at a lower confidence bound over windows: the ratio
    estimator's standard error, clustered by window (worked by hand for two windows)."""
    from statistics import NormalDist

    two = [(9, 10), (10, 10)]  # p = 0.95; residuals -0.5, 0.5; var = 2 * 0.5 / 20**2; se = 0.05
    assert pipeline.agreement_bound(two, 0.95) == pytest.approx(0.95 - NormalDist().inv_cdf(0.95) * 0.05)
    assert pipeline.agreement_bound(two, 0.5) == pytest.approx(0.95)  # the point estimate
    assert pipeline.agreement_bound([(8, 10), (16, 20)], 0.99) == pytest.approx(0.8)  # windows agree: no spread
    assert pipeline.agreement_bound([(7, 10)], 0.95) == pytest.approx(0.7)  # one window: no spread to measure
    wide = pipeline.agreement_bound([(0, 10), (10, 10)], 0.95)
    assert wide < pipeline.agreement_bound(two, 0.95) < 0.95


@pytest.mark.parametrize("group", [1, 2, 7])
def test_predictor_gradients_by_layer_group_equal_the_whole_batchs(group):
    """Training accumulates each batch's gradient a few layers at a time (for speed); the sum
    must be the gradient of the mean BCE over every layer and sample at once."""
    from torch import nn

    from specee_compile.calibrate.predictors import accumulate_gradients
    from specee_compile.predictor import PredictorBank

    torch.manual_seed(0)
    bank = PredictorBank(5, 16)
    features, labels = torch.randn(5, 40, 12), (torch.rand(5, 40) < 0.3).float()
    nn.BCEWithLogitsLoss()(bank.logits_all(features), labels).backward()
    whole = [p.grad.clone() for p in bank.parameters()]
    bank.zero_grad()
    accumulate_gradients(bank, features, labels, group)
    for got, want in zip((p.grad for p in bank.parameters()), whole):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("rule", ["full", "reduced"])
def test_the_head_tokens_of_a_few_rows_are_the_batched_products(rule):
    """``rule_tokens`` runs a few rows through torch and many through numpy's BLAS: the same tokens."""
    from specee_compile.calibrate.simulate import FEW_ROWS, rule_tokens

    target, draft, p, _ = _replay_setup(40)
    many = rule_tokens(target, draft, p.z, rule)  # [L, 40]
    assert p.z.shape[0] * 40 > FEW_ROWS
    few = torch.cat([rule_tokens(target, draft, p.z[:, t:t + 1], rule) for t in range(40)], dim=1)
    assert torch.equal(few, many)
