"""The record of a full checksum check, so that a bundle is hashed once, not on every load.

A record lives in the cache (``$XDG_CACHE_HOME/specee-compile/verified/``), never in the
bundle, keyed by the bundle's resolved path; it holds the SHA-256 of the manifest it was
made for and, per file, the (size, mtime, ctime, inode, device) the file had when its
checksum matched. A file is trusted without hashing only while all five are unchanged and
the manifest is byte for byte the same; any write to a file changes its ctime. A record that
cannot be read or written is ignored (the files are hashed instead).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def stat_key(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def _path(bundle_dir: Path) -> Path:
    from specee_compile.resources import cache_dir

    digest = hashlib.sha256(os.fsencode(Path(bundle_dir).resolve())).hexdigest()[:32]
    return cache_dir() / "verified" / f"{digest}.json"


def trusted(bundle_dir: Path, manifest_bytes: bytes) -> dict[str, list[int]]:
    """name -> stat key of the files a full check found intact, for this exact manifest."""
    try:
        data = json.loads(_path(bundle_dir).read_text())
        if data.get("manifest_sha256") != hashlib.sha256(manifest_bytes).hexdigest():
            return {}
        return {str(k): list(v) for k, v in data["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}


def remember(bundle_dir: Path, manifest_bytes: bytes, files: dict[str, list[int]]) -> None:
    """Write the record of a check that found ``files`` intact (atomically; failures are only logged)."""
    try:
        path = _path(bundle_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"bundle": str(Path(bundle_dir).resolve()), "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                "files": files}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        logger.debug("could not record the checksum check of %s: %s", bundle_dir, e)
