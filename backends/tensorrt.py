"""TensorRT lowering: the exact engine build plan, a per-layer GPU/DLA placement report, and the build.

The engine is built only where `tensorrt` and a GPU are present (`build_engine`); everywhere else
fxopt writes the plan (a `trtexec` command line and a Python build script) and says so.
"""

from __future__ import annotations

import os
import shlex
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

from fxopt.errors import TargetError
from fxopt.targets import TargetProfile, get_target

__all__ = ["BuildPlan", "Placement", "build_plan", "dla_placement", "placement_markdown", "tensorrt_available", "build_engine"]

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
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return "weights are not constant"
    if not 1 <= weight.shape[0] <= MAX_DLA_DIM:
        return f"{weight.shape[0]} output channels outside [1, 8192]"
    return ""


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
        shape = shapes.get(name) or (list(inits[name].shape) if name in inits else None)
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


def dla_placement(model: onnx.ModelProto, target: str | TargetProfile = "xavier", precision: str = "fp16") -> list[Placement]:
    """Predict, per ONNX node, whether TensorRT will place its layer on DLA or fall back to GPU.

    Args:
        model: the exported ONNX model (static shapes).
        target: a target with DLA cores.
        precision: ``fp16`` or ``int8`` (DLA runs no fp32).

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
    shapes = _shapes(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
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


def placement_markdown(rows: list[Placement], target: str, precision: str) -> str:
    """The placement report as Markdown."""
    s = placement_summary(rows)
    lines = [
        f"# DLA placement for `{target}` ({precision})",
        "",
        f"{s['dla']} of {len(rows)} nodes can run on DLA; {s['switches']} DLA/GPU switches "
        "(predicted from TensorRT 8.5's DLA layer rules; a GPU build confirms it).",
        "",
        "| node | op | device | reason |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.node} | {r.op_type} | {r.device} | {r.reason} |" for r in rows]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BuildPlan:
    """How to build the TensorRT engine on the device."""

    trtexec: list[str]
    script: str

    @property
    def command_line(self) -> str:
        return shlex.join(self.trtexec)


_PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "int8": ["--fp16", "--int8"]}


def build_plan(
    target: str | TargetProfile,
    precision: str,
    *,
    onnx_file: str = "model.onnx",
    engine_file: str = "engine.plan",
    dla_core: int | None = None,
    workspace_mib: int = 2048,
) -> BuildPlan:
    """The `trtexec` command line and Python script that build the engine on the target.

    Args:
        target: a TensorRT target (``xavier``, ``orin``).
        precision: ``fp32``, ``fp16`` or ``int8`` (int8 from Q/DQ nodes or a calibration cache).
        onnx_file: the ONNX file name, relative to where the plan runs.
        engine_file: the engine file to write.
        dla_core: run on this DLA core with GPU fallback; ``None`` for GPU only.
        workspace_mib: builder workspace.
    """
    profile = get_target(target)
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
    if dla_core is not None:
        cmd += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    script = textwrap.dedent(f'''\
        """Build {engine_file} from {onnx_file} with TensorRT {profile.tensorrt_version} ({profile.name}, {precision}); written by fxopt."""
        import sys

        from fxopt.backends.tensorrt import build_engine

        sys.exit(build_engine({onnx_file!r}, {engine_file!r}, precision={precision!r}, dla_core={dla_core!r}, workspace_mib={workspace_mib}))
        ''')
    return BuildPlan(cmd, script)


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
) -> int:
    """Build and serialise a TensorRT engine (needs `tensorrt` and a GPU); returns 0 on success."""
    if not tensorrt_available():
        raise TargetError("building an engine needs the `tensorrt` package and a CUDA GPU; run the build plan on the device")
    import tensorrt as trt

    from fxopt.files import write_atomic

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
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise TargetError(f"TensorRT failed to build an engine from {onnx_file}")
    write_atomic(engine_file, bytes(engine))
    return 0


@dataclass(frozen=True)
class DeploymentPlan:
    """Everything `save()` writes for a TensorRT target, and what the report shows."""

    files: dict[str, str]
    placement: list[Placement]
    notes: list[str]

    def conv_devices(self) -> list[str]:
        """Devices of the Conv/ConvTranspose nodes in graph order (they map 1:1 to torch convs)."""
        return [r.device for r in self.placement if r.op_type in ("Conv", "ConvTranspose")]


def plan_deployment(model: onnx.ModelProto, target: str | TargetProfile, precision: str) -> DeploymentPlan:
    """Build plan (GPU and, where the target has DLA, DLA core 0) plus the placement report."""
    profile = get_target(target)
    gpu = build_plan(profile, precision)
    files = {"build_engine.sh": f"#!/bin/sh\n# GPU engine ({profile.name}, {precision})\n{gpu.command_line}\n", "build_engine.py": gpu.script}
    placement: list[Placement] = []
    notes = []
    if profile.dla_cores and precision in profile.dla_peak_ops_per_s:
        dla = build_plan(profile, precision, engine_file="engine_dla0.plan", dla_core=0)
        files["build_engine.sh"] += f"# DLA core 0 with GPU fallback\n{dla.command_line}\n"
        placement = dla_placement(model, profile, precision)
        files["placement.md"] = placement_markdown(placement, profile.name, precision)
        s = placement_summary(placement)
        notes.append(f"DLA: {s['dla']} of {len(placement)} ONNX nodes can run on DLA, {s['switches']} DLA/GPU switches (placement.md)")
    if tensorrt_available():
        notes.append("TensorRT and a GPU are present: save() builds engine.plan")
    else:
        notes.append(f"TensorRT {profile.tensorrt_version} is not available here: save() writes the build plan (build_engine.sh, build_engine.py) to run on the device")
    return DeploymentPlan(files, placement, notes)
