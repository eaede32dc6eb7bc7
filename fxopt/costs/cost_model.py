"""Per-node cost model: parameters, FLOPs (2 x MACs), bytes moved and a roofline latency estimate.

Costs are computed from the shapes ShapeProp records (`node.meta["tensor_meta"]`) and written
under `node.meta["fxopt"]["cost"]` as frozen `NodeCost`s.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxopt.costs.engine_cost import (
    NodeFacts,
    engine_kernels,
    kernel_latency_s,
    roofline_s,
    tensor_metas,
)
from fxopt.costs.leaf_cost import measure_module, measure_on_values
from fxopt.errors import InputError
from fxopt.frontend.inputs import submodule
from fxopt.targets import BYTES_PER_ELEMENT, TargetProfile, get_target

__all__ = ["NodeCost", "CostSummary", "estimate_costs", "node_op_counts", "tensor_numels"]


@dataclass(frozen=True)
class NodeCost:
    """The cost of one graph node on one target.

    Attributes:
        kind: op family used for the efficiency table (``conv``, ``linear``, ``elementwise``...);
            ``view`` costs nothing; ``leaf`` is a module fxopt has no formula for (an opaque
            leaf, an unknown layer), costed by running it under a FLOP counter (see
            `fxopt.costs.leaf_cost.measure_module`); ``unknown`` means it could not be costed.
        params: parameters the node owns (a module's, or a `get_attr` tensor's).
        flops: floating-point operations, counted as 2 x multiply-accumulates for conv,
            linear and matmul (plus one per bias add), and one per output element for
            elementwise ops.
        bytes: bytes read and written (inputs + outputs + weights) at the target precision.
        latency_s: estimated time on the target: for a target with an `EngineModel` (TensorRT),
            the time of the kernel this node heads (0 for a node fused into another's kernel,
            see `fused_into`); otherwise the node's own max(compute time at the op's efficiency,
            memory time) + launch overhead.
        matmul_flops: the part of `flops` that is 2 x MACs of conv, linear, matmul and
            attention products, bias adds left out: what `torch.utils.flop_counter.FlopCounterMode`
            counts, so the two can be compared.
        uncosted: why the node could not be costed ("" when it was); its `flops` are then 0
            and every total that includes it is a lower bound.
        roofline_s: the lower bound for the same work: its FLOPs at peak throughput or its
            bytes at full bandwidth, whichever is slower, with no launch or efficiency loss.
        fused_into: the node whose kernel runs this one ("" when it heads its own or is free).
    """

    kind: str
    params: int
    flops: int
    bytes: int
    latency_s: float
    matmul_flops: int = 0
    uncosted: str = ""
    roofline_s: float = 0.0
    fused_into: str = ""


@dataclass(frozen=True)
class CostSummary:
    """Whole-graph totals and the per-node costs they sum.

    `uncosted` maps each node that could not be costed to the reason; when it is not empty
    the FLOPs and latency totals are lower bounds (see `uncosted_note`). `latency_s` is the
    engine time: the sum of the per-node times plus `overhead_s`, the engine's fixed cost per
    inference. `host_overhead_s` is what a call from the host adds around the engine (a Python
    call, synchronisation, input and output copies; the target's `EngineModel.host_overhead_s`),
    kept beside it, not in it: `host_latency_s` is the two together, the time a Python loop around
    the engine would see. `roofline_s` sums the per-node roofline lower bounds.
    """

    target: str
    precision: str
    params: int
    flops: int
    bytes: int
    latency_s: float
    per_node: dict[str, NodeCost] = field(repr=False, default_factory=dict)
    unknown_nodes: tuple[str, ...] = ()
    matmul_flops: int = 0
    uncosted: dict[str, str] = field(default_factory=dict)
    roofline_s: float = 0.0
    overhead_s: float = 0.0
    host_overhead_s: float = 0.0

    @property
    def host_latency_s(self) -> float:
        """Engine time plus what a host call adds: the time seen around a Python call into the engine."""
        return self.latency_s + self.host_overhead_s

    @property
    def complete(self) -> bool:
        """True when every node was costed (no total is a lower bound)."""
        return not self.uncosted

    def uncosted_note(self) -> str:
        """One line naming the uncosted nodes and why ("" when everything was costed)."""
        if not self.uncosted:
            return ""
        items = "; ".join(f"{name}: {why}" for name, why in list(self.uncosted.items())[:3])
        more = f" (+{len(self.uncosted) - 3} more)" if len(self.uncosted) > 3 else ""
        return f"{len(self.uncosted)} node(s) uncosted, FLOPs and latency are lower bounds: {items}{more}"

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "precision": self.precision,
            "params": self.params,
            "flops": self.flops,
            "matmul_flops": self.matmul_flops,
            "bytes": self.bytes,
            "latency_ms": self.latency_s * 1e3,
            "roofline_ms": self.roofline_s * 1e3,
            "overhead_ms": self.overhead_s * 1e3,
            "latency_is": "engine time (kernels + the engine's per-inference overhead); host_overhead_ms is beside it",
            "host_overhead_ms": self.host_overhead_s * 1e3,
            "unknown_nodes": list(self.unknown_nodes),
            "uncosted": dict(self.uncosted),
        }


def tensor_numels(node: Node) -> list[int]:
    """Element counts of the tensors a node produces (empty if ShapeProp did not reach it)."""
    return [math.prod(m.shape) for m in tensor_metas(node.meta.get("tensor_meta"))]


def _shape(node: object) -> tuple[int, ...] | None:
    if not isinstance(node, Node):
        return None
    metas = list(tensor_metas(node.meta.get("tensor_meta")))
    return tuple(metas[0].shape) if len(metas) == 1 else None


def _input_numel(node: Node) -> int:
    return sum(sum(tensor_numels(a)) for a in node.all_input_nodes)


@dataclass(frozen=True)
class _Count:
    """What a formula (or a measurement) says about one node, before bytes and latency."""

    kind: str
    flops: int
    matmul_flops: int = 0  # 2 x MACs, the part FlopCounterMode also counts
    uncosted: str = ""


_NO_SHAPES = "no recorded shapes for its operands"


def _products(kind: str, macs: int, extra: int = 0) -> _Count:
    return _Count(kind, 2 * macs + extra, 2 * macs)


def _conv_counts(mod: nn.Module, out_numel: int, in_numel: int) -> _Count:
    kernel = math.prod(mod.kernel_size)
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        macs = in_numel * (mod.out_channels // mod.groups) * kernel
        kind = "conv_transpose"
    else:
        macs = out_numel * (mod.in_channels // mod.groups) * kernel
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels
        kind = "conv_depthwise" if depthwise else "conv"
    return _products(kind, macs, out_numel if mod.bias is not None else 0)


def _mha_counts(mod: nn.MultiheadAttention, node: Node) -> _Count:
    q, k = _shape(node.args[0]) if node.args else None, _shape(node.args[1]) if len(node.args) > 1 else None
    if q is None or k is None:
        return _Count("unknown", 0, uncosted=_NO_SHAPES)
    e = mod.embed_dim
    lq = math.prod(q[:-1])
    lk = math.prod(k[:-1])
    seq_q, seq_k = (q[0], k[0]) if not mod.batch_first else (q[1], k[1])
    batch = lq // max(seq_q, 1)
    return _products("matmul", lq * e * e + 2 * lk * e * e + 2 * batch * seq_q * seq_k * e + lq * e * e)


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_ADAPTIVE_POOLS = (
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_FREE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.modules.dropout._DropoutNd)


def _module_counts(mod: nn.Module, node: Node, out_numel: int, in_numel: int) -> _Count | None:
    """The formula for a module call; None when fxopt has none (the module is measured)."""
    inner = getattr(mod, "module", None)
    if isinstance(inner, (nn.modules.conv._ConvNd, nn.Linear)) and len(list(mod.children())) == 1:
        mod = inner  # a weight-quantising wrapper computes as the layer it wraps
    if isinstance(mod, nn.modules.conv._ConvNd):
        return _conv_counts(mod, out_numel, in_numel)
    if isinstance(mod, nn.Linear):
        return _products("linear", out_numel * mod.in_features, out_numel if mod.bias is not None else 0)
    if isinstance(mod, nn.MultiheadAttention):
        return _mha_counts(mod, node)
    if isinstance(mod, _NORMS):
        return _Count("norm", 2 * out_numel)
    if isinstance(mod, _POOLS):
        ks = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,)
        dims = len(_shape(node) or ()) - 2
        return _Count("pool", out_numel * math.prod(ks) ** (1 if len(ks) > 1 else max(dims, 1)))
    if isinstance(mod, _ADAPTIVE_POOLS):
        return _Count("pool", in_numel)
    if isinstance(mod, nn.Upsample):
        per = 1 if mod.mode == "nearest" else 4
        return _Count("elementwise", per * out_numel)
    if isinstance(mod, _FREE_MODULES):
        return _Count("view", 0)
    if isinstance(mod, nn.Embedding):
        return _Count("elementwise", out_numel)
    if isinstance(mod, nn.Softmax):
        return _Count("elementwise", 5 * out_numel)
    if not list(mod.children()) and not list(mod.parameters(recurse=False)):
        # parameter-free leaf modules are activations (ReLU, GELU, Sigmoid...): one op per element
        return _Count("elementwise", out_numel)
    return None


def _measured(gm: nn.Module, node: Node) -> _Count:
    # a module with no formula (an opaque leaf, an unknown layer) is run under a FLOP counter
    measured = measure_module(submodule(gm, str(node.target)), node)
    if isinstance(measured, str):
        return _Count("unknown", 0, uncosted=measured)
    return _Count("leaf", measured.flops, measured.matmul_flops)


def _matmul_flops(node: Node) -> _Count:
    a, b = _shape(node.args[0]), _shape(node.args[1]) if len(node.args) > 1 else None
    out = _shape(node)
    if a is None or b is None or out is None or len(a) < 1 or len(b) < 1:
        return _Count("unknown", 0, uncosted=_NO_SHAPES)
    return _products("matmul", math.prod(out) * a[-1])


def _has_bias(node: Node) -> bool:
    return isinstance(node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"), Node)


def _linear_fn_flops(node: Node) -> _Count:
    w = _shape(node.args[1]) if len(node.args) > 1 else _shape(node.kwargs.get("weight"))
    out = _shape(node)
    if w is None or out is None:
        return _Count("unknown", 0, uncosted=_NO_SHAPES)
    return _products("linear", w[-1] * math.prod(out), _has_bias(node) * math.prod(out))


def _sdpa_flops(node: Node) -> _Count:
    q = _shape(node.args[0])
    k = _shape(node.args[1]) if len(node.args) > 1 else None
    if q is None or k is None:
        return _Count("unknown", 0, uncosted=_NO_SHAPES)
    return _products("matmul", 2 * math.prod(q[:-1]) * k[-2] * q[-1])


def _conv_fn_flops(node: Node) -> _Count:
    w = _shape(node.args[1]) if len(node.args) > 1 else None
    out = _shape(node)
    if w is None or out is None:
        return _Count("unknown", 0, uncosted=_NO_SHAPES)
    return _products("conv", math.prod(w[1:]) * math.prod(out), _has_bias(node) * math.prod(out))


def _reduce_flops(node: Node) -> _Count:
    # an adaptive pool or a reduction over dims (TensorRT runs an average Reduce as a Pooling layer): one op per input
    x = _shape(node.args[0]) if node.args else None
    return _Count("pool", math.prod(x)) if x is not None else _Count("unknown", 0, uncosted=_NO_SHAPES)


def _window_pool_flops(node: Node) -> _Count:
    out = _shape(node)
    window = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
    if out is None or window is None:
        return _Count("unknown", 0, uncosted=_NO_SHAPES)
    sizes = tuple(window) if isinstance(window, (tuple, list)) else (window,) * max(len(out) - 2, 1)
    return _Count("pool", math.prod(out) * math.prod(sizes))


_VIEW_FUNCTIONS: set[object] = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, torch.chunk, torch.split, torch.narrow, getattr, operator.getitem,
    torch.Tensor.size, torch.numel,
}
_VIEW_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "size",
    "chunk", "split", "narrow", "expand", "expand_as", "view_as", "dim", "t", "unbind",
    "contiguous", "type_as", "to", "float", "half", "detach", "repeat",
}
_MOVE_FUNCTIONS: set[object] = {torch.cat, torch.stack, torch.zeros, torch.ones, torch.zeros_like}
_FN_COUNTERS: dict[object, Callable[[Node], _Count]] = {
    torch.matmul: _matmul_flops,
    operator.matmul: _matmul_flops,
    torch.bmm: _matmul_flops,
    torch.mm: _matmul_flops,
    F.linear: _linear_fn_flops,
    F.conv1d: _conv_fn_flops,
    F.conv2d: _conv_fn_flops,
    F.conv3d: _conv_fn_flops,
    F.scaled_dot_product_attention: _sdpa_flops,
    **{fn: _reduce_flops for fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                                    F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.mean, torch.sum, torch.amax, torch.amin)},
    **{fn: _window_pool_flops for fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d)},
}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}


def _count(gm: nn.Module, node: Node) -> tuple[_Count, int]:
    """(count, params) of one node, independent of any target."""
    out_numel = sum(tensor_numels(node))
    if node.op in ("placeholder", "output"):
        return _Count("view", 0), 0
    if node.op == "get_attr":
        target = gm
        for atom in str(node.target).split("."):
            target = getattr(target, atom, None)
        return _Count("view", 0), target.numel() if isinstance(target, torch.Tensor) else 0
    if node.op == "call_module":
        mod = submodule(gm, str(node.target))
        params = sum(p.numel() for p in mod.parameters())
        counted = _module_counts(mod, node, out_numel, _input_numel(node))
        return (counted if counted is not None else _measured(gm, node)), params
    if node.op == "call_function":
        if node.target in _FN_COUNTERS:
            return _FN_COUNTERS[node.target](node), 0
        if node.target in _VIEW_FUNCTIONS:
            return _Count("view", 0), 0
        if node.target in _MOVE_FUNCTIONS:
            return _Count("elementwise", 0), 0
        return _Count("elementwise", out_numel), 0
    if node.op == "call_method":
        if node.target in _VIEW_METHODS:
            return _Count("view", 0), 0
        if node.target in ("matmul", "bmm", "mm"):
            return _matmul_flops(node), 0
        if node.target in _REDUCE_METHODS:
            return _reduce_flops(node), 0
        return _Count("elementwise", out_numel), 0
    return _Count("unknown", 0, uncosted=f"unsupported node op {node.op!r}"), 0


def node_op_counts(gm: GraphModule, node: Node) -> tuple[str, int, int]:
    """(kind, params, flops) of one node, independent of any target (see `NodeCost`)."""
    counted, params = _count(gm, node)
    return counted.kind, params, counted.flops


def _latency(target: TargetProfile, precision: str, kind: str, flops: int, nbytes: int) -> float:
    if kind == "view" or (flops == 0 and nbytes == 0):
        return 0.0
    peak = target.peak_ops_per_s[precision] * target.efficiency(kind)
    compute = flops / peak if peak > 0 else 0.0
    memory = nbytes / target.memory_bandwidth_bytes_per_s
    return max(compute, memory) + target.launch_overhead_s


def estimate_costs(
    gm: GraphModule,
    target: str | TargetProfile = "cpu",
    precision: str | None = None,
    *,
    example_inputs: tuple[Any, ...] | None = None,
) -> CostSummary:
    """Cost every node of `gm` (shapes must have been propagated) and sum them.

    A module fxopt has no formula for (an opaque leaf such as a block with data-dependent
    control flow, or an unknown layer) is run under `torch.utils.flop_counter.FlopCounterMode`
    on inputs of its recorded shapes: fake tensors where it allows, else the costliest of a few
    real probe inputs, i.e. the worst branch the probes reach (see
    `fxopt.costs.leaf_cost.measure_module`). With `example_inputs`, such modules are instead costed on
    the values they receive when `gm` runs on those inputs: the branches the example takes. A
    node that still cannot be costed is listed in `CostSummary.uncosted` with the reason.

    Args:
        gm: a graph module whose nodes carry ``tensor_meta`` (see `fxopt.trace`).
        target: the target whose roofline to use.
        precision: precision for bytes and peak throughput; the target's default if omitted.
        example_inputs: inputs to run `gm` on to cost opaque modules on real values (optional;
            `gm` must be runnable).

    Returns:
        A `CostSummary`; each node also gets ``node.meta["fxopt"]["cost"]``. Its `latency_s` is
        engine time (kernels and the engine's per-inference overhead); what a host call adds
        around the engine is beside it in `host_overhead_s`.

    Raises:
        InputError: `precision` is not one of the target's precisions.

    Example:
        >>> import torch, fxopt
        >>> gm = fxopt.trace(torch.nn.Linear(8, 4), (torch.randn(2, 8),))
        >>> estimate_costs(gm, "cpu").flops  # 2 * 2*4*8 MACs + 8 bias adds
        136
    """
    profile = get_target(target)
    precision = precision or profile.default_precision
    if precision not in profile.precisions:
        raise InputError(f"estimate_costs: target '{profile.name}' has no precision {precision!r}; it has {profile.precisions}")
    counts = {node.name: _count(gm, node) for node in gm.graph.nodes}
    if example_inputs is not None:
        opaque = {name for name, (c, _) in counts.items() if c.kind in ("leaf", "unknown")}
        for name, measured in measure_on_values(gm, opaque, tuple(example_inputs)).items():
            params = counts[name][1]
            if isinstance(measured, str):
                counts[name] = (_Count("unknown", 0, uncosted=measured), params)
            else:
                counts[name] = (_Count("leaf", measured.flops, measured.matmul_flops), params)
    per_node = (_engine_costs if profile.engine is not None else _node_costs)(gm, counts, profile, precision)
    for node in gm.graph.nodes:
        node.meta.setdefault("fxopt", {})["cost"] = per_node[node.name]
    uncosted = {name: c.uncosted for name, c in per_node.items() if c.uncosted}
    overhead = profile.engine.inference_overhead_s if profile.engine is not None else 0.0
    host = profile.engine.host_overhead_s if profile.engine is not None else 0.0
    return CostSummary(
        target=profile.name,
        precision=precision,
        params=sum(p.numel() for p in gm.parameters()),
        flops=sum(c.flops for c in per_node.values()),
        bytes=sum(c.bytes for c in per_node.values()),
        latency_s=sum(c.latency_s for c in per_node.values()) + overhead,
        per_node=per_node,
        unknown_nodes=tuple(uncosted),
        matmul_flops=sum(c.matmul_flops for c in per_node.values()),
        uncosted=uncosted,
        roofline_s=sum(c.roofline_s for c in per_node.values()),
        overhead_s=overhead,
        host_overhead_s=host,
    )


_Counts = dict[str, tuple[_Count, int]]


def _node_costs(gm: GraphModule, counts: _Counts, profile: TargetProfile, precision: str) -> dict[str, NodeCost]:
    # every computing node is one kernel: its own roofline at the op's efficiency plus a launch
    width = BYTES_PER_ELEMENT[precision]
    per_node: dict[str, NodeCost] = {}
    for node in gm.graph.nodes:
        c, params = counts[node.name]
        moved = 0 if c.kind == "view" else (_input_numel(node) + sum(tensor_numels(node)) + params)
        nbytes = moved * width
        latency = _latency(profile, precision, c.kind, c.flops, nbytes)
        bound = roofline_s(profile, precision, c.flops, nbytes) if c.kind != "view" else 0.0
        per_node[node.name] = NodeCost(c.kind, params, c.flops, nbytes, latency, c.matmul_flops, c.uncosted, bound)
    return per_node


def _engine_costs(gm: GraphModule, counts: _Counts, profile: TargetProfile, precision: str) -> dict[str, NodeCost]:
    # nodes grouped into the engine's kernels (`fxopt.costs.engine_cost`); the head of a kernel carries its cost
    width = BYTES_PER_ELEMENT[precision]
    facts = {name: NodeFacts(c.kind, c.flops, params) for name, (c, params) in counts.items()}
    heads = {}
    fused_into = {}
    for k in engine_kernels(gm, facts, profile, precision):
        heads[k.head] = k
        fused_into.update({name: k.head for name in k.fused})
    per_node: dict[str, NodeCost] = {}
    for node in gm.graph.nodes:
        c, params = counts[node.name]
        k = heads.get(node.name)
        if k is None:
            per_node[node.name] = NodeCost(c.kind, params, c.flops, 0, 0.0, c.matmul_flops, c.uncosted, 0.0, fused_into.get(node.name, ""))
            continue
        nbytes = k.elements * width
        latency = kernel_latency_s(profile, precision, k.kind, k.flops, nbytes, k.size, k.depth)
        bound = roofline_s(profile, precision, k.flops, nbytes)
        per_node[node.name] = NodeCost(k.kind, params, c.flops, nbytes, float(latency), c.matmul_flops, c.uncosted, bound)
    return per_node
