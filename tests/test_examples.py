"""Every runnable example in examples/ runs and says what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_pass_example_compiles_with_the_user_pass(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_pass.py"), "", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "record_op_histogram" in proc.stdout
    assert "GroupQueryAttention" in proc.stdout and "generated:" in proc.stdout
