"""The search space of `fxopt.passes.Slim`, found from the graph: removable residual blocks
(depth), per-stage keep ratios over the pruning dependency groups (width) and the input sizes
the user allows (resolution).

A *residual block* is an ``add(x, f(x))`` whose two operands and result have one shape, where
`x` is an ancestor of ``f(x)`` and nothing outside the block reads the nodes of `f`. Removing it
replaces the add by `x`, so the graph computes exactly what it computed when `f(x)` was zero.

A network without residual blocks (a plain chain such as PointPillars' backbone or a VGG) gets
*removable layers* as its depth instead: a stride-1 convolution whose output channels equal its
input channels, with the BatchNorm and activations that follow it alone, whose output has its
input's shape. Removing one replaces its output by its input, which is not exact: the candidate
is judged after its BatchNorm statistics are re-estimated, and fine-tuning recovers the rest
(elastic depth as in Once-for-All, on layers instead of blocks).
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

__all__ = ["ResidualBlock", "find_removable_layers", "find_residual_blocks", "node_shape", "parse_resolutions", "remove_blocks",
           "stage_of_groups"]

_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass(frozen=True)
class ResidualBlock:
    """One removable ``x + f(x)``, or one removable layer ``f(x)`` (``kind="layer"``).

    Attributes:
        add: the name of the add node (the block's output; a layer's last node).
        skip: the name of `x`, the node the add is replaced by when the block goes.
        body: the names of the nodes of ``f`` (removed with the block), in graph order.
        scope: the module path the body's modules share (for reports), or the add's name.
        kind: ``"residual"`` (removal is exact where ``f(x)`` is zero) or ``"layer"`` (not exact).
    """

    add: str
    skip: str
    body: tuple[str, ...]
    scope: str
    kind: str = "residual"


def node_shape(node: Any) -> tuple[int, ...] | None:
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
        shape = node_shape(node)
        if shape is None or node_shape(a) != shape or node_shape(b) != shape:
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


# what may follow a removable layer's convolution inside the layer: per-channel and pointwise ops
_LAYER_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU,
                  nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish, nn.ELU, nn.Dropout, nn.Identity)
_LAYER_FUNCTIONS = (torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.leaky_relu,
                    torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.hardswish, torch.sigmoid, torch.tanh)
_LAYER_METHODS = ("relu", "relu_", "sigmoid", "tanh")


def _layer_op(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _LAYER_MODULES)
    if node.op == "call_function":
        return node.target in _LAYER_FUNCTIONS
    return node.op == "call_method" and node.target in _LAYER_METHODS


def find_removable_layers(gm: GraphModule) -> list[ResidualBlock]:
    """Every removable layer of a shape-propagated graph, in graph order (``kind="layer"``).

    A layer is an ``nn.Conv1d/2d/3d`` with stride 1 and as many output channels as input
    channels, then the per-channel and pointwise ops that follow it while each has one user;
    its output must have its input's shape. Its scope is the convolution's module path.
    """
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.all_input_nodes) != 1:
            continue
        conv = gm.get_submodule(str(node.target))
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or conv.in_channels != conv.out_channels:
            continue
        if any(s != 1 for s in conv.stride):
            continue
        skip, body, end = node.all_input_nodes[0], [node], node
        while len(end.users) == 1 and _layer_op(gm, nxt := next(iter(end.users))):
            body.append(nxt)
            end = nxt
        shape = node_shape(end)
        if shape is None or node_shape(skip) != shape or any(len(n.users) != 1 for n in body[:-1]):
            continue
        layers.append(ResidualBlock(end.name, skip.name, tuple(n.name for n in body[:-1]), str(node.target), "layer"))
    return layers


def remove_blocks(module: nn.Module, blocks: Sequence[ResidualBlock]) -> None:
    """Replace each block's add by its skip input and delete its body, in place.

    Works on a `GraphModule` (recompiled, unused submodules deleted) and on a graph-carrying
    shape-only module (`fxopt.passes.prune.ShapeOnlyModule`), whose `tensor_meta` stays valid
    because a block's output has its input's shape. A block already gone with an enclosing one
    is skipped.
    """
    graph: Graph = module.graph  # type: ignore[assignment]
    nodes = {n.name: n for n in graph.nodes}
    replaced: dict[str, Node] = {}  # a removed block's output -> what now stands for it (consecutive layers)
    for block in blocks:
        add, skip = nodes.get(block.add), replaced.get(block.skip) or nodes.get(block.skip)
        if add is None or skip is None or add.graph is not graph:
            continue
        replaced[block.add] = skip
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
        shape = node_shape(nodes.get(g.roots[0][0])) if g.roots else None
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
