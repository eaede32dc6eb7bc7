"""TensorRT's ONNX operator support matrices as data: which ops each parser release imports, and for which types.

Source: onnx-tensorrt ``docs/operators.md`` at ``release/8.5-GA`` ("TensorRT 8.5 supports operators up to
Opset 17"), and the 8.6 EA entries of onnx-tensorrt ``docs/Changelog.md`` for what 8.6 added. Types are
what the matrix lists per op; the per-op attribute and input limits of the same rows are rules in
`fxopt.backends.tensorrt_compat`. A release without its own table is checked against the nearest
earlier one (`support_matrix`), and the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["SupportMatrix", "MATRICES", "support_matrix", "parse_version"]

# ONNX op -> types its importer handles ("-": the release has no importer for it).
# Transcribed from onnx-tensorrt docs/operators.md, branch release/8.5-GA (TensorRT 8.5, opsets <= 17).
_TENSORRT_8_5 = """
Abs fp32 fp16 int32
Acos fp32 fp16
Acosh fp32 fp16
Add fp32 fp16 int32
And bool
ArgMax fp32 fp16
ArgMin fp32 fp16
Asin fp32 fp16
Asinh fp32 fp16
Atan fp32 fp16
Atanh fp32 fp16
AveragePool fp32 fp16 int8 int32
BatchNormalization fp32 fp16
Bernoulli -
BitShift -
BlackmanWindow -
Cast fp32 fp16 int32 int8 bool
Ceil fp32 fp16
Celu fp32 fp16
Clip fp32 fp16 int8
Compress -
Concat fp32 fp16 int32 int8 bool
ConcatFromSequence -
Constant fp32 fp16 int32 int8 bool
ConstantOfShape fp32
Conv fp32 fp16 int8
ConvInteger -
ConvTranspose fp32 fp16 int8
Cos fp32 fp16
Cosh fp32 fp16
CumSum fp32 fp16
DFT -
DepthToSpace fp32 fp16 int32
DequantizeLinear int8
Det -
Div fp32 fp16 int32
Dropout fp32 fp16
DynamicQuantizeLinear -
Einsum fp32 fp16
Elu fp32 fp16 int8
Equal fp32 fp16 int32
Erf fp32 fp16
Exp fp32 fp16
Expand fp32 fp16 int32 bool
EyeLike fp32 fp16 int32 bool
Flatten fp32 fp16 int32 bool
Floor fp32 fp16
Gather fp32 fp16 int8 int32 bool
GatherElements fp32 fp16 int8 int32 bool
GatherND fp32 fp16 int8 int32 bool
Gemm fp32 fp16 int8
GlobalAveragePool fp32 fp16 int8
GlobalLpPool fp32 fp16 int8
GlobalMaxPool fp32 fp16 int8
Greater fp32 fp16 int32
GreaterOrEqual fp32 fp16 int32
GridSample fp32 fp16
GRU fp32 fp16
HammingWindow -
HannWindow -
HardSwish fp32 fp16 int8
HardSigmoid fp32 fp16 int8
Hardmax -
Identity fp32 fp16 int32 int8 bool
If fp32 fp16 int32 bool
ImageScaler fp32 fp16
InstanceNormalization fp32 fp16
IsInf -
IsNaN fp32 fp16 int32
LayerNormalization -
LeakyRelu fp32 fp16 int8
Less fp32 fp16 int32
LessOrEqual fp32 fp16 int32
Log fp32 fp16
LogSoftmax fp32 fp16
Loop fp32 fp16 int32 bool
LRN fp32 fp16
LSTM fp32 fp16
LpNormalization fp32 fp16
LpPool fp32 fp16 int8
MatMul fp32 fp16
MatMulInteger -
Max fp32 fp16 int32
MaxPool fp32 fp16 int8
MaxRoiPool -
MaxUnpool -
Mean fp32 fp16 int32
MeanVarianceNormalization fp32 fp16
MelWeightMatrix -
Min fp32 fp16 int32
Mod fp32 fp16 int32
Mul fp32 fp16 int32
Multinomial -
Neg fp32 fp16 int32
NegativeLogLikelihoodLoss -
NonMaxSuppression fp32 fp16
NonZero fp32 fp16
Not bool
OneHot fp32 fp16 int32 bool
Optional -
OptionalGetElement -
OptionalHasElement -
Or bool
Pad fp32 fp16 int8 int32
ParametricSoftplus fp32 fp16 int8
Pow fp32 fp16
PRelu fp32 fp16 int8
QLinearConv -
QLinearMatMul -
QuantizeLinear fp32 fp16
RandomNormal fp32 fp16
RandomNormalLike fp32 fp16
RandomUniform fp32 fp16
RandomUniformLike fp32 fp16
Range fp32 fp16 int32
Reciprocal fp32 fp16
ReduceL1 fp32 fp16
ReduceL2 fp32 fp16
ReduceLogSum fp32 fp16
ReduceLogSumExp fp32 fp16
ReduceMax fp32 fp16
ReduceMean fp32 fp16
ReduceMin fp32 fp16
ReduceProd fp32 fp16
ReduceSum fp32 fp16
ReduceSumSquare fp32 fp16
Relu fp32 fp16 int8
Reshape fp32 fp16 int32 int8 bool
Resize fp32 fp16
ReverseSequence fp32 fp16
RNN fp32 fp16
RoiAlign fp32 fp16
Round fp32 fp16 int8
STFT -
ScaledTanh fp32 fp16 int8
Scan fp32 fp16
Scatter fp32 fp16 int8 int32
ScatterElements fp32 fp16 int8 int32
ScatterND fp32 fp16 int8 int32
Selu fp32 fp16 int8
SequenceAt -
SequenceConstruct -
SequenceEmpty -
SequenceErase -
SequenceInsert -
SequenceLength -
SequenceMap -
Shape fp32 fp16 int32 int8 bool
Shrink fp32 fp16 int32
Sigmoid fp32 fp16 int8
Sign fp32 fp16 int8 int32
Sin fp32 fp16
Sinh fp32 fp16
Size fp32 fp16 int32 int8 bool
Slice fp32 fp16 int32 int8 bool
Softmax fp32 fp16
SoftmaxCrossEntropyLoss -
Softplus fp32 fp16 int8
Softsign fp32 fp16 int8
SpaceToDepth fp32 fp16 int32
Split fp32 fp16 int32 bool
SplitToSequence -
Sqrt fp32 fp16
Squeeze fp32 fp16 int32 int8 bool
StringNormalizer -
Sub fp32 fp16 int32
Sum fp32 fp16 int32
Tan fp32 fp16
Tanh fp32 fp16 int8
TfIdfVectorizer -
ThresholdedRelu fp32 fp16 int8
Tile fp32 fp16 int32 bool
TopK fp32 fp16
Transpose fp32 fp16 int32 int8 bool
Trilu fp32 fp16 int32 int8 bool
Unique -
Unsqueeze fp32 fp16 int32 int8 bool
Upsample fp32 fp16
Where fp32 fp16 int32 bool
Xor bool
"""

# What onnx-tensorrt's changelog lists as added in 8.6 EA (LayerNormalization, GroupNormalization, IsInf).
_ADDED_IN_8_6 = """
GroupNormalization fp32 fp16
IsInf fp32 fp16
LayerNormalization fp32 fp16
"""


def _parse(table: str) -> dict[str, frozenset[str] | None]:
    ops: dict[str, frozenset[str] | None] = {}
    for line in table.strip().splitlines():
        op, *types = line.split()
        ops[op] = None if types == ["-"] else frozenset(types)
    return ops


def parse_version(version: str) -> tuple[int, int]:
    """``"8.5"`` or ``"8.5.2"`` -> ``(8, 5)``."""
    parts = version.split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


@dataclass(frozen=True)
class SupportMatrix:
    """One TensorRT release's ONNX support: ops (None = not imported) and the opsets its parser reads."""

    version: str
    source: str
    max_opset: int
    ops: Mapping[str, frozenset[str] | None] = field(repr=False)
    int64_native: bool = False  # before TensorRT 9/10 the parser casts INT64 down to INT32

    def supported(self, op_type: str) -> bool:
        return self.ops.get(op_type) is not None

    def types(self, op_type: str) -> frozenset[str]:
        return self.ops.get(op_type) or frozenset()


_OPS_8_5 = _parse(_TENSORRT_8_5)
MATRICES: Mapping[str, SupportMatrix] = MappingProxyType({
    "8.5": SupportMatrix(
        "8.5", "onnx-tensorrt docs/operators.md, branch release/8.5-GA", 17, MappingProxyType(_OPS_8_5)
    ),
    "8.6": SupportMatrix(
        "8.6", "onnx-tensorrt release/8.5-GA docs/operators.md + docs/Changelog.md 'TensorRT 8.6 EA' additions", 17,
        MappingProxyType({**_OPS_8_5, **_parse(_ADDED_IN_8_6)}),
    ),
})


def support_matrix(version: str) -> tuple[SupportMatrix, str]:
    """The matrix to check `version` against, and a note when it is another release's.

    Example:
        >>> support_matrix("8.5")[0].supported("LayerNormalization")
        False
        >>> support_matrix("10.3")[1]
        'TensorRT 10.3 has no table in fxopt: checked against the 8.6 matrix (conservative: later releases import more)'
    """
    wanted = parse_version(version)
    known = sorted(MATRICES, key=parse_version)
    earlier = [v for v in known if parse_version(v) <= wanted]
    if not earlier:
        from fxopt.errors import TargetError

        raise TargetError(f"no TensorRT ONNX support matrix for {version} (fxopt has {', '.join(known)}); add one to fxopt.backends.tensorrt_ops")
    chosen = earlier[-1]
    note = "" if parse_version(chosen) == wanted else (
        f"TensorRT {version} has no table in fxopt: checked against the {chosen} matrix (conservative: later releases import more)"
    )
    return MATRICES[chosen], note
