"""The driver: runs the module and function rules over a graph, groups the prunable atoms and
annotates the nodes (`analyze_dependencies`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

from fxopt.passes.dependency_groups.function_rules import _function_rule
from fxopt.passes.dependency_groups.model import (
    META_KEY,
    ChannelDim,
    DependencyAnalysis,
    NodeChannels,
    PruneGroup,
    _Builder,
    _first_tensor,
    _shape,
    output_shapes,
)
from fxopt.passes.dependency_groups.module_rules import _module_rule
from fxopt.passes.dependency_groups.shape_arithmetic import _resolve_size_constraints


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
