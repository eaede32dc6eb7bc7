"""Costs of modules fxopt has no formula for (leaves, unknown layers), measured by running them
under torch's FLOP counter on inputs of the shapes ShapeProp recorded for their graph node."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

__all__ = ["MeasuredCost", "flop_counter", "measure_module", "measure_on_values", "module_inputs"]

_aten = torch.ops.aten
# ops that allocate, copy or read a scalar: no arithmetic, so no FLOPs
_NO_ARITHMETIC = frozenset({
    _aten.empty, _aten.empty_like, _aten.empty_strided, _aten.zeros, _aten.zeros_like, _aten.ones,
    _aten.ones_like, _aten.full, _aten.full_like, _aten.fill_, _aten.zero_, _aten.clone, _aten.copy_,
    _aten._to_copy, _aten.detach, _aten.lift_fresh, _aten.lift_fresh_copy, _aten._local_scalar_dense,
    _aten.alias, _aten.scalar_tensor, _aten.arange, _aten.cat, _aten.stack, _aten.index, _aten.gather,
    _aten.constant_pad_nd, _aten.split_with_sizes_copy, _aten.index_select,
})
_CACHE_SIZE = 1024
# FlopCounterMode has no formula for the CPU flash-attention kernel F.scaled_dot_product_attention
# dispatches to on this host (the same products as the GPU kernels'), nor for
# nn.MultiheadAttention's fused inference op (eval, batch_first): both are added here.


def _fused_mha_flops(q: Any, k: Any, v: Any, embed_dim: int, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    batch, lq, lk = math.prod(q[:-2]), q[-2], k[-2]
    # q, k, v and output projections, then q @ k^T and attn @ v: as fxopt's nn.MultiheadAttention formula
    return 2 * (2 * batch * lq * embed_dim**2 + 2 * batch * lk * embed_dim**2 + 2 * batch * lq * lk * embed_dim)


_EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    op: formula for op, formula in (
        (getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None),
         lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)),
        (getattr(_aten, "_native_multi_head_attention", None), _fused_mha_flops),
    ) if op is not None
}
_COUNTED = {*flop_registry, *_EXTRA_FORMULAS}


@dataclass(frozen=True)
class MeasuredCost:
    """FLOPs of one module call, counted by running it.

    Attributes:
        matmul_flops: what `torch.utils.flop_counter.FlopCounterMode` counts: 2 x MACs of
            conv, mm/addmm/bmm and attention kernels (bias adds inside them not included,
            where fxopt's own conv/linear formulas add one per output element).
        other_flops: one per output element of every other arithmetic aten op (elementwise,
            reductions, norms), as fxopt counts elementwise nodes.
        how: which inputs were used (``"fake tensors"``, ``"costliest of 3 probe inputs"``,
            ``"example inputs"``).
    """

    matmul_flops: int
    other_flops: int
    how: str

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.other_flops


class _ArithmeticCounter(TorchDispatchMode):
    """One FLOP per output element of aten ops the FLOP counter has no formula for."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = func._overloadpacket
        if packet not in _COUNTED and packet not in _NO_ARITHMETIC and not func.is_view:
            leaves = pytree.tree_leaves(out)
            self.flops += sum(t.numel() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())
        return out


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts what stock FlopCounterMode misses on CPU:
    flash attention and nn.MultiheadAttention's fused inference path (2 x MACs, as elsewhere).

    Example:
        >>> import torch
        >>> with flop_counter() as counter:
        ...     _ = torch.nn.functional.scaled_dot_product_attention(*torch.ones(3, 1, 1, 4, 8))
        >>> counter.get_total_flops()  # q @ k^T and attn @ v: 2 * 2 * 4*4*8
        512
    """
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)


def _count(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
    counter, other = flop_counter(), _ArithmeticCounter()
    with torch.no_grad(), counter, other:
        module(*args, **kwargs)
    return counter.get_total_flops(), other.flops


# --- inputs of the recorded shapes -------------------------------------------------------------

_Spec = tuple[Any, Any]  # (args, kwargs) with TensorMetadata where tensors go


def module_inputs(node: Node) -> _Spec | str:
    """The node's (args, kwargs) with every tensor replaced by its recorded metadata, or why not."""
    missing: list[str] = []

    def spec(a: Any) -> Any:
        if not isinstance(a, Node):
            return a
        meta = a.meta.get("tensor_meta")
        if meta is None:
            missing.append(a.name)
        return meta

    args, kwargs = map_aggregate(node.args, spec), map_aggregate(node.kwargs, spec)
    if missing:
        return f"no recorded shape for its input(s) {', '.join(missing)} (a value computed at run time)"
    return args, kwargs


def _is_meta(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, torch.Tensor)


def _build(spec: _Spec, make: Callable[[Any], torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def walk(x: Any) -> Any:
        if _is_meta(x):
            return make(x)
        if isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
            return type(x)(walk(v) for v in x)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        return x

    args, kwargs = spec
    return tuple(walk(a) for a in args), {k: walk(v) for k, v in kwargs.items()}


def _probes(device: torch.device) -> Iterator[tuple[str, Callable[[Any], torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)

    def filled(kind: str) -> Callable[[Any], torch.Tensor]:
        def make(meta: Any) -> torch.Tensor:
            shape, dtype = tuple(meta.shape), meta.dtype
            if dtype == torch.bool:
                return torch.full(shape, kind != "negative", dtype=dtype, device=device)
            if not dtype.is_floating_point:
                return torch.zeros(shape, dtype=dtype, device=device)  # a valid index everywhere
            values = torch.randn(shape, generator=gen) if kind == "normal" else torch.rand(shape, generator=gen)
            return (-values if kind == "negative" else values).to(dtype=dtype, device=device)

        return make

    for kind in ("normal", "positive", "negative"):
        yield kind, filled(kind)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _measure_uncached(module: nn.Module, spec: _Spec) -> MeasuredCost | str:
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = copy.deepcopy(module)  # a run may update buffers in place
    device = _device_of(module)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            args, kwargs = _build(spec, lambda m: torch.empty(tuple(m.shape), dtype=m.dtype, device=device))
            return MeasuredCost(*_count(module, args, kwargs), "fake tensors")
    except Exception as exc:  # noqa: BLE001 - data-dependent control flow, ops without fake kernels
        fake_failure = _first_line(exc)
    if device.type == "meta":
        return f"it cannot run on fake tensors ({fake_failure}) and its weights are on the meta device"
    best: MeasuredCost | None = None
    failure = ""
    with torch.random.fork_rng(devices=[]):
        for _kind, make in _probes(device):
            try:
                counted = MeasuredCost(*_count(module, *_build(spec, make)), "costliest of 3 probe inputs")
            except Exception as exc:  # noqa: BLE001 - a probe the module refuses is skipped
                failure = _first_line(exc)
                continue
            best = counted if best is None or counted.flops > best.flops else best
    if best is None:
        return f"it cannot run on fake tensors ({fake_failure}) nor on probe inputs ({failure})"
    return best


_cache: dict[tuple[Any, ...], MeasuredCost | str] = {}


def _key(module: nn.Module, spec: _Spec) -> tuple[Any, ...]:
    # devices are left out on purpose: a meta-device copy (prune's shape-only builds) costs the same
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in (*module.named_parameters(), *module.named_buffers()))
    return type(module), repr(module), module.training, tensors, repr(spec)


def measure_module(module: nn.Module, node: Node) -> MeasuredCost | str:
    """FLOPs of `module` called as `node`, on inputs of the node's recorded shapes, or why not.

    Fake tensors are tried first (no arithmetic is run). A module whose control flow reads
    tensor values (``if x.mean() > 0:``) cannot run on fake tensors; it is run on three real
    probe inputs (standard normal, all positive, all negative values) and the costliest run is
    counted: a worst case over the probes, so a branch none of them takes is missed. Results
    are cached per (module structure, input shapes), so repeated costings (a pruning budget
    search) run each module once.

    Returns:
        A `MeasuredCost`, or a one-line reason why the module cannot be costed.

    Example:
        >>> import torch, fxopt
        >>> gm = fxopt.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), torch.randn(1, 3, 2, 2))
        >>> node = next(n for n in gm.graph.nodes if n.op == "call_module")
        >>> measure_module(gm.get_submodule(node.target), node).matmul_flops  # 2 * 4*2*2 * 3
        96
    """
    spec = module_inputs(node)
    if isinstance(spec, str):
        return spec
    key = _key(module, spec)
    if key not in _cache:
        if len(_cache) >= _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = _measure_uncached(module, spec)
    return _cache[key]


class _InputRecorder(torch.fx.Interpreter):
    """Runs the graph and keeps a copy of what the chosen call_module nodes receive."""

    def __init__(self, gm: GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.seen: dict[str, tuple[Node, tuple[Any, ...], dict[str, Any]]] = {}

    def run_node(self, n: Node) -> Any:
        if n.op == "call_module" and n.name in self.names:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            clone = lambda t: t.clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            self.seen[n.name] = (n, pytree.tree_map(clone, tuple(args)), pytree.tree_map(clone, dict(kwargs)))
        return super().run_node(n)


def measure_on_values(gm: GraphModule, names: set[str], example_inputs: tuple[Any, ...]) -> dict[str, MeasuredCost | str]:
    """FLOPs of the call_module nodes `names` on the values they get when `gm` runs on the inputs:
    the branches the example inputs take (not cached: values, not shapes, decide them)."""
    recorder = _InputRecorder(gm, names)
    with torch.no_grad():
        recorder.run(*example_inputs)
    out: dict[str, MeasuredCost | str] = {}
    for name, (node, args, kwargs) in recorder.seen.items():
        try:
            out[name] = MeasuredCost(*_count(copy.deepcopy(gm.get_submodule(str(node.target))), args, kwargs), "example inputs")
        except Exception as exc:  # noqa: BLE001 - reported as uncosted, never a silent zero
            out[name] = f"it fails on the example inputs ({_first_line(exc)})"
    return out
