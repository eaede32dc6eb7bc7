"""Tracing: nn.Module -> torch.fx.GraphModule with shapes on every node and automatic leaves.

A submodule that symbolic tracing cannot get through (data-dependent control flow, untraceable
Python) becomes a leaf and tracing is retried, so the rest of the model is still optimised.
"""

from __future__ import annotations

import copy
import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Tracer
from torch.fx.passes.shape_prop import ShapeProp

from fxopt.errors import InputError, TraceError

__all__ = ["Leaf", "trace", "propagate_shapes", "normalize_inputs", "leaves_of"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_MAX_RETRIES = 64


@dataclass(frozen=True)
class Leaf:
    """A submodule kept opaque in the graph, and why."""

    path: str
    module_type: str
    reason: str


class _LeafTracer(Tracer):
    """A tracer that keeps chosen submodules opaque and remembers where tracing broke."""

    def __init__(self, leaves: Iterable[str]) -> None:
        super().__init__()
        self.leaf_paths = set(leaves)
        self.failed_path: str | None = None
        self._stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_paths or super().is_leaf_module(
            m, module_qualified_name
        )

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        self._stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:  # the innermost module is the culprit
                self.failed_path = path
            raise
        finally:
            self._stack.pop()


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Example inputs as a tuple (a lone tensor is wrapped); raises `InputError` otherwise."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise InputError(
            "example_inputs must be a tensor or a non-empty tuple of the model's positional "
            f"inputs, got {type(example_inputs).__name__}"
        )
    return example_inputs


def _user_line(exc: BaseException) -> str:
    # the deepest frame outside torch is the user's code that broke tracing
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def propagate_shapes(gm: GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Record `tensor_meta` (shape, dtype) on every node by running `gm` on the inputs."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def _run_failure_module(gm: GraphModule, example_inputs: tuple[Any, ...]) -> tuple[str | None, Exception | None]:
    """Run `gm` node by node; on failure return the module path owning the failing node."""
    interp = torch.fx.Interpreter(gm)
    current: list[str | None] = [None]
    run_node = interp.run_node

    def tracking_run_node(n: torch.fx.Node) -> Any:
        stack = n.meta.get("nn_module_stack") or {}
        current[0] = next(reversed(stack.values()))[0] if stack else None
        return run_node(n)

    interp.run_node = tracking_run_node  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            interp.run(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the traced program is reported
        return current[0], exc
    return None, None


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[str] = (),
) -> GraphModule:
    """Symbolically trace a deep copy of `model` (in eval mode) into a GraphModule.

    Submodules that cannot be traced become leaves automatically; they are listed, with the
    reason, in ``gm.meta["fxopt_leaves"]`` (see `leaves_of`). Every node carries
    ``meta["tensor_meta"]`` from ShapeProp on `example_inputs`.

    Args:
        model: the user's module; never modified.
        example_inputs: a tensor or tuple of positional inputs.
        leaf_modules: qualified names of submodules to keep opaque on purpose.

    Returns:
        The traced, shape-annotated GraphModule.

    Raises:
        InputError: the model does not run on `example_inputs`.
        TraceError: tracing fails in the root module itself, so no leaf can help.

    Example:
        >>> import torch
        >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()), torch.randn(1, 4))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    root = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            root(*inputs)
    except Exception as exc:
        raise InputError(
            f"the model does not run on the example inputs "
            f"({', '.join(_describe(x) for x in inputs)}): {_reason(exc)}"
        ) from exc

    leaves: dict[str, Leaf] = {p: Leaf(p, _type_of(root, p), "requested by the user") for p in leaf_modules}
    for _ in range(_MAX_RETRIES):
        tracer = _LeafTracer(leaves)
        try:
            graph = tracer.trace(root)
        except Exception as exc:
            path = tracer.failed_path
            if not path or path in leaves:
                raise TraceError(_reason(exc), module_path=path or "", source_line=_user_line(exc)) from exc
            leaves[path] = Leaf(path, _type_of(root, path), _reason(exc))
            continue
        gm = GraphModule(tracer.root, graph, type(root).__name__)
        failed_path, exc = _run_failure_module(gm, inputs)
        if exc is None:
            break
        if not failed_path or failed_path in leaves:
            raise TraceError(
                f"the traced graph does not run: {_reason(exc)}", module_path=failed_path or ""
            ) from exc
        leaves[failed_path] = Leaf(failed_path, _type_of(root, failed_path), f"traced graph fails to run: {_reason(exc)}")
    else:  # pragma: no cover - a model with more than _MAX_RETRIES untraceable blocks
        raise TraceError(f"gave up after {_MAX_RETRIES} automatic leaves")
    propagate_shapes(gm, inputs)
    gm.meta["fxopt_leaves"] = tuple(leaves.values())
    return gm


def leaves_of(gm: GraphModule) -> tuple[Leaf, ...]:
    """The leaves `trace` chose for `gm` (empty for a graph traced elsewhere)."""
    return tuple(gm.meta.get("fxopt_leaves", ()))


def _type_of(root: nn.Module, path: str) -> str:
    try:
        return type(root.get_submodule(path)).__name__
    except AttributeError:
        return "?"


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}"
    return type(x).__name__
