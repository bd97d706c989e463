"""Bundle: the compiled engine on disk, its manifest, and atomic writing.

A bundle is a directory (its suffix names the backend, e.g. ``smollm2.onnx/``)::

    manifest.json          format, producer, model shapes, I/O contract, protocol, checksums
    model.onnx             the decoder step graph (prefill and decode)
    model.onnx.data        its weights (ONNX external data)
    tokenizer.json, tokenizer_config.json, chat_template.jinja, ...   the tokenizer files
    generation_config.json

It is built in a hidden temporary sibling and renamed into place only when complete;
an existing bundle is replaced only with ``force`` and only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import reprlib
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from specee_compile.errors import BundleError, OutputError

logger = logging.getLogger(__name__)

FORMAT = "specee-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output(out: Path, force: bool) -> None:
    """Fail before any work if ``out`` cannot be written as asked."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"the output's parent folder {parent} does not exist; create it first.")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"the output's parent folder {parent} is not writable; choose another --out.")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(
                f"{out} already exists; pass --force to replace it (the old bundle is replaced only "
                "once the new one is complete), or choose another --out."
            )
        if not (out / MANIFEST).is_file():
            raise OutputError(
                f"{out} exists and is not a specee bundle (no {MANIFEST}); refusing to replace it "
                "even with --force. Remove it yourself or choose another --out."
            )


@contextlib.contextmanager
def staging(out: Path, force: bool):
    """Yield a temporary sibling directory; on success move it to ``out`` atomically.

    On any failure or interruption (KeyboardInterrupt, which the CLI also raises for SIGTERM)
    the temporary directory is removed and an existing ``out`` is left as it was. An OSError
    while writing (e.g. a full disk) becomes an OutputError.
    """
    check_output(out, force)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.partial-"))
    except OSError as e:
        raise OutputError(f"cannot create a folder in {parent} ({e}); choose another --out.") from e
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is an ordinary folder
        _swap_in(tmp, out)
    except OSError as e:
        raise OutputError(
            f"writing the bundle {out} failed ({e}); nothing was kept. Free disk space in "
            f"{parent} or choose another --out, then compile again."
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is put back if the swap fails midway."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{out.name}.old-"))
    try:
        os.replace(out, old / "bundle")
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / "bundle", out)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def finish_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Add the checksum of every file and write manifest.json (last, so its presence means done)."""
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest["files"] = {
        str(p.relative_to(bundle_dir)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files
    }
    partial = bundle_dir / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, bundle_dir / MANIFEST)
    return manifest


def read_manifest(bundle_dir: Path, verify: bool = True) -> dict:
    """Read and validate a bundle's manifest; with ``verify``, check every file's checksum.

    Raises:
        BundleError: naming the manifest and the bad field, for anything a reader cannot use.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(
            f"{bundle_dir} is not a bundle directory; compile one with `specee-compile MODEL --out {bundle_dir}`."
        )
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST}; it is incomplete or not a specee bundle. Recompile it.")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("top level is not an object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is damaged. Recompile it.") from e
    except OSError as e:
        raise BundleError(f"{path} cannot be read ({e}); check its permissions.") from e
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"{path} is not a {FORMAT} manifest (format={reprlib.repr(manifest.get('format'))}). "
            "Pass a bundle written by specee-compile, or recompile it."
        )
    version = manifest.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {reprlib.repr(version)}; this specee-compile reads versions 1 to "
            f"{FORMAT_VERSION}. Upgrade specee-compile or recompile the bundle with this version."
        )
    _check_fields(manifest, path)
    _check_files(bundle_dir, manifest, path, verify)
    return manifest


def _positive_int(value) -> bool:
    return type(value) is int and value > 0


def _io_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in value)


# The fields a reader relies on: dotted key -> (what it must be, check). The rest is informational.
_FIELDS = {
    "backend": ("a string", lambda v: isinstance(v, str)),
    "model.num_layers": ("a positive integer", _positive_int),
    "model.hidden_size": ("a positive integer", _positive_int),
    "model.num_heads": ("a positive integer", _positive_int),
    "model.num_kv_heads": ("a positive integer", _positive_int),
    "model.head_dim": ("a positive integer", _positive_int),
    "model.vocab_size": ("a positive integer", _positive_int),
    "model.eos_token_ids": ("a list of token ids", lambda v: isinstance(v, list) and all(
        type(t) is int and t >= 0 for t in v)),
    "cache.capacity": ("a positive integer", _positive_int),
    "graphs.step.file": ("a file name", lambda v: isinstance(v, str) and v != ""),
    "graphs.step.inputs": ("a list of objects with a string 'name'", _io_list),
    "graphs.step.outputs": ("a list of objects with a string 'name'", _io_list),
    "files": ("a non-empty object of file name -> {sha256, bytes}", lambda v: isinstance(v, dict) and bool(v)),
}
_OPTIONAL = {"model.chat_template": ("true or false", lambda v: isinstance(v, bool))}


def _check_fields(manifest: dict, path: Path) -> None:
    """Every field in _FIELDS (and _OPTIONAL, when present) must exist and pass its check."""
    for key, (what, ok) in [*_FIELDS.items(), *_OPTIONAL.items()]:
        found, value = _lookup(manifest, key, path)
        if not found and key not in _OPTIONAL:
            raise BundleError(f"{path} lacks the field '{key}'; the bundle is damaged or incomplete. Recompile it.")
        if found and not ok(value):
            raise BundleError(
                f"{path}: field '{key}' must be {what}, not {reprlib.repr(value)}; the bundle is "
                "damaged. Recompile it."
            )
    step_file = manifest["graphs"]["step"]["file"]
    if step_file not in manifest["files"]:
        raise BundleError(
            f"{path}: field 'graphs.step.file' names {step_file!r}, which 'files' does not list; "
            "the bundle is damaged. Recompile it."
        )


def _lookup(manifest: dict, key: str, path: Path) -> tuple[bool, object]:
    """(found, value) of a dotted key; raises BundleError if a parent is not an object."""
    node, parts = manifest, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            parent = ".".join(parts[:i])
            raise BundleError(
                f"{path}: field '{parent}' must be an object, not {reprlib.repr(node)}; the bundle "
                "is damaged. Recompile it."
            )
        if part not in node:
            return False, None
        node = node[part]
    return True, node


def _check_files(bundle_dir: Path, manifest: dict, path: Path, verify: bool) -> None:
    """Every file the manifest lists must exist inside the bundle with its size (and checksum)."""
    for name, meta in manifest["files"].items():
        if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\0" in name:
            raise BundleError(f"{path}: field 'files' names {name!r}, which is not a path inside the bundle; "
                              "the bundle is damaged. Recompile it.")
        if not (isinstance(meta, dict) and type(meta.get("bytes")) is int and isinstance(meta.get("sha256"), str)):
            raise BundleError(f"{path}: field 'files.{name}' must be {{\"sha256\": str, \"bytes\": int}}; "
                              "the bundle is damaged. Recompile it.")
        f = bundle_dir / name
        try:
            if not f.is_file():
                raise BundleError(f"bundle file {f} is missing; the bundle is damaged. Recompile it.")
            if f.stat().st_size != meta["bytes"] or (verify and sha256(f) != meta["sha256"]):
                raise BundleError(
                    f"bundle file {f} does not match its checksum in {MANIFEST}: it was altered or "
                    "truncated. Recompile the bundle."
                )
        except OSError as e:
            raise BundleError(f"bundle file {f} cannot be read ({e}); check its permissions or recompile.") from e


def io_contract(model: ir.Model) -> dict:
    """Names, dtypes and shapes (symbolic dims as strings) of a graph's inputs and outputs."""

    def describe(v: ir.Value) -> dict:
        dims = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
        dtype = str(v.dtype.numpy()) if v.dtype is not None else None
        return {"name": v.name, "dtype": dtype, "shape": dims}

    return {
        "inputs": [describe(v) for v in model.graph.inputs],
        "outputs": [describe(v) for v in model.graph.outputs],
    }
