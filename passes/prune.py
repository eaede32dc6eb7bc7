"""Structured channel pruning: remove whole channels (and conv/norm groups) under a budget.

The pass goes annotate -> score -> select -> transform:

1. `dependency_groups.analyze_dependencies` couples every channel index of the graph with the
   indices that must go with it (residual adds, concat offsets, split/chunk, grouped and
   depthwise convs, flatten -> linear blocks, tied modules) into *atoms*, freezes whatever
   reaches a graph input/output, an unknown op or a leaf, and collects prunable atoms into
   groups (the channels of the same producers); it writes them under ``node.meta["fxopt"]``.
2. `channel_importance.atom_scores` gives each atom a score aggregated over all its weights.
3. The budget (`amount` of channels, params, FLOPs or estimated latency) is met by bisection
   on one knob: the fraction removed from every group (``allocation="uniform"``) or a global
   threshold on scores normalised per group (``"global"``). Each candidate is costed with
   `fxopt.costs.cost_model.estimate_costs` on a shape-only (meta-device) build of the plan, so the
   search never copies weights. Kept channel counts are rounded to the target's alignment
   and capped by `max_ratio`; a group never loses all its channels.
4. `apply_plan` builds a new GraphModule: parameters and buffers sliced, modules rebuilt with
   their new sizes, size literals of view/reshape/expand/split/layer_norm updated. No mask is
   left; the input graph module and its modules are not modified.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxopt.costs.cost_model import CostSummary, estimate_costs
from fxopt.errors import InputError, PassError
from fxopt.passes.channel_importance import CRITERIA, Criterion, atom_scores
from fxopt.passes.dependency_groups import (
    DependencyAnalysis,
    ParamDim,
    PruneGroup,
    analyze_dependencies,
    output_shapes,
)
from fxopt.passinfra.pass_base import FxoptPass, PassResult, current_context
from fxopt.passinfra.registry import register_pass

__all__ = ["PruneChannels", "PrunePlan", "apply_plan", "budget_note", "empty_tensors", "plan_keep_ratios", "plan_pruning", "shape_only"]

UNITS = ("channels", "params", "flops", "latency")
ALLOCATIONS = ("uniform", "global")
TABLE = "prune: channel groups"
BUDGET_TABLE = "prune: budget"
_SEARCH_STEPS = 18
BUDGET_TOLERANCE = 0.05  # achieved vs requested fraction: further off, the budget row says why


@dataclass(frozen=True)
class PruneSettings:
    """Validated options of `PruneChannels` (see its docstring)."""

    amount: float
    by: str
    allocation: str
    overrides: tuple[tuple[str, float], ...]
    ignore: tuple[str, ...]
    max_ratio: float
    round_to: int | None
    importance: str | Criterion


@dataclass(frozen=True)
class PrunePlan:
    """Which atoms to remove, and what that achieves.

    Attributes:
        removed: per atom of the analysis, True when it is removed.
        keep: group index -> atoms kept.
        achieved: fraction of the budget unit removed (estimated on the shape-only build).
        alignment: the channel multiple kept counts were rounded to.
        uncosted: when the budget unit depends on nodes the cost model could not cost, which
            and why (`achieved` then leaves them out); "" otherwise.
    """

    removed: np.ndarray
    keep: Mapping[int, int]
    achieved: float
    alignment: int
    uncosted: str = ""


# --------------------------------------------------------------------------------------------
# options


def _fraction(name: str, value: Any, *, upper_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"PruneChannels: {name} must be a number in [0, 1), got {value!r}")
    if value < 0 or value > 1 or (upper_open and value >= 1):
        raise InputError(f"PruneChannels: {name} must be in [0, 1{')' if upper_open else ']'}, got {value!r}")
    return float(value)


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value or ())
    for p in items:
        if not isinstance(p, str):
            raise InputError(f"PruneChannels: {name} entries must be module names or regexes, got {p!r}")
        try:
            re.compile(p)
        except re.error as exc:
            raise InputError(f"PruneChannels: {name} entry {p!r} is not a valid regex: {exc}") from exc
    return items


def _settings(amount: Any, by: Any, allocation: Any, overrides: Any, ignore: Any,
              max_ratio: Any, round_to: Any, importance: Any) -> PruneSettings:
    amount = _fraction("amount", amount, upper_open=True)
    if by not in UNITS:
        raise InputError(f"PruneChannels: by must be one of {UNITS}, got {by!r}")
    if allocation not in ALLOCATIONS:
        raise InputError(f"PruneChannels: allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise InputError(f"PruneChannels: overrides must be a dict {{module name or regex: amount}}, got {overrides!r}")
    pairs = tuple((p, _fraction(f"overrides[{p!r}]", a, upper_open=True)) for p, a in (overrides or {}).items())
    _patterns("overrides", [p for p, _ in pairs])
    max_ratio = _fraction("max_ratio", max_ratio)
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise InputError(f"PruneChannels: round_to must be a positive int or None, got {round_to!r}")
    if not callable(importance) and importance not in CRITERIA:
        raise InputError(f"PruneChannels: importance must be one of {CRITERIA} or a callable, got {importance!r}")
    return PruneSettings(amount, by, allocation, pairs, _patterns("ignore", ignore), max_ratio, round_to, importance)


# --------------------------------------------------------------------------------------------
# the transform


class _Keep:
    """Kept indices of every channel space touched by the plan (None: unchanged)."""

    def __init__(self, analysis: DependencyAnalysis, removed: np.ndarray) -> None:
        self.analysis = analysis
        self.removed = removed
        self._cache: dict[Any, np.ndarray | None] = {}

    def indices(self, space: tuple[str, int, int]) -> np.ndarray | None:
        if space not in self._cache:
            gone = self.removed[self.analysis.elements(space)]
            self._cache[space] = np.nonzero(~gone)[0] if gone.any() else None
        return self._cache[space]

    def size(self, name: str, item: int, dim: int, old: int) -> int:
        idx = self.indices((name, item, dim))
        return old if idx is None else int(idx.shape[0])


def _shallow_module(module: nn.Module) -> nn.Module:
    new = copy.copy(module)
    new.__dict__["_parameters"] = type(module._parameters)(module._parameters)
    new.__dict__["_buffers"] = type(module._buffers)(module._buffers)
    new.__dict__["_modules"] = type(module._modules)(
        (k, _shallow_module(v) if v is not None else None) for k, v in module._modules.items()
    )
    return new


def _shallow_root(gm: GraphModule) -> nn.Module:
    """A module tree sharing gm's tensors but not its module objects (safe to re-assign into)."""
    root = nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, _shallow_module(child))
    for name, p in gm._parameters.items():
        root.register_parameter(name, p)
    for name, buf in gm._buffers.items():
        root.register_buffer(name, buf)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "." not in str(node.target) and not hasattr(root, str(node.target)):
            setattr(root, str(node.target), getattr(gm, str(node.target)))
    return root


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = copy.deepcopy(graph)
    for node in new.nodes:
        node.meta = dict(node.meta)
        if "fxopt" in node.meta:
            node.meta["fxopt"] = dict(node.meta["fxopt"])
    return new


def _new_tensor(t: torch.Tensor, dims: list[tuple[int, np.ndarray]], mode: str) -> torch.Tensor:
    if mode == "meta":
        shape = list(t.shape)
        for dim, idx in dims:
            shape[dim] = int(idx.shape[0])
        out = torch.empty(shape, dtype=t.dtype, device="meta")
    else:
        out = t.detach()
        for dim, idx in dims:
            out = out.index_select(dim, torch.as_tensor(idx, dtype=torch.long))
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out


def _set_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in owner._parameters:
        owner._parameters[name] = value
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _tensor_slot(root: nn.Module, pd: ParamDim) -> tuple[nn.Module, str]:
    if pd.kind == "tensor":
        parent, _, name = pd.owner.rpartition(".")
        return (root.get_submodule(parent) if parent else root), name
    return root.get_submodule(pd.owner), pd.name


def _slice_tensors(root: nn.Module, analysis: DependencyAnalysis, keep: _Keep, mode: str) -> set[str]:
    """Replace every tensor with a changed dim; returns the module paths whose tensors changed."""
    by_tensor: dict[tuple[str, str, bool], list[ParamDim]] = {}
    for pd in analysis.param_dims:
        if keep.indices(pd.space) is not None:
            by_tensor.setdefault((pd.owner, pd.name, pd.kind == "tensor"), []).append(pd)
    changed: set[str] = set()
    for pds in by_tensor.values():
        owner, name = _tensor_slot(root, pds[0])
        dims = [(pd.dim, keep.indices(pd.space)) for pd in pds]
        _set_tensor(owner, name, _new_tensor(getattr(owner, name), dims, mode))
        if pds[0].kind != "tensor":
            changed.add(pds[0].owner)
    return changed


def _fix_conv(m: nn.Module) -> None:
    old_out = m.out_channels
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        return
    m.out_channels = m.weight.shape[0]
    if m.groups > 1:
        m.groups = m.out_channels // (old_out // m.groups)
    m.in_channels = m.weight.shape[1] * m.groups


def _fix_linear(m: nn.Module) -> None:
    m.out_features, m.in_features = m.weight.shape


def _fix_batchnorm(m: nn.Module) -> None:
    t = m.weight if m.weight is not None else m.running_mean
    m.num_features = t.shape[0]


def _fix_groupnorm(m: nn.GroupNorm) -> None:
    per_group = m.num_channels // m.num_groups
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_channels // per_group


def _fix_layernorm(m: nn.LayerNorm) -> None:
    m.normalized_shape = (m.weight.shape[0],)


# Module attribute fix-ups after slicing, keyed by module type (matched along the MRO).
MODULE_FIXUPS: dict[type[nn.Module], Callable[[Any], None]] = {
    nn.modules.conv._ConvNd: _fix_conv,
    nn.Linear: _fix_linear,
    nn.modules.batchnorm._NormBase: _fix_batchnorm,
    nn.GroupNorm: _fix_groupnorm,
    nn.LayerNorm: _fix_layernorm,
}


def _fix_module(m: nn.Module) -> None:
    for cls in type(m).__mro__:
        if cls in MODULE_FIXUPS:
            MODULE_FIXUPS[cls](m)
            return
    raise AssertionError(f"no size fix-up for {type(m).__name__}")  # the analysis froze it


def _spec_positions(node: Node) -> tuple[str, Any] | None:
    """Where a node keeps its target sizes: ('varargs'|'arg1'|kwarg name, the spec)."""
    if len(node.args) > 2 or (len(node.args) == 2 and isinstance(node.args[1], int)):
        return "varargs", list(node.args[1:])
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return "arg1", list(node.args[1])
    for key in ("shape", "size"):
        if key in node.kwargs:
            return key, list(node.kwargs[key])
    return None


def _write_spec(node: Node, where: str, spec: list[Any]) -> None:
    if where == "varargs":
        node.args = (node.args[0], *spec)
    elif where == "arg1":
        node.args = (node.args[0], tuple(spec), *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, where: tuple(spec)}


def _new_sizes(node: Node, keep: _Keep, item: int = 0) -> list[int] | None:
    shapes = output_shapes(node)
    if shapes is None:
        return None
    return [keep.size(node.name, item, d, s) for d, s in enumerate(shapes[item])]


def _update_view(node: Node, keep: _Keep) -> None:
    found, sizes = _spec_positions(node), _new_sizes(node, keep)
    if found is None or sizes is None:
        return
    where, spec = found
    if len(spec) != len(sizes):
        return
    new = [sizes[j] if isinstance(s, int) and s not in (-1,) and s != sizes[j] else s for j, s in enumerate(spec)]
    if new != spec:
        _write_spec(node, where, new)


def _update_split(node: Node, keep: _Keep) -> None:
    shapes = output_shapes(node)
    sections = node.args[1] if len(node.args) > 1 else None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if shapes is None or sections is None or not isinstance(dim, int):
        return
    dim = dim + len(shapes[0]) if dim < 0 else dim
    sizes = [keep.size(node.name, i, dim, s[dim]) for i, s in enumerate(shapes)]
    new = sizes[0] if isinstance(sections, int) else list(sizes)
    if new != sections:
        node.args = (node.args[0], new, *node.args[2:])


def _update_layer_norm(node: Node, keep: _Keep) -> None:
    sizes = _new_sizes(node, keep)
    shape = node.args[1] if len(node.args) > 1 else None
    if sizes is None or not isinstance(shape, (list, tuple)):
        return
    new = tuple(sizes[len(sizes) - len(shape):])
    if new != tuple(shape):
        node.args = (node.args[0], new, *node.args[2:])


def _update_group_norm(node: Node, keep: _Keep) -> None:
    shapes, groups = output_shapes(node), node.args[1] if len(node.args) > 1 else None
    if shapes is None or not isinstance(groups, int):
        return
    new = keep.size(node.name, 0, 1, shapes[0][1]) // (shapes[0][1] // groups)  # whole groups go
    if new != groups:
        node.args = (node.args[0], new, *node.args[2:])


def _update_conv_groups(node: Node, keep: _Keep) -> None:
    shapes = output_shapes(node)
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if shapes is None or not isinstance(groups, int) or groups == 1:
        return
    new = keep.size(node.name, 0, 1, shapes[0][1]) // (shapes[0][1] // groups)  # whole groups go
    if new == groups:
        return
    if len(node.args) > 6:
        node.args = (*node.args[:6], new, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "groups": new}


def _update_attention_scale(node: Node, keep: _Keep) -> None:
    """Pruned head dims: the default softmax scale 1/sqrt(E) would change, so pass the original."""
    q = node.args[0] if node.args else None
    shapes = output_shapes(q) if isinstance(q, Node) else None
    if shapes is None or len(node.args) > 6 or node.kwargs.get("scale") is not None:
        return
    e = shapes[0][-1]
    if keep.size(q.name, 0, len(shapes[0]) - 1, e) != e:
        node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(e)}


# Size literals to rewrite, keyed by method name or function.
LITERAL_UPDATES: dict[Any, Callable[[Node, _Keep], None]] = {
    "view": _update_view,
    "reshape": _update_view,
    "expand": _update_view,
    torch.reshape: _update_view,
    "split": _update_split,
    torch.split: _update_split,
    F.layer_norm: _update_layer_norm,
    F.group_norm: _update_group_norm,
    F.conv1d: _update_conv_groups,
    F.conv2d: _update_conv_groups,
    F.conv3d: _update_conv_groups,
    F.scaled_dot_product_attention: _update_attention_scale,
}


def _update_literals(graph: torch.fx.Graph, keep: _Keep) -> None:
    for node in graph.nodes:
        if node.op in ("call_method", "call_function"):
            try:
                update = LITERAL_UPDATES.get(node.target)
            except TypeError:
                update = None
            if update is not None:
                update(node, keep)


def _set_meta_shapes(gm: nn.Module, keep: _Keep) -> None:
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if output_shapes(node) is None:
            continue
        if hasattr(meta, "shape"):
            node.meta["tensor_meta"] = meta._replace(shape=torch.Size(_new_sizes(node, keep)))
        else:
            items = [m._replace(shape=torch.Size(_new_sizes(node, keep, i))) for i, m in enumerate(meta)]
            node.meta["tensor_meta"] = type(meta)(items)


def _output_mask(node: Node, keep: _Keep) -> torch.Tensor | None:
    """0/1 tensor broadcastable to the node's output: 0 where a removed channel sits."""
    shapes = output_shapes(node)
    if shapes is None or len(shapes) != 1 or not hasattr(node.meta.get("tensor_meta"), "shape"):
        return None
    shape, mask = shapes[0], None
    for d, size in enumerate(shape):
        idx = keep.indices((node.name, 0, d))
        if idx is None:
            continue
        v = torch.zeros(size, dtype=node.meta["tensor_meta"].dtype)
        v[torch.as_tensor(idx, dtype=torch.long)] = 1
        view = [1] * len(shape)
        view[d] = size
        mask = v.view(view) if mask is None else mask * v.view(view)
    return mask


def _insert_masks(root: nn.Module, graph: torch.fx.Graph, keep: _Keep) -> None:
    for i, node in enumerate(list(graph.nodes)):
        if node.op in ("placeholder", "output"):
            continue
        mask = _output_mask(node, keep)
        if mask is None:
            continue
        name = f"_fxopt_prune_mask_{i}"
        root.register_buffer(name, mask)
        with graph.inserting_after(node):
            attr = graph.get_attr(name)
        with graph.inserting_after(attr):
            masked = graph.call_function(torch.mul, (node, attr))
        node.replace_all_uses_with(masked, delete_user_cb=lambda user, m=masked: user is not m)


def apply_plan(gm: GraphModule, analysis: DependencyAnalysis, removed: np.ndarray, mode: str = "slice") -> GraphModule | ShapeOnlyModule:
    """A new graph module with the atoms marked in `removed` pruned; `gm` is left intact.

    Args:
        gm: the analysed graph module.
        analysis: its `DependencyAnalysis`.
        removed: one bool per atom.
        mode: ``"slice"`` removes the channels. ``"mask"`` keeps every shape and multiplies
            each node output by a 0/1 mask that zeroes the removed channels: the sliced model
            must compute exactly the kept channels of this one (the reference the tests use;
            it differs only where a removed channel enters a cross-channel normalisation such
            as LayerNorm, softmax or a mean over channels). ``"meta"`` builds shapes only
            (meta-device tensors and updated ``tensor_meta``) for costing.

    Returns:
        The new GraphModule.
    """
    if mode == "meta":
        return shape_only(gm, analysis, removed)
    keep = _Keep(analysis, removed)
    root = _shallow_root(gm)
    graph = _copy_graph(gm.graph)
    if mode == "mask":
        _insert_masks(root, graph, keep)
    else:
        for path in _slice_tensors(root, analysis, keep, mode):
            _fix_module(root.get_submodule(path))
        _update_literals(graph, keep)
    new = GraphModule(root, graph, type(gm).__name__)
    new.training = gm.training  # submodules keep their own modes (copied with them)
    new.meta.update({k: v for k, v in gm.meta.items() if k != "fxopt_tables"})
    new.meta["fxopt_tables"] = dict(gm.meta.get("fxopt_tables", {}))
    return new


class ShapeOnlyModule(nn.Module):
    """A plan's module tree on the meta device plus its graph with updated ``tensor_meta``.

    It has what `fxopt.costs.cost_model.estimate_costs` reads (``graph``, submodules, parameters)
    without generating code, so costing a candidate plan is cheap; it cannot run.
    """

    def __init__(self, root: nn.Module, graph: torch.fx.Graph) -> None:
        super().__init__()
        for name, child in root.named_children():
            self.add_module(name, child)
        for name, p in root._parameters.items():
            self.register_parameter(name, p)
        for name, value in vars(root).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                setattr(self, name, value)
        for name, buf in root._buffers.items():
            self.register_buffer(name, buf)
        self.graph = graph


def shape_only(gm: GraphModule, analysis: DependencyAnalysis, removed: np.ndarray) -> ShapeOnlyModule:
    """The shape-only build of a plan (see `ShapeOnlyModule`), for costing candidates."""
    keep = _Keep(analysis, removed)
    root = _shallow_root(gm)
    graph = _copy_graph(gm.graph)
    for path in _slice_tensors(root, analysis, keep, "meta"):
        _fix_module(root.get_submodule(path))
    module = ShapeOnlyModule(root, graph)
    _set_meta_shapes(module, keep)
    return module


# --------------------------------------------------------------------------------------------
# selection under a budget


def _matches(names: Sequence[str], pattern: str) -> bool:
    return any(n == pattern or re.fullmatch(pattern, n) for n in names)


class _Selector:
    """Turns one knob value into a removal plan, honouring overrides, caps and alignment."""

    def __init__(self, analysis: DependencyAnalysis, scores: np.ndarray, settings: PruneSettings, alignment: int) -> None:
        self.analysis = analysis
        self.settings = settings
        self.alignment = alignment
        self.order: dict[int, np.ndarray] = {}
        self.normalised: dict[int, np.ndarray] = {}
        self.fixed: dict[int, float] = {}
        for g in analysis.groups:
            atoms = np.asarray(g.atoms)
            s = scores[atoms]
            rank = np.lexsort((atoms, s))
            self.order[g.index] = atoms[rank]
            mean = float(np.abs(s).mean()) if s.size else 0.0
            self.normalised[g.index] = s[rank] / mean if mean > 0 else np.zeros_like(s)
            for pattern, amount in settings.overrides:
                if _matches(g.root_modules + g.root_names, pattern):
                    self.fixed[g.index] = amount

    def keep_count(self, g: PruneGroup, n_remove: int) -> int:
        n = len(g.atoms)
        min_keep = max(1, math.ceil((1 - self.settings.max_ratio) * n - 1e-9))
        k = n - n_remove
        width = g.atom_width or 1
        step = self.alignment // math.gcd(self.alignment, width) if g.atom_width else 1
        if n < step:
            return n
        # groups round at staggered points (a golden-ratio phase each), so the removed total
        # grows smoothly with the knob instead of in steps of whole alignment blocks
        phase = 0.5 if g.index in self.fixed else (g.index * 0.6180339887 + 0.5) % 1.0
        k = int(math.floor(k / step + phase)) * step
        if k < min_keep:
            k = math.ceil(min_keep / step) * step
        return min(max(k, step), n)

    def removal(self, g: PruneGroup, knob: float) -> int:
        if g.index in self.fixed:
            return int(round(self.fixed[g.index] * len(g.atoms)))
        if self.settings.allocation == "uniform":
            return int(round(knob * len(g.atoms)))
        return int(np.searchsorted(self.normalised[g.index], knob, side="left"))

    def plan(self, knob: float) -> tuple[np.ndarray, dict[int, int]]:
        removed = np.zeros(self.analysis.num_atoms, dtype=bool)
        keep: dict[int, int] = {}
        for g in self.analysis.groups:
            k = self.keep_count(g, self.removal(g, knob))
            keep[g.index] = k
            removed[self.order[g.index][: len(g.atoms) - k]] = True
        return removed, keep

    def knob_range(self) -> tuple[float, float]:
        if self.settings.allocation == "uniform":
            return 0.0, 1.0
        top = max((float(v[-1]) for v in self.normalised.values() if v.size), default=1.0)
        return 0.0, top + 1e-6


def plan_keep_ratios(analysis: DependencyAnalysis, scores: np.ndarray, ratios: Mapping[int, float], *,
                     alignment: int, max_ratio: float = 0.9) -> tuple[np.ndarray, dict[int, int]]:
    """A removal plan that keeps about `ratios[group]` of each group's channels (1.0 where a
    group is not named), the least important first, rounded to `alignment` and capped by
    `max_ratio` as `PruneChannels` rounds them.

    Returns:
        ``(removed, keep)``: one bool per atom, and the kept atom count per group.
    """
    settings = _settings(0.0, "channels", "uniform", None, (), max_ratio, None, "l1")
    selector = _Selector(analysis, scores, settings, alignment)
    removed = np.zeros(analysis.num_atoms, dtype=bool)
    keep: dict[int, int] = {}
    for g in analysis.groups:
        n = len(g.atoms)
        k = n if ratios.get(g.index, 1.0) >= 1.0 else selector.keep_count(g, int(round((1 - ratios[g.index]) * n)))
        keep[g.index] = k
        removed[selector.order[g.index][: n - k]] = True
    return removed, keep


def _unit(cost: CostSummary, by: str) -> float:
    return {"params": cost.params, "flops": cost.flops, "latency": cost.latency_s}[by]


class _Measure:
    """Fraction of the budget unit a plan removes (cached per plan)."""

    def __init__(self, gm: GraphModule, analysis: DependencyAnalysis, by: str, target: Any, precision: str) -> None:
        self.gm, self.analysis, self.by = gm, analysis, by
        self.target, self.precision = target, precision
        base = estimate_costs(gm, target, precision)
        self.base = _unit(base, by) if by != "channels" else 0.0
        # params are always known; FLOPs and latency leave out what could not be costed
        self.uncosted = base.uncosted_note() if by in ("flops", "latency") else ""
        self._cache: dict[bytes, float] = {}

    def __call__(self, removed: np.ndarray, keep: Mapping[int, int]) -> float:
        key = np.packbits(removed).tobytes()
        if key not in self._cache:
            self._cache[key] = self._measure(removed, keep)
        return self._cache[key]

    def _measure(self, removed: np.ndarray, keep: Mapping[int, int]) -> float:
        if self.by == "channels":
            kept = sum(keep[g.index] * max(g.atom_width, 1) for g in self.analysis.groups)
            total = sum(len(g.atoms) * max(g.atom_width, 1) for g in self.analysis.groups)
            return 1 - kept / total if total else 0.0
        if not removed.any() or self.base == 0:
            return 0.0
        candidate = shape_only(self.gm, self.analysis, removed)
        return 1 - _unit(estimate_costs(candidate, self.target, self.precision), self.by) / self.base


def _search(selector: _Selector, measure: _Measure, amount: float) -> tuple[np.ndarray, dict[int, int], float]:
    """Find the knob whose plan removes the fraction closest to `amount`.

    The removed fraction grows monotonically (in steps) with the knob, so a bracketing search
    is safe; regula falsi with the Illinois correction needs far fewer costings than bisection.
    """
    lo, hi = selector.knob_range()
    f_lo, f_hi = 0.0, None
    best: tuple[float, np.ndarray, dict[int, int], float] | None = None
    side = 0
    for step in range(_SEARCH_STEPS):
        if f_hi is None:
            mid = hi
        else:
            mid = lo + (amount - f_lo) * (hi - lo) / (f_hi - f_lo) if f_hi > f_lo else (lo + hi) / 2
            margin = (hi - lo) * 0.05
            mid = min(max(mid, lo + margin), hi - margin) if step % 4 != 3 else (lo + hi) / 2
        removed, keep = selector.plan(mid)
        got = measure(removed, keep)
        if best is None or abs(got - amount) < best[0]:
            best = (abs(got - amount), removed, keep, got)
        if abs(got - amount) < 0.003 or (f_hi is None and got <= amount):
            break
        if f_hi is None or got > amount:
            hi, f_hi = mid, got
            f_lo = f_lo if side != 1 else f_lo + (amount - f_lo) / 2  # Illinois: pull the stale end
            side = 1
        else:
            lo, f_lo = mid, got
            f_hi = f_hi if side != -1 else f_hi - (f_hi - amount) / 2
            side = -1
        if hi - lo < 1e-6:
            break
    assert best is not None
    return best[1], best[2], best[3]


def plan_pruning(
    gm: GraphModule,
    analysis: DependencyAnalysis,
    scores: np.ndarray,
    settings: PruneSettings,
    *,
    target: Any,
    precision: str,
    alignment: int,
) -> PrunePlan:
    """Choose the atoms to remove so the budget in `settings` is met.

    Args:
        gm: the analysed graph module (shapes propagated).
        analysis: its dependency analysis.
        scores: one importance per atom (higher = keep).
        settings: the pass options.
        target: target profile for FLOPs/latency costs.
        precision: precision for the latency model.
        alignment: kept channel counts are rounded to multiples of this.

    Returns:
        The `PrunePlan`.
    """
    selector = _Selector(analysis, scores, settings, alignment)
    measure = _Measure(gm, analysis, settings.by, target, precision)
    if settings.amount == 0 and not selector.fixed:
        removed = np.zeros(analysis.num_atoms, dtype=bool)
        return PrunePlan(removed, {g.index: len(g.atoms) for g in analysis.groups}, 0.0, alignment, measure.uncosted)
    removed, keep, achieved = _search(selector, measure, settings.amount)
    return PrunePlan(removed, keep, achieved, alignment, measure.uncosted)


# --------------------------------------------------------------------------------------------
# report rows


def empty_tensors(gm: GraphModule, shaped: nn.Module) -> list[str]:
    """Nodes of the shape-only build `shaped` with a zero-size dimension `gm` did not have."""
    before = {n.name: output_shapes(n) for n in gm.graph.nodes}
    empty = []
    for node in shaped.graph.nodes:
        old, new = before.get(node.name), output_shapes(node)
        if old is None or new is None:
            continue
        if any(n == 0 < o for old_shape, new_shape in zip(old, new) for o, n in zip(old_shape, new_shape)):
            empty.append(node.name)
    return empty


def _group_rows(gm: GraphModule, pruned: nn.Module, analysis: DependencyAnalysis, plan: PrunePlan,
                target: Any, precision: str) -> list[dict[str, Any]]:
    before = estimate_costs(gm, target, precision).per_node
    after = estimate_costs(pruned, target, precision).per_node
    owner: dict[str, int] = {}
    for g in analysis.groups:
        for name in g.root_names:
            owner.setdefault(name, g.index)
    rows = []
    for g in analysis.groups:
        nodes = [n for n in g.root_names if owner.get(n) == g.index]
        d_params = sum(after[n].params - before[n].params for n in nodes if n in after)
        d_flops = sum(after[n].flops - before[n].flops for n in nodes if n in after)
        d_lat = sum(after[n].latency_s - before[n].latency_s for n in nodes if n in after)
        width = max(g.atom_width, 1)
        roots = ", ".join(g.root_modules[:3]) + (f" +{len(g.root_modules) - 3}" if len(g.root_modules) > 3 else "")
        rows.append({
            "group": g.index, "producers": roots, "channels before": len(g.atoms) * width,
            "channels after": plan.keep[g.index] * width, "params change (producers)": d_params,
            "FLOPs change (producers)": d_flops, "est. latency change ms (producers)": round(d_lat * 1e3, 5),
        })
    return rows


def budget_note(settings: PruneSettings, plan: PrunePlan, analysis: DependencyAnalysis) -> str:
    """Why the achieved budget is off the request by more than `BUDGET_TOLERANCE` ("" otherwise)."""
    if abs(plan.achieved - settings.amount) <= BUDGET_TOLERANCE:
        return ""
    prunable = sum(len(g.atoms) * max(g.atom_width, 1) for g in analysis.groups)
    head = (f"{plan.achieved:.3f} of the {settings.by} removed for {settings.amount} requested "
            f"({prunable} prunable channels in {len(analysis.groups)} group(s), max_ratio {settings.max_ratio}, "
            f"alignment {plan.alignment})")
    if plan.achieved > settings.amount:
        return f"budget overshot: {head}; kept counts are rounded to whole alignment blocks"
    top = "; ".join(f"{reason} ({n} channels)" for reason, n in list(analysis.blocking_reasons().items())[:3])
    return f"budget missed: {head}; producer channels frozen by: {top or 'none'}"


def _budget_row(settings: PruneSettings, plan: PrunePlan, analysis: DependencyAnalysis) -> dict[str, Any]:
    pruned = sum(1 for g in analysis.groups if plan.keep[g.index] < len(g.atoms))
    return {
        "by": settings.by, "requested": settings.amount, "achieved": round(plan.achieved, 4),
        "allocation": settings.allocation, "alignment": plan.alignment,
        "groups": len(analysis.groups), "groups pruned": pruned,
        "frozen nodes": len(analysis.frozen_reasons()),
        "note": budget_note(settings, plan, analysis),
        "uncosted": plan.uncosted or "none",
    }


# --------------------------------------------------------------------------------------------
# the pass


@register_pass
class PruneChannels(FxoptPass):
    """Structured channel pruning over dependency groups, under a budget.

    Args:
        amount: fraction of the unit `by` to remove, in [0, 1) (0.5 with ``by="flops"``
            leaves about half of the FLOPs).
        by: the budget unit: ``"channels"``, ``"params"``, ``"flops"`` or ``"latency"``
            (the target's roofline latency estimate).
        allocation: ``"uniform"`` removes the same fraction of every group; ``"global"``
            removes the channels with the lowest importance normalised per group.
        overrides: ``{module name or regex: amount}`` fixes the channel fraction removed from
            groups whose producers match.
        ignore: module names or regexes whose output channels are kept.
        max_ratio: the largest fraction of any group's channels that may go.
        round_to: channel multiple for kept counts; default the target's alignment at the
            compile precision (8 for fp16 on Xavier).
        importance: ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"taylor"`` (needs ``calib_data``) or a
            callable ``(group, graph_module) -> tensor`` of per-channel scores.

    Example:
        >>> import torch, fxopt
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16),
        ...                         torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1))
        >>> gm = fxopt.trace(m, torch.randn(1, 3, 8, 8))
        >>> result = PruneChannels(amount=0.5, by="channels", round_to=8)(gm)  # cpu's alignment is the host's lane count
        >>> result.modified, result.graph_module.get_submodule("0").out_channels
        (True, 8)
    """

    name = "prune"
    lossy = True
    shares_weights = True  # replaces what it changes, never writes into a weight
    reads_options = ("calib_data", "calib_labels")  # Taylor importance
    after = ("canonicalize",)
    before = ("fold_batchnorm", "quantize")

    def __init__(
        self,
        amount: float = 0.5,
        by: str = "channels",
        allocation: str = "uniform",
        overrides: Mapping[str, float] | None = None,
        ignore: Sequence[str] = (),
        max_ratio: float = 0.9,
        round_to: int | None = None,
        importance: str | Criterion = "l1",
    ) -> None:
        super().__init__()
        self.settings = _settings(amount, by, allocation, overrides, ignore, max_ratio, round_to, importance)
        self.plan: PrunePlan | None = None
        self.analysis: DependencyAnalysis | None = None

    def check_options(self, options: Mapping[str, Any], target: Any = None) -> None:
        """Taylor importance scores channels on calibration batches: without them, refuse before work."""
        if self.settings.importance == "taylor" and not options.get("calib_data"):
            raise InputError("PruneChannels: importance='taylor' needs calib_data=[(x,), ...] (a few batches like the "
                             "example inputs) to score channels; pass it, or use importance='l1'")

    def options(self) -> dict[str, Any]:
        s = self.settings
        importance = s.importance if isinstance(s.importance, str) else getattr(s.importance, "__name__", "callable")
        return {
            "amount": s.amount, "by": s.by, "allocation": s.allocation, "overrides": dict(s.overrides),
            "ignore": list(s.ignore), "max_ratio": s.max_ratio, "round_to": s.round_to, "importance": importance,
        }

    def call(self, graph_module: GraphModule) -> PassResult:
        ctx = current_context()
        s = self.settings
        alignment = s.round_to or ctx.target.alignment(ctx.precision)
        if not any("tensor_meta" in n.meta for n in graph_module.graph.nodes):
            raise InputError(
                "PruneChannels needs shapes on the graph: trace the model with fxopt.trace(model, "
                "example_inputs) (or run it through fxopt.compile)"
            )
        analysis = analyze_dependencies(graph_module, ignore=s.ignore)
        self.analysis = analysis
        calib = ctx.options.get("calib_data")
        scores = atom_scores(graph_module, analysis, s.importance, calib_data=calib, labels=ctx.options.get("calib_labels"))
        plan = plan_pruning(graph_module, analysis, scores, s, target=ctx.target, precision=ctx.precision, alignment=alignment)
        self.plan = plan
        if not plan.removed.any():
            return PassResult(graph_module, False)
        shaped = shape_only(graph_module, analysis, plan.removed)
        empty = empty_tensors(graph_module, shaped)
        if empty:  # groups per split piece should prevent this; a plan that empties a tensor is refused
            raise PassError(self.name, f"the plan leaves zero-size tensors at {', '.join(empty[:5])}")
        pruned = apply_plan(graph_module, analysis, plan.removed, mode="slice")
        tables = pruned.meta["fxopt_tables"]
        tables[TABLE] = _group_rows(graph_module, shaped, analysis, plan, ctx.target, ctx.precision)
        tables[BUDGET_TABLE] = [_budget_row(s, plan, analysis)]
        return PassResult(pruned, True)
