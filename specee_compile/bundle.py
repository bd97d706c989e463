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
import shutil
import tempfile
from pathlib import Path

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
    """Yield a temporary sibling directory; on success move it to ``out`` atomically."""
    check_output(out, force)
    tmp = Path(tempfile.mkdtemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is an ordinary folder
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "bundle")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Read and validate a bundle's manifest; with ``verify``, check every file's checksum."""
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
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is damaged. Recompile it.") from e
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a {FORMAT} manifest (format={manifest.get('format')!r}).")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {version!r}; this specee-compile reads versions up to "
            f"{FORMAT_VERSION}. Upgrade specee-compile or recompile the bundle with this version."
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path} lists no files; the bundle is damaged. Recompile it.")
    for name, meta in files.items():
        f = bundle_dir / name
        if not f.is_file():
            raise BundleError(f"bundle file {f} is missing; the bundle is damaged. Recompile it.")
        try:
            size, digest = meta["bytes"], meta["sha256"]
        except (TypeError, KeyError) as e:
            raise BundleError(f"{path} has a malformed entry for {name}; recompile the bundle.") from e
        if f.stat().st_size != size or (verify and sha256(f) != digest):
            raise BundleError(
                f"bundle file {f} does not match its checksum in {MANIFEST}: it was altered or "
                "truncated. Recompile the bundle."
            )
    return manifest
