"""The compiled SpecEE engine against the eager reference decoder, on tiny random models."""

from __future__ import annotations

import json

import pytest

from specee_compile.bundle import read_manifest
from specee_compile.calibrate import CalibrationSettings, calibrate, load_calibration
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.reference import DecodeSettings, ReferenceDecoder
from specee_compile.runtimes import load
from specee_compile.testing import make_tiny_model

PROMPTS = ([1, 40, 41, 42], [1, 7, 8, 9, 10, 11], [1, 200])
TINY = dict(draft_sequences=8, predictor_sequences=4, draft_vocab=64, predictor_hidden=16, predictor_epochs=3,
            positions_per_sequence=16, draft_epochs=1)


@pytest.fixture(scope="module")
def calibrations(tiny_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "c.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"hello world {i}",
                                          "response": "the quick brown fox jumps over the lazy dog " * 3})
                              for i in range(12)))
    settings = CalibrationSettings(calib_file=str(path), **TINY)
    return {family: calibrate(d, settings, progress=False) for family, d in tiny_dirs.items()}


def _bundle(tiny_dirs, calibrations, tmp_path, family, threshold, rule):
    return compile_bundle(CompileConfig(model=str(tiny_dirs[family]), out=tmp_path / f"{family}.onnx", max_context=64,
                                        specee=True, calibration=calibrations[family], threshold=threshold,
                                        exit_rule=rule), progress=False)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_predictors_that_never_fire_give_the_dense_engines_tokens(tiny_dirs, calibrations, tmp_path, family):
    out = _bundle(tiny_dirs, calibrations, tmp_path, family, 0.999999, "full")
    engine, dense = load(out), load(out, dense=True)
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=12)
        assert got.token_ids == dense.generate(prompt, max_new_tokens=12).token_ids
        assert set(got.exit_layers) == {2}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("rule", ["draft", "full", "reduced"])
def test_compiled_exits_equal_the_reference_decoder(tiny_dirs, calibrations, tmp_path, family, rule):
    out = _bundle(tiny_dirs, calibrations, tmp_path, family, 0.3, rule)
    engine = load(out)
    target = make_tiny_model(family)
    cal = load_calibration(calibrations[family], target)
    ref = ReferenceDecoder(target, cal.draft, cal.bank, cal.schedule,
                           DecodeSettings(rule=rule, kv_policy="propagate", threshold=0.3), capacity=64)
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=12)
        want = ref.generate(prompt, 12, eos_ids=engine.eos_token_ids)
        assert (got.token_ids, got.exit_layers) == (want.tokens, want.exit_layers)


def test_specee_bundle_manifest_lists_segments_draft_and_schedule(tiny_dirs, calibrations, tmp_path):
    manifest = read_manifest(_bundle(tiny_dirs, calibrations, tmp_path, "llama", 0.3, "draft"))
    spec = manifest["specee"]
    assert [s["exit_layer"] for s in spec["segments"]][-1] is None
    assert spec["segments"][0]["first_layer"] == 0 and spec["segments"][-1]["last_layer"] == 2
    assert spec["kv_policy"] == "propagate" and spec["rule"] == "draft"
    assert {"insert_predictors", "insert_early_exit", "fuse_draft_gathers"} <= {p["pass"] for p in manifest["passes"]}


def test_threshold_is_chosen_at_load_time_without_recompiling(tiny_dirs, calibrations, tmp_path):
    out = _bundle(tiny_dirs, calibrations, tmp_path, "llama", 0.3, "full")
    dense = load(out, dense=True)
    never = load(out, threshold=1.0)
    engine = load(out)
    assert engine.threshold == pytest.approx(0.3)
    exits = []
    for prompt in PROMPTS:
        assert never.generate(prompt, max_new_tokens=12).token_ids == dense.generate(prompt, max_new_tokens=12).token_ids
        exits += engine.generate(prompt, max_new_tokens=12).exit_layers[1:]
        engine.threshold = 1.0
        assert set(engine.generate(prompt, max_new_tokens=12).exit_layers) == {2}
        engine.threshold = 0.3
    assert min(exits) < 2  # the calibrated threshold does exit early on these prompts


def test_specee_run_takes_a_threshold(tiny_dirs, calibrations, tmp_path, capsys):
    from specee_compile.cli import run_main

    out = _bundle(tiny_dirs, calibrations, tmp_path, "llama", 0.3, "draft")
    args = [str(out), "--prompt", "hello world", "--max-new-tokens", "6", "--no-chat", "--show-exits"]
    assert run_main(args) == 0
    assert "⁽" in capsys.readouterr().out
    assert run_main([*args, "--threshold", "1.0"]) == 0
    assert "⁽" not in capsys.readouterr().out
    assert run_main([*args, "--threshold", "1.0", "--no-exit"]) == 1
    assert "takes no threshold" in capsys.readouterr().err


@pytest.mark.parametrize("dense", [False, True])
def test_score_teacher_forces_the_engine(tiny_dirs, calibrations, tmp_path, dense):
    out = _bundle(tiny_dirs, calibrations, tmp_path, "qwen2", 0.3, "full")
    engine = load(out, dense=dense)
    head = make_tiny_model("qwen2").lm_head.weight.detach().numpy()
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=10)
        scored = engine.score(prompt, got.token_ids)
        # teacher forcing on the engine's own output is free-running decoding
        assert scored.predicted == got.token_ids
        assert scored.exit_layers == got.exit_layers
        # the features are those the tokens came from: under rule "full" the argmax of the head
        assert (scored.features @ head.T).argmax(-1).tolist() == got.token_ids
        forced = [(t + 1) % 256 for t in got.token_ids]  # any other text is fed as given
        assert len(engine.score(prompt, forced).predicted) == len(forced)


def test_manifest_describes_every_segment_and_the_draft_and_damage_is_reported(tiny_dirs, calibrations, tmp_path):
    import onnxruntime as ort

    from specee_compile.bundle import MANIFEST
    from specee_compile.errors import BundleError

    out = _bundle(tiny_dirs, calibrations, tmp_path, "mistral", 0.3, "full")
    manifest = read_manifest(out)
    spec = manifest["specee"]
    for graph in [*spec["segments"], spec["draft"]]:
        sess = ort.InferenceSession(str(out / graph["file"]))
        assert [i["name"] for i in graph["inputs"]] == [i.name for i in sess.get_inputs()]
        assert [o["name"] for o in graph["outputs"]] == [o.name for o in sess.get_outputs()]
    assert any(i["name"] == "exit_threshold" for i in spec["segments"][0]["inputs"])
    del manifest["specee"]["schedule"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="'specee' section .* is damaged .*schedule.*recompile"):
        load(out, verify=False)
