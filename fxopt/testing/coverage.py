"""Which op kinds a traced graph contains: module types, functions and tensor methods by name."""

from __future__ import annotations

from torch.fx import GraphModule, Node

__all__ = ["op_kind", "op_kinds"]


def op_kind(gm: GraphModule, node: Node) -> str | None:
    """A readable name for what `node` computes (``nn.Conv2d``, ``torch.cat``, ``Tensor.add_``).

    Returns None for placeholders, attribute reads and the output node.
    """
    if node.op == "call_module":
        module = type(gm.get_submodule(str(node.target)))
        prefix = "nn." if module.__module__.startswith("torch.nn") else f"{module.__module__}."
        return prefix + module.__qualname__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        owner = getattr(node.target, "__module__", None) or "builtins"
        owner = {"_operator": "operator", "torch._C._nn": "F", "torch.nn.functional": "F", "torch._C._VariableFunctions": "torch"}.get(owner, owner)
        return f"{owner}.{getattr(node.target, '__name__', str(node.target))}"
    return None


def op_kinds(gm: GraphModule) -> set[str]:
    """The distinct op kinds of `gm` (see `op_kind`).

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        >>> sorted(op_kinds(gm))
        ['nn.Linear', 'nn.ReLU']
    """
    return {kind for node in gm.graph.nodes if (kind := op_kind(gm, node)) is not None}
