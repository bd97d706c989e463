"""specee-bench: the quick run end to end on a tiny random Llama (every system, section and plot),
and its input errors. The real SmolLM2 runs through the benchmarks themselves (docs/benchmarks)."""

from __future__ import annotations

import json
import math

import pytest

from specee_compile.cli import bench_main
from specee_compile.testing import IN_PROCESS

SYSTEMS = {"dense", "specee", "transformers", "tree-2x2x3", "tree-2x2x3:exit"}
SPEED = ("decode_tps_median", "decode_tps_q1", "decode_tps_q3", "ttft_ms_median", "speedup_vs_dense",
         "speedup_vs_transformers", "exact_match", "mean_first_divergence", "perplexity")
SPECEE = ("mean_executed_layers", "exit_rate", "teacher_forced_agreement", "draft_share", "segments_share",
          "predictors_share", "exit_checks_share", "host_loop_share", "threshold")


def test_quick_bench_writes_a_complete_report(tiny_dirs, tmp_path):
    out, prompts = tmp_path / "bench", tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"hello world {i}, the quick brown fox"}) for i in range(4)))
    model = str(tiny_dirs["llama"])
    assert bench_main([model, "--quick", "--reference", "--tree", "2x2x3,2x2x3:exit", "--verify-contexts", "8,40",
                       "--prompts", str(prompts), "--out", str(out), "-q", *IN_PROCESS]) == 0
    report = json.loads((out / "report.json").read_text())
    systems = report["systems"]
    assert set(systems) == SYSTEMS
    for name, s in systems.items():
        for key in SPEED if s["kind"] != "tree" else [k for k in SPEED if k != "perplexity"]:  # lossless: dense's
            assert math.isfinite(s[key]) and s[key] >= 0, (name, key, s[key])
        assert s["runs"] == 2 and len(report["runs"][name]) == 2
    assert systems["dense"]["speedup_vs_dense"] == 1.0
    # the dense bundle is transformers' greedy decoding: same tokens, same perplexity
    assert systems["transformers"]["exact_match"] == 1.0
    assert systems["transformers"]["perplexity"] == pytest.approx(systems["dense"]["perplexity"], rel=1e-3)
    spec = systems["specee"]
    for key in SPECEE:
        assert math.isfinite(spec[key]), key
    assert 0 < spec["mean_executed_layers"] <= report["model"]["num_layers"] == 3
    assert sum(spec["exit_histogram"].values()) == sum(len(r["exit_layers"]) - 1 for r in report["runs"]["specee"])
    assert 0 < spec["draft_share"] < 1 and 0 < spec["predictors_share"] < 1
    # every exit layer's step time next to the sum of its separately measured parts
    assert set(spec["step_vs_parts"]) == set(spec["exit_histogram"])
    for row in spec["step_vs_parts"].values():
        assert row["measured_ms"] > 0 and row["parts_ms"] > 0 and row["ratio"] == pytest.approx(row["measured_ms"] / row["parts_ms"])
    assert all(v > 0 for k, v in spec["part_ms"].items() if k != "kv_per_layer")
    # lossless tree speculation: the dense tokens, one to depth + 1 tokens per target forward
    tree = systems["tree-2x2x3"]
    assert tree["exact_match"] == 1.0 and 1.0 <= tree["tokens_per_forward"] <= 3.0 and tree["forwards"] > 0
    assert 0 < tree["draft_share"] < 1 and 0 < tree["verify_share"] < 1
    assert len(tree["depth_acceptance"]) <= 2 and all(0 <= v <= 1 for v in tree["depth_acceptance"])
    assert list(tree["verification_ms"]) == ["1", "2", "3", "4", "5", "8", "16"]
    assert tree["forward_cost"] > 0
    # the cost against the context length, once per bundle, and where it goes by operator type
    costs = tree["context_costs"]
    assert "context_costs" not in systems["tree-2x2x3:exit"] and set(costs) == {"8", "40", "operators"}
    for n in ("8", "40"):
        assert costs[n]["dense_step_ms"] > 0 and list(costs[n]["dense_steps"]) == list(tree["verification_ms"])
        assert all(v > 0 for v in costs[n]["dense_steps"].values())
        ops = costs["operators"][n]
        assert ops["tree_nodes"] == 4 and "GroupQueryAttention" in ops["tree_forward"]
        assert 0 < ops["dense_step"]["GroupQueryAttention"] < ops["dense_step"]["(run)"]
    assert tree["draft"]["sequences"] == 12 and tree["draft"]["unroll"] == 2  # the quick calibration's draft
    assert 0 <= tree["draft"]["top1_after_full"] <= tree["draft"]["top4_after_full"] <= 1
    # early exit inside verification: lossy, measured teacher-forced like the early-exit bundle
    exits = systems["tree-2x2x3:exit"]
    assert 0 <= exits["teacher_forced_agreement"] <= 1 and 0 < exits["mean_executed_layers"] <= 3
    assert sum(exits["exit_histogram"].values()) == sum(len(r["exit_layers"]) - 1 for r in report["runs"][
        "tree-2x2x3:exit"])
    assert exits["threshold"] == spec["threshold"] and 1.0 <= exits["tokens_per_forward"] <= 3.0
    # the compiled engine against the eager reference decoder: same tokens from the same exit layers
    ref = spec["reference"]
    assert ref["prompts"] == 2 and ref["steps"] >= 2 * 16 - 2
    assert ref["step_agreement"] >= 0.9, ref["differences"]
    assert [row["threshold"] for row in report["sweep"]] == [0.5, 0.9]
    assert all(0 <= row["teacher_forced_agreement"] <= 1 for row in report["sweep"])
    for plot in ("speed.png", "exits.png", "frontier.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / plot).stat().st_size > 5000
    md = (out / "report.md").read_text()
    assert "| specee |" in md and "## Threshold sweep" in md and "sum of parts ms" in md
    assert "## Compiled engine against the eager reference decoder" in md and "## Tree speculation" in md and "12 x 1, unroll 2" in md and "![frontier](frontier.png)" in md
    assert "Verification cost by context length" in md and "| 40 | tree, 4 nodes |" in md
    # a second run into the same folder refuses to replace the report without --force
    assert bench_main([model, "--quick", "--out", str(out), "-q", *IN_PROCESS]) == 1


def test_a_quantized_specee_bundle_is_measured_against_its_own_dense_graph_not_charged_the_fp32_parts(
        tiny_dirs, tiny_llama_calibration, tmp_path):
    """Its step time by exit layer would compare its int4 steps with fp32 layers and head: left out, said why.
    Its exits and trees run against its own int4 dense graph, timed in the same run, next to the fp32 bundle."""
    from specee_compile.compiler import compile as compile_bundle
    from specee_compile.config import CompileConfig

    model = str(tiny_dirs["llama"])
    dense = compile_bundle(CompileConfig(model=model, out=tmp_path / "d.onnx", max_context=256), progress=False)
    bundle = compile_bundle(CompileConfig(model=model, out=tmp_path / "q.onnx", max_context=256, specee=True,
                                          calibration=tiny_llama_calibration, quant="int4", accuracy_level=0,
                                          tree=True, tree_shape="1+2"), progress=False)
    out, prompts = tmp_path / "bench", tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"hello world {i}"}) for i in range(2)))
    assert bench_main([model, "--quick", "--bundle", str(dense), "--bundle", str(bundle), "--tree", "1+2",
                       "--no-transformers", "--ppl-samples", "0", "--profile-prompts", "0", "--prompts", str(prompts),
                       "--out", str(out), "-q", *IN_PROCESS]) == 0
    systems = json.loads((out / "report.json").read_text())["systems"]
    assert systems["dense@q"]["kind"] == "quantized" and systems["dense"].get("quant") is None
    spec, tree = systems["q"], systems["tree-1x1x1+2"]
    assert "step_vs_parts" not in spec and "quantized" in spec["step_parts_skipped"]
    assert spec["own_dense"] == tree["own_dense"] == "dense@q" and spec["speedup_vs_own_dense"] > 0
    assert tree["exact_match_vs_own_dense"] == 1.0 and "inexact" not in tree  # fp32 activations: lossless
    md = (out / "report.md").read_text()
    assert "not computed, its weights are quantized" in md and "× own dense graph" in md


@pytest.mark.parametrize("args, message", [
    (["--sweep", "0.5,high"], "--sweep takes comma-separated thresholds"),
    (["--sweep", "1.5"], "sweep thresholds must be in [0, 1]"),
    (["--limit", "0"], "--limit must be positive"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be positive"),
    (["--tree", "9"], "the width must be from 1 to 8"),
    (["--tree", "two"], "a tree shape is WIDTHxDEPTHxBUDGET"),
    (["--prompts", "nowhere.jsonl"], "--prompts must be 'mtbench', 'sharegpt' or a JSONL file"),
    (["--verify-contexts", "100,many"], "--verify-contexts takes comma-separated token counts"),
    (["--verify-contexts", "0"], "--verify-contexts takes positive token counts"),
])
def test_bad_bench_options_fail_before_any_work(tmp_path, capsys, args, message):
    assert bench_main(["smollm2", "--out", str(tmp_path / "b"), *args, *IN_PROCESS]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("tps", [[10.0, 300.0], [10.0, 11.0, 300.0], [5.0, 50.0, 60.0, 400.0]])
def test_speed_quartiles_stay_within_the_measured_speeds(tps):
    from specee_compile.bench.measure import speed
    from specee_compile.bench.systems import Run

    got = speed([Run([1], 0.1, t) for t in tps])
    assert min(tps) <= got["decode_tps_q1"] <= got["decode_tps_median"] <= got["decode_tps_q3"] <= max(tps)


def test_tree_statistics_count_accepted_depths():
    from specee_compile.bench.measure import tree
    from specee_compile.bench.systems import Run

    runs = [Run([], 0.0, 0.0, accepted_lengths=[1, 2]), Run([], 0.0, 0.0, accepted_lengths=[3, 3])]
    got = tree(runs)
    assert got["tokens_per_forward"] == 2.25 and got["forwards"] == 4 and got["acceptance_rate"] == 0.75
    assert got["accepted_depth"] == [0.75, 0.5]
    assert got["depth_acceptance"] == pytest.approx([0.75, 2 / 3])


def test_forward_cost_is_a_forward_in_dense_steps():
    from specee_compile.bench.measure import forward_cost
    from specee_compile.bench.systems import Run

    dense = [Run([], 0.0, 0.0, decode_seconds=1.0, step_seconds=[0.1] * 10),
             Run([], 0.0, 0.0, decode_seconds=2.0, step_seconds=[0.2] * 10)]
    tree = [Run([], 0.0, 0.0, decode_seconds=0.6, accepted_lengths=[2, 2, 1, 3]),  # 0.15 s per forward: 1.5 steps
            Run([], 0.0, 0.0, decode_seconds=1.2, accepted_lengths=[2, 2, 2, 2, 2])]  # 0.24 s: 1.2 steps
    assert forward_cost(tree, dense) == pytest.approx(1.35)
    assert math.isnan(forward_cost([Run([], 0.0, 0.0)], dense[:1]))  # no tree forwards: no cost
