"""compile() and the CLI on tiny models: bundle contents, greedy equality, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from specee_compile import cli
from specee_compile.bundle import MANIFEST, read_manifest
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig, with_overrides
from specee_compile.errors import ConfigError, ModelLoadError, OutputError, UnsupportedModelError
from specee_compile.runtimes import load
from specee_compile.testing import IN_PROCESS
from tests.conftest import FAMILIES


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_bundle_manifest_describes_graph_and_files(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    assert manifest["model"]["family"] == "llama"
    assert manifest["cache"]["capacity"] == 64
    step = manifest["graphs"]["step"]
    assert step["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": [1, "sequence"]}
    assert step["outputs"][0]["name"] == "logits"
    assert {"model.onnx", "model.onnx.data", "tokenizer.json"} <= set(manifest["files"])
    assert "Prefill" in manifest["protocol"]


@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_greedy_tokens_equal_hf_generate(family, tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = compile_bundle(CompileConfig(model=str(tiny_dirs[family]), out=tmp_path / "b.onnx", max_context=64),
                         progress=False)
    engine = load(out)
    prompt = [1, 40, 41, 42, 43]
    got = engine.generate(prompt, max_new_tokens=20)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                      eos_token_id=list(engine.eos_token_ids), pad_token_id=0)[0, len(prompt):].tolist()
    ref = [t for t in ref if t not in engine.eos_token_ids]
    assert got.token_ids == ref[: len(got.token_ids)] and len(got.token_ids) == len(ref)


def test_missing_model_directory_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        compile_bundle(CompileConfig(model=str(tmp_path / "nope"), out=tmp_path / "x.onnx"), progress=False)
    assert _siblings(tmp_path / "x.onnx") == []


def test_directory_without_config_raises(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        compile_bundle(CompileConfig(model=str(tmp_path / "m"), out=tmp_path / "x.onnx"), progress=False)


def test_malformed_config_raises(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        compile_bundle(CompileConfig(model=str(tmp_path / "m"), out=tmp_path / "x.onnx"), progress=False)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "bert", "architectures": ["BertModel"]}, "supports decoder-only"),
        ({"model_type": "t5", "is_encoder_decoder": True}, "encoder-decoder"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "llama, mistral, qwen2"),
    ],
)
def test_unsupported_architecture_raises(tmp_path, config, message):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=message):
        compile_bundle(CompileConfig(model=str(tmp_path / "m"), out=tmp_path / "x.onnx"), progress=False)


def test_truncated_weights_raise(tiny_dirs, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        compile_bundle(CompileConfig(model=str(model), out=tmp_path / "x.onnx"), progress=False)


def test_existing_output_without_force_is_kept(tiny_dirs, tmp_path):
    out = tmp_path / "x.onnx"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(OutputError, match="--force"):
        compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=out), progress=False)
    assert (out / "precious.txt").read_text() == "mine"
    assert _siblings(out) == ["x.onnx"]


def test_force_replaces_a_bundle_but_not_a_foreign_folder(tiny_dirs, tiny_bundle, tmp_path):
    out = tmp_path / "copy.onnx"
    shutil.copytree(tiny_bundle, out)
    before = json.loads((out / MANIFEST).read_text())["created"]
    compile_bundle(CompileConfig(model=str(tiny_dirs["qwen2"]), out=out, force=True, max_context=32), progress=False)
    assert read_manifest(out)["model"]["family"] == "qwen2"
    assert _siblings(out) == ["copy.onnx"], "no temporary folder may remain"
    assert before  # the old manifest existed
    foreign = tmp_path / "foreign.onnx"
    foreign.mkdir()
    with pytest.raises(OutputError, match="not a specee bundle"):
        compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=foreign, force=True), progress=False)


def test_unknown_output_suffix_raises():
    with pytest.raises(ConfigError, match="suffix"):
        CompileConfig(model="smollm2", out=Path("x.zip"))


def test_overrides_are_checked_against_fields():
    config = CompileConfig(model="m", out=Path("x.onnx"))
    assert with_overrides(config, ["max_context=128"]).max_context == 128
    with pytest.raises(ConfigError, match="known key"):
        with_overrides(config, ["maxctx=1"])
    with pytest.raises(ConfigError, match="not a valid int"):
        with_overrides(config, ["max_context=lots"])


def test_cli_error_exits_1_with_one_paragraph(tmp_path, capsys):
    code = cli.compile_main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.onnx"), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1


def test_cli_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.compile_main(["model-without-out"])
    assert e.value.code == 2


def test_cli_run_prints_text_and_stats(tiny_bundle, capsys):
    assert cli.run_main([str(tiny_bundle), "--prompt", "hello world", "--max-new-tokens", "5", *IN_PROCESS]) == 0
    err = capsys.readouterr().err
    assert "tok/s" in err and "time to first token" in err


def test_trt_without_gpu_fails_fast_and_writes_nothing(tmp_path):
    from specee_compile.errors import BackendError

    with pytest.raises(BackendError, match="--out .*x.onnx"):
        compile_bundle(CompileConfig(model="smollm2", out=tmp_path / "x.plan"), progress=False)
    assert list(tmp_path.iterdir()) == []
