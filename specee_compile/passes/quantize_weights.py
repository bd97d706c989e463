"""QuantizeWeightsPass: weight-only block quantization onto ONNX Runtime's fast CPU kernels.

Rewrite, for every constant 2-D weight W (in any subgraph too) at the precision its role asks
for (:class:`specee_compile.quant.QuantSpec`: layers, head, embedding):

    MatMul(A, W[K, N])             ->  MatMulNBits(A, data, scales, zero_points)
    Gemm(A, W, C, transB)          ->  MatMulNBits(A, data, scales, zero_points, bias=C)
    Gather(W[V, d], ids, axis=0)   ->  GatherBlockQuantized(data, ids, scales, zero_points)
    Gather(W[d, V], ids, axis=1)   ->  Transpose(GatherBlockQuantized(...))

For TensorRT-ready graphs (``qdq``) the products read their weights through the standard
blocked dequantization TensorRT 10 parses as weight-only INT4 (opset 21, the graph is
converted to it):

    MatMul(A, W[K, N])             ->  MatMul(A, DequantizeLinear(int4 [K, N], scales [K/B, N], axis=0))
    Gemm(A, W[N, K], C, transB)    ->  Gemm(A, DequantizeLinear(int4 [N, K], scales [N, K/B], axis=1), C)

signed values without zero points, blocks B of 64 or 128 that divide K (TensorRT's block
sizes: a weight whose K neither divides stays fp32, as do gathers, which TensorRT reads in
fp32). ONNX Runtime runs these graphs too, fusing each pair into ``MatMulNBits``.

The blocks come from ONNX Runtime's own quantizer (int4/int8) or, for ``gguf``, from the
GGUF file itself (:class:`specee_compile.quant.KeptBlocks`). GGUF Q4_1 blocks carry a minimum
per block (d * q + m); the product then runs at the default zero point 8 and adds
``(A @ E) @ (m + 8d).T`` (E sums each block of A; one block sum per input, shared by the
products that read it), exact in the weights (at zero point 0 and ``m`` where m + 8d is not
a float32). A gather of Q4_1 blocks keeps its fp32 weight.

A weight's role comes from the exporter's module scopes on its consumers (``*head``: head,
``*embed*``: embedding; a tied embedding is a head). The SpecEE passes' own weights
(``specee.*``, the predictors) stay fp32. ``report`` lists every weight and how it is stored.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnxscript import version_converter

from specee_compile.quant.blocks import Blocks, quantize
from specee_compile.quant.gguf import KeptBlocks
from specee_compile.quant.spec import BITS, GGUF_FALLBACK, QuantSpec

SCOPES = "pkg.torch.onnx.name_scopes"
OWN_WEIGHTS = "specee."  # initializers the SpecEE passes add: left as they are
MS = "com.microsoft"
QDQ_OPSET = 21  # DequantizeLinear's block_size and the INT4 type
TRT_BLOCKS = (128, 64)  # TensorRT's INT4 block sizes, the larger first


@dataclasses.dataclass
class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Quantize weights in place; ``fired`` counts weights per storage, ``report`` lists them."""

    spec: QuantSpec = dataclasses.field(default_factory=QuantSpec)
    kept: KeptBlocks | None = None
    qdq: bool = False  # TensorRT's form: DequantizeLinear feeding the product (int4 only)
    name: str = "quantize_weights"
    fired: dict[str, int] = dataclasses.field(default_factory=dict)
    report: list[dict] = dataclasses.field(default_factory=list)
    # per source tensor: its blocks and the tensors made from them, so that the graphs cut from
    # one graph (segments, which share their source tensors) share the quantized ones too
    _made: dict[int, tuple] = dataclasses.field(default_factory=dict, repr=False)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.fired, self.report = {}, []
        rewrite = _dequantize if self.qdq else _rewrite
        sums: dict[tuple, ir.Value] = {}
        touched: set[int] = set()
        for w, uses in _weights(model):
            role = _role(uses)
            precision = self.spec.precision(role)
            layout = _layout(uses)
            if precision == "fp32" or layout is None:
                continue
            k = w.const_value.shape[1 if layout == "rows" else 0]
            block = self.spec.block_size
            if self.qdq:  # gathers (the embedding, RoPE tables) read fp32
                block = next((b for b in TRT_BLOCKS if b <= self.spec.block_size and k % b == 0), None)
                if all(u.node.op_type == "Gather" for u in uses):
                    if role == "embedding":
                        self._note(role, w, layout, "fp32 (gather)")
                    continue
                if block is None:
                    self._note(role, w, layout, f"fp32 (K={k} takes no TensorRT block)")
                    continue
            key = (id(w.const_value), layout, precision, block)
            if key not in self._made:
                rows = w.const_value.numpy().astype(np.float32)
                self._made[key] = (w.const_value, *self._blocks(rows if layout == "rows" else rows.T, role, precision,
                                                                 block), {})
            _, blocks, stored, tensors = self._made[key]
            made: dict = {}
            for node in [u.node for u in uses]:
                if rewrite(model.graph, node, w, layout, blocks, self.spec.accuracy_level, sums, made, tensors):
                    touched.add(id(node.graph))
            left = len(w.uses())
            if not left and w.name in model.graph.initializers:
                model.graph.initializers.pop(w.name)
            if (blocks.bits == 8 and self.spec.accuracy_level != 4 and not self.qdq
                    and any(u.node.op_type != "Gather" for u in uses)):
                stored += ", products in fp32 (dequantized)"
            self._note(role, w, layout, stored, left)
        if touched:
            if self.qdq and model.opset_imports.get("", 0) < QDQ_OPSET:
                version_converter.convert_version(model, QDQ_OPSET)
            model.graph.sort()
        return ir.passes.PassResult(model, modified=bool(touched))

    def _note(self, role: str, w: ir.Value, layout: str, stored: str, left: int = 0) -> None:
        shape = list(w.const_value.shape)
        self.report.append({"role": role, "shape": shape if layout == "rows" else shape[::-1], "stored": stored,
                            **({"fp32_uses_left": left} if left else {})})
        self.fired[stored] = self.fired.get(stored, 0) + 1

    def _blocks(self, rows: np.ndarray, role: str, precision: str, block: int) -> tuple[Blocks, str]:
        if precision == "gguf":
            found = self.kept.find(rows) if self.kept is not None else None
            if found is not None:
                return found, f"{found.origin} kept"
            precision = GGUF_FALLBACK[role]
            blocks = quantize(rows, BITS[precision], block, self.spec.symmetric)
            return blocks, f"{precision} (not in the GGUF)"
        blocks = quantize(rows, BITS[precision], block, self.spec.symmetric)
        return blocks, f"{precision} DequantizeLinear/{block}" if self.qdq else precision


def _weights(model: ir.Model):
    """(weight, uses) for every constant 2-D float initializer that a MatMul, Gemm or Gather reads."""
    for name, w in list(model.graph.initializers.items()):
        if name.startswith(OWN_WEIGHTS) or w.const_value is None or len(w.const_value.shape) != 2:
            continue
        if w.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            continue
        uses = list(w.uses())
        ok = {("MatMul", 1), ("Gemm", 1), ("Gather", 0)}
        if uses and all((u.node.op_type, u.idx) in ok and u.node.domain in ("", "ai.onnx") for u in uses):
            yield w, uses


def _role(uses) -> str:
    scopes = [m.strip(" '") for u in uses for m in u.node.metadata_props.get(SCOPES, "[]").strip("[]").split(",")]
    modules = [s.rsplit(".", 1)[-1] if s else s for s in scopes]
    if any(m.endswith("head") for m in modules):
        return "head"
    if any("embed" in m for m in modules):
        return "embedding"
    return "layers"


def _layout(uses) -> str | None:
    """"rows" when the weight is stored [N, K] for every consumer, "cols" for [K, N], None when
    consumers disagree or one is not a plain product or gather."""
    layouts = set()
    for u in uses:
        node = u.node
        if node.op_type == "MatMul":
            layouts.add("cols")
        elif node.op_type == "Gemm":
            a = {k: v.value for k, v in node.attributes.items()}
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                return None
            layouts.add("rows" if a.get("transB", 0) else "cols")
        else:
            axis = node.attributes["axis"].value if "axis" in node.attributes else 0
            layouts.add({0: "rows", 1: "cols", -2: "rows", -1: "cols"}.get(axis, "?"))
    return layouts.pop() if len(layouts) == 1 and "?" not in layouts else None


def _rewrite(main: ir.Graph, node: ir.Node, w: ir.Value, layout: str, b: Blocks, level: int, sums: dict,
             made: dict, tensors: dict) -> bool:
    """Replace ``node``'s read of ``w`` by the blocks ``b``; False when this consumer keeps ``w``.
    ``made`` holds the initializers already made for ``w`` in this graph, shared by its
    consumers; ``tensors`` their constant tensors, shared by every graph."""
    graph = node.graph
    n, padded = b.shape
    k = w.const_value.shape[1 if layout == "rows" else 0]  # the blocks pad K up to whole blocks
    const = _constants(main, w, made, tensors)
    scales = const("_scales", lambda: b.scales)
    if node.op_type == "Gather":
        zp = const("_zero_points", b.packed_zero_points) if b.zero_points is not None else None
        idx = node.inputs[1]
        if b.mins is not None or k != padded or (layout == "cols" and idx.shape is None):
            return False  # GatherBlockQuantized has no minimums nor padding; a transpose needs the ids' rank
        # the rows of the product's blocks, as GenAI shares a tied head's (ONNX Runtime folds the reshape)
        rows = ir.node("Reshape", [const(f"_q{b.bits}", lambda: b.data), const("_rows_shape", lambda: np.array(
            [n, -1], np.int64))])
        new = [rows, ir.node("GatherBlockQuantized", [rows.outputs[0], idx, scales, zp], domain=MS,
                       attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": b.block_size, "bits": b.bits})]
        if layout == "cols":  # [*ids, K] -> [K, *ids]
            r = len(idx.shape)
            new.append(ir.node("Transpose", [new[-1].outputs[0]], attributes={"perm": [r, *range(r)]}))
    elif b.bits == 8 and level != 4:
        # ONNX Runtime's CPU MatMulNBits computes 8-bit blocks with float activations by
        # dequantizing the whole matrix on every run (SmolLM2's Q8_0 head at accuracy level 0:
        # 4 tokens/s against 67 at level 4): one fp32 product with the same dequantized values
        node.replace_input_with(1, const("_dequantized", lambda: b.dequantize()[:, :k] if layout == "rows"
                                         else b.dequantize()[:, :k].T))  # made once for every graph
        return True
    else:
        zero_points, mins = b.kernel_form()
        zp = None if zero_points is None else const("_zero_points" if zero_points is b.zero_points else
                                                    "_kernel_zero_points", lambda: b.packed_zero_points(zero_points))
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        attrs = {"K": k, "N": n, "bits": b.bits, "block_size": b.block_size}
        if level:
            attrs["accuracy_level"] = level
        data = const(f"_q{b.bits}", lambda: b.data)
        new = [ir.node("MatMulNBits", [node.inputs[0], data, scales, zp, None, bias], domain=MS, attributes=attrs)]
        if mins is not None:  # + blocksum(A) @ mins.T
            a = node.inputs[0]
            key = (id(a), id(graph), k, b.block_size)
            if key not in sums:
                name = f"block_sum_{k}_{b.block_size}"  # E [K, blocks]: 1 where row k is in the block
                ones = main.initializers[name] if name in main.initializers else _const(main, name, np.kron(
                    np.eye(padded // b.block_size, dtype=np.float32), np.ones((b.block_size, 1), np.float32))[:k])
                new.insert(0, ir.node("MatMul", [a, ones]))
                sums[key] = new[0].outputs[0]
            correction = ir.node("MatMul", [sums[key], const("_mins", lambda: np.ascontiguousarray(mins.T))])
            new += [correction, ir.node("Add", [_nbits_output(new), correction.outputs[0]])]
    for m in new:
        m.metadata_props.update(node.metadata_props)
    graph.insert_before(node, new)
    old = node.outputs[0]
    out = new[-1].outputs[0]
    out.shape, out.type = old.shape, old.type
    name = old.name
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = name
    return True


def _dequantize(main: ir.Graph, node: ir.Node, w: ir.Value, layout: str, b: Blocks, level: int, sums: dict,
                made: dict, tensors: dict) -> bool:
    """TensorRT's form of :func:`_rewrite`: the product reads ``w`` through one blocked
    DequantizeLinear per graph (signed int4, no zero points); a gather keeps ``w``."""
    if node.op_type == "Gather":
        return False
    graph = node.graph
    if id(graph) not in made:
        const = _constants(main, w, made, tensors)
        rows = layout == "rows"

        def signed():  # symmetric blocks sit at the default zero point 8: q - 8 lies in [-8, 7]
            q = b.values().astype(np.int8) - np.int8(8)
            return (q if rows else q.T).astype(ml_dtypes.int4)

        dq = ir.node("DequantizeLinear", [const("_int4", signed), const("_block_scales", lambda: b.scales if rows
                                                                         else b.scales.T)],
                     attributes={"axis": 1 if rows else 0, "block_size": b.block_size})
        out = dq.outputs[0]  # named, since names must be unique across the graph and its subgraphs
        out.name = f"{w.name}_dequantized_{sum(isinstance(key, int) for key in made)}"
        out.shape, out.type = ir.Shape(w.const_value.shape), ir.TensorType(ir.DataType.FLOAT)
        dq.metadata_props.update(node.metadata_props)
        graph.insert_before(node, dq)
        made[id(graph)] = dq.outputs[0]
    node.replace_input_with(1, made[id(graph)])
    return True


def _constants(main: ir.Graph, w: ir.Value, made: dict, tensors: dict):
    """``const(suffix, array_of)``: the initializer ``w.name + suffix`` of the main graph, made
    once per graph from a tensor made once for every graph."""
    def const(suffix: str, array_of) -> ir.Value:
        if suffix not in made:
            if suffix not in tensors:
                tensors[suffix] = ir.tensor(np.ascontiguousarray(array_of()))
            made[suffix] = _const(main, w.name + suffix, tensors[suffix])
        return made[suffix]
    return const


def _nbits_output(nodes: list[ir.Node]) -> ir.Value:
    return next(m for m in nodes if m.op_type == "MatMulNBits").outputs[0]


def _const(graph: ir.Graph, name: str, constant: np.ndarray | ir.TensorProtocol) -> ir.Value:
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    tensor = ir.tensor(np.ascontiguousarray(constant)) if isinstance(constant, np.ndarray) else constant
    value = ir.Value(name=name, const_value=tensor)  # (the tensor takes the value's name when saved)
    value.shape = ir.Shape(tensor.shape)
    value.type = ir.TensorType(tensor.dtype)
    graph.register_initializer(value)
    return value
