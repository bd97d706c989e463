"""Hostile model directories and tokenizers: custom code, chat templates, end-of-text tokens.

A model directory is data too: compiling it never runs or copies its code, and what its
tokenizer says (templates, special tokens) reaches the user as clear errors or as working
behaviour, never as a traceback or a hang.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specee_compile import tokenizer as tokenizer_module
from specee_compile.bundle import MANIFEST, read_manifest
from specee_compile.bundle import read as bundle_read
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.errors import GenerationError, ModelLoadError
from specee_compile.runtimes import load
from specee_compile.testing import make_tiny_model, tiny_tokenizer


@pytest.fixture
def model_dir(tiny_dirs, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dirs["llama"], tmp_path / "model"))


def _edit_tokenizer_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", ["auto_map+code", "class-AutoConfig", "file-elsewhere", "code-in-subfolder"])
def test_model_directory_asking_for_code_is_refused_before_loading(model_dir, tmp_path, monkeypatch, case):
    marker = tmp_path / "ran"
    evil = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n"
    if case == "auto_map+code":
        (model_dir / "tok.py").write_text(evil)
        _edit_tokenizer_config(model_dir, auto_map={"AutoTokenizer": ["tok.Evil", None]}, tokenizer_class="Evil")
        message = "holds Python code"
    elif case == "class-AutoConfig":
        _edit_tokenizer_config(model_dir, tokenizer_class="AutoConfig")
        message = "asks for the tokenizer class 'AutoConfig'"
    elif case == "file-elsewhere":
        _edit_tokenizer_config(model_dir, fast_tokenizer_files=["/etc/hostname"])
        message = "names tokenizer files itself"
    else:
        (model_dir / "sub").mkdir()
        (model_dir / "sub" / "evil.py").write_text(evil)
        message = "holds Python code"
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("the compiler asked whether to run custom code"))
    out = tmp_path / "b.onnx"
    with pytest.raises(ModelLoadError, match=message):
        compile_bundle(CompileConfig(model=str(model_dir), out=out, max_context=32), progress=False)
    assert not marker.exists() and not out.exists()


# ---- chat templates -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def templated(tiny_bundle, tmp_path_factory):
    """set(template) -> a private copy of the tiny bundle whose chat template is ``template``."""
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("chat") / "c.onnx"))

    def set_template(template: str) -> Path:
        (bundle / "chat_template.jinja").write_text(template)
        manifest = json.loads((bundle / MANIFEST).read_text())
        manifest["model"]["chat_template"] = True
        manifest["files"]["chat_template.jinja"] = {"sha256": bundle_read.sha256(bundle / "chat_template.jinja"),
                                                    "bytes": (bundle / "chat_template.jinja").stat().st_size}
        (bundle / MANIFEST).write_text(json.dumps(manifest))
        return bundle

    return set_template


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('no system role') }}", "failed to render .*no system role"),
    ("{% for m in messages %}{% endfor %}", "rendered to nothing"),
    ("{% for m in messages %}{{ m.content", "failed to render .*TemplateSyntaxError"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "failed to render .*SecurityError"),
    ("{% include '/etc/hostname' %}", "failed to render"),
    ("{{ 1 / 0 }}", "failed to render .*ZeroDivisionError"),
])
def test_broken_or_hostile_chat_template_raises_generation_error(templated, template, message):
    engine = load(templated(template))
    with pytest.raises(GenerationError, match=message):
        engine.generate("hello", max_new_tokens=2)
    assert engine.generate("hello", max_new_tokens=2, chat=False).token_ids  # plain text still works


def test_many_conversations_render_in_one_process_as_each_alone(templated):
    from specee_compile.tokenizer import chat_ids, chat_ids_many

    engine = load(templated("{% for m in messages %}<{{ m.role }}>{{ m.content | upper }}{% endfor %}"
                            "{% if messages[0].content == 'bad' %}{{ 1 / 0 }}{% endif %}"))
    talks = [[{"role": "user", "content": t}] for t in ("hello", "the quick fox", "x")]
    assert chat_ids_many(engine.tokenizer, talks, "t") == [chat_ids(engine.tokenizer, m, "t") for m in talks]
    with pytest.raises(GenerationError, match="ZeroDivisionError"):
        chat_ids_many(engine.tokenizer, [*talks, [{"role": "user", "content": "bad"}]], "t")


def test_runaway_chat_template_is_stopped_at_the_deadline(templated, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "CHAT_DEADLINE_SECONDS", 0.5)
    engine = load(templated("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"))
    with pytest.raises(GenerationError, match="ran for more than"):
        engine.generate("hello", max_new_tokens=2)


@pytest.mark.parametrize("template, message", [
    ("{{ 'x' * 3000000000 }}", "MemoryError"),
    ("{{ '' | center(3000000000) }}", "MemoryError"),
    ("{% for i in range(20000) %}{{ 'x' * 1000 }}{% endfor %}", "more than 16 MiB"),
])
def test_memory_hungry_chat_template_fails_in_its_own_process(templated, template, message):
    """One expression asking for gigabytes, or megabytes of output: the rendering process hits
    its memory limit or the text limit, and this process allocates nothing of it."""
    import resource

    engine = load(templated(template))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(GenerationError, match=message):
        engine.generate("hello", max_new_tokens=2)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: no gigabytes here


def test_runaway_chat_template_is_stopped_off_the_main_thread_too(templated, monkeypatch):
    import threading

    monkeypatch.setattr(tokenizer_module, "CHAT_DEADLINE_SECONDS", 0.5)
    engine = load(templated("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"))
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(GenerationError, engine.generate, "hi")))
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive() and "ran for more than" in str(errors[0].value)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template=st.lists(st.sampled_from(list("{}%#-+ ()[]'\"|.=~*x01") + ["messages", "for", "if", " in ", "endfor",
                                                                          "endif", "m", "loop", "{{", "}}", "{%", "%}"]),
                         max_size=30).map("".join))
def test_any_template_text_gives_tokens_or_a_generation_error(templated, template):
    engine = load(templated(template), verify=False)
    try:
        ids = engine.encode("hello", chat=True)
    except GenerationError:
        return
    assert ids and all(0 <= t < engine.vocab_size for t in ids)


# ---- end-of-text tokens -------------------------------------------------------------------


def test_every_end_of_text_token_of_the_tokenizer_stops_generation(tmp_path):
    """generation_config says </s>; the tokenizer also has <|im_end|> as a special token: both stop."""
    from tokenizers import AddedToken

    model_dir = tmp_path / "m"
    make_tiny_model("llama").save_pretrained(model_dir)
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|im_end|>", special=True)]})
    tok.save_pretrained(model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    out = compile_bundle(CompileConfig(model=str(model_dir), out=tmp_path / "b.onnx", max_context=32), progress=False)
    eos = read_manifest(out)["model"]["eos_token_ids"]
    assert tok.eos_token_id in eos and im_end in eos
    engine = load(out)
    assert im_end in engine.eos_token_ids
