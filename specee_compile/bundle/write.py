"""Writing a bundle: output checks, atomic staging, and the manifest written last.

What ``--force`` may replace: a folder whose ``manifest.json`` parses as a specee bundle's and
which holds nothing but the files that manifest lists (a damaged bundle with files missing
qualifies; a folder with anything else in it does not). Without ``force`` nothing is ever
replaced, even an output that appears while the compile runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path


from specee_compile.bundle.files import FORMAT, MANIFEST, entries, parents, sha256
from specee_compile.errors import WRITE_ERRORS, OutputError

logger = logging.getLogger(__name__)


def _parent(out: Path) -> Path:
    return out.parent if str(out.parent) else Path(".")


def check_output(out: Path, force: bool) -> None:
    """Fail before any work if ``out`` cannot be written as asked.

    Missing parent folders are fine (:func:`staging` creates them); the nearest existing one
    must be a writable folder.
    """
    ancestor = _parent(out)
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{ancestor} is not a folder, so the output {out} cannot be created inside it; "
                          "choose another --out.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"the folder {ancestor} is not writable, so {out} cannot be created; choose another --out.")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(
                f"{out} already exists; pass --force to replace it (the old bundle is replaced only "
                "once the new one is complete), or choose another --out."
            )
        problem = replaceable_problem(out)
        if problem:
            raise OutputError(f"{out} {problem}; refusing to replace it even with --force. Remove it yourself "
                              "or choose another --out.")


def replaceable_problem(out: Path) -> str | None:
    """Why ``--force`` must not replace ``out`` (None when it is a specee bundle holding only its own files)."""
    if out.is_symlink():
        return "is a symbolic link, not a bundle folder"
    if not out.is_dir():
        return "is a file, not a bundle folder"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return f"is not a specee bundle (no {MANIFEST})"
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        return f"is not a specee bundle (its {MANIFEST} cannot be read as JSON: {e})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return f"is not a specee bundle (its {MANIFEST} is not a '{FORMAT}' manifest)"
    listed = {str(n) for n in manifest["files"]}
    try:
        files, folders, others = entries(out)
    except OSError as e:
        return f"cannot be listed ({e})"
    allowed_folders = set().union(*(parents(n) for n in listed)) if listed else set()
    foreign = [n for n in files if n not in listed and n != MANIFEST]
    foreign += [n + "/" for n in folders if n not in allowed_folders] + others
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"holds files its manifest does not list ({shown}), which --force would delete"
    return None


@contextlib.contextmanager
def staging(out: Path, force: bool):
    """Yield a temporary sibling directory; on success move it to ``out`` atomically.

    On any failure or interruption (KeyboardInterrupt, which the CLI also raises for SIGTERM)
    the temporary directory is removed and an existing ``out`` is left as it was. A failed
    write (e.g. a full disk) becomes an OutputError.
    """
    check_output(out, force)
    parent = _parent(out)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.partial-"))
    except OSError as e:
        raise OutputError(f"cannot create a folder in {parent} ({e}); choose another --out.") from e
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is an ordinary folder
        _swap_in(tmp, out, force)
    except WRITE_ERRORS as e:
        raise OutputError(
            f"writing the bundle {out} failed ({e}); nothing was kept. Free disk space in "
            f"{parent} or choose another --out, then compile again."
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out``. Without ``force`` the rename refuses an ``out`` that appeared
    meanwhile; with it, an existing ``out`` is checked again and put back if the swap fails."""
    if not force or not (out.exists() or out.is_symlink()):
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError as e:
            raise OutputError(
                f"{out} appeared while this compile ran (another compile or program wrote it); it was left as "
                "it is and the new bundle was discarded. Pass --force to replace it, or choose another --out."
            ) from e
        return
    problem = replaceable_problem(out)
    if problem:
        raise OutputError(f"{out} {problem} (it changed while this compile ran); it was left as it is and the new "
                          "bundle was discarded. Remove it yourself or choose another --out.")
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


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically unless ``dst`` exists (FileExistsError).

    Linux's renameat2(RENAME_NOREPLACE); where the C library or the file system lacks it,
    ``dst`` is claimed by mkdir (atomic) and the empty folder replaced by the rename.
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    os.mkdir(dst)  # FileExistsError when it exists
    os.replace(src, dst)


def finish_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Add the checksum of every file and write manifest.json (last, so its presence means done)."""
    files, _, others = entries(bundle_dir)
    if others:
        raise OutputError(f"the bundle being written holds entries that are not files or folders: {others[:5]}; "
                          "this is a bug in a pass or lowering step that wrote them.")
    manifest["files"] = {
        name: {"sha256": sha256(bundle_dir / name), "bytes": (bundle_dir / name).stat().st_size}
        for name in files if name != MANIFEST
    }
    partial = bundle_dir / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, bundle_dir / MANIFEST)
    return manifest
