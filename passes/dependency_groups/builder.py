"""Channel dependency analysis: which channels of an FX graph must be removed together.

Every dimension of every tensor a node produces is a *channel space* ``(node, item, dim)``.
Per-op rules (explicit registries keyed by module type, function or method name) couple
spaces with index maps: identity (elementwise ops, norms, tied modules), offsets (concat,
split/chunk), blocks (flatten -> linear, grouped/depthwise conv, GroupNorm groups, reshapes
that split or merge a channel dimension). The spaces and their couplings form a networkx graph;
at channel level a union-find over the index maps yields *atoms* (sets of channel indices that
live or die together). An atom is prunable when it holds an output channel of a conv/linear and
no index that is frozen (graph inputs/outputs, unknown ops, leaf modules, shared parameters,
sizes read into arithmetic the analysis does not model). Prunable atoms living in the same producers and the same spaces
form a `PruneGroup` (so the pieces of a split are separate groups, and none is ever emptied).

Sizes read at run time (``b, c, h, w = x.shape``) and recomputed into view/reshape/expand
arguments by products and floor division by constants (``c // groups``, ``d // heads``) are
*size constraints*: the pruning must keep the arithmetic exact, i.e. every prunable atom must
take ``coef`` times as many indices from the reshaped dim as from the size it reads (equal
counts per channel-shuffle group, equal head dims in every head). A constraint that an index
coupling can satisfy (a size copied as is) gets one; one that nothing satisfies freezes.

The analysis writes a frozen `NodeChannels` under ``node.meta["fxopt"]["prune_group"]``; the
pruning transform (`fxopt.passes.prune`) reads it.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

__all__ = [
    "ChannelDim",
    "DependencyAnalysis",
    "NodeChannels",
    "ParamDim",
    "PruneGroup",
    "SizeConstraint",
    "SizeExpr",
    "SpaceKey",
    "analyze_dependencies",
    "size_expr",
    "META_KEY",
]

META_KEY = "prune_group"

SpaceKey = tuple[str, int, int]  # (node name, output item (0 for a single tensor), dim)


@dataclass(frozen=True)
class ChannelDim:
    """One dimension of one node output, as the pruning transform sees it.

    Attributes:
        size: the dimension's size in the traced graph.
        atoms: the atom id of each index (atoms are shared by coupled indices everywhere).
        groups: ids of the prune groups whose atoms appear in this dimension (empty: never pruned).
        frozen: why this dimension may not change ("" when it may).
    """

    size: int
    atoms: tuple[int, ...]
    groups: tuple[int, ...]
    frozen: str = ""


@dataclass(frozen=True)
class NodeChannels:
    """The channel spaces of one node's outputs (one tuple of dims per output item)."""

    outputs: tuple[tuple[ChannelDim, ...], ...]


@dataclass(frozen=True)
class ParamDim:
    """A parameter (or buffer) dimension whose slices follow one channel space.

    Attributes:
        owner: module path (for ``call_module``) or attribute path (for ``get_attr``).
        name: parameter/buffer name inside the owner ("" for a ``get_attr`` tensor itself).
        dim: the tensor dimension that is sliced.
        space: the channel space whose kept indices select the slices.
        kind: ``out`` (a producer's output channels), ``in`` (a consumer's input channels),
            ``affine`` (norm scale/shift), ``stat`` (running statistics), ``tensor``.
    """

    owner: str
    name: str
    dim: int
    space: SpaceKey
    kind: str


@dataclass(frozen=True)
class SizeExpr:
    """A size computed from sizes read at run time: ``coef * prod(size of each factor)``.

    Attributes:
        coef: the constant part (``c // 4`` has coef 1/4).
        factors: ``(tensor node, dim)`` of every size read that the product multiplies.
    """

    coef: Fraction
    factors: tuple[tuple[Node, int], ...]


@dataclass(frozen=True)
class SizeConstraint:
    """``size(target) == coef * prod(size(f) for f in factors)`` must hold after pruning too.

    It holds for every plan when at most one factor holds prunable atoms and each prunable
    atom takes ``coef * (the other factors' sizes)`` times as many indices from `target` as
    from that factor.
    """

    target: SpaceKey
    coef: Fraction
    factors: tuple[SpaceKey, ...]


@dataclass(frozen=True)
class PruneGroup:
    """Channels that are pruned together: atoms living in the same producer outputs and spaces.

    Attributes:
        index: the group id (as in ``ChannelDim.groups``).
        atoms: atom ids, one per prunable unit (a channel, or a whole conv/norm group).
        roots: the producer output spaces (conv/linear outputs) holding these atoms.
        root_names: node names of the producers, for reports and ``ignore``/``overrides``.
        atom_width: channels one atom occupies in the first root (1 except grouped couplings).
        members: node names whose outputs hold atoms of the group.
    """

    index: int
    atoms: tuple[int, ...]
    roots: tuple[SpaceKey, ...]
    root_names: tuple[str, ...]
    root_modules: tuple[str, ...]
    atom_width: int
    members: tuple[str, ...]

    @property
    def channels(self) -> int:
        """Channels of the group in its first root."""
        return len(self.atoms) * self.atom_width


@dataclass
class DependencyAnalysis:
    """The result of `analyze_dependencies`.

    Attributes:
        spaces: channel space -> (offset of its first index in the element arrays, size).
        atom_of: atom id of every element (channel index of every space).
        prunable: per atom, whether it may be removed.
        groups: the prune groups.
        frozen: frozen space -> reason.
        param_dims: parameter dimensions that follow channel spaces.
        space_graph: networkx graph of coupled spaces (edge attribute ``kind``).
        module_calls: module path -> node names that call it.
        roots: producer output spaces (conv/linear outputs), prunable or not.
    """

    spaces: dict[SpaceKey, tuple[int, int]]
    atom_of: np.ndarray
    prunable: np.ndarray
    groups: list[PruneGroup]
    frozen: dict[SpaceKey, str]
    param_dims: list[ParamDim]
    space_graph: nx.Graph
    module_calls: dict[str, list[str]] = field(default_factory=dict)
    roots: list[SpaceKey] = field(default_factory=list)

    @property
    def num_atoms(self) -> int:
        return int(self.prunable.shape[0])

    def elements(self, space: SpaceKey) -> np.ndarray:
        """Atom id of each index of `space`."""
        offset, size = self.spaces[space]
        return self.atom_of[offset:offset + size]

    def kept_indices(self, space: SpaceKey, removed: np.ndarray) -> np.ndarray:
        """Indices of `space` that survive when atoms with ``removed[atom]`` are pruned."""
        return np.nonzero(~removed[self.elements(space)])[0]

    def frozen_reasons(self) -> dict[str, str]:
        """Node name -> first reason one of its outputs is frozen."""
        out: dict[str, str] = {}
        for (name, _, _), reason in self.frozen.items():
            out.setdefault(name, reason)
        return out

    def blocking_reasons(self) -> dict[str, int]:
        """Frozen reason -> producer output channels it keeps from being pruned, most first.

        A channel is counted for every reason that freezes a space its atom reaches.
        """
        channels = np.zeros(self.num_atoms, dtype=np.int64)
        for key in dict.fromkeys(self.roots):
            np.add.at(channels, self.elements(key), 1)
        blocked = (channels > 0) & ~self.prunable
        atoms_of: dict[str, list[np.ndarray]] = {}
        for key, reason in self.frozen.items():
            atoms = self.elements(key)
            atoms_of.setdefault(reason, []).append(atoms[blocked[atoms]])
        counts = {reason: int(channels[np.unique(np.concatenate(a))].sum()) for reason, a in atoms_of.items()}
        return dict(sorted(((r, c) for r, c in counts.items() if c), key=lambda rc: (-rc[1], rc[0])))


# --------------------------------------------------------------------------------------------
# shapes


def _is_meta(value: object) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def output_shapes(node: Node) -> list[tuple[int, ...]] | None:
    """Shapes of a node's tensor outputs (one per item), or None for non-tensor outputs."""
    meta = node.meta.get("tensor_meta")
    if _is_meta(meta):
        return [tuple(meta.shape)]
    if isinstance(meta, (tuple, list)) and meta and all(_is_meta(m) for m in meta):
        return [tuple(m.shape) for m in meta]
    return None


def is_tuple_output(node: Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return not _is_meta(meta) and isinstance(meta, (tuple, list))


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, Node) or is_tuple_output(node):
        return None
    shapes = output_shapes(node)
    return shapes[0] if shapes else None


def _tensor_args(node: Node) -> list[Node]:
    return [a for a in node.all_input_nodes if _shape(a) is not None]


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# --------------------------------------------------------------------------------------------
# the builder: spaces, couplings, frozen spaces, roots, parameter dims


class _Builder:
    """Collects spaces and their index couplings while the per-op rules run."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.spaces: dict[SpaceKey, tuple[int, int]] = {}
        self.total = 0
        self.pairs_a: list[np.ndarray] = []
        self.pairs_b: list[np.ndarray] = []
        self.frozen: dict[SpaceKey, str] = {}
        self.roots: list[SpaceKey] = []
        self.param_dims: list[ParamDim] = []
        self.graph = nx.Graph()
        self.module_calls: dict[str, list[str]] = {}
        self.owners: dict[int, set[str]] = {}
        self.nodes: dict[str, Node] = {n.name: n for n in gm.graph.nodes}
        self.linked: set[SpaceKey] = set()
        self.size_constraints: list[SizeConstraint] = []
        # factors a split keeps whole because the size arithmetic fixes them (shuffle groups, heads)
        self.fixed_factors: set[SpaceKey] = set()

    # spaces ---------------------------------------------------------------------------------

    def add_node(self, node: Node) -> None:
        for item, shape in enumerate(output_shapes(node) or ()):
            for dim, size in enumerate(shape):
                key = (node.name, item, dim)
                self.spaces[key] = (self.total, int(size))
                self.total += int(size)
                self.graph.add_node(key)

    def space(self, node: Node, dim: int, item: int = 0) -> SpaceKey | None:
        key = (node.name, item, dim)
        return key if key in self.spaces else None

    def size(self, key: SpaceKey) -> int:
        return self.spaces[key][1]

    def node_spaces(self, node: Node) -> list[SpaceKey]:
        return [(node.name, i, d) for i, s in enumerate(output_shapes(node) or ()) for d in range(len(s))]

    # couplings ------------------------------------------------------------------------------

    def couple(self, a: SpaceKey | None, b: SpaceKey | None, *, a_offset: int = 0, b_offset: int = 0,
               count: int | None = None, a_block: int = 1, b_block: int = 1, kind: str = "identity") -> None:
        """Unit u of `a` (a_block indices from a_offset + u*a_block) goes with unit u of `b`."""
        if a is None or b is None:
            return
        if count is None:
            count = (self.size(a) - a_offset) // a_block
        if count <= 0:
            return
        assert a_offset + count * a_block <= self.size(a) and b_offset + count * b_block <= self.size(b), (a, b)
        a0, b0 = self.spaces[a][0] + a_offset, self.spaces[b][0] + b_offset
        units = np.arange(count)
        a_first, b_first = a0 + units * a_block, b0 + units * b_block
        a_all = (a_first[:, None] + np.arange(a_block)[None, :]).reshape(-1)
        b_all = (b_first[:, None] + np.arange(b_block)[None, :]).reshape(-1)
        self.pairs_a += [a_all, b_all]
        self.pairs_b += [np.repeat(b_first, a_block), np.repeat(a_first, b_block)]
        self.linked.update((a, b))
        if a != b:
            self.graph.add_edge(a, b, kind=kind)

    def couple_same(self, a: Node, b: Node, dims: Iterable[tuple[int, int]] | None = None) -> None:
        """Identity-couple dims of two single-tensor nodes (all dims when `dims` is None)."""
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None:
            return
        pairs = dims if dims is not None else [(d, d) for d in range(min(len(sa), len(sb)))]
        for da, db in pairs:
            if sa[da] == sb[db] and sa[da] > 1:
                self.couple(self.space(a, da), self.space(b, db))

    def freeze(self, key: SpaceKey | None, reason: str) -> None:
        if key is not None and key not in self.frozen:
            self.frozen[key] = reason

    def freeze_node_outputs(self, node: Node, reason: str) -> None:
        for key in self.node_spaces(node):
            self.freeze(key, reason)

    def freeze_all(self, node: Node, reason: str) -> None:
        """Freeze every space a node reads or writes (the rule for anything unknown)."""
        self.freeze_node_outputs(node, reason)
        for arg in node.all_input_nodes:
            self.freeze_node_outputs(arg, reason)

    def root(self, key: SpaceKey | None) -> None:
        if key is not None:
            self.roots.append(key)
            self.linked.add(key)

    def freeze_dims(self, node: Node, dims: Iterable[int], reason: str) -> None:
        for d in dims:
            self.freeze(self.space(node, d), reason)

    def param(self, owner: str, name: str, dim: int, key: SpaceKey | None, kind: str) -> None:
        if key is not None:
            self.param_dims.append(ParamDim(owner, name, dim, key, kind))


# --------------------------------------------------------------------------------------------
# generic coupling helpers


def _broadcast(b: _Builder, node: Node, inputs: Sequence[Any] | None = None) -> None:
    """Elementwise op: output dims couple with same-size input dims, aligned from the right."""
    out = _shape(node)
    if out is None:
        b.freeze_all(node, "elementwise op without a single tensor output")
        return
    args = [a for a in (inputs if inputs is not None else node.all_input_nodes) if isinstance(a, Node)]
    for arg in args:
        shape = _shape(arg)
        if shape is None:
            if output_shapes(arg) is not None:
                b.freeze_all(node, "elementwise op on a tuple")
            continue
        if len(shape) > len(out):
            b.freeze_all(node, "input of higher rank than the output")
            return
        lead = len(out) - len(shape)
        for d, size in enumerate(shape):
            if size == out[lead + d]:
                b.couple(b.space(arg, d), b.space(node, lead + d))
            elif size != 1:
                b.freeze_all(node, "unexpected broadcast")
                return


def _reshape(b: _Builder, src: Node, node: Node) -> None:
    """Same memory order, new shape: couple runs of dims with equal products.

    A run that keeps one dim is an identity; a merge or a split couples the outermost
    non-trivial dim by blocks and freezes the others (a strided slice would be needed).
    """
    ins, outs = _shape(src), _shape(node)
    if ins is None or outs is None:
        b.freeze_all(node, "reshape without shapes")
        return
    i = j = 0
    while i < len(ins) or j < len(outs):
        i0, j0 = i, j
        pi = ins[i] if i < len(ins) else 1
        pj = outs[j] if j < len(outs) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(ins):
                pi *= ins[i]
                i += 1
            elif pj < pi and j < len(outs):
                pj *= outs[j]
                j += 1
            else:
                b.freeze_all(node, "reshape with incompatible shapes")
                return
        _reshape_run(b, src, node, list(range(i0, min(i, len(ins)))), list(range(j0, min(j, len(outs)))))


# A split into (q/k/v, heads, head_dim) keeps the small stacking factor whole and prunes heads.
_STACKING_FACTOR = 4


def _split_run(b: _Builder, src: Node, node: Node, in_dim: int, out_dims: list[int]) -> None:
    """Couple one output factor of a split with strided blocks of the input; freeze the rest.

    The factor whose size argument is computed from a size read (``c // groups`` in a channel
    shuffle, ``d // heads`` in attention) is the unit and the literal factors stay whole.
    Otherwise the outermost factor is the unit (``C -> (C, H, W)`` keeps channels), unless it
    is a small stacking factor in front of two more (``3C -> (3, heads, head_dim)``): then each
    head owns one block of head_dim in every stacked part.
    """
    outs = _shape(node)
    assert outs is not None
    m = _computed_factor(node, out_dims)
    if m is None:
        m = 1 if len(out_dims) >= 3 and outs[out_dims[0]] <= _STACKING_FACTOR else 0
    else:
        b.fixed_factors.update(k for d in out_dims if d != out_dims[m] and (k := b.space(node, d)) is not None)
    unit = out_dims[m]
    inner = math.prod(outs[d] for d in out_dims[m + 1:])
    prefix = math.prod(outs[d] for d in out_dims[:m])
    for p in range(prefix):
        b.couple(b.space(node, unit), b.space(src, in_dim), b_offset=p * outs[unit] * inner,
                 b_block=inner, count=outs[unit], kind="block")
    for d in out_dims[m + 1:]:
        b.freeze(b.space(node, d), "inner factor of a split dimension")


def _merge_run(b: _Builder, src: Node, node: Node, in_dims: list[int], out_dim: int) -> None:
    """Couple one input factor of a merge with strided blocks of the output; freeze the rest.

    The outermost factor owns blocks of the output (flatten -> linear), unless it is a factor
    a split kept whole (heads, shuffle groups): then the one factor that is not is the unit.
    """
    ins = _shape(src)
    assert ins is not None
    m = 0
    if b.fixed_factors:
        free = [i for i, d in enumerate(in_dims) if not _reaches_fixed_factor(b, b.space(src, d))]
        m = free[0] if len(free) == 1 else 0
    unit = in_dims[m]
    inner = math.prod(ins[d] for d in in_dims[m + 1:])
    prefix = math.prod(ins[d] for d in in_dims[:m])
    for p in range(prefix):
        b.couple(b.space(src, unit), b.space(node, out_dim), b_offset=p * ins[unit] * inner,
                 b_block=inner, count=ins[unit], kind="block")
    for d in in_dims:
        if d != unit:
            b.freeze(b.space(src, d), "inner factor of a merged dimension")


def _reaches_fixed_factor(b: _Builder, key: SpaceKey | None) -> bool:
    return key is not None and not b.fixed_factors.isdisjoint(nx.node_connected_component(b.graph, key))


def _reshape_run(b: _Builder, src: Node, node: Node, in_dims: list[int], out_dims: list[int]) -> None:
    ins, outs = _shape(src), _shape(node)
    assert ins is not None and outs is not None
    big_in = [d for d in in_dims if ins[d] > 1]
    big_out = [d for d in out_dims if outs[d] > 1]
    if not big_in or not big_out:
        return
    if len(big_in) == 1 and len(big_out) == 1:
        b.couple(b.space(src, big_in[0]), b.space(node, big_out[0]))
        return
    if len(big_in) == 1:  # a split: one output factor takes whole blocks of the input
        _split_run(b, src, node, big_in[0], big_out)
        return
    if len(big_out) == 1:  # a merge (flatten): one input factor owns blocks of the output
        _merge_run(b, src, node, big_in, big_out[0])
        return
    for d in big_in:
        b.freeze(b.space(src, d), "reshape regroups several dimensions")
    for d in big_out:
        b.freeze(b.space(node, d), "reshape regroups several dimensions")


# --------------------------------------------------------------------------------------------
# module rules


def _first_tensor(node: Node) -> Node | None:
    arg = node.args[0] if node.args else None
    return arg if isinstance(arg, Node) and _shape(arg) is not None else None


def _conv_rule(b: _Builder, node: Node, mod: nn.Module) -> None:
    src = _first_tensor(node)
    out = _shape(node)
    if src is None or out is None or len(out) < 2 or len(_shape(src) or ()) != len(out):
        b.freeze_all(node, "conv on an unbatched input")
        return
    path = str(node.target)
    b.couple(b.space(src, 0), b.space(node, 0))
    b.freeze_dims(src, range(2, len(out)), "spatial dimension of a conv")
    b.freeze_dims(node, range(2, len(out)), "spatial dimension of a conv")
    transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
    in_key, out_key = b.space(src, 1), b.space(node, 1)
    if mod.groups > 1:
        if transposed:
            b.freeze_all(node, "grouped transposed conv")
            return
        # whole groups: group k's inputs and outputs go together
        b.couple(in_key, out_key, a_block=mod.in_channels // mod.groups,
                 b_block=mod.out_channels // mod.groups, kind="groups")
    b.root(out_key)
    w_out, w_in = (1, 0) if transposed else (0, 1)
    b.param(path, "weight", w_out, out_key, "out")
    if mod.groups == 1:
        b.param(path, "weight", w_in, in_key, "in")
    if mod.bias is not None:
        b.param(path, "bias", 0, out_key, "out")


def _linear_rule(b: _Builder, node: Node, mod: nn.Module) -> None:
    src, out = _first_tensor(node), _shape(node)
    if src is None or out is None:
        b.freeze_all(node, "linear without tensor shapes")
        return
    rank = len(out)
    b.couple_same(src, node, [(d, d) for d in range(rank - 1)])
    path = str(node.target)
    in_key, out_key = b.space(src, rank - 1), b.space(node, rank - 1)
    b.root(out_key)
    b.param(path, "weight", 0, out_key, "out")
    b.param(path, "weight", 1, in_key, "in")
    if mod.bias is not None:
        b.param(path, "bias", 0, out_key, "out")


def _norm_params(b: _Builder, path: str, mod: nn.Module, key: SpaceKey | None, stats: bool) -> None:
    for name in ("weight", "bias"):
        if getattr(mod, name, None) is not None:
            b.param(path, name, 0, key, "affine")
    if stats:
        for name in ("running_mean", "running_var"):
            if getattr(mod, name, None) is not None:
                b.param(path, name, 0, key, "stat")


def _batchnorm_rule(b: _Builder, node: Node, mod: nn.Module) -> None:
    src = _first_tensor(node)
    if src is None or len(_shape(src) or ()) < 2:
        b.freeze_all(node, "norm on an unbatched input")
        return
    b.couple_same(src, node)
    _norm_params(b, str(node.target), mod, b.space(node, 1), stats=True)


def _groupnorm_rule(b: _Builder, node: Node, mod: nn.GroupNorm) -> None:
    src = _first_tensor(node)
    if src is None or len(_shape(src) or ()) < 2:
        b.freeze_all(node, "norm on an unbatched input")
        return
    b.couple_same(src, node)
    key = b.space(node, 1)
    per_group = mod.num_channels // mod.num_groups
    if per_group > 1:  # whole groups: a group's statistics then stay those of the original
        b.couple(key, key, a_block=per_group, b_block=per_group, kind="groups")
    _norm_params(b, str(node.target), mod, key, stats=False)


def _layernorm_rule(b: _Builder, node: Node, mod: nn.LayerNorm) -> None:
    src, out = _first_tensor(node), _shape(node)
    if src is None or out is None:
        b.freeze_all(node, "layer norm without shapes")
        return
    b.couple_same(src, node)
    k = len(mod.normalized_shape)
    if k != 1:
        for d in range(len(out) - k, len(out)):
            b.freeze(b.space(node, d), "LayerNorm over several dimensions")
        return
    _norm_params(b, str(node.target), mod, b.space(node, len(out) - 1), stats=False)


def _passthrough_rule(b: _Builder, node: Node, mod: nn.Module | None = None) -> None:
    src = _first_tensor(node)
    if src is None:
        b.freeze_all(node, "op without a tensor input")
        return
    _broadcast(b, node, [src])


def _channel_keeping_rule(b: _Builder, node: Node, mod: nn.Module | None = None) -> None:
    """Pooling / resizing: batch and channel dims pass through, spatial dims change."""
    src = _first_tensor(node)
    if src is None or len(_shape(src) or ()) != len(_shape(node) or ()):
        b.freeze_all(node, "pooling on an unbatched input")
        return
    b.couple_same(src, node, [(0, 0), (1, 1)])
    rank = len(_shape(node) or ())
    b.freeze_dims(src, range(2, rank), "spatial dimension of a pooling/resize")
    b.freeze_dims(node, range(2, rank), "spatial dimension of a pooling/resize")


def _flatten_module_rule(b: _Builder, node: Node, mod: nn.Module) -> None:
    src = _first_tensor(node)
    if src is None:
        b.freeze_all(node, "flatten without a tensor input")
        return
    _reshape(b, src, node)


MODULE_RULES: dict[type[nn.Module], Callable[..., None]] = {
    nn.modules.conv._ConvNd: _conv_rule,
    nn.Linear: _linear_rule,
    nn.modules.batchnorm._BatchNorm: _batchnorm_rule,
    nn.modules.instancenorm._InstanceNorm: _batchnorm_rule,
    nn.GroupNorm: _groupnorm_rule,
    nn.LayerNorm: _layernorm_rule,
    nn.Flatten: _flatten_module_rule,
    nn.MultiheadAttention: lambda b, n, m: b.freeze_all(n, "nn.MultiheadAttention: heads and embed dims are not pruned"),
    nn.modules.pooling._MaxPoolNd: _channel_keeping_rule,
    nn.modules.pooling._AvgPoolNd: _channel_keeping_rule,
    nn.modules.pooling._AdaptiveAvgPoolNd: _channel_keeping_rule,
    nn.modules.pooling._AdaptiveMaxPoolNd: _channel_keeping_rule,
    nn.Upsample: _channel_keeping_rule,
    nn.PixelShuffle: lambda b, n, m: b.freeze_all(n, "pixel shuffle mixes channels and space"),
}

# Parameter-free modules that act elementwise (channels pass through unchanged).
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.modules.dropout._DropoutNd, nn.Softmax, nn.LogSoftmax,
)


def _module_rule(mod: nn.Module) -> Callable[..., None] | None:
    if isinstance(mod, ELEMENTWISE_MODULES):
        if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
            return None
        return _passthrough_rule
    for cls in type(mod).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return None


# --------------------------------------------------------------------------------------------
# function / method rules


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dims_arg(node: Node, start: int, name: str) -> list[Any]:
    rest = node.args[start:] if len(node.args) > start else ()
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    if rest:
        return list(rest)
    value = node.kwargs.get(name)
    return list(value) if isinstance(value, (tuple, list)) else ([value] if value is not None else [])


def _permute_rule(b: _Builder, node: Node) -> None:
    src = _first_tensor(node)
    dims = _dims_arg(node, 1, "dims")
    rank = len(_shape(node) or ())
    if src is None or len(dims) != rank or not all(isinstance(d, int) for d in dims):
        b.freeze_all(node, "permute with unknown dims")
        return
    b.couple_same(src, node, [(_norm_dim(d, rank), j) for j, d in enumerate(dims)])


def _transpose_rule(b: _Builder, node: Node) -> None:
    src, out = _first_tensor(node), _shape(node)
    if src is None or out is None:
        b.freeze_all(node, "transpose without shapes")
        return
    rank = len(out)
    if node.target in ("t",) or (len(node.args) < 3 and rank == 2):
        d0, d1 = 0, 1
    else:
        d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
    if not isinstance(d0, int) or not isinstance(d1, int):
        b.freeze_all(node, "transpose with unknown dims")
        return
    perm = list(range(rank))
    a, c = _norm_dim(d0, rank), _norm_dim(d1, rank)
    perm[a], perm[c] = perm[c], perm[a]
    b.couple_same(src, node, [(perm[j], j) for j in range(rank)])


def _reshape_fn_rule(b: _Builder, node: Node) -> None:
    src = _first_tensor(node)
    if src is None:
        b.freeze_all(node, "reshape without a tensor input")
        return
    _reshape(b, src, node)
    _couple_size_args(b, node)


# --------------------------------------------------------------------------------------------
# shape arithmetic: sizes read at run time and recomputed into view/reshape/expand arguments


def _couple_size_args(b: _Builder, node: Node) -> None:
    """Computed size arguments become size constraints (checked once the atoms are known)."""
    for j, spec in enumerate(_shape_spec(node) or ()):
        if not isinstance(spec, Node):
            continue
        target, expr = b.space(node, j), size_expr(spec)
        if target is None:
            continue
        factors = [key for t, d in expr.factors if (key := b.space(t, d)) is not None] if expr is not None else []
        if expr is None or len(factors) != len(expr.factors):
            b.freeze(target, "reshape size computed by arithmetic the analysis does not model")
            continue
        b.size_constraints.append(SizeConstraint(target, expr.coef, tuple(factors)))
        b.linked.add(target)


def _shape_spec(node: Node) -> list[Any] | None:
    """The target-shape arguments of view/reshape/expand (one entry per output dim)."""
    if node.target in ("view", "reshape", "expand") or node.target is torch.reshape:
        spec = _dims_arg(node, 1, "shape" if node.target is torch.reshape else "size")
        rank = len(_shape(node) or ())
        return spec if len(spec) == rank else None
    return None


def size_source(value: Any) -> tuple[Node, int] | None:
    """``(tensor node, dim)`` when `value` is exactly a size read ``t.shape[d]`` / ``t.size(d)``."""
    if not isinstance(value, Node):
        return None
    if value.op == "call_method" and value.target == "size" and len(value.args) == 2 and isinstance(value.args[1], int):
        t = value.args[0]
        return (t, _norm_dim(value.args[1], len(_shape(t) or ()))) if isinstance(t, Node) else None
    if value.op == "call_function" and value.target is operator.getitem and isinstance(value.args[1], int):
        shape = value.args[0]
        is_shape = isinstance(shape, Node) and (
            (shape.op == "call_function" and shape.target is getattr and shape.args[1] == "shape")
            or (shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1)
        )
        if is_shape:
            t = shape.args[0]
            return (t, _norm_dim(value.args[1], len(_shape(t) or ()))) if isinstance(t, Node) else None
    return None


# Integer arithmetic on sizes that stays a monomial: c * k, a * b, c // k (k a positive constant).
_SIZE_ARITHMETIC = (operator.mul, operator.floordiv)


def size_expr(value: Any) -> SizeExpr | None:
    """`value` as ``coef * product of size reads``, or None when it is not one.

    Example:
        >>> import torch, fxopt
        >>> class Shuffle(torch.nn.Module):
        ...     def forward(self, x):
        ...         b, c, h, w = x.shape
        ...         return x.view(b, 2, c // 2, h, w)
        >>> gm = fxopt.trace(Shuffle(), torch.randn(1, 4, 2, 2))
        >>> view = next(n for n in gm.graph.nodes if n.target == "view")
        >>> e = size_expr(view.args[3])
        >>> e.coef, [(t.name, d) for t, d in e.factors]
        (Fraction(1, 2), [('x', 1)])
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return SizeExpr(Fraction(value), ())
    source = size_source(value)
    if source is not None:
        return SizeExpr(Fraction(1), (source,))
    if not isinstance(value, Node) or value.op != "call_function" or value.target not in _SIZE_ARITHMETIC:
        return None
    if len(value.args) != 2 or value.kwargs:
        return None
    left, right = size_expr(value.args[0]), size_expr(value.args[1])
    if left is None or right is None:
        return None
    if value.target is operator.mul:  # c * k, a * b
        return SizeExpr(left.coef * right.coef, left.factors + right.factors)
    if not right.factors and right.coef > 0:  # c // k
        return SizeExpr(left.coef / right.coef, left.factors)
    return None


def _computed_factor(node: Node, out_dims: list[int]) -> int | None:
    """Position in `out_dims` of the one factor whose size is computed (``c // g``), the rest literal."""
    spec = _shape_spec(node)
    if spec is None:
        return None
    computed = [i for i, d in enumerate(out_dims) if isinstance(spec[d], Node)]
    literal = all(type(spec[d]) is int and spec[d] > 0 for i, d in enumerate(out_dims) if i not in computed)
    if len(computed) != 1 or not literal:
        return None
    expr = size_expr(spec[out_dims[computed[0]]])
    return computed[0] if expr is not None and expr.factors else None


def _is_clean_size_use(user: Node, value: Node) -> bool:
    spec = _shape_spec(user)
    return spec is not None and user.args[0] is not value and any(s is value for s in spec)


def _is_modelled_size_use(user: Node, value: Node) -> bool:
    """A size goes into reshape arguments, directly or through modelled arithmetic."""
    if _is_clean_size_use(user, value):
        return True
    return (user.op == "call_function" and user.target in _SIZE_ARITHMETIC and size_expr(user) is not None
            and all(_is_modelled_size_use(u, user) for u in user.users))


def _size_read_rule(b: _Builder, node: Node) -> None:
    """``t.shape`` / ``t.size()`` / ``t.size(d)``: sizes used other than in reshape sizes freeze."""
    t = node.args[0]
    if not isinstance(t, Node) or _shape(t) is None:
        return
    rank = len(_shape(t) or ())
    if node.target == "size" and len(node.args) == 2:
        dim = node.args[1]
        reads = [(node, _norm_dim(dim, rank))] if isinstance(dim, int) else []
    else:
        reads = []
        for user in node.users:
            if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
                reads.append((user, _norm_dim(user.args[1], rank)))
            else:
                for d in range(rank):
                    b.freeze(b.space(t, d), "whole shape read")
    for value, dim in reads:
        if not all(_is_modelled_size_use(u, value) for u in value.users):
            b.freeze(b.space(t, dim), f"size of dim {dim} used in arithmetic or control flow")


def _widths(b: _Builder, key: SpaceKey, atom_of: np.ndarray, n_atoms: int) -> np.ndarray:
    """Indices of `key` each atom holds."""
    offset, size = b.spaces[key]
    return np.bincount(atom_of[offset:offset + size], minlength=n_atoms)


def _constraint_holds(b: _Builder, c: SizeConstraint, atom_of: np.ndarray, prunable: np.ndarray) -> bool:
    if c.coef * math.prod(b.size(f) for f in c.factors) != b.size(c.target):
        return False  # not exact even before pruning (a floor division with a remainder)
    n = prunable.shape[0]
    live = [i for i, f in enumerate(c.factors) if prunable[_elements(b, f, atom_of)].any()]
    target = _widths(b, c.target, atom_of, n)[prunable]
    if not live:
        return not target.any()
    if len(live) > 1:
        return False  # a product of two pruned sizes is not linear in the atoms removed
    k = c.coef * math.prod(b.size(f) for i, f in enumerate(c.factors) if i != live[0])
    factor = _widths(b, c.factors[live[0]], atom_of, n)[prunable]
    return bool(np.array_equal(target * k.denominator, factor * k.numerator))


def _elements(b: _Builder, key: SpaceKey, atom_of: np.ndarray) -> np.ndarray:
    offset, size = b.spaces[key]
    return atom_of[offset:offset + size]


def _is_copy(b: _Builder, c: SizeConstraint) -> bool:
    return c.coef == 1 and len(c.factors) == 1 and b.size(c.factors[0]) == b.size(c.target)


def _resolve_size_constraints(b: _Builder) -> tuple[np.ndarray, np.ndarray]:
    """Atoms and prunable atoms once every size constraint holds.

    A copied size that the atoms do not keep equal (``reshape(b, n, d)`` with ``d`` read from
    another tensor) gets an index coupling, as a copy of the size would; whatever still breaks
    its constraint then is frozen (freezing only ever removes atoms from the check).
    """
    atom_of, prunable = _atoms(b)
    pending = [c for c in b.size_constraints if _is_copy(b, c)]
    while pending:
        broken = [c for c in pending if not _constraint_holds(b, c, atom_of, prunable)]
        if not broken:
            break
        for c in broken:
            b.couple(c.factors[0], c.target, kind="size")
        pending = [c for c in pending if c not in broken]
        atom_of, prunable = _atoms(b)
    remaining = list(b.size_constraints)
    while True:
        broken = [c for c in remaining if not _constraint_holds(b, c, atom_of, prunable)]
        if not broken:
            return atom_of, prunable
        for c in broken:  # frozen, its sizes keep their values: it holds from now on
            for key in (c.target, *c.factors):
                b.freeze(key, "size arithmetic the pruning cannot keep exact")
        remaining = [c for c in remaining if c not in broken]
        prunable = _prunable(b, atom_of)


def _getattr_rule(b: _Builder, node: Node) -> None:
    if node.args[1] == "shape":
        _size_read_rule(b, node)
    elif output_shapes(node) is not None:
        b.freeze_all(node, f"tensor attribute .{node.args[1]}")


def _expand_rule(b: _Builder, node: Node) -> None:
    src = _first_tensor(node)
    if src is None:
        b.freeze_all(node, "expand without a tensor input")
        return
    _broadcast(b, node, [src])
    _couple_size_args(b, node)


def _numel_rule(b: _Builder, node: Node) -> None:
    t = node.args[0] if node.args else None
    if isinstance(t, Node):
        b.freeze_node_outputs(t, "numel read")


def _cat_rule(b: _Builder, node: Node) -> None:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    out = _shape(node)
    if out is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        b.freeze_all(node, "concat with unknown arguments")
        return
    dim = _norm_dim(dim, len(out))
    offset = 0
    for t in tensors:
        shape = _shape(t)
        if shape is None or len(shape) != len(out):
            b.freeze_all(node, "concat of unknown tensors")
            return
        b.couple_same(t, node, [(d, d) for d in range(len(out)) if d != dim])
        b.couple(b.space(t, dim), b.space(node, dim), b_offset=offset, kind="concat")
        offset += shape[dim]


def _split_rule(b: _Builder, node: Node) -> None:
    src, shapes = _first_tensor(node), output_shapes(node)
    name = "dim"
    dim = _arg(node, 2, name, 0)
    if src is None or shapes is None or not is_tuple_output(node) or not isinstance(dim, int):
        b.freeze_all(node, "split with unknown arguments")
        return
    rank = len(_shape(src) or ())
    dim = _norm_dim(dim, rank)
    equal = node.target in ("chunk", torch.chunk) or isinstance(_arg(node, 1, "split_size_or_sections"), int)
    if equal and len({s[dim] for s in shapes}) != 1:
        b.freeze_all(node, "split into unequal pieces")  # no safe way to shrink a remainder
        return
    offset = 0
    for item, shape in enumerate(shapes):
        for d in range(rank):
            if d == dim:
                b.couple(b.space(node, d, item), b.space(src, d), a_offset=0, b_offset=offset, count=shape[d], kind="split")
            elif shape[d] > 1:
                b.couple(b.space(src, d), b.space(node, d, item))
        if equal and item > 0:  # equal pieces stay equal: index i goes in every piece
            b.couple(b.space(node, dim, 0), b.space(node, dim, item), kind="chunk")
        offset += shape[dim]


def _unbind_rule(b: _Builder, node: Node) -> None:
    src, shapes = _first_tensor(node), output_shapes(node)
    dim = _arg(node, 1, "dim", 0)
    if src is None or shapes is None or not isinstance(dim, int):
        b.freeze_all(node, "unbind with unknown arguments")
        return
    rank = len(_shape(src) or ())
    dim = _norm_dim(dim, rank)
    b.freeze(b.space(src, dim), "unbind dimension")
    for item in range(len(shapes)):
        for d in range(rank - 1):
            b.couple(b.space(src, d if d < dim else d + 1), b.space(node, d, item))


def _getitem_rule(b: _Builder, node: Node) -> None:
    src, index = node.args[0], node.args[1]
    if not isinstance(src, Node):
        return
    if is_tuple_output(src):
        shapes = output_shapes(src)
        if isinstance(index, int) and shapes is not None and _shape(node) is not None:
            item = index if index >= 0 else index + len(shapes)
            for d in range(len(shapes[item])):
                b.couple(b.space(src, d, item), b.space(node, d))
        else:
            b.freeze_all(node, "tuple index")
        return
    if _shape(src) is None:
        return  # indexing a shape or a python value
    _tensor_index_rule(b, src, node, index)


def _tensor_index_rule(b: _Builder, src: Node, node: Node, index: Any) -> None:
    ins, out = _shape(src), _shape(node)
    items = list(index) if isinstance(index, tuple) else [index]
    if out is None or ins is None or any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items):
        b.freeze_all(node, "advanced indexing")
        return
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = len(ins) - sum(1 for i in items if isinstance(i, (int, slice)))
        items = items[:at] + [slice(None)] * fill + items[at + 1:]
    items += [slice(None)] * (len(ins) - sum(1 for i in items if isinstance(i, (int, slice))))
    d_in = d_out = 0
    for item in items:
        if item is None:
            d_out += 1
        elif isinstance(item, int):
            b.freeze(b.space(src, d_in), "integer index")
            d_in += 1
        else:
            whole = _is_whole_slice(item, ins[d_in])
            if whole:
                b.couple(b.space(src, d_in), b.space(node, d_out))
            else:
                b.freeze(b.space(src, d_in), "sliced dimension")
                b.freeze(b.space(node, d_out), "sliced dimension")
            d_in += 1
            d_out += 1


def _is_whole_slice(item: slice, size: int) -> bool:
    ints = all(v is None or type(v) is int for v in (item.start, item.stop, item.step))
    return ints and item.start in (None, 0) and item.step in (None, 1) and (item.stop is None or item.stop >= size)


def _reduce_rule(b: _Builder, node: Node) -> None:
    src, out = _first_tensor(node), _shape(node)
    if src is None or out is None:
        b.freeze_all(node, "reduction without shapes")
        return
    rank = len(_shape(src) or ())
    dims = _arg(node, 1, "dim")
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if dims is None:
        return  # reduces everything to a scalar
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        b.freeze_all(node, "reduction over unknown dims")
        return
    reduced = {_norm_dim(d, rank) for d in dims}
    kept = [d for d in range(rank) if d not in reduced]
    if keepdim:
        b.couple_same(src, node, [(d, d) for d in kept])
    else:
        b.couple_same(src, node, [(d, j) for j, d in enumerate(kept)])


def _matmul_rule(b: _Builder, node: Node) -> None:
    a, c, out = _shape(node.args[0]), _shape(node.args[1]), _shape(node)
    if a is None or c is None or out is None or len(a) < 2 or len(c) < 2:
        b.freeze_all(node, "matmul on vectors")
        return
    x, y = node.args[0], node.args[1]
    b.couple(b.space(x, len(a) - 1), b.space(y, len(c) - 2), kind="contract")
    b.couple_same(x, node, [(len(a) - 2, len(out) - 2)])
    b.couple_same(y, node, [(len(c) - 1, len(out) - 1)])
    for t, shape in ((x, a), (y, c)):
        lead = len(out) - len(shape)
        b.couple_same(t, node, [(d, d + lead) for d in range(len(shape) - 2) if shape[d] == out[d + lead]])


def _sdpa_rule(b: _Builder, node: Node) -> None:
    q, k, v = (node.args + (None, None, None))[:3]
    sq, sk, sv, out = _shape(q), _shape(k), _shape(v), _shape(node)
    if None in (sq, sk, sv, out) or len({len(sq), len(sk), len(sv), len(out)}) != 1:
        b.freeze_all(node, "attention with unusual shapes")
        return
    rank = len(out)
    b.couple(b.space(q, rank - 1), b.space(k, rank - 1), kind="contract")
    b.couple(b.space(k, rank - 2), b.space(v, rank - 2), kind="contract")
    b.couple_same(q, node, [(rank - 2, rank - 2)])
    b.couple_same(v, node, [(rank - 1, rank - 1)])
    for t in (q, k, v):
        b.couple_same(t, node, [(d, d) for d in range(rank - 2)])
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, Node):
        _couple_attention_mask(b, node, mask, q, k)


def _couple_attention_mask(b: _Builder, node: Node, mask: Node, q: Node, k: Node) -> None:
    """The mask broadcasts to the scores (..., heads, Lq, Lk): a per-head mask loses pruned heads too."""
    shape, out = _shape(mask), _shape(node)
    assert out is not None
    rank = len(out)
    if shape is None or len(shape) > rank:
        b.freeze_all(node, "attention mask of unknown shape")
        return
    # the scores' dims, each as (a space of the same size, that size)
    scores = [(b.space(node, d), out[d]) for d in range(rank - 2)]
    scores += [(b.space(q, rank - 2), out[rank - 2]), (b.space(k, rank - 2), (_shape(k) or out)[rank - 2])]
    lead = rank - len(shape)
    for d, size in enumerate(shape):
        target, target_size = scores[lead + d]
        if size == target_size and size > 1:
            b.couple(b.space(mask, d), target)
        elif size != 1:
            b.freeze_all(node, "attention mask with an unexpected broadcast")
            return


def _linear_fn_rule(b: _Builder, node: Node) -> None:
    x, w, bias = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
    out = _shape(node)
    if out is None or _shape(x) is None or not isinstance(w, Node) or len(_shape(w) or ()) != 2:
        b.freeze_all(node, "functional linear with unknown weight")
        return
    rank = len(out)
    b.couple_same(x, node, [(d, d) for d in range(rank - 1)])
    b.couple(b.space(w, 0), b.space(node, rank - 1))
    b.couple(b.space(w, 1), b.space(x, rank - 1))
    if isinstance(bias, Node):
        b.couple(b.space(bias, 0), b.space(node, rank - 1))


def _conv_fn_rule(b: _Builder, node: Node) -> None:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` (weight-standardised convs)."""
    x, w, bias, groups = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias"), _arg(node, 6, "groups", 1)
    out, sx, sw = _shape(node), _shape(x), _shape(w)
    if out is None or sx is None or sw is None or not len(sx) == len(sw) == len(out) or not isinstance(groups, int):
        b.freeze_all(node, "functional conv with unknown arguments")
        return
    b.couple(b.space(x, 0), b.space(node, 0))
    b.freeze_dims(x, range(2, len(out)), "spatial dimension of a conv")
    b.freeze_dims(node, range(2, len(out)), "spatial dimension of a conv")
    in_key, out_key = b.space(x, 1), b.space(node, 1)
    b.couple(b.space(w, 0), out_key)
    if groups > 1:  # whole groups, as for nn.Conv2d; the weight's per-group input dim keeps its size
        b.couple(in_key, out_key, a_block=sx[1] // groups, b_block=out[1] // groups, kind="groups")
    else:
        b.couple(b.space(w, 1), in_key)
    if isinstance(bias, Node):
        b.couple(b.space(bias, 0), out_key)
    b.root(out_key)


def _layer_norm_fn_rule(b: _Builder, node: Node) -> None:
    x, shape, out = node.args[0], _arg(node, 1, "normalized_shape"), _shape(node)
    if out is None or _shape(x) is None or not isinstance(shape, (list, tuple)):
        b.freeze_all(node, "functional layer norm with unknown shape")
        return
    b.couple_same(x, node)
    last = len(out) - 1
    if len(shape) != 1:
        for d in range(len(out) - len(shape), len(out)):
            b.freeze(b.space(node, d), "layer norm over several dimensions")
    for index, name in ((2, "weight"), (3, "bias")):
        param = _arg(node, index, name)
        if isinstance(param, Node):
            b.couple_same(param, node, [(len(_shape(param) or ()) - 1, last)])


def _batch_norm_fn_rule(b: _Builder, node: Node) -> None:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)``: per-channel tensors."""
    x, out = node.args[0], _shape(node)
    if out is None or _shape(x) is None or len(out) < 2:
        b.freeze_all(node, "functional batch norm on an unbatched input")
        return
    b.couple_same(x, node)
    for index, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        param = _arg(node, index, name)
        if isinstance(param, Node):
            b.couple_same(param, node, [(0, 1)])


def _group_norm_fn_rule(b: _Builder, node: Node) -> None:
    """``F.group_norm(x, num_groups, weight, bias, eps)``: whole groups, per-channel tensors."""
    x, groups, out = node.args[0], _arg(node, 1, "num_groups"), _shape(node)
    if out is None or _shape(x) is None or len(out) < 2 or not isinstance(groups, int):
        b.freeze_all(node, "functional group norm with unknown groups")
        return
    b.couple_same(x, node)
    key, per_group = b.space(node, 1), out[1] // groups
    if per_group > 1:
        b.couple(key, key, a_block=per_group, b_block=per_group, kind="groups")
    for index, name in ((2, "weight"), (3, "bias")):
        param = _arg(node, index, name)
        if isinstance(param, Node):
            b.couple_same(param, node, [(0, 1)])


def _reshape_as_rule(b: _Builder, node: Node) -> None:
    src, other = node.args[0], node.args[1] if len(node.args) > 1 else None
    if _shape(src) is None or _shape(other) is None:
        b.freeze_all(node, "reshape_as without shapes")
        return
    _reshape(b, src, node)
    b.couple_same(other, node)


def _pad_rule(b: _Builder, node: Node) -> None:
    src, out, pad = _first_tensor(node), _shape(node), _arg(node, 1, "pad")
    if src is None or out is None or not isinstance(pad, (list, tuple)):
        b.freeze_all(node, "pad with unknown arguments")
        return
    padded = {len(out) - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    b.couple_same(src, node, [(d, d) for d in range(len(out)) if d not in padded])
    b.freeze_dims(src, padded, "padded dimension")
    b.freeze_dims(node, padded, "padded dimension")


def _roll_rule(b: _Builder, node: Node) -> None:
    src, out = _first_tensor(node), _shape(node)
    dims = _arg(node, 2, "dims")
    if src is None or out is None or dims is None:
        b.freeze_all(node, "roll over all dims")
        return
    dims = {_norm_dim(d, len(out)) for d in ([dims] if isinstance(dims, int) else dims)}
    for d in dims:
        b.freeze(b.space(src, d), "rolled dimension")
    b.couple_same(src, node, [(d, d) for d in range(len(out)) if d not in dims])


def _channel_keeping_fn_rule(b: _Builder, node: Node) -> None:
    _channel_keeping_rule(b, node)


def _stack_rule(b: _Builder, node: Node) -> None:
    tensors, dim, out = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0), _shape(node)
    if out is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        b.freeze_all(node, "stack with unknown arguments")
        return
    dim = _norm_dim(dim, len(out))
    for t in tensors:
        b.couple_same(t, node, [(d if d < dim else d, d if d < dim else d + 1) for d in range(len(out) - 1)])


_ELEMENTWISE_FUNCTIONS: tuple[Any, ...] = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.floordiv, torch.add, torch.sub, torch.mul, torch.div, torch.sigmoid, torch.tanh,
    torch.relu, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.clamp, torch.where,
    torch.maximum, torch.minimum, torch.erf, F.relu, F.relu6, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.mish, F.softplus, F.hardtanh,
    F.dropout, torch.softmax, F.softmax, F.log_softmax, torch.nn.functional.normalize,
    torch.clone, torch.pow, torch.square, torch.neg,
)
_ELEMENTWISE_METHODS = (
    "add", "sub", "mul", "div", "sigmoid", "tanh", "relu", "exp", "log", "sqrt", "rsqrt", "abs",
    "clamp", "clamp_min", "clamp_max", "pow", "neg", "softmax", "log_softmax", "contiguous",
    "clone", "detach", "to", "float", "half", "type_as", "masked_fill", "add_", "mul_", "sigmoid_",
    "relu_", "div_", "sub_", "square", "erf", "sqrt_", "hardtanh_", "__add__", "__mul__",
)

FUNCTION_RULES: dict[Any, Callable[[_Builder, Node], None]] = {
    **{fn: (lambda b, n: _broadcast(b, n)) for fn in _ELEMENTWISE_FUNCTIONS},
    torch.flatten: _reshape_fn_rule,
    torch.reshape: _reshape_fn_rule,
    torch.squeeze: _reshape_fn_rule,
    torch.unsqueeze: _reshape_fn_rule,
    torch.permute: _permute_rule,
    torch.transpose: _transpose_rule,
    torch.cat: _cat_rule,
    torch.concat: _cat_rule,
    torch.stack: _stack_rule,
    torch.split: _split_rule,
    torch.chunk: _split_rule,
    torch.unbind: _unbind_rule,
    operator.getitem: _getitem_rule,
    getattr: lambda b, n: _getattr_rule(b, n),
    torch.mean: _reduce_rule,
    torch.sum: _reduce_rule,
    torch.amax: _reduce_rule,
    torch.amin: _reduce_rule,
    torch.matmul: _matmul_rule,
    operator.matmul: _matmul_rule,
    torch.bmm: _matmul_rule,
    F.scaled_dot_product_attention: _sdpa_rule,
    F.linear: _linear_fn_rule,
    F.conv1d: _conv_fn_rule,  # the same objects as torch.conv1d/2d/3d
    F.conv2d: _conv_fn_rule,
    F.conv3d: _conv_fn_rule,
    F.layer_norm: _layer_norm_fn_rule,
    F.batch_norm: _batch_norm_fn_rule,
    F.group_norm: _group_norm_fn_rule,
    F.pad: _pad_rule,
    torch.roll: _roll_rule,
    F.adaptive_avg_pool2d: _channel_keeping_fn_rule,
    F.adaptive_max_pool2d: _channel_keeping_fn_rule,
    F.avg_pool2d: _channel_keeping_fn_rule,
    F.max_pool2d: _channel_keeping_fn_rule,
    F.interpolate: _channel_keeping_fn_rule,
    torch.numel: _numel_rule,
}

METHOD_RULES: dict[str, Callable[[_Builder, Node], None]] = {
    **{name: (lambda b, n: _broadcast(b, n)) for name in _ELEMENTWISE_METHODS},
    "view": _reshape_fn_rule,
    "expand": _expand_rule,
    "reshape_as": _reshape_as_rule,
    "view_as": _reshape_as_rule,
    "reshape": _reshape_fn_rule,
    "flatten": _reshape_fn_rule,
    "squeeze": _reshape_fn_rule,
    "unsqueeze": _reshape_fn_rule,
    "permute": _permute_rule,
    "transpose": _transpose_rule,
    "t": _transpose_rule,
    "split": _split_rule,
    "chunk": _split_rule,
    "unbind": _unbind_rule,
    "mean": _reduce_rule,
    "sum": _reduce_rule,
    "amax": _reduce_rule,
    "size": _size_read_rule,
    "numel": _numel_rule,
    "dim": lambda b, n: None,
    "matmul": _matmul_rule,
}

# Wrapped (opaque to fx) library functions that are the identity in eval mode, by name.
IDENTITY_FUNCTION_NAMES = frozenset({"stochastic_depth", "drop_path"})


def _function_rule(node: Node) -> Callable[[_Builder, Node], None] | None:
    if node.op == "call_method":
        return METHOD_RULES.get(str(node.target))
    try:
        rule = FUNCTION_RULES.get(node.target)
    except TypeError:  # unhashable target
        rule = None
    if rule is None and getattr(node.target, "__name__", "") in IDENTITY_FUNCTION_NAMES:
        return lambda b, n: _passthrough_rule(b, n)
    return rule


# --------------------------------------------------------------------------------------------
# the driver


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or re.fullmatch(p, name) for p in patterns)


def _run_rules(b: _Builder, gm: GraphModule, ignore: Sequence[str]) -> None:
    leaves = {leaf.path for leaf in gm.meta.get("fxopt_leaves", ())}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            b.freeze_node_outputs(node, "graph input")
        elif node.op == "output":
            for arg in node.all_input_nodes:
                b.freeze_node_outputs(arg, "reaches a graph output")
        elif node.op == "get_attr":
            _get_attr_rule(b, gm, node)
        elif node.op == "call_module":
            _call_module(b, gm, node, leaves, ignore)
        else:
            rule = _function_rule(node)
            if rule is not None:
                rule(b, node)
            elif output_shapes(node) is not None or any(output_shapes(a) is not None for a in node.all_input_nodes):
                b.freeze_all(node, f"unknown op {getattr(node.target, '__name__', node.target)}")


def _get_attr_rule(b: _Builder, gm: GraphModule, node: Node) -> None:
    target = str(node.target)
    calls = b.module_calls.setdefault("attr:" + target, [])
    calls.append(node.name)
    if len(calls) > 1:  # the same tensor read at several nodes: slice it once, consistently
        b.couple_same(b.nodes[calls[0]], node)
        return
    value = _attr(gm, target)
    if not isinstance(value, torch.Tensor) or _shape(node) is None:
        b.freeze_node_outputs(node, "non-tensor attribute")
        return
    b.owners.setdefault(id(value), set()).add("attr:" + target)
    for d in range(value.dim()):
        b.param(target, "", d, b.space(node, d), "tensor")


def _attr(gm: GraphModule, target: str) -> Any:
    value: Any = gm
    for atom in target.split("."):
        value = getattr(value, atom, None)
    return value


def _call_module(b: _Builder, gm: GraphModule, node: Node, leaves: set[str], ignore: Sequence[str]) -> None:
    path = str(node.target)
    mod = gm.get_submodule(path)
    calls = b.module_calls.setdefault(path, [])
    calls.append(node.name)
    if len(calls) == 1:
        for p in mod.parameters():
            b.owners.setdefault(id(p), set()).add(path)
    rule = None if path in leaves else _module_rule(mod)
    if rule is None:
        reason = "leaf module" if path in leaves else f"unknown module {type(mod).__name__}"
        b.freeze_all(node, f"{reason} '{path}'")
        return
    n_params = len(b.param_dims)
    rule(b, node, mod)
    stateless = not any(True for _ in mod.parameters()) and not any(True for _ in mod.buffers())
    if len(calls) > 1 and stateless:
        return
    if len(calls) > 1:  # tied module: every call must prune the same channels
        del b.param_dims[n_params:]
        b.couple_same(b.nodes[calls[0]], node)
        first, this = _first_tensor(b.nodes[calls[0]]), _first_tensor(node)
        if first is not None and this is not None:
            b.couple_same(first, this)
        return
    if _matches(path, ignore) or _matches(node.name, ignore):
        for key in [pd.space for pd in b.param_dims[n_params:] if pd.kind in ("out", "affine")]:
            b.freeze(key, f"ignored by the user ('{path}')")


def _freeze_unlinked_outputs(b: _Builder, gm: GraphModule) -> None:
    """An op's output dim tied to none of its inputs (a conv's H, a new axis) keeps its size."""
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            for key in b.node_spaces(node):
                if key not in b.linked and b.size(key) > 1:
                    b.freeze(key, "dimension the op sizes itself")


def _freeze_shared_parameters(b: _Builder) -> None:
    shared = {o for owners in b.owners.values() if len(owners) > 1 for o in owners}
    for pd in b.param_dims:
        if (pd.owner if pd.kind != "tensor" else "attr:" + pd.owner) in shared:
            b.freeze(pd.space, "parameter shared between modules")


def _union_find(n: int, a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Connected-component label (smallest element id) of each of `n` elements."""
    parent = np.arange(n)
    while a.size:
        pa, pc = parent[a], parent[c]
        lo, hi = np.minimum(pa, pc), np.maximum(pa, pc)
        live = lo != hi
        if not live.any():
            break
        np.minimum.at(parent, hi[live], lo[live])
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def _atoms(b: _Builder) -> tuple[np.ndarray, np.ndarray]:
    a = np.concatenate(b.pairs_a) if b.pairs_a else np.zeros(0, dtype=np.int64)
    c = np.concatenate(b.pairs_b) if b.pairs_b else np.zeros(0, dtype=np.int64)
    labels = _union_find(b.total, a, c)
    _, atom_of = np.unique(labels, return_inverse=True)
    return atom_of, _prunable(b, atom_of)


def _prunable(b: _Builder, atom_of: np.ndarray) -> np.ndarray:
    """Atoms that hold a producer output channel and no frozen index."""
    n_atoms = int(atom_of.max()) + 1 if atom_of.size else 0
    frozen = np.zeros(n_atoms, dtype=bool)
    for key in b.frozen:
        offset, size = b.spaces[key]
        frozen[atom_of[offset:offset + size]] = True
    rooted = np.zeros(n_atoms, dtype=bool)
    for key in b.roots:
        offset, size = b.spaces[key]
        rooted[atom_of[offset:offset + size]] = True
    return rooted & ~frozen


def _groups(b: _Builder, atom_of: np.ndarray, prunable: np.ndarray) -> list[PruneGroup]:
    """Prunable atoms grouped by the producer outputs and the channel spaces that hold them.

    Atoms of one producer that live in different spaces (the pieces of a split, the q/k and v
    parts of a fused qkv conv) form separate groups: every group keeps at least one atom, so no
    space that holds prunable atoms can be emptied.
    """
    signature: dict[int, list[int]] = {}
    widths: dict[tuple[int, int], int] = {}
    roots = list(dict.fromkeys(b.roots))
    for r, key in enumerate(roots):
        atoms = b.spaces[key][0] + np.arange(b.size(key))
        ids, counts = np.unique(atom_of[atoms], return_counts=True)
        for atom, count in zip(ids.tolist(), counts.tolist()):
            if prunable[atom]:
                signature.setdefault(atom, []).append(r)
                widths[(atom, r)] = count
    spaces = _atom_spaces(b, atom_of, prunable)
    by_sig: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for atom, rs in signature.items():
        by_sig.setdefault((tuple(rs), spaces[atom]), []).append(atom)
    names = [key[0] for key in b.spaces]
    groups = []
    for index, ((rs, held), atoms) in enumerate(sorted(by_sig.items(), key=lambda kv: min(kv[1]))):
        width = widths[(atoms[0], rs[0])]
        uniform = all(widths[(a, rs[0])] == width for a in atoms)
        keys = tuple(roots[r] for r in rs)
        groups.append(PruneGroup(
            index=index, atoms=tuple(sorted(atoms)), roots=keys,
            root_names=tuple(dict.fromkeys(k[0] for k in keys)),
            root_modules=(),
            atom_width=width if uniform else 0,
            members=tuple(sorted({names[i] for i in held})),
        ))
    return groups


def _atom_spaces(b: _Builder, atom_of: np.ndarray, prunable: np.ndarray) -> dict[int, tuple[int, ...]]:
    """Prunable atom -> indices (in ``b.spaces`` order) of the spaces holding it."""
    n_spaces = len(b.spaces)
    sizes = np.fromiter((size for _, size in b.spaces.values()), dtype=np.int64, count=n_spaces)
    space_of = np.repeat(np.arange(n_spaces), sizes)
    live = prunable[atom_of]
    pairs = np.unique(atom_of[live] * n_spaces + space_of[live])  # sorted: by atom, then space
    atoms, held = pairs // n_spaces, pairs % n_spaces
    starts = np.flatnonzero(np.r_[True, atoms[1:] != atoms[:-1]]) if pairs.size else np.zeros(0, dtype=np.int64)
    bounds = np.r_[starts, pairs.size]
    return {int(atoms[s]): tuple(held[s:e].tolist()) for s, e in zip(bounds[:-1], bounds[1:])}


def _annotate(gm: GraphModule, analysis: DependencyAnalysis) -> None:
    group_of = np.full(analysis.num_atoms, -1, dtype=np.int64)
    for g in analysis.groups:
        group_of[list(g.atoms)] = g.index
    for node in gm.graph.nodes:
        shapes = output_shapes(node)
        if shapes is None:
            node.meta.setdefault("fxopt", {}).pop(META_KEY, None)
            continue
        items = []
        for item, shape in enumerate(shapes):
            dims = []
            for d in range(len(shape)):
                key = (node.name, item, d)
                atoms = analysis.elements(key)
                gids = np.unique(group_of[atoms])
                dims.append(ChannelDim(
                    size=int(shape[d]), atoms=tuple(atoms.tolist()),
                    groups=tuple(int(g) for g in gids if g >= 0),
                    frozen=analysis.frozen.get(key, ""),
                ))
            items.append(tuple(dims))
        node.meta.setdefault("fxopt", {})[META_KEY] = NodeChannels(tuple(items))


def _root_modules(gm: GraphModule, groups: list[PruneGroup]) -> list[PruneGroup]:
    targets = {n.name: str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    out = []
    for g in groups:
        mods = tuple(dict.fromkeys(targets.get(name, name) for name in g.root_names))
        out.append(PruneGroup(g.index, g.atoms, g.roots, g.root_names, mods, g.atom_width, g.members))
    return out


def analyze_dependencies(gm: GraphModule, *, ignore: Sequence[str] = (), annotate: bool = True) -> DependencyAnalysis:
    """Find the channel groups of a shape-annotated graph.

    Args:
        gm: a graph module whose nodes carry ``tensor_meta`` (from `fxopt.trace`).
        ignore: module paths or node names (or regexes over them) whose output channels must
            not be pruned.
        annotate: write a `NodeChannels` under ``node.meta["fxopt"]["prune_group"]``.

    Returns:
        The `DependencyAnalysis`.

    Example:
        >>> import torch, fxopt
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
        >>> gm = fxopt.trace(m, torch.randn(1, 3, 8, 8))
        >>> analysis = analyze_dependencies(gm)
        >>> [(g.root_modules, g.channels) for g in analysis.groups]  # the last conv reaches the output
        [(('0',), 8)]
    """
    b = _Builder(gm)
    for node in gm.graph.nodes:
        b.add_node(node)
    _run_rules(b, gm, tuple(ignore))
    _freeze_unlinked_outputs(b, gm)
    _freeze_shared_parameters(b)
    atom_of, prunable = _resolve_size_constraints(b)
    groups = _root_modules(gm, _groups(b, atom_of, prunable))
    analysis = DependencyAnalysis(
        spaces=b.spaces, atom_of=atom_of, prunable=prunable, groups=groups, frozen=b.frozen,
        param_dims=b.param_dims, space_graph=b.graph, module_calls=b.module_calls, roots=list(dict.fromkeys(b.roots)),
    )
    if annotate:
        _annotate(gm, analysis)
    return analysis
