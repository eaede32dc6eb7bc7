"""Canonicalisation: drop no-op nodes (dropout, identity, no-op views and arithmetic), then dead code.

Rules are a small table of (matcher, kept input); one driver applies them until nothing matches.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxopt.frontend.inputs import submodule
from fxopt.passinfra.pass_base import FxoptPass, PassResult
from fxopt.passinfra.registry import register_pass

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout}


def _module(gm: GraphModule, node: Node) -> nn.Module | None:
    return submodule(gm, str(node.target)) if node.op == "call_module" else None


def _shape(value: object) -> tuple[int, ...] | None:
    meta = value.meta.get("tensor_meta") if isinstance(value, Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _dtype(value: object) -> torch.dtype | None:
    meta = value.meta.get("tensor_meta") if isinstance(value, Node) else None
    return getattr(meta, "dtype", None)


def _is_dropout_module(gm: GraphModule, n: Node) -> bool:
    return isinstance(_module(gm, n), _DROPOUT_MODULES)


def _is_identity_module(gm: GraphModule, n: Node) -> bool:
    return type(_module(gm, n)) is nn.Identity


def _is_eval_dropout_call(gm: GraphModule, n: Node) -> bool:
    if n.op != "call_function" or n.target not in _DROPOUT_FUNCTIONS:
        return False
    # training defaults to True in the functional API, so only an explicit False is a no-op
    training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", n.kwargs.get("train", True))
    return training is False


def _is_contiguous(gm: GraphModule, n: Node) -> bool:
    if not (n.op == "call_method" and n.target == "contiguous") or len(n.args) != 1 or n.kwargs:
        return False
    # a no-op only when the input already is contiguous: a later .view() may need the copy
    meta = n.args[0].meta.get("tensor_meta") if isinstance(n.args[0], Node) else None
    return getattr(meta, "memory_format", None) == torch.contiguous_format


def _is_same_shape_view(gm: GraphModule, n: Node) -> bool:
    is_view = (n.op == "call_method" and n.target in ("view", "reshape")) or (n.op == "call_function" and n.target is torch.reshape)
    # x.view(torch.int32) keeps the shape of a float32 x but not its dtype
    return is_view and _shape(n) is not None and _shape(n) == _shape(n.args[0]) and _dtype(n) == _dtype(n.args[0])


def _is_identity_permute(gm: GraphModule, n: Node) -> bool:
    if not (n.op == "call_method" and n.target == "permute") and n.target is not torch.permute:
        return False
    # x.permute(0, 1), x.permute((0, 1)) or dims=(0, 1); no dims at all is not a permutation we know
    dims = n.kwargs.get("dims", n.args[1] if len(n.args) == 2 else n.args[1:])
    return isinstance(dims, (tuple, list)) and len(dims) > 0 and list(dims) == list(range(len(dims)))


def _is_neutral_arithmetic(gm: GraphModule, n: Node) -> bool:
    if n.op != "call_function" or len(n.args) != 2 or not isinstance(n.args[0], Node):
        return False
    neutral = {operator.add: 0, operator.sub: 0, operator.mul: 1, operator.truediv: 1, torch.add: 0, torch.mul: 1}
    if n.target not in neutral or n.kwargs:
        return False
    other = n.args[1]
    if type(other) not in (int, float) or other != neutral[n.target]:
        return False
    # same shape and dtype: int_tensor / 1 is a float tensor, so it is not a no-op
    out, arg = n.meta.get("tensor_meta"), n.args[0].meta.get("tensor_meta")
    return (
        hasattr(out, "shape") and hasattr(arg, "shape")
        and tuple(out.shape) == tuple(arg.shape) and out.dtype == arg.dtype
    )


# Each rule: matcher -> the node is replaced by its first argument.
NOOP_RULES: tuple[tuple[str, Callable[[GraphModule, Node], bool]], ...] = (
    ("dropout module", _is_dropout_module),      # Dropout(x) -> x   (eval mode)
    ("identity module", _is_identity_module),    # Identity(x) -> x
    ("dropout call", _is_eval_dropout_call),     # F.dropout(x, training=False) -> x
    ("contiguous", _is_contiguous),              # x.contiguous() -> x   (x already contiguous)
    ("same-shape view", _is_same_shape_view),    # x.view(x.shape) -> x
    ("identity permute", _is_identity_permute),  # x.permute(0, 1, 2) -> x
    ("neutral arithmetic", _is_neutral_arithmetic),  # x + 0, x * 1, x / 1 -> x
)


def remove_noops(gm: GraphModule) -> dict[str, int]:
    """Apply `NOOP_RULES` until none matches; returns how often each rule fired."""
    fired: dict[str, int] = {}
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            for rule, matches in NOOP_RULES:
                if node.args and isinstance(node.args[0], Node) and matches(gm, node):
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
                    fired[rule] = fired.get(rule, 0) + 1
                    changed = True
                    break
    return fired


def has_noops(gm: GraphModule) -> bool:
    """Whether `remove_noops` would change `gm` (reads it only)."""
    return any(node.args and isinstance(node.args[0], Node) and matches(gm, node) for node in gm.graph.nodes for _, matches in NOOP_RULES)


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def mutates_input(gm: GraphModule, node: Node) -> bool:
    """True for nodes that write into a tensor (``x.add_()``, ``ReLU(inplace=True)``, ``x[i] = v``)."""
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True or (
            name.endswith("_") and not name.endswith("__")
        )
    if node.op == "call_module":
        return getattr(submodule(gm, str(node.target)), "inplace", False) is True
    return False


def eliminate_dead_code(gm: GraphModule) -> bool:
    """Remove nodes whose results are unused, and submodules no node calls any more.

    Nodes that write into a tensor are kept even when their result is unused: their effect is
    the write (torch.fx's own rule would drop ``x.add_(1)``).
    """
    changed = gm.graph.eliminate_dead_code(
        is_impure_node=lambda n: n.is_impure() or mutates_input(gm, n)
    )
    before = len(list(gm.named_modules()))
    gm.delete_all_unused_submodules()
    return changed or len(list(gm.named_modules())) != before


def has_dead_code(gm: GraphModule) -> bool:
    """Whether `eliminate_dead_code` would change `gm` (reads it only): an unused node without side
    effects, a submodule no node reaches (torch.fx's ``delete_all_unused_submodules`` rule), or a
    graph-module attribute (its own dead code is eliminated too)."""
    used: set[str] = set()
    for node in gm.graph.nodes:
        if not node.users and not (node.is_impure() or mutates_input(gm, node)):
            return True
        if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
            parts = node.target.split(".")
            used.update(".".join(parts[: i + 1]) for i in range(len(parts)))
            try:
                target = submodule(gm, node.target) if node.op == "call_module" else getattr(gm, node.target, None)
            except AttributeError:
                continue
            if node.op == "get_attr" and isinstance(target, GraphModule):
                return True
            if node.op == "call_module":
                used.update(f"{node.target}.{name}" for name, _ in target.named_modules() if name)
    return any(name and name not in used for name, _ in gm.named_modules())


@register_pass
class Canonicalize(FxoptPass):
    """Drop dropout, identities and no-op views/arithmetic, then eliminate dead code.

    Example:
        >>> import torch, fxopt
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Identity())
        >>> gm = fxopt.trace(m, torch.randn(1, 4))
        >>> Canonicalize()(gm).modified, [n.op for n in gm.graph.nodes]
        (True, ['placeholder', 'call_module', 'output'])
    """

    name = "canonicalize"
    lossy = False
    shares_weights = True  # replaces what it changes, never writes into a weight
    shares_buffers = True  # nor into a buffer, and runs no module

    def __init__(self) -> None:
        super().__init__()
        self.fired: dict[str, int] = {}

    def finds_work(self, graph_module: GraphModule) -> bool:
        return has_noops(graph_module) or has_dead_code(graph_module)

    def call(self, graph_module: GraphModule) -> PassResult:
        self.fired = remove_noops(graph_module)
        dead = eliminate_dead_code(graph_module)
        return PassResult(graph_module, bool(self.fired) or dead)


@register_pass
class EliminateDeadCode(FxoptPass):
    """Remove unused nodes and submodules (torch.fx dead-code elimination)."""

    name = "eliminate_dead_code"
    lossy = False
    shares_weights = True  # replaces what it changes, never writes into a weight
    shares_buffers = True  # nor into a buffer, and runs no module

    def finds_work(self, graph_module: GraphModule) -> bool:
        return has_dead_code(graph_module)

    def call(self, graph_module: GraphModule) -> PassResult:
        return PassResult(graph_module, eliminate_dead_code(graph_module))
