"""Can the target's TensorRT parse this ONNX file? Every node checked against its release's support matrix.

`compile()` runs `check_tensorrt_compat` on the exported file of every TensorRT target: op types and
their types come from `fxopt.backends.tensorrt_ops`; the attribute and input limits of the same matrix
rows, the int64 / bool / dynamic-shape rules and the Q/DQ constraints are the rule tables below. A hard
incompatibility (the parser refuses the file, or the engine would compute something else) is an
``error``; what builds but deserves a look is a ``warning``. Each finding names the ONNX node, the torch
module it came from (best effort, from the exporter's scope names) and what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxopt.backends.tensorrt_ops import SupportMatrix, parse_version, support_matrix
from fxopt.errors import TargetError, TensorRTCompatError
from fxopt.frontend.inputs import submodule
from fxopt.output.onnx_weights import InitializerValues
from fxopt.targets import TargetProfile, get_target

__all__ = ["CompatFinding", "CompatReport", "check_tensorrt_compat", "torch_source_names"]

ERROR, WARNING = "error", "warning"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# ONNX element type -> the matrix's type name after the parser's own cast-down (INT64 -> INT32, DOUBLE -> FP32)
_MATRIX_TYPE = {
    TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16", TensorProto.INT32: "int32", TensorProto.INT8: "int8",
    TensorProto.BOOL: "bool", TensorProto.INT64: "int32", TensorProto.DOUBLE: "fp32", TensorProto.UINT8: "uint8",
}
# types a TensorRT 8.5 network cannot hold at all (UINT8 only as a network input or output, since 8.5)
_NO_TENSORRT_TYPE = {
    t for t in TensorProto.DataType.values()
    if t not in _MATRIX_TYPE and t != TensorProto.UNDEFINED
}


@dataclass(frozen=True)
class CompatFinding:
    """One reason the target's TensorRT may not parse, or may change, one ONNX node."""

    node: str
    op_type: str
    rule: str  # "op", "attribute", "input", "dtype", "shape", "qdq", "opset", "domain"
    severity: str  # "error" | "warning"
    message: str
    fix: str
    torch_source: str = ""

    def __str__(self) -> str:
        where = f" (torch: {self.torch_source})" if self.torch_source else ""
        return f"{self.node} [{self.op_type}]{where}: {self.message}; {self.fix}"


@dataclass
class CompatReport:
    """The findings of one check, and what it was checked against."""

    tensorrt_version: str
    matrix: str
    nodes_checked: int
    findings: list[CompatFinding] = field(default_factory=list)
    note: str = ""

    @property
    def errors(self) -> list[CompatFinding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[CompatFinding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def notes(self) -> list[str]:
        """Report lines: a summary, then one line per warning."""
        head = (
            f"TensorRT {self.tensorrt_version} compatibility: {self.nodes_checked} ONNX nodes checked against {self.matrix}: "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings"
        )
        return [head] + ([f"TensorRT {self.tensorrt_version}: {self.note}"] if self.note else []) + [
            f"TensorRT {self.tensorrt_version} warning: {f}" for f in self.warnings
        ]

    def raise_if_errors(self) -> None:
        """Raise `TensorRTCompatError` listing every error (no-op when there is none)."""
        if self.errors:
            lines = "\n".join(f"  - {f}" for f in self.errors)
            raise TensorRTCompatError(
                f"TensorRT {self.tensorrt_version} cannot run this ONNX file as exported ({len(self.errors)} incompatibilities, "
                f"checked against {self.matrix}):\n{lines}",
                findings=self.errors,
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensorrt_version": self.tensorrt_version, "matrix": self.matrix, "nodes_checked": self.nodes_checked,
            "note": self.note, "findings": [asdict(f) for f in self.findings],
        }


@dataclass(frozen=True)
class _Graph:
    """What the rules read about the model: shapes, element types, constants, producers and consumers."""

    shapes: Mapping[str, list[int | str]]
    dtypes: Mapping[str, int]
    constants: Mapping[str, np.ndarray]
    consumers: Mapping[str, list[tuple[onnx.NodeProto, int]]]
    producers: Mapping[str, onnx.NodeProto]
    matrix: SupportMatrix

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def static(self, name: str) -> bool:
        shape = self.shapes.get(name)
        return shape is not None and all(isinstance(d, int) for d in shape)


Issue = tuple[str, str, str, str]  # (rule, severity, message, fix)
Rule = Callable[[onnx.NodeProto, _Graph], list[Issue]]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _needs_constant(*indices: int, what: str = "") -> Rule:
    # the 8.5 importer reads these inputs at parse time: a computed tensor is refused
    def rule(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
        return [
            ("input", ERROR, f"input {i} ('{what or 'axes'}') must be a constant (an initializer) for TensorRT's parser, it is computed",
             "make it a Python constant in the torch code (no tensor-valued axes/K), so the exporter folds it")
            for i in indices if _input(node, i) and g.const(_input(node, i)) is None
        ]
    return rule


def _pool(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    issues = []
    kernel = _attr(node, "kernel_shape", [])
    if len(kernel) not in (2, 3):
        issues.append(("attribute", ERROR, f"{len(kernel)}-D pooling; TensorRT pools 2-D or 3-D only",
                       "pool a 4-D/5-D tensor (unsqueeze a 1-D signal to N,C,1,L and use the 2-D pool)"))
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        issues.append(("attribute", ERROR, "the Indices output of MaxPool is not supported",
                       "use nn.MaxPool(return_indices=False); compute argmax positions outside the engine"))
    return issues


_CAST_TARGETS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT8, TensorProto.BOOL}


def _cast(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    to = _attr(node, "to")
    if to in _CAST_TARGETS:
        return []
    name = TensorProto.DataType.Name(to)
    if to in (TensorProto.INT64, TensorProto.DOUBLE):
        return [("dtype", WARNING, f"cast to {name}: TensorRT casts to {_MATRIX_TYPE[to].upper()} instead",
                 "fine unless the values leave the INT32/FP32 range")]
    return [("dtype", ERROR, f"cast to {name}, which TensorRT {g.matrix.version} has no type for",
             "cast to float32, float16, int32, int8 or bool in the torch code")]


_RESIZE = {
    # matrix row Resize: transformation modes, modes and nearest modes the importer maps
    "coordinate_transformation_mode": ("half_pixel", {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}),
    "mode": ("nearest", {"nearest", "linear"}),
    "nearest_mode": ("round_prefer_floor", {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}),
}


def _resize(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    issues = []
    for name, (default, allowed) in _RESIZE.items():
        value = _attr(node, name, default)
        if value not in allowed:
            fix = ("use mode='bilinear' or 'nearest' in F.interpolate / nn.Upsample" if name == "mode"
                   else f"use one of {sorted(allowed)}")
            issues.append(("attribute", ERROR, f"Resize {name}='{value}' is not supported", fix))
    return issues


def _einsum(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    equation = str(_attr(node, "equation", "")).replace(" ", "")
    terms = equation.split("->")[0].split(",")
    issues = []
    if "..." in equation:
        issues.append(("attribute", ERROR, f"einsum '{equation}' uses an ellipsis", "spell out every dimension in the equation"))
    if any(len(set(t)) != len(t) for t in terms):
        issues.append(("attribute", ERROR, f"einsum '{equation}' takes a diagonal (a repeated index)", "use torch.diagonal before the einsum"))
    sizes: dict[str, set[int]] = {}
    for term, name in zip(terms, node.input):
        shape = g.shapes.get(name)
        if shape is not None and len(shape) == len(term):
            for label, dim in zip(term, shape):
                sizes.setdefault(label, set()).add(dim)
    if any(len(s) > 1 for s in sizes.values()):
        issues.append(("attribute", ERROR, f"einsum '{equation}' broadcasts between its inputs", "expand the inputs to equal sizes first, or use matmul"))
    return issues


def _instance_norm(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    issues = _needs_constant(1, 2, what="scale/bias")(node, g)
    rank = len(g.shapes.get(node.input[0], [])) if node.input[0] in g.shapes else None
    if rank is not None and not 3 <= rank <= 5:
        issues.append(("input", ERROR, f"InstanceNormalization of a rank-{rank} tensor; TensorRT takes rank 3 to 5", "reshape to N,C,... first"))
    return issues


def _reverse_sequence(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    if g.static(node.input[0]):
        return []
    return [("shape", ERROR, "ReverseSequence on a dynamic shape (supported from TensorRT 8.6)", "export with static shapes")]


def _recurrent(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    acts = list(_attr(node, "activations", []) or [])
    if _attr(node, "direction", "forward") == "bidirectional" and acts and acts[: len(acts) // 2] != acts[len(acts) // 2:]:
        return [("attribute", ERROR, "bidirectional recurrence with different activations per direction", "use the same activations both ways")]
    return []


def _random(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    if _attr(node, "seed") is None:
        return []
    return [("attribute", WARNING, "the seed is ignored by TensorRT: outputs differ from ONNX Runtime's", "sample outside the engine if the values matter")]


def _if(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    then, other = _attr(node, "then_branch"), _attr(node, "else_branch")
    shared = {o.name for o in then.output} & {o.name for o in other.output} if then is not None and other is not None else set()
    if shared:
        return [("attribute", ERROR, f"both branches of the If output the same tensor names {sorted(shared)}", "return distinct tensors from each branch")]
    return []


def _data_dependent_shape(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    return [("shape", WARNING, f"{node.op_type} has a data-dependent output shape: it runs on the GPU only (never DLA) and "
             "the engine allocates for the worst case", "keep it if needed; a fixed-size alternative (top-k, masks) is faster")]


# --- Q/DQ: TensorRT 8.5 explicit quantization (developer guide, "Working with INT8" / Q/DQ layers):
# signed int8 only, zero point 0, constant scales, per-tensor for activations, per-channel only
# for constant weights along the output-channel axis of the layer that consumes them.
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": -1, "Gemm": None}


def _qdq(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    issues: list[Issue] = []
    scale, zero = g.const(_input(node, 1)), g.const(_input(node, 2))
    if scale is None:
        issues.append(("qdq", ERROR, "the scale is computed, not a constant", "calibrate scales into constants before export"))
    if _input(node, 2):
        zp_type = g.dtypes.get(_input(node, 2))
        if zp_type == TensorProto.UINT8:
            issues.append(("qdq", ERROR, "uint8 quantization (TensorRT quantizes to signed int8 only)", "use torch.qint8 observers (symmetric)"))
        if zero is None:
            issues.append(("qdq", ERROR, "the zero point is computed, not a constant", "use symmetric quantization (zero point 0)"))
        elif np.any(zero != 0):
            issues.append(("qdq", ERROR, f"zero point {zero.reshape(-1)[:4].tolist()} is not 0 (TensorRT quantizes symmetrically)",
                           "use symmetric observers (qscheme=torch.per_tensor_symmetric / per_channel_symmetric)"))
    if scale is not None and scale.size > 1:
        issues += _per_channel(node, g, scale)
    return issues


def _per_channel(node: onnx.NodeProto, g: _Graph, scale: np.ndarray) -> list[Issue]:
    # per-channel: only a constant weight, quantized along its consumer's output-channel axis
    source = node.input[0]
    weight = g.const(source) is not None or any(
        p.op_type == "QuantizeLinear" and g.const(p.input[0]) is not None for p in _producers(g, source)
    )
    if not weight:
        return [("qdq", ERROR, "per-channel quantization of an activation (TensorRT takes per-tensor scales for activations)",
                 "quantize activations per tensor")]
    rank = len(g.shapes.get(source) or (g.const(source).shape if g.const(source) is not None else ()))
    axis = _attr(node, "axis", 1)
    axis = axis + rank if axis < 0 and rank else axis
    for consumer, _ in _final_consumers(g, node):
        wanted = _WEIGHT_AXIS.get(consumer.op_type, "any")
        if consumer.op_type == "Gemm":
            wanted = 0 if _attr(consumer, "transB", 0) else 1
        if wanted == "any":
            continue
        wanted = wanted + rank if isinstance(wanted, int) and wanted < 0 else wanted
        if axis != wanted:
            return [("qdq", ERROR, f"per-channel axis {axis} of a {consumer.op_type} weight; TensorRT quantizes it along axis {wanted} (output channels)",
                     f"quantize the weight with ch_axis={wanted}")]
    return []


def _producers(g: _Graph, name: str) -> list[onnx.NodeProto]:
    return [g.producers[name]] if name in g.producers else []


def _final_consumers(g: _Graph, node: onnx.NodeProto) -> Iterable[tuple[onnx.NodeProto, int]]:
    for user, index in g.consumers.get(node.output[0], []):
        if user.op_type in ("QuantizeLinear", "DequantizeLinear"):
            yield from _final_consumers(g, user)
        else:
            yield user, index


# ONNX op -> the matrix row's attribute/input limits (TensorRT 8.5; later releases relax some: see per-rule comments)
RULES: dict[str, Rule] = {
    "AveragePool": _pool,                                  # 2-D or 3-D pooling only
    "MaxPool": _pool,                                      # ... and no Indices output
    "Cast": _cast,                                         # to TensorRT's types only
    "CumSum": _needs_constant(1, what="axis"),             # axis must be an initializer
    "Slice": _needs_constant(3, what="axes"),              # axes must be an initializer
    "Squeeze": _needs_constant(1, what="axes"),            # axes must be an initializer
    "Unsqueeze": _needs_constant(1, what="axes"),          # axes must be a constant
    "TopK": _needs_constant(1, what="K"),                  # K must be an initializer (dynamic K from 8.6)
    "Resize": _resize,                                     # coordinate modes, nearest/linear, nearest modes
    "Einsum": _einsum,                                     # no ellipsis, diagonal or broadcasting
    "InstanceNormalization": _instance_norm,               # constant scale/bias, rank 3..5
    "ReverseSequence": _reverse_sequence,                  # static shapes only (dynamic from 8.6)
    "GRU": _recurrent, "LSTM": _recurrent, "RNN": _recurrent,  # same activations both directions
    "RandomNormal": _random, "RandomNormalLike": _random,  # seed ignored
    "RandomUniform": _random, "RandomUniformLike": _random,
    "If": _if,                                             # branch outputs must be distinct tensors
    "NonZero": _data_dependent_shape, "NonMaxSuppression": _data_dependent_shape,
    "QuantizeLinear": _qdq, "DequantizeLinear": _qdq,      # int8, zero point 0, per-channel on weights only
}
# rules a later release drops (onnx-tensorrt Changelog, 8.6 EA: dynamic ReverseSequence and TopK K)
RELAXED_FROM: dict[str, str] = {"ReverseSequence": "8.6", "TopK": "8.6"}

# What to do about an op the release does not import at all.
FIXES: dict[str, str] = {
    "LayerNormalization": "fxopt rewrites LayerNormalization into ReduceMean/Sub/Pow/Sqrt/Div for TensorRT < 8.6 at export "
                          "(export_onnx(..., tensorrt_version=...)); this file was exported without that rewrite",
    "GroupNormalization": "write GroupNorm as reshape + InstanceNorm, or export at opset <= 17 (torch decomposes it)",
    "IsInf": "compare instead: x.abs() == float('inf')",
    "Hardmax": "use argmax + one_hot",
    "Unique": "compute unique values outside the engine",
    "Compress": "use a boolean mask with torch.where, or index with fixed-size gathers",
    "DFT": "compute the FFT outside the engine, or as a matmul with a DFT matrix",
    "STFT": "compute the STFT outside the engine, or as a conv with a fixed DFT basis",
    "Bernoulli": "sample outside the engine", "Multinomial": "sample outside the engine",
    "BitShift": "multiply or divide by powers of two",
    "MaxUnpool": "use scatter or an upsampling conv",
    "Det": "compute the determinant outside the engine",
}
DEFAULT_FIX = "replace the torch op that produces it, run it as an eager stage outside the graph, or supply a TensorRT plugin"


def torch_source_names(graph_module: Any) -> dict[str, str]:
    """The exporter's scope name of each torch submodule call -> ``"module 'path' (Type, fx node 'name')"``.

    The TorchScript exporter names a node ``/<scope>/<Op>``, the scope being the called submodule's
    attribute name, suffixed ``_1``, ``_2`` ... when the name repeats; this rebuilds that naming from the
    fx graph's ``call_module`` nodes in graph order (best effort: a name that collides is ambiguous).
    """
    seen: dict[str, int] = {}
    names: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or str(node.target) in names.values():
            continue
        path = str(node.target)
        attr = path.rsplit(".", 1)[-1]
        count = seen.get(attr, 0)
        seen[attr] = count + 1
        scope = attr if count == 0 else f"{attr}_{count}"
        module = submodule(graph_module, path)
        names.setdefault(scope, f"module '{path}' ({type(module).__name__}, fx node '{node.name}')")
    return names


def _source(node_name: str, sources: Mapping[str, str]) -> str:
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return "a torch function call in the graph's root" if sources else ""
    return sources.get(parts[0], f"module scope '{'/'.join(parts[:-1])}'")


def _graph_facts(model: onnx.ModelProto, matrix: SupportMatrix) -> _Graph:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a model shape inference cannot read is still checked, with fewer facts
        inferred = model
    shapes: dict[str, list[int | str]] = {}
    dtypes: dict[str, int] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        t = vi.type.tensor_type
        dtypes[vi.name] = t.elem_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    constants = InitializerValues(model.graph)  # read where a check needs a weight's values
    for i in model.graph.initializer:
        dtypes[i.name] = i.data_type
        shapes[i.name] = list(i.dims)
    for node in model.graph.node:
        if node.op_type == "Constant" and _attr(node, "value") is not None:
            constants[node.output[0]] = numpy_helper.to_array(_attr(node, "value"))
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    producers: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
        producers.update((out, node) for out in node.output)
    return _Graph(shapes, dtypes, constants, consumers, producers, matrix)


def _type_issues(node: onnx.NodeProto, g: _Graph) -> list[Issue]:
    # the matrix's "Supported Types" column, on the data input (input 0; Where: its values)
    if not node.input or node.op_type in ("ConstantOfShape", "QuantizeLinear", "DequantizeLinear", "Cast"):
        return []
    name = node.input[1] if node.op_type == "Where" else node.input[0]
    elem = g.dtypes.get(name)
    kind = _MATRIX_TYPE.get(elem) if elem is not None else None
    types = g.matrix.types(node.op_type)
    if kind is None or kind in types or not types:
        return []
    if kind == "bool":
        return [("dtype", ERROR, f"{node.op_type} on a bool tensor: TensorRT {g.matrix.version} has no bool form of it (types: {', '.join(sorted(types))})",
                 "cast the bool tensor to int32 or float in the torch code before this op")]
    return [("dtype", WARNING, f"{node.op_type} on {kind}, not among the matrix's types ({', '.join(sorted(types))})",
             "check the engine's output for this layer, or cast to a listed type")]


def _check_node(node: onnx.NodeProto, g: _Graph, version: tuple[int, int]) -> list[Issue]:
    if node.domain not in ("", "ai.onnx"):
        return [("domain", ERROR, f"custom-domain op '{node.domain}::{node.op_type}'", "TensorRT needs a plugin for it; write it with standard ops")]
    if not g.matrix.supported(node.op_type):
        known = node.op_type in g.matrix.ops
        why = f"TensorRT {g.matrix.version}'s ONNX parser does not import {node.op_type}" + ("" if known else " (not in its support matrix)")
        return [("op", ERROR, why, FIXES.get(node.op_type, DEFAULT_FIX))]
    rule = RULES.get(node.op_type)
    relaxed = node.op_type in RELAXED_FROM and version >= parse_version(RELAXED_FROM[node.op_type])
    return _type_issues(node, g) + (rule(node, g) if rule is not None and not relaxed else [])


def _int64_issues(model: onnx.ModelProto, g: _Graph) -> list[tuple[str, str, Issue]]:
    # INT64 weights are cast to INT32 with clamping; Slice starts/ends of +-INT64_MAX mean "to the end" either way
    found = []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.INT64:
            continue
        values = g.constants[init.name]
        if values.size == 0 or (values.min() >= INT32_MIN and values.max() <= INT32_MAX):
            continue
        users = g.consumers.get(init.name, [])
        if users and all(u.op_type == "Slice" and i in (1, 2) for u, i in users):
            continue
        user = users[0][0] if users else None
        found.append((user.name if user else init.name, user.op_type if user else "initializer", (
            "dtype", ERROR, f"int64 constant '{init.name}' holds {values.min() if values.min() < INT32_MIN else values.max()}, outside int32: "
            "TensorRT casts int64 to int32 and clamps it", "keep integer constants within int32 (or compute in float)")))
    return found


def _io_issues(model: onnx.ModelProto, matrix: SupportMatrix) -> list[tuple[str, str, Issue]]:
    found = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in values:
            t = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            if any(not isinstance(d, int) for d in dims):
                found.append((vi.name, f"graph {kind}", ("shape", WARNING, f"dynamic {kind} shape {dims}",
                              "the engine needs an optimization profile: trtexec --minShapes/--optShapes/--maxShapes")))
            if t.elem_type == TensorProto.INT64 and not matrix.int64_native:
                found.append((vi.name, f"graph {kind}", ("dtype", WARNING, f"int64 {kind}: TensorRT {matrix.version} binds it as int32",
                              "feed / read int32 buffers on the device")))
            elif t.elem_type in _NO_TENSORRT_TYPE:
                found.append((vi.name, f"graph {kind}", ("dtype", ERROR, f"{TensorProto.DataType.Name(t.elem_type)} {kind} has no TensorRT type",
                              "use float32, float16, int32, int8, uint8 or bool")))
    return found


def check_tensorrt_compat(
    model: onnx.ModelProto,
    target: str | TargetProfile,
    *,
    graph_module: Any = None,
) -> CompatReport:
    """Check every node of `model` against the target's TensorRT ONNX support matrix.

    Args:
        model: the exported ONNX model.
        target: a TensorRT target (``"xavier"``), or a TensorRT version string (``"8.5"``).
        graph_module: the fx graph it was exported from, to name each node's torch module.

    Returns:
        A `CompatReport`; ``report.raise_if_errors()`` turns hard incompatibilities into a
        `fxopt.TensorRTCompatError`.

    Example:
        >>> import onnx
        >>> from onnx import helper, TensorProto
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        >>> g = helper.make_graph([helper.make_node("IsInf", ["x"], ["y"], name="/IsInf")], "g", [x], [y])
        >>> report = check_tensorrt_compat(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), "xavier")
        >>> report.ok, report.errors[0].op_type
        (False, 'IsInf')
    """
    if isinstance(target, str) and target[:1].isdigit():
        version = target
    else:
        profile = get_target(target)
        if profile.tensorrt_version is None:
            raise TargetError(f"target '{profile.name}' does not use TensorRT (backend: {profile.backend})")
        version = profile.tensorrt_version
    matrix, note = support_matrix(version)
    g = _graph_facts(model, matrix)
    sources = torch_source_names(graph_module) if graph_module is not None else {}
    report = CompatReport(version, f"{matrix.source} (TensorRT {matrix.version})", len(model.graph.node), note=note)
    add = report.findings.append
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > matrix.max_opset:
        add(CompatFinding("<model>", "", "opset", ERROR, f"opset {opset}; TensorRT {matrix.version} parses opsets up to {matrix.max_opset}",
                          f"export at opset {matrix.max_opset} (the target's max_onnx_opset)"))
    for name, op, (rule, severity, message, fix) in _io_issues(model, matrix) + ([] if matrix.int64_native else _int64_issues(model, g)):
        add(CompatFinding(name, op, rule, severity, message, fix, _source(name, sources)))
    for node in _all_nodes(model.graph):
        for rule, severity, message, fix in _check_node(node, g, parse_version(version)):
            add(CompatFinding(node.name or node.output[0], node.op_type, rule, severity, message, fix, _source(node.name, sources)))
    return report


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    # nodes of If / Loop / Scan bodies are parsed too
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            for sub in a.graphs:
                yield from _all_nodes(sub)
