"""The compiled SpecEE engine against the eager reference decoder, on tiny random models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specee_compile.bundle import read_manifest
from specee_compile.calibrate import load_calibration
from specee_compile.config import CompileConfig
from specee_compile.reference import DecodeSettings, ReferenceDecoder
from specee_compile.runtimes import load
from specee_compile.testing import IN_PROCESS, TINY_CALIBRATION, make_tiny_model

PROMPTS = ([1, 40, 41, 42], [1, 7, 8, 9, 10, 11], [1, 200])
TINY = TINY_CALIBRATION


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_predictors_that_never_fire_give_the_dense_engines_tokens(bundle, family):
    out = bundle(family, 0.3, "full", tree=True)
    engine, dense = load(out, threshold=0.999999), load(out, dense=True)
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=12)
        assert got.token_ids == dense.generate(prompt, max_new_tokens=12).token_ids
        assert set(got.exit_layers) == {2}


@pytest.mark.parametrize("family, rule", [  # every family under "full", every rule on one family at least
    ("llama", "full"), ("qwen2", "full"), ("mistral", "full"), ("llama", "draft"), ("mistral", "draft"),
    ("qwen2", "reduced")])
def test_compiled_exits_equal_the_reference_decoder(bundle, calibrations, family, rule):
    out = bundle(family, 0.3, rule, tree=rule == "full")
    engine = load(out)
    target = make_tiny_model(family)
    cal = load_calibration(calibrations[family], target)
    ref = ReferenceDecoder(target, cal.draft, cal.bank, cal.schedule,
                           DecodeSettings(rule=rule, kv_policy="propagate", threshold=0.3), capacity=64)
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=12)
        want = ref.generate(prompt, 12, eos_ids=engine.eos_token_ids)
        assert (got.token_ids, got.exit_layers) == (want.tokens, want.exit_layers)


def test_specee_run_in_one_shared_thread_pool_gives_the_same_tokens_and_exits(bundle):
    """The installed command shares one ONNX Runtime pool across the engine's sessions (a
    process-wide switch, hence a subprocess); the output equals per-session pools'."""
    out = bundle("llama", 0.3, "full", tree=True)
    engine = load(out)
    want = engine.generate("hello world", max_new_tokens=8, chat=False)
    command = Path(sys.executable).with_name("specee-run")
    done = subprocess.run([str(command), str(out), "--prompt", "hello world", "--max-new-tokens", "8", "--no-chat",
                           "--show-exits", "--threads", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from specee_compile.cli import annotate_exits

    shown = annotate_exits(engine.tokenizer, want.token_ids, want.exit_layers, engine.num_layers)
    assert done.stdout.strip() == shown.strip() and "⁽" in shown


def test_specee_bundle_manifest_lists_segments_draft_and_schedule(bundle):
    manifest = read_manifest(bundle("llama", 0.3, "draft"))
    spec = manifest["specee"]
    assert [s["exit_layer"] for s in spec["segments"]][-1] is None
    assert spec["segments"][0]["first_layer"] == 0 and spec["segments"][-1]["last_layer"] == 2
    assert spec["kv_policy"] == "propagate" and spec["rule"] == "draft"
    assert {"insert_predictors", "insert_early_exit", "fuse_draft_gathers"} <= {p["pass"] for p in manifest["passes"]}


def test_threshold_is_chosen_at_load_time_without_recompiling(bundle):
    out = bundle("llama", 0.3, "full", tree=True)
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


def test_specee_run_takes_a_threshold(bundle, capsys):
    from specee_compile.cli import run_main

    out = bundle("llama", 0.3, "draft")
    args = [str(out), "--prompt", "hello world", "--max-new-tokens", "6", "--no-chat", "--show-exits", *IN_PROCESS]
    assert run_main(args) == 0
    assert "⁽" in capsys.readouterr().out
    assert run_main([*args, "--threshold", "1.0"]) == 0
    assert "⁽" not in capsys.readouterr().out
    assert run_main([*args, "--threshold", "1.0", "--no-exit"]) == 1
    assert "takes no threshold" in capsys.readouterr().err


@pytest.mark.parametrize("dense", [False, True])
def test_score_teacher_forces_the_engine(bundle, dense):
    out = bundle("qwen2", 0.3, "full", tree=True)
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


def test_manifest_describes_every_segment_and_the_draft_and_damage_is_reported(bundle, tmp_path):
    import onnxruntime as ort

    from specee_compile.bundle import MANIFEST
    from specee_compile.errors import BundleError

    out = tmp_path / "mistral.onnx"
    shutil.copytree(bundle("mistral", 0.3, "full", tree=True), out)  # damaged below
    manifest = read_manifest(out)
    spec = manifest["specee"]
    for graph in [*spec["segments"], spec["draft"]]:
        sess = ort.InferenceSession(str(out / graph["file"]))
        assert [i["name"] for i in graph["inputs"]] == [i.name for i in sess.get_inputs()]
        assert [o["name"] for o in graph["outputs"]] == [o.name for o in sess.get_outputs()]
    assert any(i["name"] == "exit_threshold" for i in spec["segments"][0]["inputs"])
    del manifest["specee"]["schedule"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest.json lacks the field 'specee\.schedule\..*Recompile it"):
        load(out, verify=False)


# ---- exit mode "graph": one decode graph with nested If exits ----------------------------------

GRAPH_CASES = [("llama", "full"), ("qwen2", "reduced"), ("mistral", "draft")]  # every family and every rule


def _cache(engine, n):
    """The KV buffers (positions < n) of the engine's last request, back in its pool."""
    return [a[:, :, :n].copy() for a in engine._pool[-1].buffers.cache.arrays]


@pytest.mark.parametrize(("family", "rule"), GRAPH_CASES)
def test_graph_mode_gives_the_segments_tokens_exit_layers_and_cache(bundle, calibrations, family, rule):
    import numpy as np

    graph, segments = load(bundle(family, 0.3, rule, "graph")), load(bundle(family, 0.3, rule, tree=rule == "full"))
    assert type(graph.decoder).__name__ == "GraphExitDecoder"
    target = make_tiny_model(family)
    cal = load_calibration(calibrations[family], target)
    ref = ReferenceDecoder(target, cal.draft, cal.bank, cal.schedule,
                           DecodeSettings(rule=rule, kv_policy="propagate", threshold=0.3), capacity=64)
    exits = []
    for prompt in PROMPTS:
        got, want = graph.generate(prompt, max_new_tokens=12), segments.generate(prompt, max_new_tokens=12)
        assert (got.token_ids, got.exit_layers) == (want.token_ids, want.exit_layers)
        ref_out = ref.generate(prompt, 12, eos_ids=graph.eos_token_ids)
        assert (got.token_ids, got.exit_layers) == (ref_out.tokens, ref_out.exit_layers)
        n = len(prompt) + len(got.token_ids) - 1  # positions written, the skipped layers' included
        for a, b in zip(_cache(graph, n), _cache(segments, n)):
            np.testing.assert_allclose(a, b, atol=1e-5)
        exits += got.exit_layers[1:]
    assert min(exits) < 2  # exits happened, so the If branches and their K/V propagation ran


@pytest.mark.parametrize(("family", "rule"), GRAPH_CASES)
def test_graph_mode_that_never_exits_gives_the_dense_tokens(bundle, family, rule):
    out = bundle(family, 0.3, rule, "graph")
    never, dense = load(out, threshold=1.0), load(out, dense=True)
    for prompt in PROMPTS:
        got = never.generate(prompt, max_new_tokens=12)
        assert got.token_ids == dense.generate(prompt, max_new_tokens=12).token_ids
        assert set(got.exit_layers) == {2}


def test_graph_mode_manifest_has_one_decode_graph_with_an_if_per_predictor(bundle):
    import onnx_ir as ir
    import onnxruntime as ort

    out = bundle("llama", 0.3, "full", "graph")
    spec = read_manifest(out)["specee"]
    assert spec["exit_mode"] == "graph" and "segments" not in spec
    assert spec["decode"]["file"] == "specee/decode.onnx"
    sess = ort.InferenceSession(str(out / spec["decode"]["file"]))
    assert [i["name"] for i in spec["decode"]["inputs"]] == [i.name for i in sess.get_inputs()]
    assert [o["name"] for o in spec["decode"]["outputs"]] == [o.name for o in sess.get_outputs()]
    assert [o["name"] for o in spec["decode"]["outputs"]][:3] == ["token", "feature", "exit_layer"]
    exits = [n for n in ir.traversal.RecursiveGraphIterator(ir.load(out / spec["decode"]["file"]).graph)
             if n.op_type == "If" and n.name.startswith("exit_or_continue.")]
    assert sorted(int(n.name.split(".")[1]) for n in exits) == spec["predictor_layers"]
    assert read_manifest(bundle("llama", 0.3, "full", tree=True))["specee"]["exit_mode"] == "segments"


def test_graph_mode_tensorrt_ready_graph_passes_the_check_and_gives_the_reference_tokens(bundle, calibrations):
    out = bundle("qwen2", 0.3, "reduced", "graph", check="trt")
    manifest = read_manifest(out)
    assert manifest["tensorrt_check"]["graphs"] == ["step", "decode", "draft"]
    engine = load(out)
    target = make_tiny_model("qwen2")
    cal = load_calibration(calibrations["qwen2"], target)
    ref = ReferenceDecoder(target, cal.draft, cal.bank, cal.schedule,
                           DecodeSettings(rule="reduced", kv_policy="propagate", threshold=0.3), capacity=64)
    for prompt in PROMPTS:
        got, want = engine.generate(prompt, max_new_tokens=12), ref.generate(prompt, 12, eos_ids=engine.eos_token_ids)
        assert (got.token_ids, got.exit_layers) == (want.tokens, want.exit_layers)


def test_standalone_example_runs_a_graph_mode_bundle(bundle):
    import subprocess
    import sys
    from pathlib import Path

    out = bundle("qwen2", 0.3, "reduced", "graph")
    got = load(out).generate("hello world, the quick", max_new_tokens=16, chat=False)
    script = Path(__file__).resolve().parents[1] / "examples" / "standalone_ort.py"
    proc = subprocess.run([sys.executable, str(script), str(out), "--prompt", "hello world, the quick",
                           "--max-new-tokens", "16", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"token_ids": got.token_ids, "exit_layers": got.exit_layers,
                                       "stop_reason": got.stop_reason}


def test_exit_mode_without_specee_is_refused(capsys):
    from specee_compile.cli import compile_main
    from specee_compile.errors import ConfigError

    with pytest.raises(SystemExit) as e:
        compile_main(["smollm2", "--out", "never-written.onnx", "--exit-mode", "graph"])
    assert e.value.code == 2
    assert "--exit-mode graph applies to SpecEE bundles only: add --specee" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="exit_mode 'graph' applies to SpecEE bundles only"):
        CompileConfig(model="smollm2", out="x.onnx", exit_mode="graph")
    with pytest.raises(ConfigError, match="exit_mode 'ifs' is unknown"):
        CompileConfig(model="smollm2", out="x.onnx", specee=True, exit_mode="ifs")


def test_compiling_warns_when_the_calibration_predicts_no_speedup(caplog):
    from specee_compile.compiler import _warn_if_slower

    with caplog.at_level("WARNING", logger="specee_compile.compiler"):
        _warn_if_slower({"relative_cost": 0.93, "agreement": 0.985, "mean_layers": 26.1}, 30)
        assert not caplog.records
        _warn_if_slower({"relative_cost": 1.048, "agreement": 0.9858, "mean_layers": 29.58}, 30)
    assert "104.8% of the dense cost" in caplog.text and "29.58 of 30 layers" in caplog.text
