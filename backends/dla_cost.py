"""Estimated time of a GPU/DLA placement: the ONNX graph's layers costed on the device each runs on.

`placement_times` groups the ONNX nodes into the layers TensorRT would run (a conv with its
BatchNorm, activation and one add; consecutive pointwise ops; copies; free views), costs each on
the GPU (`fxopt.costs.engine_cost.kernel_latency_s`) or on one DLA core (`dla_kernel_latency_s`), and adds
a reformat and a hand-over at every DLA<->GPU switch. It compares three placements: the GPU alone,
DLA core 0 with GPU fallback for what DLA cannot run, and the best split (DLA runs the graph up to a
point, the GPU the rest).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import onnx

from fxopt.costs.engine_cost import dla_kernel_latency_s, kernel_latency_s
from fxopt.targets import BYTES_PER_ELEMENT, TargetProfile

__all__ = ["Layer", "PlacementTimes", "onnx_layers", "placement_times"]

_PRODUCTS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# pointwise ops that fuse into the layer before them (TensorRT's conv/pointwise fusions)
_EPILOGUES = {"BatchNormalization", "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish",
              "Add", "Mul", "Sub", "Div"}
_COPIES = {"Concat", "Slice", "Split", "Transpose", "Tile", "Pad"}
_VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Constant", "Gather", "Cast",
          "QuantizeLinear", "DequantizeLinear", "Dropout"}
_POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean"}


@dataclass(frozen=True)
class Layer:
    """One layer of the engine: a head ONNX node and the nodes fused into it, with what it costs."""

    head: str
    nodes: tuple[str, ...]
    kind: str
    flops: float
    elements: float
    size: float
    depth: float
    out_elements: float


@dataclass(frozen=True)
class PlacementTimes:
    """Estimated engine times (seconds) of the GPU alone, DLA0 with GPU fallback, and the best split.

    Attributes:
        gpu_only_s: the whole graph on the GPU.
        dla_s: DLA core 0 with GPU fallback, as `dla_placement` predicts, end to end.
        dla_gpu_busy_s: of `dla_s`, the time the GPU is busy (fallback layers and reformats).
        split_s: the best split: DLA runs the layers up to `split_after` (GPU fallback inside), the GPU the rest.
        split_gpu_busy_s: of `split_s`, the GPU's part.
        split_after: the head node of the last layer the split runs on DLA ("" when no split frees GPU time).
        switches: DLA<->GPU switches of the DLA placement.
        layer_s: per layer head, (GPU time, DLA time or None where DLA cannot run it).
    """

    gpu_only_s: float
    dla_s: float
    dla_gpu_busy_s: float
    split_s: float
    split_gpu_busy_s: float
    split_after: str
    switches: int
    layer_s: Mapping[str, tuple[float, float | None]]


def _numel(shapes: Mapping[str, list[int]], name: str) -> float:
    return float(math.prod(shapes[name])) if name in shapes else 0.0


def _product_facts(node: onnx.NodeProto, shapes: Mapping[str, list[int]], inits: Mapping[str, tuple[int, ...]]) -> tuple[str, float, float]:
    """(kind, FLOPs, reduction depth) of a Conv / ConvTranspose / Gemm / MatMul; `inits`: the initializers' shapes."""
    out = _numel(shapes, node.output[0])
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    wshape = list(w) if w is not None else shapes.get(node.input[1], [])
    if node.op_type in ("Conv", "ConvTranspose") and len(wshape) >= 3:
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        area = math.prod(wshape[2:])
        if node.op_type == "ConvTranspose":
            depth = wshape[0] * area
            return "conv_transpose", 2.0 * _numel(shapes, node.input[0]) * wshape[1] * area, depth
        depth = wshape[1] * area
        kind = "conv_depthwise" if groups > 1 and wshape[1] == 1 else "conv"
        return kind, 2.0 * out * depth, depth
    depth = float(wshape[0] if node.op_type == "Gemm" and wshape else (shapes.get(node.input[0]) or [1])[-1])
    return ("linear" if node.op_type == "Gemm" else "matmul"), 2.0 * out * depth, depth


def onnx_layers(model: onnx.ModelProto, shapes: Mapping[str, list[int]], device: Mapping[str, str] | None = None) -> list[Layer]:
    """Group the ONNX nodes into engine layers; a node fuses only into a layer on its own device."""
    device = device or {}
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}  # shapes only: no weight is read
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    open_layers: dict[str, dict] = {}  # output tensor -> the layer it ends
    layers: list[dict] = []
    for node in model.graph.node:
        op = node.op_type
        if op in _VIEWS:
            continue
        outs = sum(_numel(shapes, o) for o in node.output)
        ins = sum(_numel(shapes, i) for i in node.input if i not in inits)
        producer = next((open_layers[i] for i in node.input if i in open_layers and consumers.get(i) == 1), None)
        if (op in _EPILOGUES and producer is not None and device.get(producer["head"]) == device.get(node.name)
                and not (op in ("Add", "Sub", "Mul", "Div") and producer["residual"] and producer["kind"] != "elementwise")):
            others = ins - _numel(shapes, next(i for i in node.input if open_layers.get(i) is producer))
            producer["elements"] += others + outs - producer["out"]
            producer["out"] = outs
            producer["nodes"].append(node.name)
            producer["flops"] += outs if producer["kind"] == "elementwise" else 0.0
            producer["residual"] = producer["residual"] or (op in ("Add", "Sub", "Mul", "Div") and others > 0)
            for o in node.output:
                open_layers[o] = producer
            continue
        if op in _PRODUCTS:
            kind, flops, depth = _product_facts(node, shapes, inits)
            params = sum(float(math.prod(inits[i])) for i in node.input if i in inits)
            layer = dict(kind=kind, flops=flops, depth=depth, elements=ins + outs + params)
        elif op in _COPIES:
            layer = dict(kind="copy", flops=0.0, depth=1.0, elements=2 * outs)
        elif op in _POOLS:
            layer = dict(kind="pool", flops=ins, depth=1.0, elements=ins + outs)
        else:
            layer = dict(kind="elementwise", flops=outs, depth=1.0, elements=ins + outs)
        layer.update(head=node.name, nodes=[node.name], size=outs, out=outs, residual=False)
        layers.append(layer)
        for o in node.output:
            open_layers[o] = layer
    return [Layer(k["head"], tuple(k["nodes"]), k["kind"], k["flops"], k["elements"], k["size"], k["depth"], k["out"]) for k in layers]


def _switch_s(profile: TargetProfile, precision: str, elements: float) -> tuple[float, float]:
    """(time, GPU-busy part) of a DLA<->GPU switch: a GPU reformat copy of the tensor that crosses, plus the
    hand-over between the engines, during which the GPU waits rather than works."""
    width = BYTES_PER_ELEMENT[precision]
    copy = float(kernel_latency_s(profile, precision, "copy", 0.0, 2 * elements * width, elements, 1.0))
    return copy + profile.dla.transition_s, copy


def _run_s(profile: TargetProfile, precision: str, layers: Sequence[Layer], on_dla: Sequence[bool],
           gpu_s: Sequence[float], dla_s: Sequence[float | None]) -> tuple[float, float]:
    """(end-to-end, GPU-busy) seconds of the layers on the devices given."""
    total = busy = profile.engine.inference_overhead_s if profile.engine else 0.0
    previous = False  # the input arrives from the GPU side
    for layer, dla, g, d in zip(layers, on_dla, gpu_s, dla_s):
        if dla != previous:
            switch, copy = _switch_s(profile, precision, layer.elements - layer.out_elements)
            total, busy = total + switch, busy + copy
        total += d if dla else g
        busy += 0.0 if dla else g
        previous = dla
    if previous:  # the output goes back to the GPU side
        switch, copy = _switch_s(profile, precision, layers[-1].out_elements)
        total, busy = total + switch, busy + copy
    return total, busy


def _split_runs(profile: TargetProfile, precision: str, layers: Sequence[Layer], on_dla: Sequence[bool],
                gpu_s: Sequence[float], dla_s: Sequence[float | None]) -> Iterator[tuple[int, float, float]]:
    """(i, end-to-end, GPU-busy) seconds of every split at a DLA layer i: `on_dla` up to layer i, the GPU
    after it; what `_run_s` gives for each such mask, in one pass over the layers instead of one per split."""
    n = len(layers)
    after = [0.0] * (n + 1)  # GPU seconds of layers i.. n-1
    for j in range(n - 1, -1, -1):
        after[j] = after[j + 1] + gpu_s[j]
    total = busy = profile.engine.inference_overhead_s if profile.engine else 0.0
    previous = False
    for i, (layer, dla) in enumerate(zip(layers, on_dla)):
        if dla != previous:
            switch, copy = _switch_s(profile, precision, layer.elements - layer.out_elements)
            total, busy = total + switch, busy + copy
        total += dla_s[i] if dla else gpu_s[i]
        busy += 0.0 if dla else gpu_s[i]
        previous = dla
        if dla:  # back to the GPU: into layer i + 1, or with the output
            crossing = layers[i + 1].elements - layers[i + 1].out_elements if i + 1 < n else layer.out_elements
            switch, copy = _switch_s(profile, precision, crossing)
            yield i, total + switch + after[i + 1], busy + copy + after[i + 1]


def placement_times(model: onnx.ModelProto, devices: Mapping[str, str], shapes: Mapping[str, list[int]],
                    profile: TargetProfile, precision: str) -> PlacementTimes | None:
    """Estimated times of the GPU alone, DLA0 with fallback (`devices`: ONNX node -> "DLA"/"GPU") and the best split.

    Returns:
        `PlacementTimes`, or ``None`` when the target has no DLA or engine latency model or DLA does
        not run `precision`.
    """
    if profile.dla is None or profile.engine is None or precision not in profile.dla.efficiency:
        return None
    width = BYTES_PER_ELEMENT[precision]
    gpu_layers = onnx_layers(model, shapes)
    dla_layers = onnx_layers(model, shapes, devices)

    def gpu_time(layer: Layer) -> float:
        return float(kernel_latency_s(profile, precision, layer.kind, layer.flops, layer.elements * width, layer.size, layer.depth))

    gpu_only = (profile.engine.inference_overhead_s + sum(gpu_time(k) for k in gpu_layers))
    on_dla = [devices.get(k.head) == "DLA" for k in dla_layers]
    g = [gpu_time(k) for k in dla_layers]
    d = [dla_kernel_latency_s(profile, precision, k.flops, k.elements * width) if dla else None for k, dla in zip(dla_layers, on_dla)]
    dla_total, dla_busy = _run_s(profile, precision, dla_layers, on_dla, g, d)
    # splits: DLA (with fallback) up to layer i, the GPU after it; the best frees the most GPU time per ms of latency added
    best = (gpu_only, gpu_only, "")
    best_score = 0.0
    for i, total, busy in _split_runs(profile, precision, dla_layers, on_dla, g, d):
        freed, added = gpu_only - busy, max(total - gpu_only, 1e-9)
        if freed > 0 and freed / added > best_score:
            best_score, best = freed / added, (total, busy, dla_layers[i].head)
    switches = sum(1 for a, b in zip(on_dla, on_dla[1:]) if a != b)
    layer_s = {k.head: (gk, dk) for k, gk, dk in zip(dla_layers, g, d)}
    return PlacementTimes(gpu_only, dla_total, dla_busy, best[0], best[1], best[2], switches, layer_s)
