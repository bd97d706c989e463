"""The manifest's fields a runtime relies on, each checked for presence, type and range.

Informational fields (``producer``, ``compile``, ``passes``, ``protocol``, the I/O shapes'
symbolic names, ...) are not checked. Files named by a field are checked against ``files``
here; that those files exist and are intact is :mod:`.read`'s part.
"""

from __future__ import annotations

import math
import reprlib
from pathlib import Path

from specee_compile.errors import BundleError

EXIT_RULES = ("full", "reduced", "draft")
EXIT_MODES = ("segments", "graph")
MAX_LAYERS = 4096
MAX_SIZE = 1 << 24  # heads, head dims, hidden sizes, vocabularies
MAX_CAPACITY = 1 << 20
_SHORT = reprlib.Repr()  # Python 3.11's Repr takes its limits as attributes
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 3, 3, 60, 60


class _Fields:
    """Checks one manifest, raising a BundleError that names the manifest and the field."""

    def __init__(self, manifest: dict, path: Path):
        self.manifest, self.path = manifest, path

    def fail(self, key: str, what: str, value) -> BundleError:
        return BundleError(f"{self.path}: field '{key}' must be {what}, not {_SHORT.repr(value)}; the bundle is "
                           "damaged. Recompile it.")

    def get(self, key: str, optional: bool = False):
        node, parts = self.manifest, key.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):  # a list entry: "segments.0"
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise self.fail(".".join(parts[:i]), "an object", node)
            if part not in node:
                if optional:
                    return None
                raise BundleError(f"{self.path} lacks the field '{key}'; the bundle is damaged or incomplete. "
                                  "Recompile it.")
            node = node[part]
        return node

    def obj(self, key: str, optional: bool = False) -> dict | None:
        value = self.get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, "an object", value)
        return value

    def int(self, key: str, lo: int, hi: int, optional: bool = False) -> int | None:
        value = self.get(key, optional)
        if value is None and optional:
            return None
        if type(value) is not int or not lo <= value <= hi:
            raise self.fail(key, f"an integer in [{lo}, {hi}]", value)
        return value

    def number(self, key: str, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self.get(key)
        ok = type(value) in (int, float) and math.isfinite(value) and (lo < value if lo_open else lo <= value) \
            and value <= hi
        if not ok:
            raise self.fail(key, f"a number in {'(' if lo_open else '['}{lo}, {hi}]", value)
        return float(value)

    def choice(self, key: str, choices: tuple) -> str:
        value = self.get(key)
        if value not in choices:
            raise self.fail(key, f"one of {', '.join(map(str, choices))}", value)
        return value

    def ints(self, key: str, lo: int, hi: int, max_len: int, distinct: bool = True) -> list[int]:
        value = self.get(key)
        ok = isinstance(value, list) and len(value) <= max_len and all(type(v) is int and lo <= v <= hi for v in value)
        if not ok or (distinct and len(set(value)) != len(value)):
            what = f"a list of at most {max_len} {'distinct ' if distinct else ''}integers in [{lo}, {hi}]"
            raise self.fail(key, what, value)
        return value

    def file(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str) or value not in self.manifest["files"]:
            raise BundleError(f"{self.path}: field '{key}' names {reprlib.repr(value)}, which 'files' does not list; "
                              "a runtime opens only the bundle's listed files. The bundle is damaged: recompile it.")
        return value

    def graph(self, key: str) -> None:
        """A graph entry: its file and its I/O lists of named values."""
        self.file(f"{key}.file")
        for part in ("inputs", "outputs"):
            value = self.get(f"{key}.{part}")
            if not (isinstance(value, list) and value and all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                                              for v in value)):
                raise self.fail(f"{key}.{part}", "a non-empty list of objects with a string 'name'", value)


def check_fields(manifest: dict, path: Path) -> None:
    """Every field a runtime reads exists, has its type and lies in its range."""
    f = _Fields(manifest, path)
    files = f.obj("files")
    if not files:
        raise f.fail("files", "a non-empty object of file name -> {sha256, bytes}", files)
    if not isinstance(f.get("backend"), str):
        raise f.fail("backend", "a string", f.get("backend"))
    layers = f.int("model.num_layers", 1, MAX_LAYERS)
    for key in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        f.int(f"model.{key}", 1, MAX_SIZE)
    vocab = manifest["model"]["vocab_size"]
    f.ints("model.eos_token_ids", 0, vocab - 1, 64, distinct=False)
    chat = f.get("model.chat_template", optional=True)
    if chat is not None and not isinstance(chat, bool):
        raise f.fail("model.chat_template", "true or false", chat)
    f.int("cache.capacity", 1, MAX_CAPACITY)
    f.graph("graphs.step")
    if "onnx" in manifest["graphs"]["step"]:
        f.file("graphs.step.onnx")
    if "specee" in manifest:
        _check_specee(f, layers, vocab)


def _check_specee(f: _Fields, layers: int, vocab: int) -> None:
    spec = f.obj("specee")
    f.choice("specee.rule", EXIT_RULES)
    mode = f.choice("specee.exit_mode", EXIT_MODES)
    f.number("specee.threshold", 0.0, 1.0)
    predictors = f.ints("specee.predictor_layers", 0, layers - 2, layers)
    f.int("specee.schedule.num_layers", layers, layers)  # model.num_layers
    f.ints("specee.schedule.offline_layers", 0, layers - 1, layers)
    f.int("specee.schedule.history", 0, 1024)
    f.ints("specee.schedule.offsets", -layers, layers, 64, distinct=False)
    if not isinstance(f.get("specee.schedule.online"), bool):
        raise f.fail("specee.schedule.online", "true or false", f.get("specee.schedule.online"))
    f.graph("specee.draft")
    f.int("specee.draft.vocab_size", 1, vocab)
    f.int("specee.draft.kv_heads", 1, MAX_SIZE)
    f.int("specee.draft.head_dim", 1, MAX_SIZE)
    f.file("specee.kv_fill.file")
    f.number("specee.kv_fill.eps", 0.0, 1.0, lo_open=True)
    if mode == "segments":
        _check_segments(f, "specee.segments", layers, predictors)
    else:
        f.graph("specee.decode")
    if f.obj("specee.tree", optional=True) is not None:
        f.graph("specee.tree")
        f.int("specee.tree.max_width", 1, 4096, optional=True)
        f.graph("specee.tree.draft")
        if "segments" in spec["tree"]:
            _check_segments(f, "specee.tree.segments", layers, predictors)


def _check_segments(f: _Fields, key: str, layers: int, predictors: list[int]) -> None:
    """A non-empty list of graphs covering layers 0..L-1 in order, each exiting at most at one of its layers."""
    segments = f.get(key)
    if not isinstance(segments, list) or not 1 <= len(segments) <= layers:
        raise f.fail(key, f"a list of 1 to {layers} segments", segments)
    start = 0
    for k, seg in enumerate(segments):
        at = f"{key}.{k}"
        if not isinstance(seg, dict):
            raise f.fail(at, "an object", seg)
        f.graph(at)
        if "onnx" in seg:
            f.file(f"{at}.onnx")
        first = f.int(f"{at}.first_layer", start, start)
        last = f.int(f"{at}.last_layer", first, layers - 1)
        exit_layer = seg.get("exit_layer")
        if exit_layer is not None and (type(exit_layer) is not int or exit_layer not in predictors
                                       or not first <= exit_layer <= last):
            raise f.fail(f"{at}.exit_layer", f"null or a predictor layer in [{first}, {last}]", exit_layer)
        start = last + 1
    if start != layers:
        raise f.fail(f"{key}.{len(segments) - 1}.last_layer", f"{layers - 1} (the segments must cover every layer)",
                     segments[-1].get("last_layer"))
