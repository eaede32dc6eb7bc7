"""Int8 post-training quantisation: Q/DQ placed by the target's rules, calibrated on `calib_data`.

Runs last among the transformations: after `prune`/`slim` and after `fold_batchnorm`, so the folded
weights are the ones quantised. It goes annotate → calibrate → transform:

1. annotate: from the target's `QuantScheme`, which tensors get a Q/DQ pair (the activation inputs
   of conv / transposed conv / linear / matmul, and the residual input of an add after a conv)
   and which weights are quantised per output channel; written under
   ``node.meta["fxopt"]["quantize"]``;
2. insert one `FakeQuantize` per such tensor and wrap each weighted op in `WeightFakeQuant`;
3. calibrate: two passes over `calib_data` (range, then a histogram of |x|), then each tensor's
   clipping range from its calibrator (max, percentile, entropy, mse).

The result is a fake-quantised graph: differentiable (straight-through estimator), so it can be
fine-tuned, and exported by the ONNX backend as QuantizeLinear/DequantizeLinear pairs (zero point 0).
"""

from __future__ import annotations

import contextlib
import copy
import operator
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxopt.errors import ExportError, InputError
from fxopt.passes.quant_observers import (
    CALIBRATORS,
    WEIGHT_FAKE_QUANT,
    FakeQuantize,
    RangeObserver,
    WeightFakeQuant,
    observing,
)
from fxopt.passinfra.pass_base import FxoptPass, PassResult, current_context
from fxopt.passinfra.pass_manager import MANIFEST_META, PRECISION_META
from fxopt.passinfra.registry import register_pass
from fxopt.targets.host import INT8_WEIGHT_CHOICES, int8_weights_for
from fxopt.verification.ort_timing import OrtCrashed, isolated_latencies_ms

__all__ = [
    "LayerSensitivity", "QuantAnnotation", "QuantizeInt8", "annotate_int8", "float_graph", "input_views", "int8_tables",
    "qdq_pairs", "quantized_layers", "sensitivity",
]

META_KEY = "quantize"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_MATMUL_FUNCTIONS = {torch.matmul, torch.bmm, operator.matmul}
_MATMUL_METHODS = {"matmul", "bmm"}
_ADD = {operator.add, torch.add, operator.iadd}


@dataclass(frozen=True)
class QuantAnnotation:
    """How one node is quantised.

    Attributes:
        kind: the scheme's op kind (``conv``, ``conv_transpose``, ``linear``, ``matmul``,
            ``residual_add``).
        quantized_inputs: names of the nodes whose output tensors get a Q/DQ pair before it.
        weight: its weight is fake-quantised per output channel.
    """

    kind: str
    quantized_inputs: tuple[str, ...]
    weight: bool


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, _CONV):
        return "conv"
    if isinstance(module, _CONV_T):
        return None if module.groups > 1 else "conv_transpose"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _is_float(node: Any) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(path == p or re.fullmatch(p, path) for p in patterns)


def annotate_int8(gm: GraphModule, scheme: Any, skip: Sequence[str] = ()) -> dict[str, QuantAnnotation]:
    """Which nodes the target's scheme quantises; writes ``node.meta["fxopt"]["quantize"]``.

    Args:
        gm: a traced graph with shapes.
        scheme: the target's `fxopt.targets.QuantScheme`.
        skip: module paths (or regexes) to leave in higher precision.

    Returns:
        node name -> `QuantAnnotation`, in graph order.
    """
    wanted = set(scheme.quantized_ops)
    found: dict[str, QuantAnnotation] = {}
    for node in gm.graph.nodes:
        kind, inputs, weight = None, (), False
        if node.op == "call_module":
            kind = _module_kind(gm.get_submodule(str(node.target)))
            if _matches(str(node.target), skip):
                kind = None
            inputs, weight = node.args[:1], True
        elif (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (node.op == "call_method" and node.target in _MATMUL_METHODS):
            kind, inputs = "matmul", node.args[:2]
        if kind in wanted and all(_is_float(a) for a in inputs):
            found[node.name] = QuantAnnotation(kind, tuple(a.name for a in inputs), weight)
    if scheme.residual_add:
        _annotate_residual_adds(gm, found)
    if getattr(scheme, "quantize_outputs", False):
        _annotate_outputs(gm, found)
    for node in gm.graph.nodes:
        node.meta.setdefault("fxopt", {}).pop(META_KEY, None)
        if node.name in found:
            node.meta["fxopt"][META_KEY] = found[node.name]
    return found


def _annotate_residual_adds(gm: GraphModule, found: dict[str, QuantAnnotation]) -> None:
    """The residual input of each add that follows a quantised conv gets a Q/DQ, so TensorRT fuses
    the add into that conv's epilogue with both operands int8.

    When both inputs are quantised convs (a ResNet block with a downsampling shortcut), the conv on
    the longer path fuses the add and the other one's output is the residual: NVIDIA's ResNet Q/DQ
    example quantises the shortcut (``identity``) the same way. Equal depths: the second input.
    """
    depth: dict[str, int] = {}
    for node in gm.graph.nodes:  # longest path from the inputs, in graph order
        depth[node.name] = 1 + max((depth[a.name] for a in node.all_input_nodes), default=-1)
    for node in gm.graph.nodes:
        if not _is_add(node):
            continue
        args = [a for a in node.args[:2] if isinstance(a, Node)]
        if len(args) != 2 or not all(_is_float(a) for a in args):
            continue
        convs = [a for a in args if a.name in found and found[a.name].kind == "conv"]
        if len(convs) == 1:  # a conv + add: the conv fuses the add; its other input is int8
            residual = args[1] if convs[0] is args[0] else args[0]
        elif len(convs) == 2:  # conv + conv: the deeper conv fuses the add
            residual = args[0] if depth[args[0].name] < depth[args[1].name] else args[1]
        else:
            continue
        found[node.name] = QuantAnnotation("residual_add", (residual.name,), False)


def _annotate_outputs(gm: GraphModule, found: dict[str, QuantAnnotation]) -> None:
    """Quantise the outputs of quantised ops (after the ReLU that follows one) and of adds of
    such outputs, for every user but the graph output: the DQ -> op -> Q a runtime fuses."""
    ops = [n for n in gm.graph.nodes if n.name in found and found[n.name].kind != "residual_add"]
    tensors = []
    for node in ops:
        users = list(node.users)
        tensors.append(users[0] if len(users) == 1 and _is_relu(users[0]) else node)
    quantized = {t.name for t in tensors}
    adds = []
    for node in gm.graph.nodes:
        if _is_add(node) and any(isinstance(a, Node) and (a.name in quantized or _is_relu(a) and a.args[0].name in quantized) for a in node.args[:2]):
            users = list(node.users)
            tensors.append(users[0] if len(users) == 1 and _is_relu(users[0]) else node)
            adds.append(node)
    for tensor in tensors:
        for user in tensor.users:
            if user.op == "output" or not _is_float(tensor):
                continue
            note = found.get(user.name)
            if note is None:
                found[user.name] = QuantAnnotation("output", (tensor.name,), False)
            elif tensor.name not in note.quantized_inputs:
                found[user.name] = QuantAnnotation(note.kind, (*note.quantized_inputs, tensor.name), note.weight)
    # an add whose output is int8 reads int8 on both sides (DQ, DQ -> Add -> Q is ONNX Runtime's
    # QLinearAdd): its other input, a pool's output say, is quantised too
    for add in adds:
        note = found.get(add.name)
        others = tuple(a.name for a in add.args[:2] if isinstance(a, Node) and _is_float(a) and (note is None or a.name not in note.quantized_inputs))
        if others:
            found[add.name] = QuantAnnotation("output", others, False) if note is None else QuantAnnotation(note.kind, (*note.quantized_inputs, *others), note.weight)


_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6}
_NONNEGATIVE_KEEPERS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


def _is_relu(node: Any) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_module":
        return isinstance(node.graph.owning_module.get_submodule(str(node.target)), _RELU_MODULES)
    return (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or (node.op == "call_method" and node.target in ("relu", "relu_"))


def _is_add(node: Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD) or (node.op == "call_method" and node.target in ("add", "add_"))


def nonnegative(node: Any) -> bool:
    """True when `node`'s values are never negative: a ReLU, or a pool/flatten/fake-quant of one."""
    if _is_relu(node):
        return True
    if isinstance(node, Node) and node.op == "call_module" and node.args:
        module = node.graph.owning_module.get_submodule(str(node.target))
        return isinstance(module, (*_NONNEGATIVE_KEEPERS, FakeQuantize)) and nonnegative(node.args[0])
    return False


# ops that only move a tensor's values: a view of a model input is still the model's input data
_MOVE_FUNCTIONS = {torch.permute, torch.reshape, torch.flatten, torch.transpose, torch.squeeze, torch.unsqueeze}
_MOVE_METHODS = {"permute", "reshape", "view", "flatten", "transpose", "squeeze", "unsqueeze", "contiguous"}


_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _pool_of_quantized(gm: GraphModule, node: Node, unsigned_after_relu: bool) -> bool:
    """`node` is a max pool whose input is already fake-quantised with the signedness its own
    quantizer would get: its output lies on that grid, so a second Q/DQ adds nothing.

    For ONNX Runtime this is what lets the pool run in int8 *and* the add after it fuse: with a Q
    after the pool (even at the input's scale) it drops the pool's Q/DQ pair but then leaves the
    add that reads the pool in float (measured on resnet18: 7 of 8 QLinearAdd instead of 8).
    """
    if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), _MAX_POOLS) or not node.args:
        return False
    source = node.args[0]
    if not (isinstance(source, Node) and source.op == "call_module"):
        return False
    module = gm.get_submodule(str(source.target))
    return isinstance(module, FakeQuantize) and module.unsigned == (unsigned_after_relu and nonnegative(node))


def input_views(gm: GraphModule) -> set[str]:
    """The model's inputs and the tensors that only move their values (a permute, a reshape): the
    tensors the ``max`` calibrator covers by default, being bounded data rather than features."""
    names: set[str] = set()
    for node in gm.graph.nodes:
        moves = (node.op == "call_function" and node.target in _MOVE_FUNCTIONS) or (node.op == "call_method" and node.target in _MOVE_METHODS)
        if node.op == "placeholder" or (moves and isinstance(node.args[0], Node) and node.args[0].name in names):
            names.add(node.name)
    return names


@dataclass(frozen=True)
class LayerSensitivity:
    """How much one layer's int8 alone changes the model's outputs on the calibration data.

    Attributes:
        layer: the node name of the quantised op.
        kind: its scheme kind (``conv``, ``linear``, ``matmul``, ``residual_add`` ...).
        error: relative L2 error of all outputs (``||int8 - fp32|| / ||fp32||``).
        metric: the user metric's value, when one was given.
    """

    layer: str
    kind: str
    error: float
    metric: float | None = None


def quantized_layers(gm: GraphModule) -> dict[str, list[nn.Module]]:
    """Each quantised op of a `quantize`d graph -> its quantisers (input `FakeQuantize`s, weight)."""
    layers: dict[str, list[nn.Module]] = {}
    for node in gm.graph.nodes:
        if not isinstance(node.meta.get("fxopt", {}).get(META_KEY), QuantAnnotation):
            continue
        parts = [gm.get_submodule(str(a.target)) for a in node.args if isinstance(a, Node) and a.op == "call_module"]
        if node.op == "call_module":
            parts.append(gm.get_submodule(str(node.target)))
        layers[node.name] = [m for m in parts if isinstance(m, (FakeQuantize, *WEIGHT_FAKE_QUANT))]
    return layers


def _enable(layers: Mapping[str, list[nn.Module]], on: set[str]) -> None:
    # a quantiser shared by two layers (one tensor feeding both) stays on while either is on
    for parts in layers.values():
        for m in parts:
            m.enabled = False
    for name in on:
        for m in layers[name]:
            m.enabled = True


def _outputs(gm: GraphModule, calib: Sequence[tuple[Any, ...]]) -> list[list[torch.Tensor]]:
    from fxopt.verification.numerics import flatten_outputs, run_model

    return [[t.double() for t in flatten_outputs(run_model(gm, batch))] for batch in calib]


def _relative_error(outputs: list[list[torch.Tensor]], reference: list[list[torch.Tensor]]) -> float:
    num = sum(float(((o - r) ** 2).sum()) for out, ref in zip(outputs, reference) for o, r in zip(out, ref))
    den = sum(float((r ** 2).sum()) for ref in reference for r in ref)
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


@contextlib.contextmanager
def _switches_restored(layers: Mapping[str, list[nn.Module]]) -> Iterator[None]:
    """Put every quantiser's on/off switch back as it was when the block ends."""
    state = {id(m): m.enabled for parts in layers.values() for m in parts}
    try:
        yield
    finally:
        for parts in layers.values():
            for m in parts:
                m.enabled = state[id(m)]


def _fp32_outputs(gm: GraphModule, calib: Sequence[tuple[Any, ...]]) -> list[list[torch.Tensor]]:
    layers = quantized_layers(gm)
    with _switches_restored(layers):
        _enable(layers, set())
        return _outputs(gm, calib)


def sensitivity(gm: GraphModule, calib_data: Sequence[tuple[Any, ...]], metric: Any = None) -> list[LayerSensitivity]:
    """Per quantised layer of a `quantize`d graph, the output error with only that layer in int8.

    Args:
        gm: a graph the `quantize` pass produced (e.g. ``compiled.graph_module``).
        calib_data: input batches to measure on.
        metric: optional ``(outputs, reference) -> float`` over the lists of per-batch outputs.

    Returns:
        The layers, most sensitive first. The graph's quantisers are left as they were. A tensor
        feeding two quantised layers has one quantiser, so it counts for both.
    """
    layers = quantized_layers(gm)
    kinds = {n.name: n.meta["fxopt"][META_KEY].kind for n in gm.graph.nodes if n.name in layers}
    reference = _fp32_outputs(gm, calib_data)
    rows = []
    with _switches_restored(layers):
        for name in layers:
            _enable(layers, {name})
            outputs = _outputs(gm, calib_data)
            rows.append(LayerSensitivity(name, kinds[name], _relative_error(outputs, reference), metric(outputs, reference) if metric else None))
    return sorted(rows, key=lambda r: -r.error)


def _ort_latencies_ms(graphs: Mapping[str, nn.Module], inputs: tuple[Any, ...], opset: int, runs: int, threads: int) -> dict[str, float]:
    """Median ONNX Runtime (CPU) latency of each graph on `inputs`: exported, then timed by
    `fxopt.verification.ort_timing.isolated_latencies_ms` (fixed thread count, runs interleaved, in a child process)."""
    from fxopt.backends.onnx import export_onnx

    exports = [export_onnx(gm, inputs, opset=opset) for gm in graphs.values()]  # held while timed (a large model's store)
    return dict(zip(graphs, isolated_latencies_ms([e.model for e in exports], inputs, runs, threads=threads)))


@dataclass(frozen=True)
class _LeftOut:
    """A module call or matmul the scheme did not quantise, with what the reasons read."""

    module: nn.Module | None  # None: a matmul function or method
    kind: str | None  # the scheme kind it would have (`_module_kind`, or "matmul")
    skipped: bool  # named by skip=
    wanted: frozenset[str]
    higher: str

    @staticmethod
    def of(gm: GraphModule, node: Node, wanted: set[str], skip: Sequence[str], higher: str) -> _LeftOut | None:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, (FakeQuantize, *WEIGHT_FAKE_QUANT)):
                return None
            return _LeftOut(module, _module_kind(module), _matches(str(node.target), skip), frozenset(wanted), higher)
        if (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (node.op == "call_method" and node.target in _MATMUL_METHODS):
            return _LeftOut(None, "matmul", False, frozenset(wanted), higher)
        return None


# Why a node stayed in the higher precision: (does this rule hold?, the reason); the first that holds wins.
WHY_NOT_INT8: tuple[tuple[Callable[[_LeftOut], bool], Callable[[_LeftOut], str]], ...] = (
    (lambda c: c.skipped, lambda c: f"skip= keeps it in {c.higher}"),  # skip= -> kept
    (lambda c: isinstance(c.module, _CONV_T) and c.kind is None,  # groups > 1 -> no per-channel weight
     lambda c: "grouped transposed conv: its weight is not per-channel quantisable here"),
    (lambda c: c.kind is not None and c.kind not in c.wanted, lambda c: f"the target's int8 scheme does not quantise {c.kind}"),
    (lambda c: c.kind == "matmul", lambda c: "an operand is not a float tensor"),  # wanted, yet not annotated
    (lambda c: c.kind is not None, lambda c: "an input is not a float tensor"),
    (lambda c: not isinstance(c.module, _NOT_COMPUTE), lambda c: "an opaque module: fxopt does not quantise inside it"),  # a leaf
)


# modules that are not weighted compute: activations, pools, norms and shape ops (no reason owed)
_NOT_COMPUTE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Softmax,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Upsample, nn.Embedding,
)


def float_graph(gm: GraphModule) -> GraphModule:
    """A copy of a `quantize`d graph with the fake quantisation taken out: the same node names and
    shapes, the weighted modules unwrapped (what the cost model and the higher precision see)."""
    twin = copy.deepcopy(gm)
    for node in list(twin.graph.nodes):
        if node.op == "call_module" and isinstance(twin.get_submodule(str(node.target)), FakeQuantize):
            node.replace_all_uses_with(node.args[0])
            twin.graph.erase_node(node)
    for path, module in list(twin.named_modules()):
        if isinstance(module, WEIGHT_FAKE_QUANT):
            twin.set_submodule(path, module.module)
    twin.delete_all_unused_submodules()
    twin.recompile()
    return twin


def float_twin(gm: GraphModule) -> GraphModule | None:
    """`float_graph(gm)` when `gm` holds fake quantisation, else ``None`` (the core's ``float_twin``
    extension: an int8 file's verification measures the quantisation error against it)."""
    return float_graph(gm) if any(isinstance(m, FakeQuantize) for m in gm.modules()) else None


def qdq_pairs(gm: GraphModule) -> dict[str, int]:
    """Q/DQ pairs the ONNX export of a `quantize`d graph holds: activations and weights (enabled ones)."""
    modules = list(gm.modules())
    return {
        "activations": sum(isinstance(m, FakeQuantize) and m.enabled for m in modules),
        "weights": sum(isinstance(m, WEIGHT_FAKE_QUANT) and m.enabled for m in modules),
    }


def int8_tables(gm: GraphModule, target: Any, higher: str, reasons: Mapping[str, str]) -> dict[str, list[dict[str, Any]]]:
    """The report's int8 tables: estimated latency per layer at `higher` and int8 side by side, the
    Q/DQ count and totals, and the weighted layers left in `higher` with the reason."""
    from fxopt.output.report import precision_comparison, precision_layers

    layers = quantized_layers(gm)
    precisions = {name: "int8" for name, parts in layers.items() if parts and all(m.enabled for m in parts)}
    rows = precision_layers(float_graph(gm), target, precisions, reasons, higher)
    name = getattr(target, "name", str(target))
    per_layer = precision_comparison(rows, higher)
    total = per_layer[-1]
    pairs = qdq_pairs(gm)
    ratio = float(total["est. ms as compiled"]) / max(float(total[f"est. ms {higher}"]), 1e-12)
    summary = [
        {"what": "Q/DQ pairs", "value": f"{pairs['activations'] + pairs['weights']} ({pairs['activations']} activations, {pairs['weights']} weights)"},
        {"what": f"layers in int8 / left in {higher}", "value": f"{len(precisions)} / {sum(1 for r in rows if r.reason)}"},
        {"what": f"est. {name} latency, all {higher}", "value": f"{total[f'est. ms {higher}']} ms"},
        {"what": f"est. {name} latency, all int8", "value": f"{total['est. ms int8']} ms"},
        {"what": f"est. {name} latency as compiled", "value": f"{total['est. ms as compiled']} ms ({ratio:.2f}x the all-{higher} estimate)"},
    ]
    left = [{"layer": r.node, "op": r.op, "precision": r.precision, "reason": r.reason} for r in rows if r.reason]
    return {
        "int8 summary": summary,
        f"int8 vs {higher}: estimated {name} latency per layer (cost model)": per_layer,
        f"layers left in {higher}": left,
    }


@register_pass
class QuantizeInt8(FxoptPass):
    """Int8 fake quantisation placed by the target's `QuantScheme` and calibrated on `calib_data`.

    Args:
        calibrator: how an activation's range is chosen from its histogram: ``"max"``,
            ``"percentile"``, ``"entropy"`` (TensorRT's KL search) or ``"mse"`` (the clipping
            point with the least quantise-dequantise error; the default). Not entropy by default,
            although it is TensorRT's: it clips sparse BEV/lidar features at a fraction of their
            range (motionnet's first block at 0.78 of 12.5) and cost motionnet 76 points of
            accuracy and pointpillars 15 of mAP, where MSE stays within 0.2 and matches entropy
            on camera_multitask (bench/results/quantize_models.md).
        percentile: the percentile of ``"percentile"``.
        calibrators: per-tensor overrides, ``{node name or regex: calibrator}``. The model's
            own inputs, and permutes/reshapes of them (`input_views`), use ``"max"`` unless named
            here: they are bounded data (pixels, point features) whose clipping the entropy fit
            cannot judge (on the digits images it clipped at 0.69 of the range and cost 1.8
            points of accuracy; on pointpillars' permuted point features, 0.5 of it).
        skip: module paths (or regexes) kept in higher precision.
        skip_most_sensitive: keep this many layers in higher precision (fp16 on TensorRT, fp32 on
            cpu): the ones whose int8 alone changes the outputs most (see `sensitivity`).
        error_budget: instead, keep the most sensitive layers out until the whole model's relative
            output error on `calib_data` is at most this (e.g. 0.02).
        keep_faster: on a target measured here (``cpu``: ONNX Runtime on this host), keep int8
            only when it is faster; otherwise the pass changes nothing and says why with the
            figures. On such a target the int8 and the fp32 graph are always timed in ONNX Runtime
            on the example inputs and the report gives both medians, whatever this says.
        timing_runs: ONNX Runtime runs per candidate (median, interleaved).
        timing_threads: ONNX Runtime intra-op threads while timing: fixed, because the library's
            default (one per core) makes the comparison swing with the machine's other load.
        int8_weights: the weights' int8 range where the target's scheme leaves it to the host
            (``cpu``): ``"host"`` (default) uses ±127 where this CPU's ONNX Runtime int8 kernels are
            exact (VNNI/AMX) and |q| <= 64 where they would saturate (x86 without VNNI);
            ``"portable"``: |q| <= 64, a file exact on every x86 CPU; ``"full"``: ±127. The compile
            option ``int8_weights=`` sets it too (see `fxopt.targets.host`). TensorRT targets always use ±127.

    Example:
        >>> import torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
        >>> x = torch.randn(1, 3, 16, 16)
        >>> compiled = fxopt.compile(model, "xavier", example_inputs=(x,), precision="int8",
        ...                          calib_data=[(torch.randn(1, 3, 16, 16),) for _ in range(4)])
        >>> sorted({n.op_type for n in compiled.onnx_model.graph.node})
        ['Conv', 'DequantizeLinear', 'QuantizeLinear', 'Relu']
    """

    name = "quantize"
    lossy = True
    stage = "int8"  # its row in compile's summary table: "after int8"
    shares_weights = True  # replaces what it changes, never writes into a weight
    after = ("canonicalize", "prune", "slim", "distill", "fold_batchnorm")
    reads_options = ("calib_data", "int8_weights")

    def __init__(
        self,
        calibrator: str = "mse",
        percentile: float = 99.99,
        calibrators: Mapping[str, str] | None = None,
        skip: Sequence[str] = (),
        skip_most_sensitive: int = 0,
        error_budget: float | None = None,
        keep_faster: bool = True,
        timing_runs: int = 30,
        timing_threads: int = 1,
        int8_weights: str | None = None,
    ) -> None:
        super().__init__()
        if int8_weights is not None and int8_weights not in INT8_WEIGHT_CHOICES:
            raise InputError(f"int8_weights must be one of {INT8_WEIGHT_CHOICES}, got {int8_weights!r}")
        self.int8_weights = int8_weights
        if skip_most_sensitive < 0 or (error_budget is not None and not error_budget > 0):
            raise InputError(f"skip_most_sensitive must be >= 0 and error_budget > 0, got {skip_most_sensitive}, {error_budget}")
        self.skip_most_sensitive = skip_most_sensitive
        self.error_budget = error_budget
        for name in [calibrator, *(calibrators or {}).values()]:
            if name not in CALIBRATORS:
                raise InputError(f"unknown calibrator '{name}'; choose one of {', '.join(CALIBRATORS)}")
        if not 0 < percentile <= 100:
            raise InputError(f"percentile must be in (0, 100], got {percentile}")
        self.calibrator = calibrator
        self.percentile = percentile
        self.calibrators = dict(calibrators or {})
        self.skip = tuple(skip)
        self.keep_faster = keep_faster
        if timing_runs < 1 or timing_threads < 1:
            raise InputError(f"timing_runs and timing_threads must be >= 1, got {timing_runs} and {timing_threads}")
        self.timing_runs = timing_runs
        self.timing_threads = timing_threads
        self.timing: dict[str, float] = {}

    def options(self) -> dict[str, Any]:
        return {
            "calibrator": self.calibrator, "percentile": self.percentile, "calibrators": self.calibrators,
            "skip": list(self.skip), "skip_most_sensitive": self.skip_most_sensitive, "error_budget": self.error_budget,
            "keep_faster": self.keep_faster, "timing_runs": self.timing_runs, "timing_threads": self.timing_threads,
            "int8_weights": self.int8_weights,
        }

    def check_options(self, options: Mapping[str, Any], target: Any = None) -> None:
        """The int8 weight range must suit the target and this host (`fxopt.targets.host.int8_weights_for`)."""
        scheme = getattr(target, "quant_scheme", None)
        if scheme is not None:
            int8_weights_for(scheme.weight_range, options.get("int8_weights") or self.int8_weights)

    def call(self, graph_module: GraphModule) -> PassResult:
        ctx = current_context()
        scheme = ctx.target.quant_scheme
        if scheme is None:
            raise InputError(f"target '{ctx.target.name}' has no int8 scheme (TargetProfile.quant_scheme)")
        calib = ctx.options.get("calib_data")
        if not calib:
            raise InputError("the quantize pass needs calib_data=[(x,), ...] (batches like the example inputs) to calibrate")
        weights = int8_weights_for(scheme.weight_range, ctx.options.get("int8_weights") or self.int8_weights)
        annotations = annotate_int8(graph_module, scheme, self.skip)
        if not annotations:
            self.unchanged_reason = f"no op the '{ctx.target.name}' int8 scheme quantises ({', '.join(scheme.quantized_ops)})"
            return PassResult(graph_module, False)
        original = copy.deepcopy(graph_module) if self._measured(ctx) else None
        quantizers = self._insert(graph_module, annotations, unsigned_after_relu=scheme.unsigned_after_relu,
                                  share_pool_grid=scheme.quantize_outputs, weight_levels=weights.levels)
        graph_module.meta.setdefault(MANIFEST_META, {})["int8_weights"] = weights.to_dict()
        graph_module.meta[PRECISION_META] = "int8"
        graph_module.recompile()
        inputs = input_views(graph_module)
        self._calibrate(graph_module, quantizers, calib, inputs)
        graph_module.meta.setdefault("fxopt_tables", {})["int8 calibration"] = self._table(quantizers, annotations)
        higher = "fp32" if ctx.target.backend == "onnxruntime" else "fp16"
        kept: dict[str, str] = {}
        if self.skip_most_sensitive or self.error_budget is not None:
            graph_module.meta["fxopt_tables"]["int8 sensitivity"] = self._mixed_precision(graph_module, calib, higher, kept)
        int8_report = int8_tables(graph_module, ctx.target, higher, self._why_not_int8(graph_module, scheme, kept, higher))
        int8_report["int8 summary"].append({"what": "int8 weights", "value": weights.why})
        graph_module.meta["fxopt_tables"].update(int8_report)
        if original is not None:
            try:
                self.timing = _ort_latencies_ms(
                    {"fp32": original, "int8": graph_module}, ctx.example_inputs, ctx.target.max_onnx_opset, self.timing_runs, self.timing_threads
                )
            except ExportError as exc:  # the graph itself cannot be lowered: the compile's export says why
                graph_module.meta["fxopt_tables"]["int8 vs fp32 in ONNX Runtime (this host)"] = [
                    {"graph": "not timed", "why": f"the graph does not export to ONNX ({str(exc)[:200]}); int8 kept untimed"}]
                return PassResult(graph_module, True)
            except OrtCrashed as exc:  # ONNX Runtime cannot run one of the files here: ship the one it can
                self.unchanged_reason = f"ONNX Runtime failed on the int8 file ({exc}); kept fp32"
                return PassResult(original, False)
            graph_module.meta["fxopt_tables"]["int8 vs fp32 in ONNX Runtime (this host)"] = [
                {"graph": k, "median ms": f"{v:.4f}", "runs": self.timing_runs, "threads": self.timing_threads} for k, v in self.timing.items()
            ]
            if self.keep_faster and self.timing["int8"] >= self.timing["fp32"]:
                self.unchanged_reason = (
                    f"int8 is not faster on this host: ONNX Runtime median {self.timing['int8']:.3f} ms vs fp32 "
                    f"{self.timing['fp32']:.3f} ms over {self.timing_runs} runs on {self.timing_threads} thread(s); kept fp32 (keep_faster=False forces int8)"
                )
                # the calibration and timing tables explain the choice; the int8 layer tables would describe a graph not kept
                kept_tables = {k: v for k, v in graph_module.meta["fxopt_tables"].items() if k not in int8_report}
                original.meta.setdefault("fxopt_tables", {}).update(kept_tables)
                return PassResult(original, False)
        return PassResult(graph_module, True)

    def _measured(self, ctx: Any) -> bool:
        # only a target that runs here can be measured here
        return ctx.target.backend == "onnxruntime" and bool(ctx.example_inputs)

    def _insert(
        self, gm: GraphModule, annotations: dict[str, QuantAnnotation], unsigned_after_relu: bool = False, share_pool_grid: bool = False,
        weight_levels: int = 127,
    ) -> dict[str, FakeQuantize]:
        nodes = {n.name: n for n in gm.graph.nodes}
        quantizers: dict[str, FakeQuantize] = {}
        inserted: dict[str, Node] = {}
        for name in [n for n in nodes if n in annotations]:  # graph order: a pool's input is quantised before its users ask
            consumer, note = nodes[name], annotations[name]
            for producer_name in note.quantized_inputs:
                if share_pool_grid and _pool_of_quantized(gm, nodes[producer_name], unsigned_after_relu):
                    continue  # already on its input's int8 grid: consumers read the pool (see _pool_of_quantized)
                if producer_name not in inserted:
                    producer = nodes[producer_name]
                    attr = f"fxopt_fq_{producer_name}"
                    quantizers[producer_name] = FakeQuantize(unsigned=unsigned_after_relu and nonnegative(producer))
                    gm.add_submodule(attr, quantizers[producer_name])
                    with gm.graph.inserting_after(producer):
                        inserted[producer_name] = gm.graph.call_module(attr, (producer,))
                    inserted[producer_name].meta["tensor_meta"] = producer.meta.get("tensor_meta")
                consumer.replace_input_with(nodes[producer_name], inserted[producer_name])
            if note.weight:
                path = str(consumer.target)
                module = gm.get_submodule(path)
                if not isinstance(module, WEIGHT_FAKE_QUANT):  # a module called twice is wrapped once
                    gm.set_submodule(path, WeightFakeQuant(module, weight_levels))
        return quantizers

    def _calibrate(self, gm: GraphModule, quantizers: dict[str, FakeQuantize], calib: Sequence[tuple[Any, ...]], inputs: set[str]) -> None:
        observed = {name: (fq, RangeObserver()) for name, fq in quantizers.items()}
        steps = [(what, batch) for what in ("range", "histogram") for batch in calib]
        iterator: Any = steps
        if sys.stderr.isatty() and len(steps) > 8:
            from tqdm.auto import tqdm

            iterator = tqdm(steps, desc="int8 calibration", unit="batch", leave=False)
        with torch.no_grad():
            for what, batch in iterator:
                with observing(observed, what):
                    gm(*[x.detach().clone() if isinstance(x, torch.Tensor) else x for x in batch])
        self.ranges: dict[str, tuple[str, float, float]] = {}
        for name, (fq, obs) in observed.items():
            chosen = self._calibrator_for(name, name in inputs)
            if obs.hist is None or obs.amax <= 0:
                amax = obs.amax
            elif chosen == "percentile":
                amax = CALIBRATORS[chosen](obs.hist, obs.edges, self.percentile)
            else:
                amax = CALIBRATORS[chosen](obs.hist, obs.edges)
            fq.set_amax(amax)
            self.ranges[name] = (chosen, obs.amax, fq.amax)

    def _mixed_precision(self, gm: GraphModule, calib: Sequence[tuple[Any, ...]], higher: str, kept: dict[str, str]) -> list[dict[str, Any]]:
        """Switch the most sensitive layers back to `higher`, recording why in `kept`; the sensitivity table."""
        ranked = sensitivity(gm, calib)
        layers = quantized_layers(gm)
        reference = _fp32_outputs(gm, calib) if self.error_budget is not None else []
        for rank, row in enumerate(ranked, 1):
            if self.error_budget is None and rank > self.skip_most_sensitive:
                break
            if self.error_budget is not None and _relative_error(_outputs(gm, calib), reference) <= self.error_budget:
                break
            kept[row.layer] = f"kept in {higher}: rank {rank} of {len(ranked)} by sensitivity"
            _enable(layers, {name for name in layers if name not in kept})
        return [
            {"layer": r.layer, "kind": r.kind, "output error with only this layer int8": f"{r.error:.3g}", "precision": kept.get(r.layer, "int8")}
            for r in ranked
        ]

    def _why_not_int8(self, gm: GraphModule, scheme: Any, kept: Mapping[str, str], higher: str) -> dict[str, str]:
        """Each conv / linear / matmul / leaf left in `higher`, and why (the first rule of
        `WHY_NOT_INT8` that holds)."""
        reasons = dict(kept)
        for node in gm.graph.nodes:
            if node.name in reasons or isinstance(node.meta.get("fxopt", {}).get(META_KEY), QuantAnnotation):
                continue
            left = _LeftOut.of(gm, node, set(scheme.quantized_ops), self.skip, higher)
            if left is None:
                continue
            reason = next((why(left) for holds, why in WHY_NOT_INT8 if holds(left)), None)
            if reason is not None:
                reasons[node.name] = reason
        return reasons

    def _calibrator_for(self, tensor: str, is_input: bool) -> str:
        default = "max" if is_input else self.calibrator
        return next((c for pattern, c in self.calibrators.items() if _matches(tensor, [pattern])), default)

    def _table(self, quantizers: dict[str, FakeQuantize], annotations: dict[str, QuantAnnotation]) -> list[dict[str, Any]]:
        consumers: dict[str, list[str]] = {}
        for name, note in annotations.items():
            for producer in note.quantized_inputs:
                consumers.setdefault(producer, []).append(f"{name} ({note.kind})")
        return [
            {
                "tensor": name,
                "feeds": ", ".join(consumers.get(name, [])),
                "calibrator": self.ranges[name][0],
                "observed |x| max": f"{self.ranges[name][1]:.4g}",
                "clip at": f"{self.ranges[name][2]:.4g}",
                "scale": f"{float(fq.scale):.4g}",
            }
            for name, fq in quantizers.items()
        ]
