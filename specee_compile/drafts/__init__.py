"""Drafts trained for the built-in models, shipped inside the package.

A folder here holds ``draft.safetensors`` (fp16, the layout ``--draft`` reads) and
``draft.json``: a hash of the weights of the model it was trained for (``weights_key``: the
tensors' names, dtypes, shapes and values, so it does not depend on how the files were
written), and how it was made: the command, the text, the settings, the held-out scores of
every training stage. A calibration of a model whose weights have that hash uses the shipped draft instead of
training one, unless told not to (``--set shipped_draft=false``); it then trains only the
predictors and chooses the schedule. ``python -m specee_compile.drafts.train`` makes them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).parent
WEIGHTS = "draft.safetensors"
RECORD = "draft.json"


def find(model_dir: Path, root: Path | None = None) -> Path | None:
    """The shipped draft's weights for the model in ``model_dir``, if any."""
    records = []
    for record in sorted((root or ROOT).glob(f"*/{RECORD}")):
        try:
            records.append((record, json.loads(record.read_text())))
        except (OSError, ValueError):
            continue
    if not records:
        return None
    key = weights_key(model_dir)
    for record, meta in records:
        if meta.get("weights_key") == key and (record.parent / WEIGHTS).is_file():
            return record.parent / WEIGHTS
    return None


def weights_key(model_dir: Path) -> str:
    """A hash of a model directory's tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def record(folder: Path) -> dict:
    return json.loads((Path(folder) / RECORD).read_text())
