"""What every bundle reader and writer shares: the format's name, the manifest's file name,
checksums, and the walk over a bundle folder's entries."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FORMAT = "specee-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def entries(folder: Path, limit: int = 100_000) -> tuple[list[str], list[str], list[str]]:
    """(files, folders, others) under ``folder`` as '/'-separated relative names, without
    following symbolic links (a link is an "other", whatever it points at).

    Stops after ``limit`` entries (a bundle has a few dozen), so a hostile folder cannot make
    a reader walk forever.
    """
    files, folders, others = [], [], []
    stack = [""]
    while stack:
        prefix = stack.pop()
        with os.scandir(folder / prefix if prefix else folder) as it:
            for e in it:
                name = f"{prefix}{e.name}"
                if e.is_symlink():
                    others.append(name)
                elif e.is_dir(follow_symlinks=False):
                    folders.append(name)
                    stack.append(name + "/")
                elif e.is_file(follow_symlinks=False):
                    files.append(name)
                else:
                    others.append(name)
                if len(files) + len(folders) + len(others) > limit:
                    others.append(f"... (more than {limit} entries)")
                    return files, folders, others
    return sorted(files), sorted(folders), sorted(others)


def parents(name: str) -> set[str]:
    """The folders a relative '/'-separated file name lies in: 'a/b/c' -> {'a', 'a/b'}."""
    parts = name.split("/")[:-1]
    return {"/".join(parts[: i + 1]) for i in range(len(parts))}
