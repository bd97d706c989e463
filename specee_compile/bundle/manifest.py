"""The manifest: every field a runtime relies on, checked for presence, type and range
(:func:`check_fields`), and the typed :class:`Manifest` the compiler writes and the
runtimes read (``Manifest.from_json`` runs the checks).

Informational fields (``producer``, ``compile``, ``passes``, ``protocol``, the I/O shapes'
symbolic names, ...) are not checked. Files named by a field are checked against ``files``
here; that those files exist and are intact is :mod:`.read`'s part.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

from specee_compile.bundle.files import FORMAT, FORMAT_VERSION
from specee_compile.contract import EXIT_MODES, EXIT_RULES
from specee_compile.errors import BundleError, ConfigError
from specee_compile.quant.spec import PRECISIONS

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
        """A graph entry: its file and its I/O lists of named values (with an optional dtype
        string and a shape of integers and symbolic names); a TensorRT engine's entry also names
        the ONNX file it was built from (``onnx``)."""
        self.file(f"{key}.file")
        if isinstance(self.get(key), dict) and "onnx" in self.get(key):
            self.file(f"{key}.onnx")
        for part in ("inputs", "outputs"):
            value = self.get(f"{key}.{part}")
            if not (isinstance(value, list) and value and all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                                              for v in value)):
                raise self.fail(f"{key}.{part}", "a non-empty list of objects with a string 'name'", value)
            for k, v in enumerate(value):
                shape, dtype = v.get("shape", []), v.get("dtype")
                if not (isinstance(shape, list) and all(type(d) is int or isinstance(d, str) for d in shape)):
                    raise self.fail(f"{key}.{part}.{k}.shape", "a list of integers and names", shape)
                if dtype is not None and not isinstance(dtype, str):
                    raise self.fail(f"{key}.{part}.{k}.dtype", "a string or null", dtype)


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
    capacity = f.int("cache.capacity", 1, MAX_CAPACITY)
    windows = f.get("cache.sliding_windows", optional=True)
    if windows is not None and (not isinstance(windows, list) or len(windows) != layers or not all(
            w is None or (type(w) is int and 1 <= w <= capacity) for w in windows)):
        raise f.fail("cache.sliding_windows", f"a list of {layers} windows (integers 1..{capacity} or null)", windows)
    f.graph("graphs.step")
    if "specee" in manifest:
        _check_specee(f, layers, vocab)
    if "quant" in manifest:
        f.obj("quant")
        f.choice("quant.weights", PRECISIONS)
        f.int("quant.accuracy_level", 0, 4)
    if "genai" in manifest:
        f.obj("genai")
        f.file("genai.config")
        f.file("genai.graph")


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
    if "fusion_layers" in f.get("specee.draft"):
        f.ints("specee.draft.fusion_layers", 0, layers - 1, 2, distinct=False)
    f.file("specee.kv_fill.file")
    f.number("specee.kv_fill.eps", 0.0, 1.0, lo_open=True)
    if mode == "segments":
        _check_segments(f, "specee.segments", layers, predictors)
    else:
        f.graph("specee.decode")
    if f.obj("specee.tree", optional=True) is not None:
        f.graph("specee.tree")
        width = f.int("specee.tree.max_width", 1, 4096, optional=True) or 1
        f.graph("specee.tree.draft")
        shape = f.get("specee.tree.default_shape", optional=True)
        if shape is not None:
            from specee_compile.runtimes.speculation import TreeShape  # (runtimes import bundle)

            try:
                TreeShape.parse(shape if isinstance(shape, str) else "?").check(width)
            except ConfigError:
                raise f.fail("specee.tree.default_shape", f"a tree shape like 1x1x1+4 at most {width} wide",
                             shape) from None
        inexact = f.get("specee.tree.inexact", optional=True)
        if inexact is not None and not (isinstance(inexact, str) and inexact):
            raise f.fail("specee.tree.inexact", "a non-empty string (why trees are not token-exact)", inexact)
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


# ---- the typed manifest: what the compiler writes and the runtimes read --------------------------
@dataclass(frozen=True, kw_only=True)
class Value:
    """A graph input or output: its name, dtype and shape (symbolic dims as strings)."""

    name: str
    dtype: str | None = None
    shape: tuple = ()

    @classmethod
    def from_json(cls, d: dict) -> "Value":
        return cls(name=d["name"], dtype=d.get("dtype"), shape=tuple(d.get("shape", ())))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True, kw_only=True)
class Graph:
    """One graph of the bundle: its file (an engine for TensorRT), I/O, and for an engine the
    ONNX file it was built from and the shapes it takes (``profile``)."""

    file: str
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    onnx: str | None = None
    profile: dict | None = None

    @classmethod
    def fields_from_json(cls, d: dict) -> dict:
        return {"file": d["file"], "inputs": tuple(Value.from_json(v) for v in d["inputs"]),
                "outputs": tuple(Value.from_json(v) for v in d["outputs"]), "onnx": d.get("onnx"),
                "profile": d.get("profile")}

    @classmethod
    def from_json(cls, d: dict):
        return cls(**cls.fields_from_json(d))

    def to_json(self) -> dict:
        out = {"file": self.file, "inputs": [v.to_json() for v in self.inputs],
               "outputs": [v.to_json() for v in self.outputs]}
        out.update({k: v for k, v in (("onnx", self.onnx), ("profile", self.profile)) if v is not None})
        return out

    def input_names(self) -> list[str]:
        return [v.name for v in self.inputs]


@dataclass(frozen=True, kw_only=True)
class Segment(Graph):
    """A decode graph cut from the SpecEE step: layers first..last, ending with ``exit_layer``'s
    predictor (None: the last segment, with the LM head)."""

    first_layer: int
    last_layer: int
    exit_layer: int | None

    @classmethod
    def from_json(cls, d: dict) -> "Segment":
        return cls(**cls.fields_from_json(d), first_layer=d["first_layer"], last_layer=d["last_layer"],
                   exit_layer=d.get("exit_layer"))

    def to_json(self) -> dict:
        return {"file": self.file, "first_layer": self.first_layer, "last_layer": self.last_layer,
                "exit_layer": self.exit_layer, **{k: v for k, v in super().to_json().items() if k != "file"}}

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)


@dataclass(frozen=True, kw_only=True)
class Draft(Graph):
    vocab_size: int  # the draft's reduced vocabulary
    kv_heads: int
    head_dim: int
    # a fusion draft's low and middle layers: the target graphs' features are its fused input
    # (informational: runtimes feed the graphs' features as they are)
    fusion_layers: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, d: dict) -> "Draft":
        return cls(**cls.fields_from_json(d), vocab_size=d["vocab_size"], kv_heads=d["kv_heads"],
                   head_dim=d["head_dim"], fusion_layers=tuple(d.get("fusion_layers", ())))

    def to_json(self) -> dict:
        return {**super().to_json(), "vocab_size": self.vocab_size, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, **({"fusion_layers": list(self.fusion_layers)} if self.fusion_layers else {})}


@dataclass(frozen=True, kw_only=True)
class Tree(Graph):
    """Tree speculation's verification graph, its draft graph and (exit mode "segments") the
    tree step with per-node exits, cut."""

    max_width: int
    draft: Graph
    segments: tuple[Segment, ...] = ()
    default_shape: str = ""  # the shape ``tree=True`` runs ("": the runtime's DEFAULT_TREE)
    choice: dict | None = None  # how default_shape was chosen (runtimes/tree_choice.py), informational
    inexact: str = ""  # why trees do not give the dense graph's tokens ("": they do, lossless)

    @classmethod
    def from_json(cls, d: dict) -> "Tree":
        return cls(**cls.fields_from_json(d), max_width=d.get("max_width", 1), draft=Graph.from_json(d["draft"]),
                   segments=tuple(Segment.from_json(s) for s in d.get("segments", [])),
                   default_shape=d.get("default_shape", ""), choice=d.get("choice"), inexact=d.get("inexact", ""))

    def to_json(self) -> dict:
        out = {**super().to_json(), "max_width": self.max_width, "draft": self.draft.to_json()}
        if self.segments:
            out["segments"] = [s.to_json() for s in self.segments]
        if self.default_shape:
            out["default_shape"] = self.default_shape
        if self.choice is not None:
            out["choice"] = self.choice
        if self.inexact:
            out["inexact"] = self.inexact
        return out


@dataclass(frozen=True, kw_only=True)
class SpecEE:
    """The ``specee`` section: exits, their schedule, the draft and the decode graphs."""

    calibration: str
    rule: str
    threshold: float
    exit_mode: str
    predictor_layers: tuple[int, ...]
    schedule: dict  # Schedule.to_dict()
    draft: Draft
    kv_fill_file: str
    kv_fill_eps: float
    segments: tuple[Segment, ...] = ()  # exit mode "segments"
    decode: Graph | None = None  # exit mode "graph"
    tree: Tree | None = None
    cost_model: dict = field(default_factory=dict)
    kv_policy: str = "propagate"
    # per draft graph ("draft", "draft_tree"): its weights' precision and how many are stored how
    draft_weights: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> "SpecEE":
        return cls(calibration=d.get("calibration", ""), rule=d["rule"], threshold=float(d["threshold"]),
                   exit_mode=d["exit_mode"], predictor_layers=tuple(d["predictor_layers"]), schedule=d["schedule"],
                   draft=Draft.from_json(d["draft"]), kv_fill_file=d["kv_fill"]["file"],
                   kv_fill_eps=float(d["kv_fill"]["eps"]),
                   segments=tuple(Segment.from_json(s) for s in d.get("segments", [])),
                   decode=Graph.from_json(d["decode"]) if "decode" in d else None,
                   tree=Tree.from_json(d["tree"]) if "tree" in d else None, cost_model=d.get("cost_model", {}),
                   kv_policy=d.get("kv_policy", "propagate"), draft_weights=d.get("draft_weights", {}))

    def to_json(self) -> dict:
        out = {"calibration": self.calibration, "rule": self.rule, "threshold": self.threshold,
               "kv_policy": self.kv_policy, "exit_mode": self.exit_mode,
               "predictor_layers": list(self.predictor_layers), "schedule": self.schedule,
               "cost_model": self.cost_model, "draft": self.draft.to_json(),
               "kv_fill": {"file": self.kv_fill_file, "eps": self.kv_fill_eps}}
        if self.segments:
            out["segments"] = [s.to_json() for s in self.segments]
        if self.decode is not None:
            out["decode"] = self.decode.to_json()
        if self.tree is not None:
            out["tree"] = self.tree.to_json()
        if self.draft_weights:
            out["draft_weights"] = self.draft_weights
        return out


@dataclass(frozen=True, kw_only=True)
class Model:
    source: str
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    chat_template: bool = False


@dataclass(frozen=True, kw_only=True)
class Cache:
    capacity: int
    layout: str = "[batch, kv_heads, capacity, head_dim]"
    dtype: str = "float32"
    update: str = ""
    # per layer, the sliding window (the query at position p reads the keys at p - window < t <= p;
    # null: all) of models that have one; every layer's buffer still holds ``capacity`` positions
    sliding_windows: tuple[int | None, ...] = ()

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if not self.sliding_windows:
            del out["sliding_windows"]
        else:
            out["sliding_windows"] = list(self.sliding_windows)
        return out


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A bundle's manifest.json as typed fields. ``from_json`` checks every field a runtime
    reads and every file a field names (:func:`check_fields`); ``to_json`` is what the
    compiler writes (``files`` is added when the bundle is finished)."""

    backend: str
    graph_target: str
    model: Model
    cache: Cache
    step: Graph
    protocol: str = ""
    specee: SpecEE | None = None
    producer: str = ""
    created: str = ""
    compile: dict = field(default_factory=dict)
    passes: list = field(default_factory=list)
    engine: dict | None = None  # TensorRT: precision, versions, device
    tensorrt_check: dict | None = None
    quant: dict | None = None  # weight quantization: precisions, block size, accuracy level, storage per graph
    genai: dict | None = None  # ONNX Runtime GenAI's config and graph files (bundle/genai.py)
    files: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict, path: Path) -> "Manifest":
        check_fields(d, path)
        m = d["model"]
        model = Model(source=str(m.get("source", "")), family=str(m.get("family", "")), num_layers=m["num_layers"],
                      hidden_size=m["hidden_size"], num_heads=m["num_heads"], num_kv_heads=m["num_kv_heads"],
                      head_dim=m["head_dim"], vocab_size=m["vocab_size"], eos_token_ids=tuple(m["eos_token_ids"]),
                      chat_template=bool(m.get("chat_template", False)))
        c = d["cache"]
        return cls(backend=d["backend"], graph_target=d.get("graph_target", "ort"), model=model,
                   cache=Cache(capacity=c["capacity"], layout=c.get("layout", ""), dtype=c.get("dtype", "float32"),
                               update=c.get("update", ""), sliding_windows=tuple(c.get("sliding_windows", ()))),
                   step=Graph.from_json(d["graphs"]["step"]), protocol=d.get("protocol", ""),
                   specee=SpecEE.from_json(d["specee"]) if "specee" in d else None, producer=d.get("producer", ""),
                   created=d.get("created", ""), compile=d.get("compile", {}), passes=d.get("passes", []),
                   engine=d.get("engine"), tensorrt_check=d.get("tensorrt_check"), quant=d.get("quant"),
                   genai=d.get("genai"), files=d["files"])

    def to_json(self) -> dict:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION, "producer": self.producer, "created": self.created,
               "backend": self.backend, "graph_target": self.graph_target,
               "model": {**dataclasses.asdict(self.model), "eos_token_ids": list(self.model.eos_token_ids)},
               "cache": self.cache.to_json(), "graphs": {"step": self.step.to_json()},
               "protocol": self.protocol, "compile": self.compile, "passes": self.passes}
        for name in ("tensorrt_check", "engine", "quant", "genai"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.specee is not None:
            out["specee"] = self.specee.to_json()
        if self.files:
            out["files"] = self.files
        return out
