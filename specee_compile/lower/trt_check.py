"""CheckTensorRTPass: would TensorRT 10's ONNX parser take this graph? A static analysis.

Checks, against the operator table in ``trt_ops`` for a target 10.x release:

- the ai.onnx opset lies in the release's range;
- every node, recursively into ``If``/``Loop``/``Scan`` subgraphs and model-local
  functions, is an ``ai.onnx`` operator the table lists as supported (not one marked
  unsupported, not an unknown one, not one added after the target release); the element
  types of its inputs are in the operator's list; its documented restrictions hold
  (constant ``axes``, attribute values, inputs and outputs it does not take, ranks);
- every ``If`` has branches that return as many outputs as the node, with equal element
  types and ranks, under different names;
- network inputs have a known rank and, like outputs, an element type TensorRT has;
- every KV-cache output ``present.*`` is written the way TensorRT takes a cache update: a
  ScatterElements / ScatterND (or TensorScatter from 10.15) into the matching past-buffer
  input, with its shape, or a Concat.

Types and ranks come from ONNX shape inference (non-strict), run first on the model: that
annotation of value types and shapes is the pass's only change, and ``modified`` says
whether it changed anything. Problems are collected, not stopped at; the pass raises
:class:`TensorRTCompatibilityError` listing all of them.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401

from specee_compile.errors import PassError
from specee_compile.lower import trt_ops
from specee_compile.lower.trt_ops import DOMAINS, SUPPORTED, UNSUPPORTED, OpSupport, Rule, Version

logger = logging.getLogger(__name__)

DEFAULT_TARGET: Version = (10, 0)  # the oldest 10.x: a graph that passes parses on every 10.x
MAX_LISTED = 25


@dataclasses.dataclass(frozen=True)
class Problem:
    """One construct TensorRT's parser would reject: where, what, and why."""

    graph: str  # graph path, e.g. "step" or "segment_1/exit.3.then_branch"
    node: str  # node name, or the value name for graph-level problems
    op: str  # "domain::OpType" ("" for graph-level problems)
    what: str
    why: str

    def __str__(self) -> str:
        where = f"node '{self.node}' ({self.op})" if self.op else f"'{self.node}'"
        return f"{self.graph}: {where}: {self.what} ({self.why})"


class TensorRTCompatibilityError(PassError):
    """A graph holds constructs TensorRT's ONNX parser does not take; ``problems`` lists them."""

    def __init__(self, graph: str, problems: list[Problem], target: Version):
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        super().__init__(
            f"graph(s) {graph} hold {len(problems)} construct(s) that TensorRT {_v(target)}'s ONNX parser does "
            f"not take:\n{listed}{more}\nCompile TensorRT-ready graphs (--check trt, or a .plan output), or an "
            "ONNX Runtime bundle with --out NAME.onnx."
        )


@dataclasses.dataclass
class CheckTensorRTPass(ir.passes.InPlacePass):
    """Check a model against TensorRT 10's ONNX parser; raise listing every problem found."""

    target: Version = DEFAULT_TARGET
    graph_name: str = ""
    name: str = "check_tensorrt"
    problems: list[Problem] = dataclasses.field(default_factory=list)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = ir.passes.common.ShapeInferencePass(strict_mode=False)(model).modified
        name = self.graph_name or model.graph.name or "main"
        self.problems = find_problems(model, self.target, name)
        if self.problems:
            raise TensorRTCompatibilityError(name, self.problems, self.target)
        return ir.passes.PassResult(model, modified=modified)


def find_problems(model: ir.Model, target: Version = DEFAULT_TARGET, name: str = "main") -> list[Problem]:
    """Every problem in ``model`` for TensorRT ``target`` (types and ranks as annotated)."""
    problems: list[Problem] = []
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    lo, hi = next((lo, hi) for since, lo, hi in reversed(trt_ops.OPSETS) if target >= since)
    if opset is not None and not lo <= opset <= hi:
        problems.append(Problem(name, "opset_import", "", f"ai.onnx opset {opset}",
                                f"TensorRT {_v(target)} parses opsets {lo} to {hi}"))
    _check_io(model.graph, name, problems)
    _check_graph(model, model.graph, name, target, problems)
    _check_cache_writes(model.graph, name, target, problems)
    return problems


def oldest_target(models) -> Version:
    """The oldest 10.x release whose documented opset range holds every model's ai.onnx opset
    (10.0 for the exported graphs' opset 18; 10.15 for the opset 21 of blocked dequantization)."""
    opset = max((m.opset_imports.get("", m.opset_imports.get("ai.onnx", 0)) for m in models), default=0)
    return next((since for since, lo, hi in trt_ops.OPSETS if lo <= opset <= hi), DEFAULT_TARGET)


def _check_graph(model: ir.Model, graph: ir.Graph | ir.Function, path: str, target: Version, problems) -> None:
    for k, node in enumerate(graph):
        label = node.name or f"#{k}"
        where = (path, label, f"{node.domain or 'ai.onnx'}::{node.op_type}")
        function = model.functions.get(node.op_identifier())
        if function is not None:
            _check_graph(model, function, f"{path}/function {node.op_type}", target, problems)
        elif node.domain not in DOMAINS:
            problems.append(Problem(*where, f"operator domain '{node.domain}'",
                                    "TensorRT parses ai.onnx operators only; other domains need a TensorRT "
                                    "plugin of that name"))
        elif node.op_type in UNSUPPORTED:
            problems.append(Problem(*where, "unsupported operator", "TensorRT 10's operator matrix marks it unsupported"))
        elif node.op_type not in SUPPORTED:
            problems.append(Problem(*where, "unknown operator", "not in TensorRT 10's operator matrix"))
        elif target < SUPPORTED[node.op_type].since:
            problems.append(Problem(*where, "operator too new for the target",
                                    f"parsed from TensorRT {_v(SUPPORTED[node.op_type].since)} on"))
        else:
            _check_node(model, node, SUPPORTED[node.op_type], where, target, problems)
        if node.op_type == "If" and node.domain in DOMAINS:
            _check_if(node, where, problems)
        if node.op_type == "DequantizeLinear" and node.domain in DOMAINS:
            _check_dequantize(node, where, problems)
        for attr in node.attributes.values():
            subgraphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else \
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
            for sub in subgraphs:
                _check_graph(model, sub, f"{path}/{label}.{attr.name}", target, problems)


def _check_node(model, node: ir.Node, support: OpSupport, where, target: Version, problems) -> None:
    types = next((t for until, t in support.older_types if target < until), support.types)
    allowed = {dt for t in types for dt in trt_ops.TYPE_NAMES[t]}
    for i, v in enumerate(node.inputs):
        if v is None or v.dtype is None or (support.typed_inputs is not None and i not in support.typed_inputs):
            continue
        if v.dtype not in allowed:
            problems.append(Problem(*where, f"input {i} '{v.name}' is {v.dtype.name}",
                                    f"TensorRT's {node.op_type} takes {', '.join(types)}"))
    opset = node.version or model.opset_imports.get(node.domain or "", 0)
    for rule in support.rules:
        if rule.before is not None and target >= rule.before:
            continue
        broken = _broken(rule, node, opset)
        if broken:
            problems.append(Problem(*where, broken, rule.why))


def _broken(rule: Rule, node: ir.Node, opset: int) -> str | None:
    """What breaks ``rule`` at ``node``, or None when it holds."""
    kind, key = rule.kind, rule.key
    value = node.inputs[key] if isinstance(key, int) and key < len(node.inputs) else None
    if kind == "constant_input":
        return f"input {key} '{value.name}' is computed at run time" if value is not None and \
            _constant(value) is None else None
    if kind == "constant_below":
        const = _constant(value) if value is not None else None
        if value is not None and (const is None or np.max(const) >= rule.allowed[0]):
            return f"input {key} '{value.name}' is {'computed at run time' if const is None else np.max(const)}"
        return None
    if kind == "input_absent":
        return f"input {key} '{value.name}' is given" if value is not None else None
    if kind == "output_unused":
        out = node.outputs[key] if key < len(node.outputs) else None
        return f"output {key} '{out.name}' is used" if out is not None and (out.uses() or out.is_graph_output()) \
            else None
    if kind == "rank_in":
        rank = len(value.shape) if value is not None and value.shape is not None else None
        return f"input {key} '{value.name}' has rank {rank}" if rank is not None and rank not in rule.allowed else None
    if kind == "opset_below":
        return f"opset {opset}" if opset >= rule.allowed[0] else None
    attr = node.attributes.get(key)
    if kind == "attribute_absent":
        return f"attribute '{key}' is set" if attr is not None else None
    if kind == "attribute_in":
        got = rule.default if attr is None else attr.value
        return f"attribute {key}={got!r}" if got not in rule.allowed else None
    if kind == "attribute_all_ones":
        got = list(attr.value) if attr is not None else []
        return f"attribute {key}={got}" if any(x != 1 for x in got) else None
    if kind == "attribute_type_in":
        if attr is None:
            return None
        dtype = ir.DataType(attr.value) if attr.type == ir.AttributeType.INT else getattr(attr.value, "dtype", None)
        allowed = {dt for t in rule.allowed for dt in trt_ops.TYPE_NAMES[t]}
        return f"attribute '{key}' is of type {dtype.name}" if dtype is not None and dtype not in allowed else None
    raise ValueError(f"unknown rule kind {kind!r}")


def _constant(value: ir.Value):
    """The value's constant array (initializer or Constant node output), or None."""
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in DOMAINS:
        attr = next(iter(producer.attributes.values()), None)
        if attr is not None:
            return np.asarray(attr.value.numpy() if attr.type == ir.AttributeType.TENSOR else attr.value)
    return None


def _check_if(node: ir.Node, where, problems) -> None:
    branches = [node.attributes.get(b) for b in ("then_branch", "else_branch")]
    if any(b is None for b in branches):
        problems.append(Problem(*where, "a branch is missing", "an If needs then_branch and else_branch"))
        return
    then, other = (b.as_graph() for b in branches)
    n = len(node.outputs)
    if len(then.outputs) != n or len(other.outputs) != n:
        problems.append(Problem(*where, f"branches return {len(then.outputs)} and {len(other.outputs)} outputs "
                                f"for {n} node outputs", "both branches of a TensorRT conditional return "
                                "every output of the If"))
        return
    for k, (a, b) in enumerate(zip(then.outputs, other.outputs)):
        if a.dtype is not None and b.dtype is not None and a.dtype != b.dtype:
            problems.append(Problem(*where, f"output {k}: then_branch gives {a.dtype.name}, else_branch "
                                    f"{b.dtype.name}", "branch outputs must have the same type"))
        ra, rb = (len(v.shape) if v.shape is not None else None for v in (a, b))
        if ra is not None and rb is not None and ra != rb:
            problems.append(Problem(*where, f"output {k}: then_branch gives rank {ra} ('{a.name}'), else_branch "
                                    f"rank {rb} ('{b.name}')", "TensorRT needs branch outputs of the same rank"))
        if a.name == b.name:
            problems.append(Problem(*where, f"output {k}: both branches return the value '{a.name}'",
                                    "TensorRT needs the branch outputs under different names"))


def _check_dequantize(node: ir.Node, where, problems) -> None:
    """TensorRT's quantization schemes: zero points all zero; a scale of the input's rank (blocks)
    only for constant INT4 weights, blocked along one of the last two axes in blocks of 64 or 128."""
    data, scale = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if zero is not None:
        values = _constant(zero)
        if values is None or np.any(values.astype(np.float64) != 0):
            problems.append(Problem(*where, f"zero point '{zero.name}' is {'not constant' if values is None else 'not all 0'}",
                                    "TensorRT's quantization is symmetric: zero points must be all zeros"))
    if data is None or scale is None or scale.shape is None or data.shape is None or len(scale.shape) < 2:
        return  # per tensor or per channel
    weights = data.const_value is not None or _constant(data) is not None  # an initializer needs no unpacking
    if data.dtype != ir.DataType.INT4 or not weights:
        problems.append(Problem(*where, f"blocked scales over {data.dtype.name if data.dtype else '?'} "
                                f"{'weights' if weights else 'activations'}",
                                "TensorRT blocks constant INT4 weights only"))
        return
    rank = len(data.shape)
    axis = node.attributes["axis"].value if "axis" in node.attributes else 1
    block = node.attributes["block_size"].value if "block_size" in node.attributes else 0
    if axis % rank < rank - 2:
        problems.append(Problem(*where, f"blocked along axis {axis}", "TensorRT blocks one of the last two axes"))
    dim = data.shape[axis % rank]
    if block not in trt_ops.INT4_BLOCKS or not isinstance(dim, int) or dim % block:
        problems.append(Problem(*where, f"block_size {block} over {dim} values",
                                f"TensorRT's INT4 blocks are {' or '.join(map(str, trt_ops.INT4_BLOCKS))} values "
                                "and divide the blocked axis"))


def _check_io(graph: ir.Graph, path: str, problems) -> None:
    allowed = {dt for t in trt_ops.IO_TYPES for dt in trt_ops.TYPE_NAMES[t]}
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for v in values:
            if v.dtype is not None and v.dtype not in allowed:
                problems.append(Problem(path, v.name, "", f"network {kind} of type {v.dtype.name}",
                                        f"TensorRT network I/O is {', '.join(trt_ops.IO_TYPES)}"))
            if kind == "input" and v.shape is None:
                problems.append(Problem(path, v.name, "", "network input of unknown rank",
                                        "TensorRT needs every input's rank to build an optimization profile"))


def _check_cache_writes(graph: ir.Graph, path: str, target: Version, problems) -> None:
    inputs = {v.name: v for v in graph.inputs}
    for out in graph.outputs:
        if not (out.name or "").startswith("present."):
            continue
        producer = out.producer()
        while producer is not None and producer.op_type == "Identity" and producer.domain in DOMAINS:
            producer = producer.inputs[0].producer()
        if producer is None:
            continue
        op = f"{producer.domain or 'ai.onnx'}::{producer.op_type}"
        since = trt_ops.CACHE_WRITES.get(producer.op_type) if producer.domain in DOMAINS else None
        if since is None or target < since:
            problems.append(Problem(path, producer.name or out.name, op, f"writes the cache output '{out.name}'",
                                    "TensorRT takes a KV-cache update as ScatterElements or ScatterND (TensorScatter "
                                    "from 10.15) into the past-buffer input, or a Concat"))
            continue
        if producer.op_type == "Concat":
            continue
        data = producer.inputs[0]
        past = out.name.replace("present.", "past_key_values.", 1)
        if data is None or inputs.get(data.name) is not data:
            problems.append(Problem(path, producer.name or out.name, op,
                                    f"'{out.name}' scatters into '{data.name if data else None}', not the input '{past}'",
                                    "the cache update must write into the past buffer the runtime passes in"))
        elif data.shape is not None and out.shape is not None and list(data.shape) != list(out.shape):
            problems.append(Problem(path, producer.name or out.name, op,
                                    f"'{out.name}' has shape {list(out.shape)} but '{data.name}' {list(data.shape)}",
                                    "present and past buffers must have one shape so the runtime can swap them"))


def _v(version: Version) -> str:
    return f"{version[0]}.{version[1]}"
