"""The search space of `fxopt.passes.Slim`, found from the graph: removable residual blocks
(depth), per-stage keep ratios over the pruning dependency groups (width) and the input sizes
the user allows (resolution).

A *residual block* is an ``add(x, f(x))`` whose two operands and result have one shape, where
`x` is an ancestor of ``f(x)`` and nothing outside the block reads the nodes of `f`. Removing it
replaces the add by `x`, so the graph computes exactly what it computed when `f(x)` was zero.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxopt.errors import InputError

__all__ = ["ResidualBlock", "find_residual_blocks", "parse_resolutions", "remove_blocks", "stage_of_groups"]

_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass(frozen=True)
class ResidualBlock:
    """One removable ``x + f(x)``.

    Attributes:
        add: the name of the add node (the block's output).
        skip: the name of `x`, the node the add is replaced by when the block goes.
        body: the names of the nodes of ``f`` (removed with the block), in graph order.
        scope: the module path the body's modules share (for reports), or the add's name.
    """

    add: str
    skip: str
    body: tuple[str, ...]
    scope: str


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_add(node: Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs.get("alpha")
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _ancestors(node: Node, stop: Node) -> set[Node] | None:
    """Nodes `node` depends on down to `stop` (exclusive); None if `stop` is not reached."""
    seen: set[Node] = set()
    stack, reached = [node], False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if a is stop:
                reached = True
            elif a.op not in ("get_attr", "placeholder"):
                stack.append(a)
            elif a.op == "placeholder":
                return None  # f reads another model input: not a block of x alone
    return seen if reached else None


def _scope(gm: GraphModule, body: Iterable[Node], fallback: str) -> str:
    paths = [str(n.target).split(".") for n in body if n.op == "call_module"]
    if not paths:
        return fallback
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or fallback


def find_residual_blocks(gm: GraphModule) -> list[ResidualBlock]:
    """Every removable residual block of a shape-propagated graph, in graph order.

    Blocks may nest (a block inside the body of another); `remove_blocks` handles any subset.
    """
    blocks = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if not _is_add(node):
            continue
        a, b = node.args
        if not (isinstance(a, Node) and isinstance(b, Node)):
            continue
        shape = _shape(node)
        if shape is None or _shape(a) != shape or _shape(b) != shape:
            continue
        for skip, branch in ((a, b), (b, a)):
            body = _ancestors(branch, skip)
            if not body or skip in body:
                continue
            inside = body | {node}
            if any(u not in inside for n in body for u in n.users):
                continue  # a node of f feeds something else: removing f would break it
            names = tuple(n.name for n in sorted(body, key=order.__getitem__))
            blocks.append(ResidualBlock(node.name, skip.name, names, _scope(gm, body, node.name)))
            break
    return blocks


def remove_blocks(module: nn.Module, blocks: Sequence[ResidualBlock]) -> None:
    """Replace each block's add by its skip input and delete its body, in place.

    Works on a `GraphModule` (recompiled, unused submodules deleted) and on a graph-carrying
    shape-only module (`fxopt.passes.prune.ShapeOnlyModule`), whose `tensor_meta` stays valid
    because a block's output has its input's shape. A block already gone with an enclosing one
    is skipped.
    """
    graph: Graph = module.graph  # type: ignore[assignment]
    nodes = {n.name: n for n in graph.nodes}
    for block in blocks:
        add, skip = nodes.get(block.add), nodes.get(block.skip)
        if add is None or skip is None or add.graph is not graph:
            continue
        if isinstance(module, GraphModule):  # a shape-only build shares modules with its source and never runs
            for user in list(add.users):
                _out_of_place(module, user)  # it now reads `skip`, which other nodes (and autograd) still need
        add.replace_all_uses_with(skip)
        for name in (block.add, *reversed(block.body)):
            n = nodes.pop(name, None)
            if n is not None and not n.users:
                graph.erase_node(n)
    if isinstance(module, GraphModule):
        graph.lint()
        module.recompile()
        module.delete_all_unused_submodules()


def _out_of_place(module: nn.Module, node: Node) -> None:
    """Make an in-place op (``ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.relu_()``) write a
    new tensor: after a block goes, its input feeds what the block's output fed, and writing into
    it would change a tensor other nodes read (or autograd saved)."""
    if node.op == "call_module":
        sub = module.get_submodule(str(node.target))
        if getattr(sub, "inplace", False):
            sub.inplace = False
    elif node.op == "call_function" and node.kwargs.get("inplace"):
        node.kwargs = {**node.kwargs, "inplace": False}
    elif node.op == "call_method" and str(node.target).endswith("_") and hasattr(torch.Tensor, str(node.target)[:-1]):
        node.target = str(node.target)[:-1]


def stage_of_groups(gm: GraphModule, analysis: Any) -> dict[int, str]:
    """A stage name per prune group: the spatial size of its first producer's output
    (``"96x160"``), ``"flat"`` for producers without spatial dims (linear layers)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    stages = {}
    for g in analysis.groups:
        shape = _shape(nodes.get(g.roots[0][0])) if g.roots else None
        spatial = shape[2:] if shape is not None and len(shape) > 2 else ()
        stages[g.index] = "x".join(map(str, spatial)) if spatial else "flat"
    return stages


def parse_resolutions(resolutions: Any, example_inputs: tuple[Any, ...]) -> list[tuple[tuple[int, ...], ...]]:
    """Normalise ``resolutions=`` to one full shape per tensor input for each choice.

    Each choice is a shape for the first input (``(1, 3, 64, 96)``), its spatial part alone
    (``(64, 96)``), or a tuple of shapes (one per input). Inputs other than the first keep
    their shapes unless given.

    Raises:
        InputError: a choice whose rank or non-spatial dims do not fit the example inputs.
    """
    if resolutions is None:
        return []
    if isinstance(resolutions, (str, bytes)) or not isinstance(resolutions, Sequence) or not resolutions:
        raise InputError(f"resolutions must be a non-empty list of input shapes, got {resolutions!r}")
    base = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in example_inputs)
    if base[0] is None:
        raise InputError("resolutions= changes the first input's shape, but the first example input is not a tensor")
    choices = []
    for i, choice in enumerate(resolutions):
        shapes = list(base)
        items = list(choice) if isinstance(choice, Sequence) else None
        if items and all(isinstance(s, Sequence) for s in items):
            given = [tuple(int(v) for v in s) for s in items]
        elif items and all(isinstance(v, int) for v in items):
            first = tuple(items)
            given = [first if len(first) == len(base[0]) else base[0][: len(base[0]) - len(first)] + first]
        else:
            raise InputError(f"resolutions[{i}] must be a shape (ints) or one shape per input, got {choice!r}")
        for j, shape in enumerate(given):
            if j >= len(base) or base[j] is None or len(shape) != len(base[j]) or shape[:2] != base[j][:2]:
                raise InputError(
                    f"resolutions[{i}] gives input {j} the shape {shape}, which does not fit its example shape "
                    f"{base[j] if j < len(base) else 'none'} (same rank, batch and channels; only the spatial dims may change)"
                )
            shapes[j] = shape
        choices.append(tuple(shapes))
    return choices
