"""Names, paths, options and the terminal: --force never deletes a user's folder, a compile
never silently replaces an output that appeared meanwhile, bad files given to options are
named, and the commands end without a traceback whatever happens to their output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specee_compile import cli
from specee_compile.bundle import FORMAT, MANIFEST, read_manifest
from specee_compile.calibrate import CalibrationSettings
from specee_compile.compiler import compile as compile_bundle
from specee_compile.config import CompileConfig
from specee_compile.errors import ConfigError, OutputError
from specee_compile.testing import IN_PROCESS


def _compile(tiny_dirs, out: Path, force: bool = False) -> Path:
    return compile_bundle(CompileConfig(model=str(tiny_dirs["llama"]), out=out, max_context=32, force=force),
                          progress=False)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("folder", [
    {MANIFEST: json.dumps({"manifest_version": 3, "name": "my extension"}), "background.js": "work of weeks"},
    {MANIFEST: json.dumps({"format": FORMAT, "files": {}}), "notes.txt": "mine"},
    {MANIFEST: "not json", "a.txt": "x"},
], ids=["browser-extension", "bundle-with-a-user-file", "unparsable-manifest"])
def test_force_refuses_a_folder_that_is_not_purely_a_bundle_and_keeps_it(tiny_dirs, tmp_path, folder):
    out = tmp_path / "x.onnx"
    out.mkdir()
    for name, text in folder.items():
        (out / name).write_text(text)
    with pytest.raises(OutputError, match="refusing to replace it even with --force"):
        _compile(tiny_dirs, out, force=True)
    assert _tree(out) == folder


def test_force_replaces_a_bundle_and_a_damaged_one(tiny_dirs, tmp_path):
    out = _compile(tiny_dirs, tmp_path / "x.onnx")
    (out / "model.onnx.data").unlink()  # damaged: a listed file missing
    _compile(tiny_dirs, out, force=True)
    assert read_manifest(out)["model"]["family"] == "llama"


def test_force_refuses_a_symlink(tiny_dirs, tmp_path):
    real = _compile(tiny_dirs, tmp_path / "real.onnx")
    (tmp_path / "link.onnx").symlink_to(real)
    with pytest.raises(OutputError, match="symbolic link"):
        _compile(tiny_dirs, tmp_path / "link.onnx", force=True)


@pytest.mark.parametrize("force", [False, True])
def test_output_that_appears_during_the_compile_is_never_silently_replaced(tiny_dirs, tmp_path, monkeypatch, force):
    out = tmp_path / "x.onnx"
    from specee_compile.bundle import assemble

    real_finish = assemble.finish_manifest

    def finish_while_another_writes(bundle_dir, manifest):
        out.mkdir()  # another program (or compile) creates the output meanwhile
        (out / "theirs.txt").write_text("theirs")
        return real_finish(bundle_dir, manifest)

    monkeypatch.setattr(assemble, "finish_manifest", finish_while_another_writes)
    with pytest.raises(OutputError, match="appeared while this compile ran" if not force else "changed while"):
        _compile(tiny_dirs, out, force=force)
    assert _tree(out) == {"theirs.txt": "theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


def test_dump_ir_naming_a_file_raises_config_error(tiny_dirs, tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="--dump-ir .* is a file"):
        CompileConfig(model=str(tiny_dirs["llama"]), out=tmp_path / "x.onnx", dump_ir=tmp_path / "f")


@pytest.mark.parametrize("kind", ["missing", "folder"])
@pytest.mark.parametrize("option", ["calib_file", "draft_file"])
def test_calibration_file_options_naming_no_file_raise_config_error(tmp_path, option, kind):
    path = tmp_path / "x"
    if kind == "folder":
        path.mkdir()
    flag = {"calib_file": "--calib", "draft_file": "--draft"}[option]
    with pytest.raises(ConfigError, match=f"{flag} {path} is {'a folder' if kind == 'folder' else 'missing'}"):
        CalibrationSettings(**{option: str(path)})
    if option == "calib_file":
        with pytest.raises(ConfigError, match=f"--calib {path} is"):
            CompileConfig(model="smollm2", out=tmp_path / "o.onnx", specee=True, calib_file=str(path))


@pytest.mark.parametrize("name", ["with space ünïcødé.onnx", "-dash.a.b.onnx"])
def test_unusual_output_names_compile_and_load(tiny_dirs, tmp_path, name):
    out = _compile(tiny_dirs, tmp_path / name)
    assert read_manifest(out)["model"]["family"] == "llama"


# ---- the commands' own output ---------------------------------------------------------------


@given(text=st.text())
def test_terminal_safe_text_has_no_control_characters_but_newline_and_tab(text):
    safe = cli.terminal_safe(text)
    assert not any((ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F for c in safe)
    assert cli.terminal_safe("plain text\n\twith ümlauts") == "plain text\n\twith ümlauts"


def test_one_token_generation_reports_no_nan(tiny_bundle, capsys):
    assert cli.run_main([str(tiny_bundle), "--prompt", "hello", "--max-new-tokens", "1", "--no-chat",
                         *IN_PROCESS]) == 0
    err = capsys.readouterr().err
    assert "nan" not in err and "no decode step after the first token" in err


def test_closed_pipe_ends_quietly_without_a_traceback(tiny_bundle):
    run = [sys.executable, "-c", "import sys; from specee_compile.cli import run_main; sys.exit(run_main())",
           str(tiny_bundle), "--prompt", "the quick brown fox", "--max-new-tokens", "40", "--no-chat", "-q"]
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (`| head -c0`)
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err
    assert proc.returncode in (0, 141)


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--max-new-tokens", "99999999999"], "the limit is"),
    (["--threshold", "7"], "no early exits"),
    (["--tree", "9x9x9"], "tree speculation runs"),
])
def test_bad_run_options_print_one_error_line(tiny_bundle, capsys, args, message):
    code = cli.run_main([str(tiny_bundle), "--prompt", "hello", "--no-chat", *IN_PROCESS, *args])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("threads", ["-1", "100000"])
def test_thread_options_out_of_range_are_a_clear_error(tiny_bundle, capsys, threads):
    code = cli.run_main([str(tiny_bundle), "--prompt", "hello", "--no-chat", "--threads", threads, *IN_PROCESS])
    err = capsys.readouterr().err
    assert code == 1 and "--threads" in err and "Traceback" not in err


def test_unexpected_exception_is_reported_as_a_bug_without_traceback(tiny_bundle, capsys, monkeypatch):
    from specee_compile import runtimes

    monkeypatch.setattr(runtimes, "load", lambda *a, **k: {}["boom"])
    assert cli.run_main([str(tiny_bundle), "--prompt", "x", *IN_PROCESS]) == 1
    err = capsys.readouterr().err
    assert "internal error (KeyError" in err and "report it" in err and "Traceback" not in err
