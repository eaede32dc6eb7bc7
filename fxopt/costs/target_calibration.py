"""Calibrate a TensorRT target's latency model from a measured per-layer profile (`trtexec --exportProfile`).

`calibrate_target` reads the profile, matches each engine layer to the ONNX nodes it runs (TensorRT
names a fused layer after its nodes, joined by `` + ``), costs those nodes with the target's
`EngineModel`, and fits the op efficiencies, the reachable bandwidth and the per-kernel launch
cost to the measured times. The result is a `TargetProfile` that `fxopt.targets.load_target`
reads back; ``fxopt calibrate-target`` is the command line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fxopt.costs.engine_cost import kernel_latency_s
from fxopt.errors import InputError
from fxopt.targets import BYTES_PER_ELEMENT, TargetProfile, get_target

__all__ = ["LayerTime", "ProfileFormatError", "calibrate_target", "read_trtexec_profile", "onnx_layer_work"]


class ProfileFormatError(InputError):
    """A measured profile (or its ONNX model) is not what `calibrate_target` can read; names the file and field."""

    def __init__(self, path: str | Path, field: str, message: str) -> None:
        self.path = str(path)
        self.field = field
        super().__init__(f"{path}: {field}: {message}")


@dataclass(frozen=True)
class LayerTime:
    """One layer of a measured engine profile: its name and mean time per inference."""

    name: str
    time_s: float


def read_trtexec_profile(path: str | Path) -> list[LayerTime]:
    """The layers of a ``trtexec --exportProfile=FILE`` JSON: ``[{"count": N}, {"name", "averageMs" or
    "timeMs", ...}, ...]``; ``timeMs`` (total over ``count`` runs) is used when ``averageMs`` is absent.

    Raises:
        ProfileFormatError: not JSON, not a list of layer records, or a record without a name or
            a non-negative time; the message names the file and the field.

    Example:
        >>> import json, tempfile
        >>> f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        >>> json.dump([{"count": 10}, {"name": "conv1 + relu1", "timeMs": 1.5, "averageMs": 0.15, "percentage": 100}], f); f.close()
        >>> read_trtexec_profile(f.name)
        [LayerTime(name='conv1 + relu1', time_s=0.00015)]
    """
    try:
        document = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ProfileFormatError(path, "<file>", f"not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(document, list):
        raise ProfileFormatError(path, "<top level>", f"expected a list of layer records, got {type(document).__name__}")
    count = 1
    records = document
    if records and isinstance(records[0], dict) and "count" in records[0] and "name" not in records[0]:
        count = records[0]["count"]
        if not isinstance(count, int) or count <= 0:
            raise ProfileFormatError(path, "[0].count", f"expected a positive run count, got {count!r}")
        records = records[1:]
    layers = []
    for i, rec in enumerate(records, start=len(document) - len(records)):
        if not isinstance(rec, dict):
            raise ProfileFormatError(path, f"[{i}]", f"expected a layer record, got {type(rec).__name__}")
        name = rec.get("name")
        if not isinstance(name, str) or not name:
            raise ProfileFormatError(path, f"[{i}].name", "missing or not a string")
        key = "averageMs" if "averageMs" in rec else "timeMs"
        ms = rec.get(key)
        if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not math.isfinite(ms) or ms < 0:
            raise ProfileFormatError(path, f"[{i}].{key}", f"expected a non-negative time in ms, got {ms!r}")
        layers.append(LayerTime(name, ms / 1e3 / (count if key == "timeMs" else 1)))
    if not layers:
        raise ProfileFormatError(path, "<top level>", "no layer records")
    return layers


@dataclass(frozen=True)
class _NodeWork:
    kind: str
    flops: float
    inputs: float  # activation elements read
    weights: float
    outputs: float
    depth: float


# ONNX op type -> fxopt op kind (what the efficiency table is keyed by)
_KINDS: Mapping[str, str] = {
    "Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "linear", "MatMul": "matmul",
    "BatchNormalization": "norm", "LayerNormalization": "norm", "InstanceNormalization": "norm",
    "GroupNormalization": "norm", "MaxPool": "pool", "AveragePool": "pool", "GlobalAveragePool": "pool",
    "GlobalMaxPool": "pool", "Transpose": "copy", "Slice": "copy", "Concat": "copy", "Split": "copy",
    "Gather": "copy", "Tile": "copy",
}
_FREE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Constant", "Shape", "QuantizeLinear", "DequantizeLinear"}
_PRODUCTS = ("conv", "conv_depthwise", "conv_transpose", "linear", "matmul")


def onnx_layer_work(path: str | Path) -> dict[str, _NodeWork]:
    """Per ONNX node name: op kind, FLOPs (2 x MACs for products), elements read/written, depth."""
    import onnx
    from onnx import shape_inference

    try:
        model = shape_inference.infer_shapes(onnx.load(str(path)))
    except Exception as exc:  # noqa: BLE001 - onnx raises many types for a bad file
        raise ProfileFormatError(path, "<file>", f"not a readable ONNX model ({exc})") from None
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    work: dict[str, _NodeWork] = {}
    for node in model.graph.node:
        if node.op_type in _FREE or not node.name:
            continue
        out = math.prod(shapes.get(node.output[0], (0,))) if node.output else 0
        acts = sum(math.prod(shapes.get(i, (0,))) for i in node.input if i and i not in weights)
        wts = sum(math.prod(weights[i]) for i in node.input if i in weights)
        kind, flops, depth = _KINDS.get(node.op_type, "elementwise"), float(out), 1.0
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in weights:
            w = weights[node.input[1]]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            depth = float(math.prod(w[1:])) if node.op_type == "Conv" else float(w[0] // group * math.prod(w[2:]))
            flops = 2.0 * out * depth
            if node.op_type == "Conv" and group > 1 and w[1] == 1:  # one input channel per group
                kind = "conv_depthwise"
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0]) or weights.get(node.input[0])
            depth = float(a[-1]) if a else 1.0
            flops = 2.0 * out * depth
            if node.op_type == "MatMul" and node.input[1] in weights:
                kind = "linear"
        work[node.name] = _NodeWork(kind, flops, float(acts), float(wts), float(out), depth)
    return work


_SPLIT_NAME = re.compile(r"\s\+\s|PWN\(|\)|,\s*|\[|\]")


def _layer_parts(layer: str, work: Mapping[str, _NodeWork]) -> list[_NodeWork]:
    # "conv1 + relu1", "PWN(PWN(sig), mul)": the ONNX nodes a TensorRT layer runs
    if layer.startswith("Reformatting") or layer.startswith("reformat"):
        return []
    return [work[token.strip()] for token in _SPLIT_NAME.split(layer) if token.strip() in work]


@dataclass(frozen=True)
class _Layer:
    kind: str
    flops: float
    elements: float
    size: float
    depth: float
    time_s: float


def _match(layers: Sequence[LayerTime], work: Mapping[str, _NodeWork]) -> list[_Layer]:
    matched = []
    for layer in layers:
        parts = _layer_parts(layer.name, work)
        if not parts or layer.time_s <= 0:
            continue
        head = next((p for p in parts if p.kind in _PRODUCTS), parts[0])
        elements = head.inputs + sum(p.weights for p in parts) + parts[-1].outputs
        flops = head.flops if head.kind in _PRODUCTS else sum(p.flops for p in parts)
        matched.append(_Layer(head.kind, flops, elements, head.outputs, head.depth, layer.time_s))
    return matched


def calibrate_target(
    profile_path: str | Path,
    target: str | TargetProfile = "xavier",
    *,
    onnx_path: str | Path | None = None,
    precision: str | None = None,
    name: str | None = None,
) -> TargetProfile:
    """Fit a target's op efficiencies, bandwidth efficiency and launch cost to a measured profile.

    Args:
        profile_path: a ``trtexec --exportProfile`` JSON of an engine built from `onnx_path`.
        target: the target to start from (its `EngineModel` gives the kernel formula).
        onnx_path: the ONNX file the engine was built from; default: ``model.onnx`` beside the
            profile (where ``fxopt compile ... -o DIR`` writes it).
        precision: the precision the engine ran (default: the target's).
        name: the calibrated target's name (default: ``<target>_calibrated``).

    Returns:
        The calibrated `TargetProfile` (not registered; `fxopt.targets.load_target` of its
        ``to_dict()`` JSON registers it).

    Raises:
        ProfileFormatError: the profile or the ONNX file cannot be read, or no layer of the
            profile matches a node of the ONNX model.
        InputError: the target has no `EngineModel`, or no ONNX file was given or found.
    """
    from scipy.optimize import least_squares

    base = get_target(target)
    if base.engine is None:
        raise InputError(f"target '{base.name}' has no EngineModel to calibrate (only TensorRT targets have one)")
    precision = precision or base.default_precision
    profile_path = Path(profile_path)
    onnx_file = Path(onnx_path) if onnx_path is not None else profile_path.parent / "model.onnx"
    if not onnx_file.exists():
        raise InputError(f"no ONNX model for {profile_path}: pass --onnx (looked for {onnx_file})")
    layers = _match(read_trtexec_profile(profile_path), onnx_layer_work(onnx_file))
    if not layers:
        raise ProfileFormatError(profile_path, "name", f"no layer name matches a node of {onnx_file}")
    kinds = sorted({la.kind for la in layers if la.flops > 0 and la.kind in _PRODUCTS})
    names = [*kinds, "bandwidth_efficiency", "launch_overhead_s"]
    x0 = np.log([*(base.efficiency(k) for k in kinds), base.engine.bandwidth_efficiency, max(base.launch_overhead_s, 1e-7)])
    lo = np.log([*(1e-3 for _ in kinds), 0.02, 1e-8])
    hi = np.log([*(1.0 for _ in kinds), 1.0, 1e-2])
    width = BYTES_PER_ELEMENT[precision]
    arrays = {f: np.array([getattr(la, f) for la in layers]) for f in ("flops", "elements", "size", "depth", "time_s")}
    kind_array = np.array([la.kind for la in layers])

    def candidate(x: np.ndarray) -> TargetProfile:
        values = dict(zip(names, np.exp(x)))
        efficiency = {**base.op_efficiency, **{k: float(values[k]) for k in kinds}}
        engine = base.engine.replace(bandwidth_efficiency=float(values["bandwidth_efficiency"]))
        return base.replace(op_efficiency=efficiency, launch_overhead_s=float(values["launch_overhead_s"]), engine=engine)

    def residuals(x: np.ndarray) -> np.ndarray:
        predicted = kernel_latency_s(candidate(x), precision, kind_array, arrays["flops"], arrays["elements"] * width,
                                     arrays["size"], arrays["depth"])
        return np.log(predicted / arrays["time_s"])

    fitted = least_squares(residuals, np.clip(x0, lo, hi), bounds=(lo, hi), loss="soft_l1", f_scale=0.1)
    result = candidate(fitted.x)
    source = f"calibrated from {profile_path.name} ({len(layers)} layers of {onnx_file.name}, {precision})"
    return result.replace(name=name or f"{base.name}_calibrated", engine=result.engine.replace(source=source))


def write_profile(profile: TargetProfile, path: str | Path) -> Path:
    """Write `profile` as the JSON `fxopt.targets.load_target` reads."""
    path = Path(path)
    path.write_text(json.dumps(_jsonable(profile.to_dict()), indent=1) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
