"""Per-node cost model: parameters, FLOPs (2 x MACs), bytes moved and a roofline latency estimate.

Costs are computed from the shapes ShapeProp records (`node.meta["tensor_meta"]`) and written
under `node.meta["fxopt"]["cost"]` as frozen `NodeCost`s.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxopt.targets import BYTES_PER_ELEMENT, TargetProfile, get_target

__all__ = ["NodeCost", "CostSummary", "estimate_costs", "node_op_counts", "tensor_numels"]


@dataclass(frozen=True)
class NodeCost:
    """The cost of one graph node on one target.

    Attributes:
        kind: op family used for the efficiency table (``conv``, ``linear``, ``elementwise``...);
            ``view`` costs nothing, ``unknown`` means fxopt cannot see inside (a leaf module).
        params: parameters the node owns (a module's, or a `get_attr` tensor's).
        flops: floating-point operations, counted as 2 x multiply-accumulates for conv,
            linear and matmul, and one per output element for elementwise ops.
        bytes: bytes read and written (inputs + outputs + weights) at the target precision.
        latency_s: roofline estimate: max(compute time, memory time) + launch overhead.
    """

    kind: str
    params: int
    flops: int
    bytes: int
    latency_s: float


@dataclass(frozen=True)
class CostSummary:
    """Whole-graph totals and the per-node costs they sum."""

    target: str
    precision: str
    params: int
    flops: int
    bytes: int
    latency_s: float
    per_node: dict[str, NodeCost] = field(repr=False, default_factory=dict)
    unknown_nodes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "precision": self.precision,
            "params": self.params,
            "flops": self.flops,
            "bytes": self.bytes,
            "latency_ms": self.latency_s * 1e3,
            "unknown_nodes": list(self.unknown_nodes),
        }


def _metas(value: object) -> Iterable[object]:
    # tensor_meta is a TensorMetadata or a (nested) tuple/list/dict of them
    if value is None:
        return
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _metas(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _metas(v)


def tensor_numels(node: Node) -> list[int]:
    """Element counts of the tensors a node produces (empty if ShapeProp did not reach it)."""
    return [math.prod(m.shape) for m in _metas(node.meta.get("tensor_meta"))]


def _shape(node: object) -> tuple[int, ...] | None:
    if not isinstance(node, Node):
        return None
    metas = list(_metas(node.meta.get("tensor_meta")))
    return tuple(metas[0].shape) if len(metas) == 1 else None


def _input_numel(node: Node) -> int:
    return sum(sum(tensor_numels(a)) for a in node.all_input_nodes)


def _conv_counts(mod: nn.Module, out_numel: int, in_numel: int) -> tuple[str, int]:
    kernel = math.prod(mod.kernel_size)
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        macs = in_numel * (mod.out_channels // mod.groups) * kernel
        kind = "conv_transpose"
    else:
        macs = out_numel * (mod.in_channels // mod.groups) * kernel
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels
        kind = "conv_depthwise" if depthwise else "conv"
    bias = out_numel if mod.bias is not None else 0
    return kind, 2 * macs + bias


def _mha_counts(mod: nn.MultiheadAttention, node: Node) -> tuple[str, int]:
    q, k = _shape(node.args[0]) if node.args else None, _shape(node.args[1]) if len(node.args) > 1 else None
    if q is None or k is None:
        return "unknown", 0
    e = mod.embed_dim
    lq = math.prod(q[:-1])
    lk = math.prod(k[:-1])
    seq_q, seq_k = (q[0], k[0]) if not mod.batch_first else (q[1], k[1])
    batch = lq // max(seq_q, 1)
    macs = lq * e * e + 2 * lk * e * e + 2 * batch * seq_q * seq_k * e + lq * e * e
    return "matmul", 2 * macs


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_ADAPTIVE_POOLS = (
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_FREE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.modules.dropout._DropoutNd)


def _module_counts(mod: nn.Module, node: Node, out_numel: int, in_numel: int) -> tuple[str, int]:
    if isinstance(mod, nn.modules.conv._ConvNd):
        return _conv_counts(mod, out_numel, in_numel)
    if isinstance(mod, nn.Linear):
        return "linear", 2 * out_numel * mod.in_features + (out_numel if mod.bias is not None else 0)
    if isinstance(mod, nn.MultiheadAttention):
        return _mha_counts(mod, node)
    if isinstance(mod, _NORMS):
        return "norm", 2 * out_numel
    if isinstance(mod, _POOLS):
        ks = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,)
        dims = len(_shape(node) or ()) - 2
        return "pool", out_numel * math.prod(ks) ** (1 if len(ks) > 1 else max(dims, 1))
    if isinstance(mod, _ADAPTIVE_POOLS):
        return "pool", in_numel
    if isinstance(mod, nn.Upsample):
        per = 1 if mod.mode == "nearest" else 4
        return "elementwise", per * out_numel
    if isinstance(mod, _FREE_MODULES):
        return "view", 0
    if isinstance(mod, nn.Embedding):
        return "elementwise", out_numel
    if isinstance(mod, nn.Softmax):
        return "elementwise", 5 * out_numel
    if not list(mod.children()) and not list(mod.parameters(recurse=False)):
        # parameter-free leaf modules are activations (ReLU, GELU, Sigmoid...): one op per element
        return "elementwise", out_numel
    return "unknown", 0


def _matmul_flops(node: Node) -> int:
    a, b = _shape(node.args[0]), _shape(node.args[1]) if len(node.args) > 1 else None
    if a is None or b is None or len(a) < 1 or len(b) < 1:
        return 0
    out = _shape(node)
    k = a[-1]
    out_numel = math.prod(out) if out else 0
    return 2 * out_numel * k


def _has_bias(node: Node) -> bool:
    return isinstance(node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"), Node)


def _linear_fn_flops(node: Node) -> int:
    w = _shape(node.args[1]) if len(node.args) > 1 else _shape(node.kwargs.get("weight"))
    out = _shape(node)
    if w is None or out is None:
        return 0
    return (2 * w[-1] + _has_bias(node)) * math.prod(out)


def _sdpa_flops(node: Node) -> int:
    q = _shape(node.args[0])
    k = _shape(node.args[1]) if len(node.args) > 1 else None
    if q is None or k is None:
        return 0
    return 4 * math.prod(q[:-1]) * k[-2] * q[-1]


def _conv_fn_flops(node: Node) -> int:
    w = _shape(node.args[1]) if len(node.args) > 1 else None
    out = _shape(node)
    if w is None or out is None:
        return 0
    return (2 * math.prod(w[1:]) + _has_bias(node)) * math.prod(out)


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
_FN_COUNTERS: dict[object, tuple[str, Callable[[Node], int]]] = {
    torch.matmul: ("matmul", _matmul_flops),
    operator.matmul: ("matmul", _matmul_flops),
    torch.bmm: ("matmul", _matmul_flops),
    torch.mm: ("matmul", _matmul_flops),
    F.linear: ("linear", _linear_fn_flops),
    F.conv1d: ("conv", _conv_fn_flops),
    F.conv2d: ("conv", _conv_fn_flops),
    F.conv3d: ("conv", _conv_fn_flops),
    F.scaled_dot_product_attention: ("matmul", _sdpa_flops),
}


def node_op_counts(gm: GraphModule, node: Node) -> tuple[str, int, int]:
    """(kind, params, flops) of one node, independent of any target."""
    out_numel = sum(tensor_numels(node))
    in_numel = _input_numel(node)
    if node.op in ("placeholder", "output"):
        return "view", 0, 0
    if node.op == "get_attr":
        target = gm
        for atom in str(node.target).split("."):
            target = getattr(target, atom, None)
        params = target.numel() if isinstance(target, torch.Tensor) else 0
        return "view", params, 0
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        params = sum(p.numel() for p in mod.parameters())
        kind, flops = _module_counts(mod, node, out_numel, in_numel)
        return kind, params, flops
    if node.op == "call_function":
        if node.target in _FN_COUNTERS:
            kind, counter = _FN_COUNTERS[node.target]
            return kind, 0, counter(node)
        if node.target in _VIEW_FUNCTIONS:
            return "view", 0, 0
        if node.target in _MOVE_FUNCTIONS:
            return "elementwise", 0, 0
        return "elementwise", 0, out_numel
    if node.op == "call_method":
        if node.target in _VIEW_METHODS:
            return "view", 0, 0
        if node.target in ("matmul", "bmm", "mm"):
            return "matmul", 0, _matmul_flops(node)
        return "elementwise", 0, out_numel
    return "unknown", 0, 0


def _latency(target: TargetProfile, precision: str, kind: str, flops: int, nbytes: int) -> float:
    if kind == "view" or (flops == 0 and nbytes == 0):
        return 0.0
    peak = target.peak_ops_per_s[precision] * target.efficiency(kind)
    compute = flops / peak if peak > 0 else 0.0
    memory = nbytes / target.memory_bandwidth_bytes_per_s
    return max(compute, memory) + target.launch_overhead_s


def estimate_costs(
    gm: GraphModule, target: str | TargetProfile = "cpu", precision: str | None = None
) -> CostSummary:
    """Cost every node of `gm` (shapes must have been propagated) and sum them.

    Args:
        gm: a graph module whose nodes carry ``tensor_meta`` (see `fxopt.trace`).
        target: the target whose roofline to use.
        precision: precision for bytes and peak throughput; the target's default if omitted.

    Returns:
        A `CostSummary`; each node also gets ``node.meta["fxopt"]["cost"]``.

    Example:
        >>> import torch, fxopt
        >>> gm = fxopt.trace(torch.nn.Linear(8, 4), (torch.randn(2, 8),))
        >>> estimate_costs(gm, "cpu").flops  # 2 * 2*4*8 MACs + 8 bias adds
        136
    """
    profile = get_target(target)
    precision = precision or profile.default_precision
    width = BYTES_PER_ELEMENT[precision]
    per_node: dict[str, NodeCost] = {}
    unknown: list[str] = []
    for node in gm.graph.nodes:
        kind, params, flops = node_op_counts(gm, node)
        moved = 0 if kind == "view" else (_input_numel(node) + sum(tensor_numels(node)) + params)
        nbytes = moved * width
        cost = NodeCost(kind, params, flops, nbytes, _latency(profile, precision, kind, flops, nbytes))
        node.meta.setdefault("fxopt", {})["cost"] = cost
        per_node[node.name] = cost
        if kind == "unknown":
            unknown.append(node.name)
    total_params = sum(p.numel() for p in gm.parameters())
    return CostSummary(
        target=profile.name,
        precision=precision,
        params=total_params,
        flops=sum(c.flops for c in per_node.values()),
        bytes=sum(c.bytes for c in per_node.values()),
        latency_s=sum(c.latency_s for c in per_node.values()),
        per_node=per_node,
        unknown_nodes=tuple(unknown),
    )
