"""Every runnable example in examples/ runs and says what it promises."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_custom_pass_example_compiles_with_the_user_pass(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_pass.py"), "", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for family in ("step", "segments", "draft"):
        assert f"'{family}:record_op_histogram'" in proc.stdout
    assert "op histogram of specee/segment_0.onnx:" in proc.stdout and "op histogram of specee/draft.onnx" in proc.stdout
    assert "GroupQueryAttention" in proc.stdout and "generated:" in proc.stdout and "exit layers:" in proc.stdout


# ---- examples/standalone_ort.py: a bundle driven with onnxruntime, numpy and tokenizers only ----

STANDALONE = ROOT / "examples" / "standalone_ort.py"
CHAT_TEMPLATE = (  # exercises trim_blocks / lstrip_blocks, loop variables and a special token
    "{% for m in messages %}\n"
    "  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}\n"
    "{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{% if not loop.last %}\n{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_specee_bundle(tiny_dirs, tmp_path_factory) -> Path:
    """A SpecEE bundle of the tiny Llama, with a chat template, whose predictors exit at mixed layers.

    The calibration is tests/test_specee_engine.py's (same model, file and settings, so a session
    that runs both calibrates once); the bundle is compiled from a copy of the model whose tokenizer
    has a chat template. Rule "draft" at threshold 0.5 makes steps exit at layer 0, 1 or run to 2.
    """
    from specee_compile.calibrate import CalibrationSettings, calibrate
    from specee_compile.compiler import compile as compile_bundle
    from specee_compile.config import CompileConfig
    from specee_compile.testing import make_tiny_model, tiny_tokenizer

    work = tmp_path_factory.mktemp("standalone")
    model_dir = work / "tiny-llama-chat"
    make_tiny_model("llama").save_pretrained(model_dir)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    calib = work / "c.jsonl"
    calib.write_text("\n".join(json.dumps({"prompt": f"hello world {i}",
                                           "response": "the quick brown fox jumps over the lazy dog " * 3})
                               for i in range(12)))
    settings = CalibrationSettings(calib_file=str(calib), draft_sequences=8, predictor_sequences=4, draft_vocab=64,
                                   predictor_hidden=16, predictor_epochs=3, positions_per_sequence=16, draft_epochs=1)
    cal = calibrate(tiny_dirs["llama"], settings, progress=False)
    return compile_bundle(CompileConfig(model=str(model_dir), out=work / "tiny-specee.onnx", max_context=64,
                                        specee=True, calibration=cal, threshold=0.5, exit_rule="draft", tree=True),
                          progress=False)


def _standalone(bundle: Path, prompt: str, max_new_tokens: int, *flags: str) -> dict:
    args = [str(bundle), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens), "--json", *flags]
    proc = subprocess.run([sys.executable, str(STANDALONE), *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _engine(bundle: Path, prompt: str, max_new_tokens: int, chat: bool = False, dense: bool = False) -> dict:
    from specee_compile.runtimes import load

    got = load(bundle, dense=dense).generate(prompt, max_new_tokens=max_new_tokens, chat=chat)
    return {"token_ids": got.token_ids, "exit_layers": got.exit_layers, "stop_reason": got.stop_reason}


def test_standalone_example_imports_no_package_torch_or_transformers():
    siblings = {"standalone_algorithms", "standalone_files"}  # its modules next to it in examples/
    modules = set()
    for file in [STANDALONE, *(STANDALONE.with_name(f"{name}.py") for name in siblings)]:
        tree = ast.parse(file.read_text())
        modules |= {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert not modules & {"specee_compile", "torch", "transformers", "safetensors"}
    # jinja2 only for --chat: chat templates are Jinja
    assert modules - set(sys.stdlib_module_names) <= {"onnxruntime", "numpy", "tokenizers", "jinja2", *siblings}


def test_standalone_example_reproduces_the_dense_engine_to_a_full_cache(tiny_bundle):
    # 100 new tokens do not fit the 64-position cache: both stop with "capacity"
    want = _engine(tiny_bundle, "hello world, the quick", 100)
    assert want["stop_reason"] == "capacity"
    assert _standalone(tiny_bundle, "hello world, the quick", 100) == want


def test_standalone_example_reproduces_the_specee_engine_tokens_and_exit_layers(tiny_specee_bundle):
    exits = []
    for prompt in ("hello world, the quick", "the lazy dog"):
        want = _engine(tiny_specee_bundle, prompt, 24)
        assert _standalone(tiny_specee_bundle, prompt, 24) == want
        exits += want["exit_layers"]
    assert min(exits) < 2  # early exits happened, so K/V propagation and the online schedule ran


@pytest.mark.parametrize("shape", ["2x2x3+4", "3x3x6"])
def test_standalone_example_decodes_with_a_tree_as_the_engine(tiny_specee_bundle, shape):
    from specee_compile.runtimes import load

    engine = load(tiny_specee_bundle, tree=shape)
    for prompt in ("hello world, the quick", "the lazy dog"):
        want = engine.generate(prompt, max_new_tokens=24, chat=False)
        got = _standalone(tiny_specee_bundle, prompt, 24, "--tree", shape)
        assert got["token_ids"] == want.token_ids == _engine(tiny_specee_bundle, prompt, 24, dense=True)["token_ids"]
        assert got["accepted_lengths"] == want.accepted_lengths


def test_standalone_example_exits_inside_tree_verification_as_the_engine(tiny_specee_bundle):
    """``--tree SHAPE:exit``: the tree segments with per-node exits, the walk, the propagated
    K/V and the draft's candidates as in the package's engine: same tokens, exit layers and
    accepted lengths."""
    from specee_compile.runtimes import load

    engine = load(tiny_specee_bundle, tree="2x2x3+4:exit")
    exits = []
    for prompt in ("hello world, the quick", "the lazy dog"):
        want = engine.generate(prompt, max_new_tokens=24, chat=False)
        got = _standalone(tiny_specee_bundle, prompt, 24, "--tree", "2x2x3+4:exit")
        assert got["token_ids"] == want.token_ids and got["exit_layers"] == want.exit_layers
        assert got["accepted_lengths"] == want.accepted_lengths
        exits += want.exit_layers
    assert min(exits) < 2  # verification stopped early, so the walk and the K/V propagation ran


def test_standalone_example_with_chat_template_reproduces_the_engine(tiny_specee_bundle):
    want = _engine(tiny_specee_bundle, "hello world", 12, chat=True)
    assert want != _engine(tiny_specee_bundle, "hello world", 12)  # the template changed the prompt
    assert _standalone(tiny_specee_bundle, "hello world", 12, "--chat") == want


def test_standalone_example_without_exits_reproduces_the_dense_graph(tiny_specee_bundle):
    want = _engine(tiny_specee_bundle, "the lazy dog", 12, dense=True)
    assert _standalone(tiny_specee_bundle, "the lazy dog", 12, "--no-exit") == want
