"""Drafts trained for the built-in models, shipped inside the package.

A folder here holds ``draft.safetensors`` (fp16, the layout ``--draft`` reads) and
``draft.json``: the weights hash of the model it was trained for (``model_key``), and how it
was made: the command, the text, the settings, the held-out scores of every training stage.
A calibration of a model whose weights have that hash uses the shipped draft instead of
training one, unless told not to (``--set shipped_draft=false``); it then trains only the
predictors and chooses the schedule. ``python -m specee_compile.drafts.train`` makes them.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).parent
WEIGHTS = "draft.safetensors"
RECORD = "draft.json"


def find(model_key: str, root: Path | None = None) -> Path | None:
    """The shipped draft's weights for the model whose weights hash to ``model_key``, if any."""
    for record in sorted((root or ROOT).glob(f"*/{RECORD}")):
        try:
            meta = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("model_key") == model_key and (record.parent / WEIGHTS).is_file():
            return record.parent / WEIGHTS
    return None


def record(folder: Path) -> dict:
    return json.loads((Path(folder) / RECORD).read_text())
