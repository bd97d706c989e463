"""ONNX Runtime GenAI loads a bundle folder unchanged and decodes our runtime's greedy tokens."""

from __future__ import annotations

import json

import pytest

from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.runtimes import load
from specee_compile.testing import save_gguf_model

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the [bench] extra")
NEW = 24


def _genai_tokens(bundle, ids: list[int]) -> list[int]:
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([ids])
    while not generator.is_done():
        generator.generate_next_token()
    return generator.get_sequence(0)[len(ids):].tolist()


@pytest.mark.parametrize("quant", ["fp32", "int4", "gguf"])
def test_genai_decodes_the_bundles_greedy_tokens(quant, tiny_dirs, tmp_path):
    model, gguf = tiny_dirs["qwen2"], None
    if quant == "gguf":  # Q4_1 blocks kept: products with a block-sum correction, GenAI must run them too
        model, gguf = save_gguf_model(tmp_path, "qwen2", {p: "Q4_1" for p in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                               "gate_proj", "up_proj", "down_proj")})
    out = compile_bundle(CompileConfig(model=str(model), out=tmp_path / "b.onnx", max_context=64, quant=quant,
                                       gguf=gguf), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["genai"] == {"config": "genai_config.json", "graph": "genai.onnx"}
    assert {"genai_config.json", "genai.onnx"} <= set(manifest["files"])
    assert not (out / "genai.onnx.data").exists()  # the weights are model.onnx's
    if quant == "gguf":
        assert manifest["quant"]["weights_stored"]["step"].get("Q4_1 kept", 0) > 0
    engine = load(out)
    ids = engine.encode("the quick brown fox", chat=False)
    want = engine.generate(ids, max_new_tokens=NEW)
    got = _genai_tokens(out, ids)
    eos = set(manifest["model"]["eos_token_ids"])
    assert got[:len(want.token_ids)] == want.token_ids
    assert len(got) == len(want.token_ids) or got[len(want.token_ids)] in eos
