"""A fusion draft (EAGLE-3's multi-layer input) through the whole compile, on a tiny Llama: the
bundle's graphs hand the draft the fused feature, so the compiled engine still makes the eager
reference decoder's tokens and exits, in both exit modes, and tree speculation stays lossless."""

from __future__ import annotations

import pytest
import torch

from specee_compile.bundle import read_manifest
from specee_compile.calibrate import CalibrationSettings, calibrate, load_calibration
from specee_compile.calibrate.draft import EagleDraft
from specee_compile.calibrate.pipeline import save_draft
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.errors import PassError
from specee_compile.reference import DecodeSettings, ReferenceDecoder
from specee_compile.runtimes import load
from specee_compile.testing import TINY_CALIBRATION, make_tiny_model, write_calibration_jsonl

PROMPTS = ([1, 40, 41, 42], [1, 7, 8, 9, 10, 11], [1, 200])
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def fused(tiny_dirs, tiny_llama_calibration, tmp_path_factory):
    """(calibration, compile(exit_mode)) for a fusion draft whose fuse layer is far from its
    identity start, so every slot changes what the draft proposes."""
    tmp = tmp_path_factory.mktemp("fusion")
    target = make_tiny_model("llama")
    base = load_calibration(tiny_llama_calibration, target).draft
    draft = EagleDraft(target, base.vocab_map, fusion=True)
    draft.load_state_dict(base.state_dict(), strict=False)
    torch.manual_seed(0)
    with torch.no_grad():
        draft.fuse.weight.add_(torch.randn_like(draft.fuse.weight) * 0.3)
    save_draft(draft, tmp / "draft.safetensors")
    calib = write_calibration_jsonl(tmp / "c.jsonl")
    cal = calibrate(tiny_dirs["llama"], CalibrationSettings(calib_file=str(calib), draft_file=str(tmp / "draft.safetensors"),
                                                            **TINY_CALIBRATION), progress=False)

    built = {}

    def bundle(exit_mode: str):
        if exit_mode not in built:
            built[exit_mode] = compile_bundle(CompileConfig(
                model=str(tiny_dirs["llama"]), out=tmp / f"{exit_mode}.onnx", max_context=64, specee=True,
                calibration=cal, threshold=THRESHOLD, exit_rule="full", exit_mode=exit_mode,
                tree=exit_mode == "segments"), progress=False)
        return built[exit_mode]

    return cal, bundle


def _reference(cal):
    target = make_tiny_model("llama")
    c = load_calibration(cal, target)
    assert c.draft.fusion == (0, 1)
    return ReferenceDecoder(target, c.draft, c.bank, c.schedule,
                            DecodeSettings(rule="full", kv_policy="propagate", threshold=THRESHOLD), capacity=64)


@pytest.mark.parametrize("exit_mode", ["segments", "graph"])
def test_a_fusion_drafts_bundle_exits_as_the_reference_decoder(fused, exit_mode):
    cal, bundle = fused
    engine, ref = load(bundle(exit_mode)), _reference(cal)
    exits = set()
    for prompt in PROMPTS:
        got = engine.generate(prompt, max_new_tokens=12)
        want = ref.generate(prompt, 12, eos_ids=engine.eos_token_ids)
        assert (got.token_ids, got.exit_layers) == (want.tokens, want.exit_layers), prompt
        exits |= set(got.exit_layers)
    assert len(exits) > 1, "some steps must exit early, so the exits' fused features are used"


def test_a_fusion_drafts_tree_speculation_gives_the_dense_tokens(fused):
    out = fused[1]("segments")
    assert read_manifest(out)["specee"]["draft"]["fusion_layers"] == [0, 1]
    dense, engine = load(out, dense=True), load(out, tree="2x2x3")
    for prompt in PROMPTS:
        want = dense.generate(prompt, max_new_tokens=16).token_ids
        got = engine.generate(prompt, max_new_tokens=16, tree="2x2x3")
        assert got.token_ids == want and sum(got.accepted_lengths) >= len(got.token_ids) - 1


def test_skipping_the_fusion_pass_is_refused_before_a_bundle_is_written(fused, tiny_dirs, tmp_path):
    cal, _ = fused
    out = tmp_path / "b.onnx"
    with pytest.raises(PassError, match="does not hand the draft its fused input"):
        compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=out, max_context=64, specee=True,
                                     calibration=cal, skip_passes=("step:fuse_draft_input",)), progress=False)
    assert not out.exists()
