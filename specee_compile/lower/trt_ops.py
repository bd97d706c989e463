"""What TensorRT 10's ONNX parser accepts, as data: the operator table the checker reads.

Encoded from onnx-tensorrt's ``docs/operators.md`` (the 10.x support matrix) and its
changelog (which 10.x minor release added an operator or lifted a restriction). Each
supported ``ai.onnx`` operator maps to an :class:`OpSupport`: the element types its tensor
inputs may have, the first 10.x release that parses it, and its documented restrictions
as :class:`Rule` records. ``UNSUPPORTED`` lists the operators the matrix marks "N".

Type names follow the matrix: FP32, FP16, BF16, INT32, INT64, INT8, UINT8, BOOL, FP8,
FP4, INT4. DOUBLE appears in no operator's list: the parser only narrows float64
*weights* to float32, so float64 computation is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

Version = tuple[int, int]

# Type names of the support matrix -> ONNX element types.
TYPE_NAMES: dict[str, tuple[ir.DataType, ...]] = {
    "FP32": (ir.DataType.FLOAT,),
    "FP16": (ir.DataType.FLOAT16,),
    "BF16": (ir.DataType.BFLOAT16,),
    "INT32": (ir.DataType.INT32,),
    "INT64": (ir.DataType.INT64,),
    "INT8": (ir.DataType.INT8,),
    "UINT8": (ir.DataType.UINT8,),
    "BOOL": (ir.DataType.BOOL,),
    "FP8": (ir.DataType.FLOAT8E4M3FN,),
    "FP4": (ir.DataType.FLOAT4E2M1,),
    "INT4": (ir.DataType.INT4,),
}
# Types a network input or output may have (UINT8 only there).
IO_TYPES = ("FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL")

# Opset range of the ai.onnx domain: (first release, lowest, highest opset).
OPSETS: tuple[tuple[Version, int, int], ...] = (((10, 0), 9, 20), ((10, 15), 9, 24))

DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Rule:
    """One documented restriction of an operator.

    kind:
        ``constant_input``: input ``key`` (an index) must be an initializer or a Constant;
        ``attribute_in``: attribute ``key`` must be one of ``allowed`` (``default`` if unset);
        ``attribute_absent``: attribute ``key`` must not be set;
        ``attribute_all_ones``: attribute ``key`` (a list) must be unset, empty or all ones;
        ``input_absent``: input ``key`` (an index) must be empty or missing;
        ``output_unused``: output ``key`` (an index) must be missing or have no consumer;
        ``rank_in``: input ``key`` must have one of the ranks in ``allowed``;
        ``constant_below``: input ``key`` must be a constant smaller than ``allowed[0]``;
        ``attribute_type_in``: the element type named by attribute ``key`` (Cast's ``to``,
        Constant's ``value``) must be one of the type names in ``allowed``;
        ``opset_below``: the node's opset must be below ``allowed[0]``.
    before: the rule binds only TensorRT releases before this one (lifted then).
    """

    kind: str
    key: int | str
    why: str
    allowed: tuple = ()
    default: object = None
    before: Version | None = None


@dataclass(frozen=True)
class OpSupport:
    types: tuple[str, ...]
    rules: tuple[Rule, ...] = ()
    since: Version = (10, 0)
    typed_inputs: tuple[int, ...] | None = None  # the inputs ``types`` restricts; None: all
    older_types: tuple[tuple[Version, tuple[str, ...]], ...] = ()  # (until release, types) before then


FLOATS = ("FP32", "FP16", "BF16")
NUMERIC = (*FLOATS, "INT32", "INT64")
ANY = (*NUMERIC, "BOOL")


def _const(index: int, what: str, before: Version | None = None) -> Rule:
    return Rule("constant_input", index, f"`{what}` must be an initializer (a build-time constant)", before=before)


_REDUCE_AXES = (_const(1, "axes"),)
_NO_DILATION = Rule("attribute_all_ones", "dilations", "`dilations` must be empty or all ones")

# Operators the matrix marks supported ("Y"): name -> support.
SUPPORTED: dict[str, OpSupport] = {
    "Abs": OpSupport(NUMERIC), "Acos": OpSupport(FLOATS), "Acosh": OpSupport(FLOATS), "Add": OpSupport(NUMERIC),
    "And": OpSupport(("BOOL",)),
    "ArgMax": OpSupport(NUMERIC), "ArgMin": OpSupport(NUMERIC),
    "Asin": OpSupport(FLOATS), "Asinh": OpSupport(FLOATS), "Atan": OpSupport(FLOATS), "Atanh": OpSupport(FLOATS),
    "Attention": OpSupport((*FLOATS, "INT8", "FP8"), since=(10, 14), typed_inputs=(0, 1, 2), rules=(
        Rule("rank_in", 0, "`Q` must be 4D", (4,)), Rule("rank_in", 1, "`K` must be 4D", (4,)),
        Rule("rank_in", 2, "`V` must be 4D", (4,)),
        Rule("input_absent", 4, "`past_key` is unsupported (no in-graph KV cache on Attention)"),
        Rule("input_absent", 5, "`past_value` is unsupported (no in-graph KV cache on Attention)"),
        Rule("input_absent", 6, "`nonpad_kv_seqlen` is unsupported"),
        Rule("output_unused", 1, "the `present_key` output is unsupported"),
        Rule("output_unused", 2, "the `present_value` output is unsupported"),
        Rule("output_unused", 3, "the `qk_matmul_output` output is unsupported"),
        Rule("attribute_absent", "qk_matmul_output_mode", "`qk_matmul_output_mode` is unsupported"),
        Rule("attribute_absent", "softcap", "`softcap` is unsupported"))),
    "AveragePool": OpSupport(FLOATS, rules=(_NO_DILATION,)),
    "BatchNormalization": OpSupport(FLOATS),
    "BlackmanWindow": OpSupport(("FP32", "FP16"), since=(10, 4), typed_inputs=()),
    "Cast": OpSupport((*NUMERIC, "UINT8", "BOOL"), rules=(
        Rule("attribute_type_in", "to", "Cast produces only FP32, FP16, BF16, INT32, INT64, UINT8 or BOOL",
             (*NUMERIC, "UINT8", "BOOL")),)),
    "CastLike": OpSupport((*NUMERIC, "UINT8", "BOOL")),
    "Ceil": OpSupport(FLOATS), "Celu": OpSupport(FLOATS), "Clip": OpSupport(FLOATS),
    "Concat": OpSupport(ANY),
    "Constant": OpSupport((*ANY, "FP8", "FP4", "INT4"), rules=(
        Rule("attribute_type_in", "value", "a constant of this element type has no TensorRT type",
             (*ANY, "FP8", "FP4", "INT4")),
        Rule("attribute_absent", "sparse_value", "`sparse_value` is unsupported"),
        Rule("attribute_absent", "value_string", "string constants are unsupported"),
        Rule("attribute_absent", "value_strings", "string constants are unsupported"))),
    "ConstantOfShape": OpSupport((*ANY, "FP8", "FP4", "INT4")),
    "Conv": OpSupport(FLOATS), "ConvTranspose": OpSupport(FLOATS),
    "Cos": OpSupport(FLOATS), "Cosh": OpSupport(FLOATS),
    "CumSum": OpSupport(FLOATS, typed_inputs=(0,), rules=(_const(1, "axis"),)),
    "DeformConv": OpSupport(("FP32", "FP16"), since=(10, 1)),
    "DepthToSpace": OpSupport(NUMERIC),
    "DequantizeLinear": OpSupport(("INT8", "FP8", "FP4", "INT4"), typed_inputs=(0,), rules=(
        _const(1, "x_scale"),)),  # and trt_check's quantization-scheme check
    "Div": OpSupport(NUMERIC),
    "Dropout": OpSupport(FLOATS, typed_inputs=(0,), rules=(_const(2, "training_mode"),)),
    "Einsum": OpSupport(FLOATS), "Elu": OpSupport(FLOATS), "Equal": OpSupport(NUMERIC),
    "Erf": OpSupport(FLOATS), "Exp": OpSupport(FLOATS), "Expand": OpSupport(ANY), "EyeLike": OpSupport(ANY),
    "Flatten": OpSupport(ANY), "Floor": OpSupport(FLOATS),
    "Gather": OpSupport(ANY), "GatherElements": OpSupport(ANY), "GatherND": OpSupport(ANY),
    "Gelu": OpSupport((*NUMERIC, "INT8")), "Gemm": OpSupport(FLOATS),
    "GlobalAveragePool": OpSupport(FLOATS), "GlobalLpPool": OpSupport(FLOATS), "GlobalMaxPool": OpSupport(FLOATS),
    "Greater": OpSupport(NUMERIC), "GreaterOrEqual": OpSupport(NUMERIC),
    "GridSample": OpSupport(("FP32", "FP16"), rules=(Rule("rank_in", 0, "the input must be 4D", (4,)),)),
    "GroupNormalization": OpSupport(FLOATS), "GRU": OpSupport(FLOATS, typed_inputs=(0, 1, 2, 3, 5)),
    "HammingWindow": OpSupport(("FP32", "FP16"), since=(10, 4), typed_inputs=()),
    "HannWindow": OpSupport(("FP32", "FP16"), since=(10, 4), typed_inputs=()),
    "HardSigmoid": OpSupport(FLOATS), "HardSwish": OpSupport(FLOATS), "Hardmax": OpSupport(FLOATS),
    "Identity": OpSupport(ANY),
    "If": OpSupport(ANY),  # branch outputs: same count, types and ranks, distinct names (checked apart)
    "ImageScaler": OpSupport(FLOATS), "InstanceNormalization": OpSupport(FLOATS),
    "IsInf": OpSupport(FLOATS), "IsNaN": OpSupport(NUMERIC),
    "LayerNormalization": OpSupport(FLOATS, rules=(
        Rule("output_unused", 1, "only the first output `Y` is supported"),
        Rule("output_unused", 2, "only the first output `Y` is supported"))),
    "LeakyRelu": OpSupport(FLOATS), "Less": OpSupport(NUMERIC), "LessOrEqual": OpSupport(NUMERIC),
    "Log": OpSupport(FLOATS), "LogSoftmax": OpSupport(FLOATS),
    "Loop": OpSupport(ANY),
    "LRN": OpSupport(FLOATS),
    "LSTM": OpSupport(FLOATS, typed_inputs=(0, 1, 2, 3, 5, 6, 7), rules=(
        Rule("attribute_in", "input_forget", "`input_forget` must be 0", (0,), default=0),
        Rule("attribute_in", "layout", "`layout` must be 0", (0,), default=0))),
    "LpNormalization": OpSupport(FLOATS), "LpPool": OpSupport(FLOATS, rules=(_NO_DILATION,)),
    "MatMul": OpSupport(FLOATS), "Max": OpSupport(NUMERIC),
    "MaxPool": OpSupport(FLOATS, rules=(_NO_DILATION, Rule("output_unused", 1, "the `Indices` output is unsupported"))),
    "Mean": OpSupport((*NUMERIC, "FP8")), "MeanVarianceNormalization": OpSupport(FLOATS),
    "Min": OpSupport(NUMERIC), "Mish": OpSupport(("FP32", "FP16")), "Mod": OpSupport(NUMERIC),
    "Mul": OpSupport(NUMERIC), "Neg": OpSupport(NUMERIC),
    "NonMaxSuppression": OpSupport(("FP32", "FP16"), typed_inputs=(0, 1)),
    "NonZero": OpSupport(("FP32", "FP16")), "Not": OpSupport(("BOOL",)),
    "OneHot": OpSupport(ANY, rules=(_const(1, "depth"),)),
    "Or": OpSupport(("BOOL",)),
    "Pad": OpSupport(NUMERIC, rules=(_const(3, "axes", before=(10, 4)),)),
    "ParametricSoftplus": OpSupport(FLOATS),
    "Pow": OpSupport(NUMERIC, older_types=(((10, 8), FLOATS),)),
    "PRelu": OpSupport(FLOATS),
    "QuantizeLinear": OpSupport(FLOATS, typed_inputs=(0,)),
    "RandomNormal": OpSupport(FLOATS), "RandomNormalLike": OpSupport(FLOATS),
    "RandomUniform": OpSupport(FLOATS), "RandomUniformLike": OpSupport(FLOATS),
    "Range": OpSupport(NUMERIC), "Reciprocal": OpSupport(FLOATS),
    **{f"Reduce{kind}": OpSupport(NUMERIC, rules=_REDUCE_AXES)
       for kind in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")},
    "Relu": OpSupport(NUMERIC), "Reshape": OpSupport(ANY),
    "Resize": OpSupport(FLOATS, typed_inputs=(0,), rules=(
        Rule("attribute_in", "mode", "only `nearest` and `linear` resizing", ("nearest", "linear"), default="nearest"),
        Rule("attribute_in", "coordinate_transformation_mode", "unsupported coordinate transformation mode",
             ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"),
             default="half_pixel"),
        Rule("attribute_in", "nearest_mode", "unsupported nearest mode",
             ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"), default="round_prefer_floor"),
        Rule("attribute_in", "keep_aspect_ratio_policy", "only the `stretch` aspect ratio policy", ("stretch",),
             default="stretch"),
        Rule("attribute_in", "antialias", "antialiasing is unsupported", (0,), default=0))),
    "ReverseSequence": OpSupport(ANY), "RMSNormalization": OpSupport(FLOATS, since=(10, 15)),
    "RNN": OpSupport(FLOATS, typed_inputs=(0, 1, 2, 3, 5)), "RoiAlign": OpSupport(("FP32", "FP16"), typed_inputs=(0, 1)),
    "RotaryEmbedding": OpSupport(FLOATS, since=(10, 15), typed_inputs=(0, 1, 2)),
    "Round": OpSupport(FLOATS),
    "STFT": OpSupport(("FP32",), typed_inputs=(0, 2), since=(10, 5), rules=(
        _const(1, "frame_step"), _const(2, "window"))),
    "ScaledTanh": OpSupport(FLOATS), "Scan": OpSupport(FLOATS),
    "Scatter": OpSupport(NUMERIC), "ScatterElements": OpSupport(NUMERIC),
    "ScatterND": OpSupport(NUMERIC, rules=(
        Rule("attribute_in", "reduction", "`reduction` other than `none` is unsupported", ("none",), default="none"),
        Rule("opset_below", "", "opset 18+ ScatterND is parsed from TensorRT 10.9 on", (18,), before=(10, 9)))),
    "Selu": OpSupport(FLOATS), "Shape": OpSupport(ANY), "Shrink": OpSupport(NUMERIC), "Sigmoid": OpSupport(FLOATS),
    "Sign": OpSupport(NUMERIC), "Sin": OpSupport(FLOATS), "Sinh": OpSupport(FLOATS), "Size": OpSupport(ANY),
    "Slice": OpSupport(ANY, rules=(_const(3, "axes", before=(10, 3)),)),
    "Softmax": OpSupport(FLOATS), "Softplus": OpSupport(FLOATS), "Softsign": OpSupport(FLOATS),
    "SpaceToDepth": OpSupport(NUMERIC), "Split": OpSupport(ANY), "Sqrt": OpSupport(FLOATS),
    "Squeeze": OpSupport(ANY, rules=(_const(1, "axes", before=(10, 7)),)),
    "Sub": OpSupport(NUMERIC), "Sum": OpSupport(NUMERIC), "Tan": OpSupport(FLOATS), "Tanh": OpSupport(FLOATS),
    "TensorScatter": OpSupport((*FLOATS, "INT32"), since=(10, 15), typed_inputs=(0, 1), rules=(
        Rule("rank_in", 0, "`past_cache` must be 4D", (4,)), Rule("rank_in", 1, "`update` must be 4D", (4,)),
        Rule("attribute_in", "axis", "`axis` must be -2", (-2,), default=-2))),
    "ThresholdedRelu": OpSupport(FLOATS), "Tile": OpSupport(ANY),
    "TopK": OpSupport(NUMERIC, rules=(
        Rule("attribute_in", "sorted", "`sorted` must be 1", (1,), default=1),
        Rule("constant_below", 1, "`K` must be a constant below 3840", (3840,)))),
    "Transpose": OpSupport(ANY), "Trilu": OpSupport(ANY),
    "Unsqueeze": OpSupport(ANY, rules=(_const(1, "axes", before=(10, 7)),)),
    "Upsample": OpSupport(FLOATS, typed_inputs=(0,)), "Where": OpSupport(ANY), "Xor": OpSupport(("BOOL",)),
}

# Operators the matrix marks unsupported ("N").
UNSUPPORTED = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})

# TensorRT's INT4 block sizes (blocked DequantizeLinear: INT4 weights only).
INT4_BLOCKS = (64, 128)

# How a KV cache output (present.*) may be produced so that TensorRT parses the update.
CACHE_WRITES: dict[str, Version] = {"ScatterElements": (10, 0), "ScatterND": (10, 0), "Concat": (10, 0),
                                    "TensorScatter": (10, 15)}
