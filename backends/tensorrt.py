"""TensorRT lowering: the exact engine build plan, a per-layer GPU/DLA placement report, and the build.

The engine is built only where `tensorrt` and a GPU are present (`build_engine`); everywhere else
fxopt writes the plan (a `trtexec` command line and a Python build script) and says so.

Int8: the GPU engine is built from the Q/DQ file (explicit quantisation). DLA on TensorRT 8.5 takes
no Q/DQ, so for the DLA engine the same graph is written without them (`strip_qdq`) with the same
scales in TensorRT's text calibration cache (`calibration_cache`), which implicit quantisation reads.
"""

from __future__ import annotations

import os
import shlex
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import onnx
from onnx import helper, numpy_helper

from fxopt.backends.dla_cost import PlacementTimes, placement_times
from fxopt.errors import TargetError
from fxopt.frontend.inputs import submodule
from fxopt.output.onnx_weights import InitializerValues, serialize, tensor_values
from fxopt.targets import TargetProfile, get_target

__all__ = [
    "BuildPlan", "Placement", "build_engine", "build_plan", "calibration_cache", "dla_placement", "placement_markdown",
    "read_calibration_cache", "strip_qdq", "tensorrt_available",
]

# DLA limits of TensorRT 8.5 ("DLA Supported Layers and Restrictions", TensorRT developer guide).
MAX_DLA_DIM = 8192
MAX_DLA_BATCH = 4096


@dataclass(frozen=True)
class Placement:
    """Where TensorRT can run one ONNX node with DLA enabled and GPU fallback allowed."""

    node: str
    op_type: str
    device: str  # "DLA" or "GPU"
    reason: str


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            if a.type == onnx.AttributeProto.INTS:  # the usual case, read without onnx.helper's chain of type tests
                return list(a.ints)
            return helper.get_attribute_value(a)
    return default


def _ints(node: onnx.NodeProto, name: str) -> list[int]:
    value = _attr(node, name, [])
    return list(value) if isinstance(value, (list, tuple)) else []


def _rank(shapes: dict[str, list[int]], name: str) -> int | None:
    shape = shapes.get(name)
    return len(shape) if shape is not None else None


def _check_conv(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, object]) -> str:
    kernel, strides, dil = _ints(node, "kernel_shape"), _ints(node, "strides"), _ints(node, "dilations")
    pads = _ints(node, "pads")
    if len(kernel) != 2:
        return "only 2-D convolution runs on DLA"
    if not all(1 <= k <= 32 for k in kernel):
        return f"kernel {kernel} outside [1, 32]"
    if not all(1 <= s <= 8 for s in strides or [1]):
        return f"stride {strides} outside [1, 8]"
    if not all(0 <= p <= 31 for p in pads or [0]):
        return f"padding {pads} outside [0, 31]"
    if not all(1 <= d <= 32 for d in dil or [1]):
        return f"dilation {dil} outside [1, 32]"
    if len(node.input) < 2 or node.input[1] not in inits:
        return "weights are not constant"
    channels = _init_shape(inits, node.input[1])[0]
    if not 1 <= channels <= MAX_DLA_DIM:
        return f"{channels} output channels outside [1, 8192]"
    return ""


def _init_shape(inits: Mapping[str, Any], name: str) -> list[int]:
    """The shape of initializer `name`, without reading its values where `inits` can tell it."""
    return inits.shape(name) if isinstance(inits, InitializerValues) else list(inits[name].shape)


def _check_deconv(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, object]) -> str:
    if len(_ints(node, "kernel_shape")) != 2:
        return "only 2-D deconvolution runs on DLA"
    if (_attr(node, "group", 1) or 1) != 1 or any(d != 1 for d in _ints(node, "dilations")):
        return "grouped or dilated deconvolution does not run on DLA"
    if any(p != 0 for p in _ints(node, "pads")):
        return "deconvolution padding must be 0 on DLA"
    return ""


def _check_pool(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, object]) -> str:
    if node.op_type.startswith("Global"):
        shape = shapes.get(node.input[0])
        if shape is None or len(shape) != 4:
            return "input shape unknown or not 4-D"
        window = shape[2:]
    else:
        window = _ints(node, "kernel_shape")
    if len(window) != 2 or not all(1 <= w <= 8 for w in window):
        return f"pooling window {window} outside [1, 8]"
    if not all(1 <= s <= 16 for s in _ints(node, "strides") or [1]):
        return "pooling stride outside [1, 16]"
    if not all(0 <= p <= 7 for p in _ints(node, "pads") or [0]):
        return "pooling padding outside [0, 7]"
    return ""


def _check_4d(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, object]) -> str:
    out_rank = _rank(shapes, node.output[0])
    return "" if out_rank == 4 else f"DLA runs this op on 4-D tensors only (rank {out_rank})"


def _check_elementwise(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, object]) -> str:
    reason = _check_4d(node, shapes, inits)
    if reason:
        return reason
    out = shapes.get(node.output[0])
    for name in node.input:
        shape = shapes.get(name) or (_init_shape(inits, name) if name in inits else None)
        if shape is None:
            return "operand shape unknown"
        padded = [1] * (4 - len(shape)) + list(shape)
        # DLA broadcasts only per tensor, per channel, or not at all
        if padded != out and padded not in ([1, 1, 1, 1], [1, out[1], 1, 1]):
            return f"broadcast {shape} -> {out} is not per-channel"
    return ""


def _check_concat(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, object]) -> str:
    rank = _rank(shapes, node.output[0])
    axis = _attr(node, "axis", 0)
    if rank != 4 or axis not in (1, -3):
        return "DLA concatenates 4-D tensors along channels only"
    return ""


def _check_resize(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, object]) -> str:
    mode = _attr(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("nearest", "linear"):
        return f"resize mode '{mode}' not on DLA"
    src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not src or not dst or len(src) != 4:
        return "resize of non-4-D or unknown shapes"
    if any(d % s for s, d in zip(src[2:], dst[2:])):
        return "DLA resizes by integer scale factors only"
    return ""


def _always(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, object]) -> str:
    return ""


Check = Callable[[onnx.NodeProto, dict, dict], str]
# ONNX op -> the rule TensorRT 8.5 applies before placing its layer on DLA.
DLA_RULES: dict[str, Check] = {
    "Conv": _check_conv,                      # IConvolutionLayer
    "ConvTranspose": _check_deconv,           # IDeconvolutionLayer
    "Gemm": _always,                          # IFullyConnected (constant weights)
    "MaxPool": _check_pool,                   # IPoolingLayer
    "AveragePool": _check_pool,
    "GlobalAveragePool": _check_pool,
    "GlobalMaxPool": _check_pool,
    "Relu": _check_4d,                        # IActivationLayer
    "Sigmoid": _check_4d,
    "Tanh": _check_4d,
    "LeakyRelu": _check_4d,
    "Clip": _check_4d,
    "PRelu": _check_4d,
    "BatchNormalization": _check_4d,          # IScaleLayer
    "Add": _check_elementwise,                # IElementWiseLayer: sum, sub, prod, max, min
    "Sub": _check_elementwise,
    "Mul": _check_elementwise,
    "Max": _check_elementwise,
    "Min": _check_elementwise,
    "Concat": _check_concat,                  # IConcatenationLayer
    "Resize": _check_resize,                  # IResizeLayer
    "LRN": _check_4d,
}
# Orin's DLA (TensorRT 8.5) also runs softmax over channels.
ORIN_EXTRA_RULES: dict[str, Check] = {"Softmax": _check_4d}


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    return shapes


def dla_placement(model: onnx.ModelProto, target: str | TargetProfile = "xavier", precision: str = "fp16",
                  shapes: Mapping[str, list[int]] | None = None) -> list[Placement]:
    """Predict, per ONNX node, whether TensorRT will place its layer on DLA or fall back to GPU.

    Args:
        model: the exported ONNX model (static shapes).
        target: a target with DLA cores.
        precision: ``fp16`` or ``int8`` (DLA runs no fp32).
        shapes: the model's static tensor shapes (ONNX shape inference) where the caller has them.

    Returns:
        One `Placement` per node, in graph order.
    """
    profile = get_target(target)
    if profile.dla_cores == 0:
        raise TargetError(f"target '{profile.name}' has no DLA cores")
    if precision not in profile.dla_peak_ops_per_s:
        return [Placement(n.name, n.op_type, "GPU", f"DLA does not run {precision}") for n in model.graph.node]
    rules = dict(DLA_RULES)
    if profile.name == "orin":
        rules.update(ORIN_EXTRA_RULES)
    shapes = _shapes(model) if shapes is None else shapes
    inits = InitializerValues(model.graph)  # a rule reads a weight's shape, rarely its values
    rows = []
    for node in model.graph.node:
        rule = rules.get(node.op_type)
        if rule is None:
            rows.append(Placement(node.name, node.op_type, "GPU", f"{node.op_type} has no DLA implementation"))
            continue
        big = [d for name in node.output for d in (shapes.get(name) or [])[1:] if d > MAX_DLA_DIM]
        reason = f"dimension {big[0]} above 8192" if big else rule(node, shapes, inits)
        rows.append(Placement(node.name, node.op_type, "GPU" if reason else "DLA", reason or "supported"))
    return rows


def placement_summary(rows: list[Placement]) -> dict[str, int]:
    """DLA / GPU node counts and the number of DLA<->GPU switches (each costs a reformat copy)."""
    switches = sum(1 for a, b in zip(rows, rows[1:]) if a.device != b.device)
    return {"dla": sum(r.device == "DLA" for r in rows), "gpu": sum(r.device == "GPU" for r in rows), "switches": switches}


def placement_markdown(rows: list[Placement], target: str, precision: str, times: PlacementTimes | None = None) -> str:
    """The placement report as Markdown; with `times` (`fxopt.backends.dla_cost.placement_times`), the
    estimated engine time of each placement, the best GPU/DLA split and each layer's time on each device."""
    s = placement_summary(rows)
    lines = [
        f"# DLA placement for `{target}` ({precision})",
        "",
        f"{s['dla']} of {len(rows)} nodes can run on DLA; {s['switches']} DLA/GPU switches "
        "(predicted from TensorRT 8.5's DLA layer rules; a GPU build confirms it).",
        "",
    ]
    if times is not None:
        ms = 1e3
        freed = times.gpu_only_s - times.dla_gpu_busy_s
        lines += [
            "Estimated engine time (the xavier latency model, bench/results/xavier_latency.md; DLA fitted to the published DLA/GPU pairs, see there):",
            "",
            "| placement | end to end ms | GPU busy ms | GPU time freed ms |",
            "|---|---|---|---|",
            f"| GPU only | {times.gpu_only_s * ms:.3f} | {times.gpu_only_s * ms:.3f} | 0 |",
            f"| DLA core 0, GPU fallback | {times.dla_s * ms:.3f} | {times.dla_gpu_busy_s * ms:.3f} | {freed * ms:.3f} |",
        ]
        if times.split_after:
            lines.append(f"| best split: DLA0 up to `{times.split_after}`, then GPU | {times.split_s * ms:.3f} | "
                         f"{times.split_gpu_busy_s * ms:.3f} | {(times.gpu_only_s - times.split_gpu_busy_s) * ms:.3f} |")
        lines += ["", (f"On DLA0 the model frees {freed * ms:.3f} ms of GPU time per inference at a cost of "
                       f"{(times.dla_s - times.gpu_only_s) * ms:+.3f} ms latency ({times.switches} switches, each a reformat and a hand-over)."
                       if freed > 0 else "On DLA0 the model frees no GPU time: its fallback layers and reformats cost the GPU more than it saves."), ""]
    lines += ["| node | op | device | reason | GPU ms | DLA ms |" if times else "| node | op | device | reason |",
              "|---|---|---|---|---|---|" if times else "|---|---|---|---|"]
    for r in rows:
        row = f"| {r.node} | {r.op_type} | {r.device} | {r.reason} |"
        if times is not None:
            g, d = times.layer_s.get(r.node, (None, None))
            row += f" {g * 1e3:.4f} | {d * 1e3:.4f} |" if g is not None and d is not None else (f" {g * 1e3:.4f} | |" if g is not None else " | |")
        lines.append(row)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- int8 for DLA

# The calibrator TensorRT's implicit int8 reads the cache for, and the version it was written for
# (TensorRT 8.5.2, JetPack 5.1 on Xavier/Orin); `build_engine` rewrites the version to the installed one.
CALIBRATION_ALGORITHM = "EntropyCalibration2"
CALIBRATION_CACHE_VERSION = 8502
# ops whose output holds (a subset of) its input's values: a scale carries across them unchanged,
# and quantising the input with the output's scale gives the same int8 values after the op
_SCALE_KEEPING = {"Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}


def _values(graph: onnx.GraphProto) -> dict[str, object]:
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant" and n.attribute}
    return {i.name: tensor_values(i) for i in graph.initializer} | constants


def strip_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, float]]:
    """The implicit-quantisation twin of a Q/DQ file, and the activation scales its Q/DQ pairs held.

    Each QuantizeLinear -> DequantizeLinear pair is removed and its consumers read the tensor it
    quantised: an activation (its scale is returned under the tensor's name) or a float weight
    (TensorRT quantises weights itself, per output channel, from their max, as the Q/DQ file did).
    Tensor names are unchanged, so a calibration cache keyed by them fits both files.

    Args:
        model: an ONNX model with Q/DQ pairs (e.g. ``compiled.onnx_model`` after ``precision="int8"``).

    Returns:
        ``(model without Q/DQ, {activation tensor: scale})``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    values = _values(graph)
    producers = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    scales: dict[str, float] = {}
    dropped: set[int] = set()
    for dq in graph.node:
        q = producers.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        source = q.input[0]
        rename[dq.output[0]] = source
        dropped |= {id(q), id(dq)}
        if source not in values:  # an activation, not a weight
            scales[source] = float(values[q.input[1]].reshape(-1)[0])
    kept = [n for n in graph.node if id(n) not in dropped and not (n.op_type == "Constant" and _only_feeds_qdq(n, graph, dropped))]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    outputs = {o.name for o in graph.output}
    kept += [helper.make_node("Identity", [rename[o]], [o]) for o in outputs if o in rename]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | outputs
    initializers = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return out, scales


def _only_feeds_qdq(node: onnx.NodeProto, graph: onnx.GraphProto, dropped: set[int]) -> bool:
    users = [n for n in graph.node if node.output[0] in n.input]
    return bool(users) and all(id(u) in dropped for u in users)


@dataclass(frozen=True)
class _ScaleGraph:
    """Who reads and who writes each tensor of an ONNX graph (what the scale rules ask)."""

    consumers: Mapping[str, int]
    producers: Mapping[str, onnx.NodeProto]

    @staticmethod
    def of(model: onnx.ModelProto) -> _ScaleGraph:
        counts: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                counts[name] = counts.get(name, 0) + 1
        return _ScaleGraph(counts, {o: n for n in model.graph.node for o in n.output})

    def single_use(self, tensor: str) -> bool:
        return self.consumers.get(tensor, 0) == 1


def _across_keeper(node: onnx.NodeProto, known: Mapping[str, float], g: _ScaleGraph) -> dict[str, float]:
    src, dst = node.input[0], node.output[0]
    if src in known and dst not in known:  # input -> output
        return {dst: known[src]}
    if dst in known and src not in known and g.single_use(src):  # output -> its input, read by this op alone
        return {src: known[dst]}
    return {}


def _concat_to_inputs(node: onnx.NodeProto, known: Mapping[str, float], g: _ScaleGraph) -> dict[str, float]:
    dst = node.output[0]  # concat output -> each input it alone reads
    return {name: known[dst] for name in node.input if dst in known and name not in known and g.single_use(name)} if dst in known else {}


def _add_to_fused_conv(node: onnx.NodeProto, known: Mapping[str, float], g: _ScaleGraph) -> dict[str, float]:
    # add(conv, residual) with a scaled residual -> the conv's output takes the add's: TensorRT fuses the add
    # into that conv's epilogue, so the sum is what the conv writes
    dst = node.output[0]
    if dst not in known or len(node.input) != 2:
        return {}
    for a, b in (node.input, node.input[::-1]):
        conv = g.producers.get(a)
        if b in known and a not in known and conv is not None and conv.op_type == "Conv" and g.single_use(a):
            return {a: known[dst]}
    return {}


# How a tensor takes a scale from a neighbour, per ONNX op kind (one rule each; the driver repeats them)
SCALE_RULES: Mapping[str, Callable[[onnx.NodeProto, Mapping[str, float], _ScaleGraph], dict[str, float]]] = MappingProxyType({
    **{op: _across_keeper for op in _SCALE_KEEPING},  # ReLU, max-pool, reshapes keep the scale
    "Concat": _concat_to_inputs,
    "Add": _add_to_fused_conv,
})


def propagated_scales(model: onnx.ModelProto, scales: Mapping[str, float]) -> dict[str, float]:
    """`scales` plus the tensors that take one over unchanged, as TensorRT fuses them (implicit mode
    needs a range on every tensor a fused int8 layer reads or writes): `SCALE_RULES` applied to every
    node until nothing changes.

    Example:
        >>> from onnx import helper
        >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [], [])
        >>> propagated_scales(helper.make_model(g), {"x": 0.5})
        {'x': 0.5, 'y': 0.5}
    """
    out = dict(scales)
    graph = _ScaleGraph.of(model)
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            rule = SCALE_RULES.get(node.op_type)
            found = rule(node, out, graph) if rule is not None and node.input and node.output else {}
            for tensor, scale in found.items():
                if tensor not in out:
                    out[tensor], changed = scale, True
    return out


def calibration_cache(scales: Mapping[str, float], version: int = CALIBRATION_CACHE_VERSION) -> str:
    """TensorRT's text calibration cache: a ``TRT-<version>-EntropyCalibration2`` line, then one
    ``tensor: <big-endian hex of the float32 scale>`` line per tensor (scale = amax / 127).

    Example:
        >>> calibration_cache({"input": 0.0078125}).splitlines()
        ['TRT-8502-EntropyCalibration2', 'input: 3c000000']
    """
    lines = [f"TRT-{version}-{CALIBRATION_ALGORITHM}"]
    lines += [f"{name}: {struct.pack('!f', scale).hex()}" for name, scale in scales.items()]
    return "\n".join(lines) + "\n"


def read_calibration_cache(text: str) -> tuple[str, dict[str, float]]:
    """The header line and ``{tensor: scale}`` of a TensorRT text calibration cache.

    Example:
        >>> read_calibration_cache("TRT-8502-EntropyCalibration2\\ninput: 3c000000\\n")
        ('TRT-8502-EntropyCalibration2', {'input': 0.0078125})
    """
    header, *lines = text.splitlines()
    scales = {}
    for line in filter(None, lines):
        name, _, value = line.rpartition(": ")
        scales[name] = struct.unpack("!f", bytes.fromhex(value))[0]
    return header, scales


@dataclass(frozen=True)
class BuildPlan:
    """How to build the TensorRT engine on the device.

    Attributes:
        trtexec: the `trtexec` command line, as arguments.
        script: a Python script building the same engine with `build_engine`.
        call: the `build_engine(...)` call the script makes (to compose several builds in one script).
    """

    trtexec: list[str]
    script: str
    call: str = ""

    @property
    def command_line(self) -> str:
        return shlex.join(self.trtexec)


# {input name: (min shape, opt shape, max shape)}: a TensorRT optimisation profile
ShapeProfile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]

_PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "int8": ["--fp16", "--int8"]}


def build_plan(
    target: str | TargetProfile,
    precision: str,
    *,
    onnx_file: str = "model.onnx",
    engine_file: str = "engine.plan",
    dla_core: int | None = None,
    workspace_mib: int = 2048,
    calibration_cache: str | None = None,
    shapes: ShapeProfile | None = None,
) -> BuildPlan:
    """The `trtexec` command line and Python script that build the engine on the target.

    Args:
        target: a TensorRT target (``xavier``, ``orin``).
        precision: ``fp32``, ``fp16`` or ``int8`` (int8 from Q/DQ nodes or a calibration cache).
        onnx_file: the ONNX file name, relative to where the plan runs.
        engine_file: the engine file to write.
        dla_core: run on this DLA core with GPU fallback; ``None`` for GPU only.
        workspace_mib: builder workspace.
        calibration_cache: int8 from this TensorRT calibration cache (implicit quantisation, e.g.
            for DLA) instead of Q/DQ nodes in the ONNX file.
        shapes: the optimisation profile of a file with a dynamic batch axis:
            ``{input name: (min shape, opt shape, max shape)}``.
    """
    profile = get_target(target)
    if calibration_cache is not None and precision != "int8":
        raise TargetError(f"a calibration cache is for int8 builds, not {precision}")
    if profile.backend != "tensorrt":
        raise TargetError(f"target '{profile.name}' does not use TensorRT (backend: {profile.backend})")
    if precision not in profile.precisions:
        raise TargetError(f"target '{profile.name}' has no precision '{precision}'")
    if dla_core is not None and not 0 <= dla_core < profile.dla_cores:
        raise TargetError(f"target '{profile.name}' has DLA cores 0..{profile.dla_cores - 1}, not {dla_core}")
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}", *_PRECISION_FLAGS[precision]]
    stem = os.path.splitext(engine_file)[0]  # each engine's layer/profile files beside it, not shared
    cmd += [f"--memPoolSize=workspace:{workspace_mib}", "--profilingVerbosity=detailed",
            f"--exportLayerInfo={stem}.layers.json", f"--exportProfile={stem}.profile.json"]
    if calibration_cache is not None:
        cmd.append(f"--calib={calibration_cache}")
    if shapes:
        for flag, i in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            cmd.append(f"{flag}=" + ",".join(f"{name}:{'x'.join(map(str, dims[i]))}" for name, dims in shapes.items()))
    if dla_core is not None:
        cmd += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    cache = f", calibration_cache={calibration_cache!r}" if calibration_cache is not None else ""
    cache += f", shapes={ {k: tuple(tuple(d) for d in v) for k, v in shapes.items()}!r}" if shapes else ""
    call = f"build_engine({onnx_file!r}, {engine_file!r}, precision={precision!r}, dla_core={dla_core!r}, workspace_mib={workspace_mib}{cache})"
    script = build_script([call], f"Build {engine_file} from {onnx_file} with TensorRT {profile.tensorrt_version} ({profile.name}, {precision})")
    return BuildPlan(cmd, script, call)


def build_script(calls: list[str], what: str) -> str:
    """A Python script running `build_engine` calls in turn (one that fails raises: a non-zero exit)."""
    lines = [f'"""{what}; written by fxopt."""', "from fxopt.backends.tensorrt import build_engine", "", *calls]
    return "\n".join(lines) + "\n"


def tensorrt_available() -> bool:
    """True when the `tensorrt` module imports and a CUDA GPU is visible."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available()


def build_engine(
    onnx_file: str,
    engine_file: str,
    *,
    precision: str = "fp16",
    dla_core: int | None = None,
    workspace_mib: int = 2048,
    calibration_cache: str | None = None,
    shapes: ShapeProfile | None = None,
) -> int:
    """Build and serialise a TensorRT engine (needs `tensorrt` and a GPU); returns 0 on success.

    With `calibration_cache` (int8 only), int8 scales come from that TensorRT text cache (implicit
    quantisation, as DLA needs) rather than from Q/DQ nodes; its header is set to the installed
    TensorRT's version first, since TensorRT skips a cache written for another version.
    """
    if not tensorrt_available():
        raise TargetError("building an engine needs the `tensorrt` package and a CUDA GPU; run the build plan on the device")
    import tensorrt as trt

    from fxopt.output.files import write_atomic

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    with open(onnx_file, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TargetError(f"TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if calibration_cache is not None:
        with open(calibration_cache) as f:
            config.int8_calibrator = _cache_calibrator(trt, cache_for_version(f.read(), trt.__version__))
    if shapes:  # a dynamic batch axis: one optimisation profile
        opt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            opt_profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
        config.add_optimization_profile(opt_profile)
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise TargetError(f"TensorRT failed to build an engine from {onnx_file}")
    write_atomic(engine_file, bytes(engine))
    return 0


def cache_for_version(text: str, tensorrt_version: str) -> bytes:
    """`text` (a calibration cache) with its header naming `tensorrt_version` (``"8.5.2.2"`` -> 8502).

    Example:
        >>> cache_for_version("TRT-8502-EntropyCalibration2\\nx: 3c000000\\n", "8.5.1.7").decode().splitlines()[0]
        'TRT-8501-EntropyCalibration2'
    """
    major, minor, patch = (int(p) for p in (tensorrt_version.split(".") + ["0", "0"])[:3])
    header, _, rest = text.partition("\n")
    algorithm = header.split("-", 2)[2] if header.count("-") >= 2 else CALIBRATION_ALGORITHM
    return f"TRT-{major * 1000 + minor * 100 + patch}-{algorithm}\n{rest}".encode()


def _cache_calibrator(trt: Any, cache: bytes) -> Any:
    """An int8 calibrator that only hands TensorRT `cache` (it has no batches to calibrate on)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: bytes) -> None:
            return None

    return CacheCalibrator()


@dataclass(frozen=True)
class DeploymentPlan:
    """Everything `save()` writes for a TensorRT target, and what the report shows."""

    files: dict[str, str | bytes]
    placement: list[Placement]
    notes: list[str]

    def conv_devices(self) -> list[str]:
        """Devices of the Conv/ConvTranspose nodes in graph order (they map 1:1 to torch convs)."""
        return [r.device for r in self.placement if r.op_type in ("Conv", "ConvTranspose")]


DLA_ONNX = "model_dla.onnx"
CALIBRATION_CACHE = "calibration.cache"


def batch_profile(model: onnx.ModelProto, batch: tuple[int, int, int]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """``{input: (min, opt, max shape)}`` of a file whose inputs have a symbolic batch axis."""
    shapes = {}
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        shapes[value.name] = tuple([b, *dims[1:]] for b in batch)
    return shapes


def plan_deployment(model: onnx.ModelProto, target: str | TargetProfile, precision: str,
                    dynamic_batch: tuple[int, int, int] | None = None) -> DeploymentPlan:
    """Build plan (GPU and, where the target has DLA, DLA core 0) plus the placement report.

    At int8 the GPU engine is built from the Q/DQ file; the DLA engine, which on TensorRT 8.5 takes no
    Q/DQ, from `model_dla.onnx` (the same graph without them) and `calibration.cache` (their scales).
    With `dynamic_batch` the GPU engine gets the ``(min, opt, max)`` optimisation profile; DLA builds
    static shapes only, so its engine is fixed at the opt batch.
    """
    profile = get_target(target)
    shapes = batch_profile(model, dynamic_batch) if dynamic_batch else None
    gpu = build_plan(profile, precision, shapes=shapes)
    files: dict[str, str | bytes] = {"build_engine.sh": f"#!/bin/sh\n# GPU engine ({profile.name}, {precision})\n{gpu.command_line}\n"}
    calls = [gpu.call]
    placement: list[Placement] = []
    notes = []
    if profile.dla_cores and precision in profile.dla_peak_ops_per_s:
        dla_shapes = {k: (v[1], v[1], v[1]) for k, v in shapes.items()} if shapes else None
        dla_model, dla, how = _dla_build(model, profile, precision, files, notes, dla_shapes)
        if shapes:
            how += f" (static batch {dynamic_batch[1]}: DLA takes no dynamic shapes)"
        files["build_engine.sh"] += f"# DLA core 0 with GPU fallback{how}\n{dla.command_line}\n"
        calls.append(dla.call)
        inferred = _shapes(dla_model)  # one shape inference for the placement and its times
        placement = dla_placement(dla_model, profile, precision, inferred)
        dla_precision = "fp16" if "fp16" in how else precision
        times = placement_times(dla_model, {r.node: r.device for r in placement}, inferred, profile, dla_precision)
        files["placement.md"] = placement_markdown(placement, profile.name, precision, times)
        s = placement_summary(placement)
        timing = (f"; estimated {times.dla_s * 1e3:.2f} ms on DLA0 vs {times.gpu_only_s * 1e3:.2f} ms on the GPU, "
                  f"freeing {(times.gpu_only_s - times.dla_gpu_busy_s) * 1e3:.2f} ms of GPU time") if times else ""
        notes.append(f"DLA: {s['dla']} of {len(placement)} ONNX nodes can run on DLA, {s['switches']} DLA/GPU switches{timing} (placement.md)")
    files["build_engine.py"] = build_script(calls, f"Build the {profile.name} engines with TensorRT {profile.tensorrt_version} ({precision})") if len(calls) > 1 else gpu.script
    if tensorrt_available():
        notes.append("TensorRT and a GPU are present: save() builds engine.plan")
    else:
        notes.append(f"TensorRT {profile.tensorrt_version} is not available here: save() writes the build plan (build_engine.sh, build_engine.py) to run on the device")
    return DeploymentPlan(files, placement, notes)


def _dla_build(
    model: onnx.ModelProto, profile: TargetProfile, precision: str, files: dict[str, str | bytes], notes: list[str],
    shapes: ShapeProfile | None = None,
) -> tuple[onnx.ModelProto, BuildPlan, str]:
    """The model DLA builds from, its plan and a comment; at int8 writes model_dla.onnx and the cache."""
    if precision != "int8":
        return model, build_plan(profile, precision, engine_file="engine_dla0.plan", dla_core=0, shapes=shapes), ""
    implicit, scales = strip_qdq(model)
    if not scales:
        notes.append("int8 DLA: the ONNX file has no Q/DQ (nothing was quantised), so the DLA engine is built in fp16")
        return model, build_plan(profile, "fp16", engine_file="engine_dla0.plan", dla_core=0, shapes=shapes), " (fp16: no Q/DQ to take scales from)"
    cache = propagated_scales(implicit, scales)
    files[DLA_ONNX] = serialize(implicit)  # a lean model with its weights written in
    files[CALIBRATION_CACHE] = calibration_cache(cache)
    notes.append(
        f"int8: the GPU engine is built from the Q/DQ file (model.onnx, explicit quantisation); DLA on TensorRT "
        f"{profile.tensorrt_version} takes no Q/DQ, so the DLA engine is built from {DLA_ONNX} (the same graph without "
        f"Q/DQ) with {CALIBRATION_CACHE} ({len(scales)} Q/DQ scales from the same calibration, {len(cache) - len(scales)} "
        "more carried across ReLU/pool/reshape and fused adds); a layer whose tensors have no scale "
        "(the network outputs, ops the Q/DQ file leaves unquantised) runs in fp16"
    )
    dla = build_plan(profile, precision, onnx_file=DLA_ONNX, engine_file="engine_dla0.plan", dla_core=0,
                     calibration_cache=CALIBRATION_CACHE, shapes=shapes)
    return implicit, dla, " (implicit int8: no Q/DQ on DLA)"


@dataclass(frozen=True)
class TensorRTDeployment:
    """What compile's lowering adds for a TensorRT target: report lines, build-plan files, and the
    GPU/DLA device of each torch conv (node name -> device) for the report's layer table."""

    notes: list[str]
    files: dict[str, Any]
    placement: dict[str, str]


def conv_placement(gm: Any, devices: list[str]) -> dict[str, str]:
    """Pair the graph's convs with `devices`, the placement of the ONNX file's Conv nodes in order: the
    exporter emits one Conv per torch conv, in graph order, so the two sequences pair up ({} otherwise)."""
    from torch import nn

    convs = [n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(submodule(gm, str(n.target)), nn.modules.conv._ConvNd)]
    return dict(zip(convs, devices)) if len(convs) == len(devices) else {}


def deploy(exported: Any, target: TargetProfile, precision: str, dynamic_batch: tuple[int, int, int] | None,
           graph_module: Any) -> TensorRTDeployment:
    """compile's TensorRT step (the `deployment` extension for ``"tensorrt"``): the release's
    compatibility check (a hard incompatibility raises `TensorRTCompatError` naming each node), the
    build plan and the placement report."""
    from fxopt.backends.tensorrt_compat import check_tensorrt_compat

    notes = [f"ONNX rewrite for TensorRT {target.tensorrt_version}: {line}" for line in exported.rewrites]
    compat = check_tensorrt_compat(exported.model, target, graph_module=graph_module)
    compat.raise_if_errors()
    notes += compat.notes()
    plan = plan_deployment(exported.model, target, precision, dynamic_batch)
    return TensorRTDeployment(notes + list(plan.notes), dict(plan.files), conv_placement(graph_module, plan.conv_devices()))
