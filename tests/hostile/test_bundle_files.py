"""Hostile bundles: what a bundle's files and manifest may make a runtime open, read or run.

A bundle is data. Whatever its manifest says, a runtime opens only files the manifest lists,
inside the bundle, with their checksums, and runs no code from it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from specee_compile.bundle import MANIFEST, read_manifest
from specee_compile.bundle import read as bundle_read
from specee_compile.errors import BundleError
from specee_compile.runtimes import load


@pytest.fixture
def dense(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b.onnx"))


@pytest.fixture
def specee(tiny_specee_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_specee_bundle, tmp_path / "s.onnx"))


def _rewrite(bundle: Path, change) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _outside_file(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.onnx"
    secret.parent.mkdir()
    secret.write_bytes(b"not for the runtime")
    return secret


@pytest.mark.parametrize("field", ["draft", "kv_fill", "segments", "tree", "tree.draft", "tree.segments"])
def test_specee_graph_path_outside_the_files_list_raises(specee, tmp_path, field):
    secret = _outside_file(tmp_path)
    target = os.path.relpath(secret, specee)

    def point(m):
        section = m["specee"]
        for part in field.split("."):
            section = section[part]
        (section[0] if isinstance(section, list) else section)["file"] = target

    _rewrite(specee, point)
    with pytest.raises(BundleError, match="which 'files' does not list") as e:
        load(specee, tree=field.startswith("tree") or None)
    assert "specee." in str(e.value)


def test_listed_file_that_leaves_the_bundle_raises(dense, tmp_path):
    secret = _outside_file(tmp_path)
    name = os.path.relpath(secret, dense)
    _rewrite(dense, lambda m: m["files"].update({name: {"sha256": "0" * 64, "bytes": secret.stat().st_size}}))
    with pytest.raises(BundleError, match="not a path inside the bundle"):
        read_manifest(dense)


@pytest.mark.parametrize("name", ["/etc/hostname", "a/../../x", "./model.onnx", "a\\..\\x", "", MANIFEST])
def test_file_names_that_are_not_plain_relative_paths_raise(dense, name):
    _rewrite(dense, lambda m: m["files"].update({name: {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(BundleError, match="not a path inside the bundle"):
        read_manifest(dense)


@pytest.mark.parametrize("field", ["draft", "tree", "tree.draft"])
def test_an_engines_onnx_path_outside_the_files_list_raises(specee, tmp_path, field):
    """A TensorRT engine's entry names the ONNX file it was built from (``onnx``); that path is
    checked like ``file`` in every graph entry."""
    target = os.path.relpath(_outside_file(tmp_path), specee)

    def point(m):
        section = m["specee"]
        for part in field.split("."):
            section = section[part]
        section["onnx"] = target

    _rewrite(specee, point)
    with pytest.raises(BundleError, match="which 'files' does not list") as e:
        load(specee, tree=field.startswith("tree") or None)
    assert f"specee.{field}.onnx" in str(e.value)


def test_symlinked_graph_pointing_outside_raises(dense, tmp_path):
    secret = _outside_file(tmp_path)
    data = dense / "model.onnx.data"
    shutil.copy(data, secret)
    data.unlink()
    data.symlink_to(secret)  # same bytes, same checksum: only the link gives it away
    with pytest.raises(BundleError, match="symbolic links"):
        load(dense)


def test_symlinked_folder_inside_the_bundle_raises(specee, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(specee / "specee", moved)
    (specee / "specee").symlink_to(moved, target_is_directory=True)
    with pytest.raises(BundleError, match="symbolic links"):
        read_manifest(specee)


@pytest.mark.parametrize("extra", ["added_tokens.json", "chat_template.jinja", "special_tokens_map.json",
                                   "specee/notes.txt"])
def test_unlisted_file_in_the_bundle_raises_naming_it(dense, extra):
    (dense / extra).parent.mkdir(exist_ok=True)
    (dense / extra).write_text('{"<evil>": 5}')
    with pytest.raises(BundleError, match=f"does not list \\({extra}") as e:
        load(dense)
    assert "Remove them" in str(e.value)


def test_external_data_naming_an_unlisted_file_raises(dense):
    model = onnx.load(dense / "model.onnx", load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = "../../../etc/hostname"
    onnx.save(model, dense / "model.onnx")

    def relist(m):
        m["files"]["model.onnx"] = {"sha256": bundle_read.sha256(dense / "model.onnx"),
                                    "bytes": (dense / "model.onnx").stat().st_size}

    _rewrite(dense, relist)
    with pytest.raises(BundleError, match="keeps weights in '../../../etc/hostname'"):
        load(dense)


def _relist(bundle: Path, *names: str) -> None:
    """List ``names`` in the manifest with their real checksums, as a crafted bundle would."""
    def change(m):
        for name in names:
            m["files"][name] = {"sha256": bundle_read.sha256(bundle / name), "bytes": (bundle / name).stat().st_size}
    _rewrite(bundle, change)


def _edit_tokenizer_config(bundle: Path, **changes) -> None:
    cfg = json.loads((bundle / "tokenizer_config.json").read_text())
    cfg.update(changes)
    (bundle / "tokenizer_config.json").write_text(json.dumps(cfg))


_EVIL = "import pathlib; pathlib.Path({marker!r}).write_text('custom code ran')\n"


def test_listed_python_code_is_refused_without_asking(dense, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (dense / "tokenizer_code.py").write_text(_EVIL.format(marker=str(marker)))
    _edit_tokenizer_config(dense, auto_map={"AutoTokenizer": ["tokenizer_code.EvilTokenizer", None]})
    _relist(dense, "tokenizer_code.py", "tokenizer_config.json")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("the runtime asked whether to run custom code"))
    with pytest.raises(BundleError, match="holds Python code"):
        load(dense)
    assert not marker.exists()


@pytest.mark.parametrize("tokenizer_class", ["AutoConfig", "AutoModelForCausalLM", "EvilTokenizer", None])
def test_tokenizer_config_cannot_pick_a_loader_or_code(dense, tmp_path, tokenizer_class):
    """auto_map, a tokenizer_class naming another transformers loader, and a config.json with
    auto_map to code in a subfolder (all listed): none is read, the bundle's tokenizer loads."""
    marker = tmp_path / "ran"
    (dense / "sub").mkdir()
    (dense / "sub" / "evil.txt").write_text(_EVIL.format(marker=str(marker)))
    (dense / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "sub/evil.Cfg"}}))
    _edit_tokenizer_config(dense, tokenizer_class=tokenizer_class,
                           auto_map={"AutoTokenizer": ["sub/evil.EvilTokenizer", None]})
    _relist(dense, "sub/evil.txt", "config.json", "tokenizer_config.json")
    engine = load(dense)
    assert type(engine.tokenizer).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert engine.generate("the quick brown fox", max_new_tokens=3, chat=False).token_ids
    assert not marker.exists()


@pytest.mark.parametrize("key", ["tokenizer_file", "fast_tokenizer_files", "vocab_file"])
def test_tokenizer_config_naming_a_file_elsewhere_is_not_read(dense, tmp_path, key):
    outside = tmp_path / "outside" / "tokenizer.json"
    outside.parent.mkdir()
    planted = json.loads((dense / "tokenizer.json").read_text())
    planted["added_tokens"].append({"id": 999, "content": "<planted>", "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    outside.write_text(json.dumps(planted))
    _edit_tokenizer_config(dense, **{key: [str(outside)] if key.endswith("files") else str(outside)})
    _relist(dense, "tokenizer_config.json")
    assert "<planted>" not in load(dense).tokenizer.get_vocab()


# ---- checksums: once in full, then a record keyed by size, mtime, ctime and inode -------------


def _count_hashes(monkeypatch) -> list[str]:
    hashed: list[str] = []
    real = bundle_read.sha256
    monkeypatch.setattr(bundle_read, "sha256", lambda p: hashed.append(Path(p).name) or real(p))
    return hashed


def test_second_load_trusts_the_record_and_full_verify_hashes_again(dense, monkeypatch):
    hashed = _count_hashes(monkeypatch)
    read_manifest(dense)
    assert "model.onnx.data" in hashed
    hashed.clear()
    read_manifest(dense)
    assert hashed == []
    read_manifest(dense, verify="full")
    assert "model.onnx.data" in hashed


def test_file_changed_after_the_record_with_its_size_and_mtime_kept_is_caught(dense, monkeypatch):
    read_manifest(dense)
    data = dense / "model.onnx.data"
    before = data.stat()
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime: only ctime moved
    with pytest.raises(BundleError, match="does not match its checksum"):
        read_manifest(dense)


def test_changed_manifest_is_not_covered_by_an_old_record(dense, monkeypatch):
    read_manifest(dense)
    _rewrite(dense, lambda m: m.update(producer="someone else"))
    hashed = _count_hashes(monkeypatch)
    read_manifest(dense)
    assert "model.onnx.data" in hashed


def test_unwritable_record_folder_still_verifies(dense, monkeypatch, tmp_path):
    blocker = tmp_path / "xdg-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    hashed = _count_hashes(monkeypatch)
    read_manifest(dense)
    read_manifest(dense)
    assert hashed.count("model.onnx.data") == 2


@pytest.mark.parametrize("change", ["unlisted-file", "field-outside"])
def test_standalone_example_refuses_what_the_package_refuses(dense, tmp_path, change):
    import subprocess
    import sys

    if change == "unlisted-file":
        (dense / "added_tokens.json").write_text("{}")
    else:
        _rewrite(dense, lambda m: m["graphs"]["step"].update(file="../outside.onnx"))
    example = Path(__file__).resolve().parents[2] / "examples" / "standalone_ort.py"
    proc = subprocess.run([sys.executable, str(example), str(dense), "--prompt", "hello"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert ("does not list" in proc.stderr) if change == "unlisted-file" else ("do not list" in proc.stderr)
