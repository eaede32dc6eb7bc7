"""How a TensorRT engine runs a graph: fused kernels, copy kernels, padded channels, size-dependent efficiency.

`fxopt.costs.cost_model.estimate_costs` calls `engine_kernels` for a target with an `EngineModel`
(`fxopt.targets`): nodes are grouped into the kernels TensorRT would launch, and each kernel is
costed by `kernel_latency_s`. The grouping rules are tables below; the numbers are the target's.
"""

from __future__ import annotations

import contextvars
import itertools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxopt.frontend.inputs import submodule
from fxopt.targets import TargetProfile

__all__ = ["Kernel", "NodeFacts", "dla_kernel_latency_s", "engine_kernels", "kernel_latency_s", "roofline_s", "tensor_metas"]


@dataclass(frozen=True)
class NodeFacts:
    """What the cost model counted for one node, independent of the target (its input here)."""

    kind: str
    flops: int
    params: int


@dataclass(frozen=True)
class Kernel:
    """One kernel of the engine: a head node and the nodes fused into it.

    Attributes:
        head: the node whose op the kernel runs (a conv, a pointwise op, a copy...).
        kind: the op kind whose efficiency applies (``copy`` for transposes, slices, concat).
        fused: the nodes that run inside the head's kernel (BatchNorm, activation, residual add,
            further pointwise ops); they cost nothing of their own.
        flops: the kernel's FLOPs, on channels padded to the target's alignment.
        elements: elements read and written: external inputs, weights, the last node's output.
        size: output elements of the head (its parallel work).
        depth: reduction depth of the head (input channels x kernel area; 1 for non-products).
    """

    head: str
    kind: str
    fused: tuple[str, ...]
    flops: int
    elements: int
    size: int
    depth: int


def tensor_metas(value: object) -> Iterable[object]:
    """The tensor metadata in a node's ``tensor_meta``: one, or a (nested) tuple/list/dict of them."""
    if value is None:
        return
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensor_metas(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensor_metas(v)


# Within one `engine_kernels` call the graph does not change: its submodules and node sizes are looked up once.
_LOOKUPS: contextvars.ContextVar[dict[Any, Any] | None] = contextvars.ContextVar("fxopt_engine_lookups", default=None)


def _metas(node: object) -> list[object]:
    return list(tensor_metas(node.meta.get("tensor_meta"))) if isinstance(node, Node) else []


def _numel(node: object) -> int:
    cache = _LOOKUPS.get()
    if cache is None or not isinstance(node, Node):
        return sum(math.prod(m.shape) for m in _metas(node))
    key = ("numel", node)
    if key not in cache:
        cache[key] = sum(math.prod(m.shape) for m in _metas(node))
    return cache[key]


def _single_tensor(node: object) -> tuple[int, ...] | None:
    metas = _metas(node)
    return tuple(metas[0].shape) if len(metas) == 1 and node.meta.get("tensor_meta") is metas[0] else None


# TensorRT's layer fusions (TensorRT 8.5 Developer Guide, "Types of Fusions"; today's "Layer Fusion Catalog",
# docs.nvidia.com/deeplearning/tensorrt/latest/performance/fusion-catalog.html), the rows this model follows:
#   Convolution and ReLU/GELU/Clip Activation; Scale and Activation              -> "act": a unary pointwise op
#   Convolution and Scale (a BatchNorm folded into the weights)                  -> "bn"
#   Convolution and ElementWise Operation (a sum without broadcasting)           -> "residual"
#   PointWise Fusion (adjacent Activation, ElementWise, Unary, uniform Scale)    -> "pointwise": any pointwise op
#   Convolution and Generic Activation (after PointWise Fusion: a pointwise
#     subgraph with one input and one output, e.g. x * sigmoid(x) as two nodes)  -> "generic"
# No row fuses Pooling, Reduce, Resize or SoftMax into a conv or a pointwise kernel: they run as their own kernels.
# Per op kind whose kernel takes fused nodes, the epilogues it takes:
_EPILOGUES: Mapping[str, frozenset[str]] = {
    "conv": frozenset({"bn", "act", "residual", "generic"}),  # conv + BN + bias + ReLU + add -> one kernel
    "conv_depthwise": frozenset({"bn", "act", "residual", "generic"}),
    "conv_transpose": frozenset({"bn", "act", "residual", "generic"}),
    "linear": frozenset({"bn", "act", "residual", "generic"}),  # FC + bias + activation -> one kernel (a 1x1 conv)
    "matmul": frozenset({"act"}),                        # matmul + scale/activation
    "elementwise": frozenset({"bn", "act", "residual", "pointwise", "generic"}),  # a -> b -> c pointwise -> one kernel
    "norm": frozenset({"act"}),                          # scale + activation
}
_GENERIC_LIMIT = 8  # nodes in one generic activation: a fused PointWise layer's size is limited (the guide)
# shape-keeping ops that are no Activation/ElementWise/Unary layer (SoftMax is its own layer)
_NOT_POINTWISE_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.Upsample, nn.Embedding)
_NOT_POINTWISE = {torch.softmax, torch.log_softmax, torch.nn.functional.softmax, torch.nn.functional.log_softmax,
                  torch.nn.functional.interpolate, torch.nn.functional.normalize, torch.cumsum, torch.roll, torch.flip,
                  "softmax", "log_softmax", "cumsum", "roll", "flip"}
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)

# nodes TensorRT runs as copy kernels, when the target says so
_TRANSPOSE_FUNCTIONS = {torch.permute, torch.transpose, torch.t}
_TRANSPOSE_METHODS = {"permute", "transpose", "t"}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.narrow, torch.unbind}
_SPLIT_METHODS = {"chunk", "split", "narrow", "unbind", "repeat"}
_CONCAT_FUNCTIONS = {torch.cat, torch.stack, torch.concat}
_MATMULS = {torch.matmul, operator.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm"}
_CONV_FUNCTIONS = {torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d}


def _is_qdq(mod: nn.Module) -> bool:
    # explicit-quantisation Q/DQ pairs: TensorRT folds them into the kernels around them
    from torch.ao.quantization import FakeQuantizeBase

    return isinstance(mod, FakeQuantizeBase) or type(mod).__name__ == "FakeQuantize"


def _copy_elements(node: Node) -> int | None:
    """Elements a copy kernel reads and writes for `node`; None if it is not a copy."""
    fn = node.target if node.op == "call_function" else None
    method = node.target if node.op == "call_method" else None
    if fn in _TRANSPOSE_FUNCTIONS or method in _TRANSPOSE_METHODS:
        # a transpose feeding only matrix products is folded into them (a transposed operand)
        if node.users and all(u.target in _MATMULS for u in node.users):
            return None
        return 2 * _numel(node)
    if fn in _SPLIT_FUNCTIONS or method in _SPLIT_METHODS:
        return 2 * _numel(node)
    if fn in _CONCAT_FUNCTIONS:
        return 2 * _numel(node)
    if fn is operator.getitem and _single_tensor(node.args[0]) is not None:
        return 2 * _numel(node)  # a slice of a tensor (not an item of a tuple)
    return None


def _module(gm: GraphModule, node: Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    cache = _LOOKUPS.get()
    if cache is None:
        return submodule(gm, str(node.target))
    modules = cache.get(("modules", id(gm)))
    if modules is None:
        modules = cache[("modules", id(gm))] = dict(gm.named_modules(remove_duplicate=False))
    return modules[str(node.target)]


def _inner(mod: nn.Module | None) -> nn.Module | None:
    # a weight-quantising wrapper (``.module``) computes as the layer it wraps
    inner = getattr(mod, "module", None)
    return inner if isinstance(inner, (nn.modules.conv._ConvNd, nn.Linear)) else mod


def _padded(c: int, align: int) -> int:
    # a 3-channel stem runs on the 8-channel formats, wider layers on the full alignment
    a = align if c >= align else min(align, 8)
    return -(-c // a) * a


_WINOGRAD = 16 / 36  # F(2x2, 3x3): 16 multiplies per 2x2 output tile where a direct 3x3 conv does 36


def _winograd(mod: nn.Module) -> bool:
    return (isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3) and mod.stride == (1, 1)
            and mod.dilation == (1, 1) and mod.groups == 1)


def _shape_facts(gm: GraphModule, node: Node, align: int, pad: bool, winograd: bool) -> tuple[float, int]:
    """(FLOP factor of padding the channels and of Winograd, reduction depth) of a product node."""
    mod = _inner(_module(gm, node))
    if isinstance(mod, nn.modules.conv._ConvNd):
        cin, cout, groups = mod.in_channels, mod.out_channels, mod.groups
        depth = cin // groups * math.prod(mod.kernel_size)
        transform = _WINOGRAD if winograd and _winograd(mod) else 1.0
        if not pad or groups > 1:
            return transform, depth
        return transform * _padded(cin, align) / cin * _padded(cout, align) / cout, depth
    if isinstance(mod, nn.Linear):
        factor = _padded(mod.in_features, align) / mod.in_features * _padded(mod.out_features, align) / mod.out_features
        return (factor if pad else 1.0), mod.in_features
    a = _single_tensor(node.args[0]) if node.args else None
    if node.target in _MATMULS and a:
        return 1.0, a[-1]
    if node.target is torch.nn.functional.linear and len(node.args) > 1:
        w = _single_tensor(node.args[1])
        return 1.0, (w[-1] if w else 1)
    if node.target in _CONV_FUNCTIONS and len(node.args) > 1:
        w = _single_tensor(node.args[1])  # (out, in / groups, *kernel): the depth is all but the first
        return 1.0, (math.prod(w[1:]) if w else 1)
    return 1.0, 1


def _pointwise(gm: GraphModule, node: Node, facts: NodeFacts) -> bool:
    """An Activation, ElementWise or Unary layer: an elementwise node whose output has its inputs' broadcast shape."""
    if facts.kind != "elementwise" or node.op not in ("call_module", "call_function", "call_method"):
        return False
    mod = _module(gm, node)
    if mod is not None and (isinstance(mod, _NOT_POINTWISE_MODULES) or _is_qdq(mod) or any(True for _ in mod.parameters())):
        return False
    if mod is None and node.target in _NOT_POINTWISE:
        return False
    out = _single_tensor(node)
    shapes = [_single_tensor(a) for a in node.all_input_nodes]
    if out is None or not shapes or any(s is None for s in shapes):
        return False
    return _broadcast(shapes) == out  # a pool, resize or reduction changes the shape


def _broadcast(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The broadcast of static shapes (`torch.broadcast_shapes`'s result, without its symbolic-shape
    machinery: a tenth of its time), or None where they do not broadcast."""
    out: list[int] = []
    for dims in itertools.zip_longest(*(reversed(s) for s in shapes), fillvalue=1):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(reversed(out))


def _epilogue(gm: GraphModule, node: Node, facts: NodeFacts, producer: Node) -> str | None:
    """Which epilogue `node` would be when fused after `producer`; None if it cannot fuse."""
    mod = _module(gm, node)
    if isinstance(mod, _BATCHNORMS):
        return "bn"
    if not _pointwise(gm, node, facts):
        return None
    others = [a for a in node.all_input_nodes if a is not producer and a.op != "get_attr"]
    if not others:
        return "act"
    if len(others) == 1 and node.target in _ADDS and _single_tensor(others[0]) == _single_tensor(node):
        return "residual"
    return "pointwise"


def engine_kernels(gm: GraphModule, facts: Mapping[str, NodeFacts], profile: TargetProfile, precision: str) -> list[Kernel]:
    """Group the nodes of `gm` into the kernels the target's engine would launch.

    Args:
        gm: a graph module with propagated shapes.
        facts: per node name, its kind, FLOPs and parameters (from `fxopt.costs.cost_model`).
        profile: a target with an `EngineModel`.
        precision: the precision the engine runs.

    Returns:
        The kernels in graph order; a node in no kernel (a view, a Q/DQ pair, a placeholder)
        costs nothing.
    """
    token = _LOOKUPS.set({})
    try:
        return _engine_kernels(gm, facts, profile, precision)
    finally:
        _LOOKUPS.reset(token)


def _engine_kernels(gm: GraphModule, facts: Mapping[str, NodeFacts], profile: TargetProfile, precision: str) -> list[Kernel]:
    engine = profile.engine
    assert engine is not None, "engine_kernels needs a target with an EngineModel"
    align = profile.alignment(precision)
    open_kernels: dict[str, dict] = {}  # tail node name -> the kernel it ends
    planned: dict[str, tuple[dict, str]] = {}  # node of a generic activation -> (its kernel, the kernel's tail before it)
    kernels: list[dict] = []
    for node in gm.graph.nodes:
        f = facts[node.name]
        mod = _module(gm, node)
        if mod is not None and _is_qdq(mod):
            continue
        copied = _copy_elements(node) if engine.copies_are_kernels else None
        if copied is not None:
            kernels.append(dict(head=node.name, kind="copy", fused=[], flops=0, elements=copied, size=_numel(node), depth=1, done=True))
            continue
        if f.kind == "view" or node.op in ("placeholder", "output", "get_attr"):
            continue
        if engine.fuse_epilogues and _fuse(gm, node, f, facts, open_kernels, planned):
            continue
        factor, depth = _shape_facts(gm, node, align, engine.pad_channels, precision in engine.winograd_precisions)
        inputs = sum(_numel(a) for a in node.all_input_nodes if a.op != "get_attr")
        kernel = dict(head=node.name, kind=f.kind, fused=[], flops=round(f.flops * factor), size=_numel(node), depth=depth,
                      elements=inputs + f.params + _numel(node), residual=False, out=_numel(node))
        kernels.append(kernel)
        open_kernels[node.name] = kernel
    return [Kernel(k["head"], k["kind"], tuple(k["fused"]), k["flops"], k["elements"], k["size"], k["depth"]) for k in kernels]


def _generic_activation(gm: GraphModule, facts: Mapping[str, NodeFacts], tail: Node) -> list[Node] | None:
    """The pointwise nodes after `tail` (a tensor with several users) that read only `tail` and constants and end
    in one node of `tail`'s shape: one generic activation (``x * sigmoid(x)``, ``x * relu6(x + 3) / 6``); else None."""
    region: list[Node] = []
    inside = {tail}
    best = None
    node = tail.next
    for _ in range(8 * _GENERIC_LIMIT):  # the nodes that follow, in graph order
        if node.op == "root" or len(region) == _GENERIC_LIMIT:
            break
        reads = node.all_input_nodes
        if any(a in inside for a in reads):
            if not (_pointwise(gm, node, facts[node.name]) and all(a in inside or a.op == "get_attr" for a in reads)):
                break  # a reader that cannot join: the activation, if any, has ended
            region.append(node)
            inside.add(node)
            leaving = [n for n in (tail, *region) if any(u not in inside for u in n.users)]
            if len(region) > 1 and leaving == [node] and _single_tensor(node) == _single_tensor(tail):
                best = list(region)  # one input, one output: complete here (it may grow further)
        node = node.next
    return best


def _absorb(kernel: dict, node: Node, f: NodeFacts, producer: Node | None, ends: bool) -> None:
    """Account `node` inside `kernel`: its other inputs and weights are read; if it `ends` the kernel, its output is written."""
    inside = {kernel["head"], *kernel["fused"]}  # tensors the kernel computes: not read from memory
    others = sum(_numel(a) for a in node.all_input_nodes if a is not producer and a.op != "get_attr" and a.name not in inside)
    kernel["elements"] += others + f.params
    if ends:
        kernel["elements"] += _numel(node) - kernel["out"]
        kernel["out"] = _numel(node)
        kernel["size"] = max(kernel["size"], _numel(node))  # the parallel work is the widest tensor the kernel writes
    kernel["flops"] += f.flops if kernel["kind"] == "elementwise" else 0  # epilogues ride free on a product
    kernel["fused"].append(node.name)


def _fuse(gm: GraphModule, node: Node, f: NodeFacts, facts: Mapping[str, NodeFacts], open_kernels: dict[str, dict],
          planned: dict[str, tuple[dict, str]]) -> bool:
    """Fuse `node` into the open kernel of one of its inputs if the rules allow; True if it did."""
    if node.name in planned:  # a node of a generic activation found at its first node
        kernel, tail = planned.pop(node.name)
        sink = kernel["generic_sink"]
        _absorb(kernel, node, f, None, ends=node.name == sink)
        if node.name == sink:
            del open_kernels[tail]
            open_kernels[node.name] = kernel
        return True
    for producer in [a for a in node.all_input_nodes if a.name in open_kernels and len(a.users) > 1]:
        kernel = open_kernels[producer.name]
        if "generic" not in _EPILOGUES.get(kernel["kind"], frozenset()):
            continue
        region = _generic_activation(gm, facts, producer)
        if region is None or node not in region:
            continue
        kernel["generic_sink"] = region[-1].name
        planned.update({n.name: (kernel, producer.name) for n in region})
        return _fuse(gm, node, f, facts, open_kernels, planned)
    candidates = [a for a in node.all_input_nodes if a.name in open_kernels and len(a.users) == 1]
    for producer in reversed(candidates):  # the most recent producer takes the residual
        kernel = open_kernels[producer.name]
        epilogue = _epilogue(gm, node, f, producer)
        allowed = _EPILOGUES.get(kernel["kind"], frozenset())
        if epilogue is None or epilogue not in allowed or (epilogue == "residual" and kernel["residual"]):
            continue
        if epilogue == "bn" and kernel["fused"] and kernel["kind"] != "elementwise":
            continue  # a BatchNorm folds into the weights only right after the conv
        _absorb(kernel, node, f, producer, ends=True)
        kernel["residual"] = kernel["residual"] or epilogue == "residual"
        del open_kernels[producer.name]
        open_kernels[node.name] = kernel
        return True
    return False


def kernel_latency_s(
    profile: TargetProfile, precision: str, kind: object, flops: object, nbytes: object, size: object, depth: object
) -> object:
    """Estimated time of one kernel (or, given numpy arrays, of many): the slower of compute at the
    kind's size-dependent efficiency and memory traffic at the reachable bandwidth, plus a launch.

    Example:
        >>> from fxopt.targets import get_target
        >>> xavier = get_target("xavier")
        >>> big = kernel_latency_s(xavier, "fp16", "conv", 2e9, 4e6, 1e6, 1152)
        >>> small = kernel_latency_s(xavier, "fp16", "conv", 2e7, 4e4, 1e4, 1152)
        >>> bool(big / 2e9 < small / 2e7)  # FLOP for FLOP, the big layer runs faster
        True
    """
    engine = profile.engine
    assert engine is not None, "kernel_latency_s needs a target with an EngineModel"
    kinds = np.asarray(kind)
    if kinds.ndim == 0:
        eff = profile.efficiency(str(kind)) * engine.size_factor(str(kind), float(size), float(depth))
    else:
        eff = np.array([profile.efficiency(k) * engine.size_factor(k, s, d) for k, s, d in zip(kinds, np.asarray(size), np.asarray(depth))])
    eff = eff * engine.precision_efficiency.get(precision, 1.0)
    work = np.asarray(flops, dtype=float)
    rate = np.asarray(profile.peak_ops_per_s[precision] * eff, dtype=float)
    compute = np.divide(work, rate, out=np.zeros(np.broadcast(work, rate).shape), where=work > 0)
    memory = np.asarray(nbytes, dtype=float) / (profile.memory_bandwidth_bytes_per_s * engine.bandwidth_efficiency)
    out = np.maximum(compute, memory) + profile.launch_overhead_s
    return float(out) if kinds.ndim == 0 else out


def dla_kernel_latency_s(profile: TargetProfile, precision: str, flops: float, nbytes: float) -> float:
    """Estimated time of one layer on one DLA core (`TargetProfile.dla`): the slower of its FLOPs at the
    core's reachable peak and its bytes at the reachable bandwidth, plus the per-layer cost.

    Example:
        >>> from fxopt.targets import get_target
        >>> xavier = get_target("xavier")
        >>> dla, gpu = dla_kernel_latency_s(xavier, "fp16", 2e9, 4e6), kernel_latency_s(xavier, "fp16", "conv", 2e9, 4e6, 1e6, 1152)
        >>> bool(dla > gpu)  # one DLA core is slower than the GPU on a large conv
        True
    """
    dla = profile.dla
    assert dla is not None, "dla_kernel_latency_s needs a target with a DlaModel"
    peak = profile.dla_peak_ops_per_s[precision] * dla.efficiency[precision]
    compute = flops / peak if flops > 0 else 0.0
    memory = nbytes / (profile.memory_bandwidth_bytes_per_s * dla.bandwidth_efficiency)
    return max(compute, memory) + dla.layer_overhead_s


def roofline_s(profile: TargetProfile, precision: str, flops: float, nbytes: float) -> float:
    """The lower bound: compute at peak throughput or memory at full bandwidth, whichever is slower."""
    if flops == 0 and nbytes == 0:
        return 0.0
    return max(flops / profile.peak_ops_per_s[precision], nbytes / profile.memory_bandwidth_bytes_per_s)
