"""End to end on the real SmolLM2-135M: the bundle's greedy tokens equal transformers' eager greedy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specee_compile import resources
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.load import resolve
from specee_compile.runtimes import load

pytestmark = pytest.mark.slow

QUESTIONS = 3
NEW_TOKENS = 64
PARITY_TOKENS = 32  # transformers' eager generate is the slow half of that test


@pytest.fixture(scope="module")
def smollm2_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "smollm2.onnx"
    yield compile_bundle(CompileConfig(model="smollm2", out=out, max_context=512), progress=False)
    shutil.rmtree(out)  # half a GB: free the disk for the rest of the run


def test_bundle_matches_transformers_greedy_on_mtbench(smollm2_bundle):
    from transformers import AutoModelForCausalLM

    engine = load(smollm2_bundle, threads=2)
    hf = AutoModelForCausalLM.from_pretrained(resolve("smollm2"), dtype=torch.float32).eval()
    mismatches = []
    for k, question in enumerate(resources.mtbench_questions(QUESTIONS)):
        ids = engine.encode(question)
        got = engine.generate(ids, max_new_tokens=PARITY_TOKENS).token_ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=PARITY_TOKENS, do_sample=False,
                              eos_token_id=sorted(engine.eos_token_ids), pad_token_id=2)
        ref = [t for t in ref[0, len(ids):].tolist() if t not in engine.eos_token_ids]
        if got != ref:
            mismatches.append((k, got, ref))
    assert not mismatches, f"{len(mismatches)} of {QUESTIONS} questions differ: {mismatches[:1]}"


def test_the_converted_directory_holds_transformers_own_gguf_load():
    """The conversion parses the GGUF once (load._gguf_read_once); what it saves must be what
    transformers' unaided GGUF load gives: the same weights bit for bit, the same tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = resources.wheel_member(*resources.SMOLLM2_WHEEL)
    converted = resolve("smollm2")
    plain = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    saved = load_file(converted / "model.safetensors")
    assert set(saved) <= set(plain) and "model.embed_tokens.weight" in saved
    assert all(torch.equal(saved[k], plain[k]) for k in saved)
    text = "Explain in two sentences why the sky is blue. 日本語 ünïcode\n\tcode()"
    assert AutoTokenizer.from_pretrained(converted)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(text)["input_ids"]


def test_standalone_example_reproduces_the_engine_on_smollm2(smollm2_bundle):
    """examples/standalone_ort.py (onnxruntime, numpy, tokenizers only) gives the engine's tokens."""
    example = Path(__file__).resolve().parents[1] / "examples" / "standalone_ort.py"
    engine = load(smollm2_bundle, threads=2)
    for question in resources.mtbench_questions(1):
        want = engine.generate(question, max_new_tokens=NEW_TOKENS)  # chat template applied, as specee-run does
        proc = subprocess.run([sys.executable, str(example), str(smollm2_bundle), "--prompt", question, "--chat",
                               "--max-new-tokens", str(NEW_TOKENS), "--threads", "2", "--json"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout)
        assert (got["token_ids"], got["stop_reason"]) == (want.token_ids, want.stop_reason)


SHIPPED = Path(__file__).resolve().parents[1] / "specee_compile" / "drafts" / "smollm2"


@pytest.mark.skipif(not (SHIPPED / "draft.safetensors").is_file(), reason="no SmolLM2 draft is shipped yet")
def test_shipped_draft_is_found_for_smollm2_and_scores_as_recorded():
    from specee_compile import drafts
    from specee_compile import load as model_load
    from specee_compile.calibrate.collect import target_pass
    from specee_compile.calibrate.pipeline import draft_metrics, load_draft
    from specee_compile.drafts.train import OWN_ANSWERS, SLICE, answer_starts

    model_dir = resolve("smollm2")
    assert drafts.find(model_dir) == SHIPPED / drafts.WEIGHTS
    record = drafts.record(SHIPPED)
    target, tokenizer = model_load.load(model_dir)
    draft = load_draft(SHIPPED / drafts.WEIGHTS, target)
    answers = json.loads((SHIPPED / OWN_ANSWERS).read_text())[:SLICE]
    assert record["stages"][-1].get("scored") == "responses"
    got = draft_metrics(draft, [target_pass(target, ids) for ids in answers], target.config.num_hidden_layers // 2,
                        answer_starts(tokenizer, answers))
    want = record["stages"][-1]["held_out"]["own_answers_slice"]
    for name in ("top1_after_full", "top4_after_full", "top1_after_exit", "top4_after_exit"):
        assert got[name] == pytest.approx(want[name], abs=0.01), name  # other CPUs may break a few ties otherwise


def test_llama_cpp_row_decodes_the_same_gguf_greedily(smollm2_bundle):
    """specee-bench's llama.cpp system (an optional extra, not installed in CI) runs the very GGUF
    the built-in model comes from: it stops at the token budget, and its first greedy tokens
    are the fp32 bundle's (both compute the same weights; llama.cpp's int8 activations may
    part from it later)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra: pip install -e '.[llama]'")
    from specee_compile.bench.systems import llama_cpp_system
    from specee_compile.load import gguf_source

    engine = load(smollm2_bundle, threads=2)
    ids = engine.encode(resources.mtbench_questions(1)[0])
    llama = llama_cpp_system(gguf_source("smollm2"), 2, 24, engine.eos_token_ids, 512)
    run = llama.generate(ids)
    want = engine.generate(ids, max_new_tokens=24).token_ids
    assert len(run.token_ids) == len(want) == 24 and run.decode_tps > 0
    assert run.token_ids[:4] == want[:4]
