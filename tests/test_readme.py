"""The README's first command, as written, in a fresh clone: what a newcomer runs first."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _two_commands() -> list[str]:
    """The commands of the README's "Two commands" block, in order."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_gives_the_demo_then_the_test_command():
    assert _two_commands() == ["make demo", "make test"]


@pytest.mark.slow
def test_readme_demo_command_runs_in_a_fresh_clone(tmp_path):
    """`make demo` in a fresh clone (no out/ folder, nothing built), with this test run's
    environment standing in for the .venv that `make install` would create."""
    if not (REPO / ".git").exists() or shutil.which("git") is None or shutil.which("make") is None:
        pytest.skip("needs a git checkout, git and make")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    venv = Path(sys.prefix)
    stamp = venv / ".installed"
    command = _two_commands()[0].split() + [f"VENV={venv}", "-o", str(stamp), "PROMPT=Say hello."]
    proc = subprocess.run(command, cwd=clone, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (clone / "out" / "smollm2.onnx" / "manifest.json").is_file()
    assert "tokens, stop:" in proc.stderr and "Traceback" not in proc.stderr
