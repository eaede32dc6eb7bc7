"""The channel-space model: frozen results, the `_Builder` that collects spaces and their
index couplings, and the union-find that turns couplings into atoms."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import networkx as nx
import numpy as np
from torch.fx import GraphModule, Node

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
# node shapes and arguments


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

def _first_tensor(node: Node) -> Node | None:
    arg = node.args[0] if node.args else None
    return arg if isinstance(arg, Node) and _shape(arg) is not None else None

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
# atoms: union-find over the couplings, then which atoms may be removed

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
