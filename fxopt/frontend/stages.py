"""Staged compiles: the tensor part of a model becomes the graph, the Python around it stays eager.

A detector's image transform and post-processing (anchors, box decoding, NMS) cannot be a static
graph, but its backbone and heads can. `Stages` names the submodules whose calls form the graph
part (``("backbone", "head")``); `split_stages` runs the model once with hooks to capture what
each of them receives, checks that every tensor a later part takes comes from an earlier part
(so the Python between them only regroups tensors, ``list(features.values())``), and builds
`StagedGraph`, one module running the parts in order, which fxopt traces, optimises and lowers
to one ONNX file. `StagedModel` runs a copy of the original model with each part replaced by a
stand-in that answers from one call of the compiled graph, so ``compiled(images)`` returns the
model's own output (detections). torchvision's detection families have presets (`preset_for`).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxopt.errors import InputError
from fxopt.frontend.inputs import copy_inputs
from fxopt.frontend.module_state import preserved_state

__all__ = ["Stages", "StagedGraph", "StagedModel", "StageSplit", "preset_for", "split_stages"]


@dataclass(frozen=True)
class Stages:
    """Where a staged compile cuts a model: the submodules whose calls form the graph part.

    Args:
        graph: submodule paths in the order the model calls them, e.g. ``("backbone", "head")``.
            The first one's tensor inputs become the graph's inputs; every tensor input of a
            later one must be an output of an earlier one (or a graph input). Each is called
            exactly once per forward. Everything else (the root forward's Python and the other
            submodules) runs eagerly around the compiled graph.
        name: what the cut is called in the report (a preset's name, or ``"user"``).

    Example:
        >>> Stages(("backbone", "head")).graph
        ('backbone', 'head')
        >>> Stages("backbone").graph
        ('backbone',)
    """

    graph: tuple[str, ...] | str
    name: str = "user"

    def __post_init__(self) -> None:
        paths = (self.graph,) if isinstance(self.graph, str) else tuple(self.graph)
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise InputError(f"stages must name one or more submodule paths (e.g. 'backbone' or ('backbone', 'head')), got {self.graph!r}")
        for a in paths:
            for b in paths:
                if a != b and b.startswith(a + "."):
                    raise InputError(f"stages: '{b}' lies inside '{a}'; name each part of the graph once")
        if len(set(paths)) != len(paths):
            raise InputError(f"stages: a path is named twice in {paths}")
        object.__setattr__(self, "graph", paths)


# torchvision detection families by class name (found anywhere in the model's MRO): the backbone
# (with its FPN) and the heads are the graph; transform, anchors, decoding, NMS stay eager.
PRESETS: dict[str, Stages] = {
    "RetinaNet": Stages(("backbone", "head"), "torchvision RetinaNet"),
    "FCOS": Stages(("backbone", "head"), "torchvision FCOS"),
    "SSD": Stages(("backbone", "head"), "torchvision SSD"),
    "GeneralizedRCNN": Stages(("backbone", "rpn.head"), "torchvision GeneralizedRCNN"),
}
_PRESET_MODULE = "torchvision.models.detection"


def preset_for(model: nn.Module) -> Stages | None:
    """The built-in cut for a torchvision detector (by class), else None.

    Example:
        >>> preset_for(torch.nn.Linear(2, 2)) is None
        True
    """
    for cls in type(model).__mro__:
        if cls.__name__ in PRESETS and cls.__module__.startswith(_PRESET_MODULE):
            return PRESETS[cls.__name__]
    return None


def resolve_stages(model: nn.Module, stages: Stages | str | Sequence[str] | None) -> Stages | None:
    """`compile(stages=...)` as a `Stages` (a preset when None), with every path checked."""
    chosen = preset_for(model) if stages is None else stages if isinstance(stages, Stages) else Stages(stages)
    if chosen is None:
        return None
    names = [name for name, _ in model.named_modules() if name]
    for path in chosen.graph:
        if path not in names:
            close = difflib.get_close_matches(path, names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; its top-level submodules: {', '.join(n for n in names if '.' not in n)}"
            raise InputError(f"stages: {type(model).__name__} has no submodule '{path}'{hint}")
    return chosen


# ---------------------------------------------------------------------------------------------
# capturing what each part receives


@dataclass
class _Call:
    """One call of a graph part on the example: its arguments and output."""

    path: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


def _capture(model: nn.Module, inputs: tuple[Any, ...], paths: Sequence[str]) -> list[_Call]:
    """Run `model` once and record each named part's call, in call order."""
    calls: list[_Call] = []
    handles = []
    for path in paths:
        def hook(_m: nn.Module, args: Any, kwargs: Any, output: Any, path: str = path) -> None:
            calls.append(_Call(path, tuple(args), dict(kwargs), output))

        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*copy_inputs(inputs))
    except Exception as exc:
        raise InputError(f"the model does not run on the example inputs: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    counts = {p: sum(c.path == p for c in calls) for p in paths}
    wrong = {p: n for p, n in counts.items() if n != 1}
    if wrong:
        raise InputError(
            "stages: each graph part must be called exactly once per forward; "
            + ", ".join(f"'{p}' was called {n} times" for p, n in wrong.items())
            + " on the example inputs"
        )
    return calls


# A leaf of a part's (args, kwargs): a graph input, an earlier part's output, or a constant.
_Source = tuple[str, Any, Any]


def _sources(calls: list[_Call]) -> tuple[int, list[tuple[pytree.TreeSpec, list[_Source]]]]:
    """How every part's arguments are made, by tensor identity on the captured call."""
    known: dict[int, _Source] = {}
    recipes = []
    n_inputs = 0
    for k, call in enumerate(calls):
        leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
        made: list[_Source] = []
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                made.append(("const", leaf, None))
            elif k == 0:  # every tensor the first part takes is a graph input
                made.append(("input", n_inputs, None))
                known.setdefault(id(leaf), made[-1])
                n_inputs += 1
            elif id(leaf) in known:
                made.append(known[id(leaf)])
            else:
                raise InputError(
                    f"stages: '{call.path}' takes a tensor of shape {tuple(leaf.shape)} that is neither a graph input "
                    f"nor an output of {', '.join(repr(c.path) for c in calls[:k])}: the code between them computes it, "
                    "so it cannot be one graph. Cut there instead (name fewer parts), or make that code a submodule in the graph"
                )
        recipes.append((spec, made))
        for j, t in enumerate(pytree.tree_leaves(call.output)):
            if isinstance(t, torch.Tensor):
                known.setdefault(id(t), ("output", call.path, j))
    return n_inputs, recipes


# ---------------------------------------------------------------------------------------------
# the graph part


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at `path` under `root`, making empty containers on the way (so node
    names in the graph and the report are the user's module paths)."""
    *parents, name = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(name, module)


class StagedGraph(nn.Module):
    """The graph part of a staged model: its parts run in order on the first part's tensors.

    Returns a dict from part path to that part's output, so the ONNX outputs are named by part
    (``head_cls_logits``). Its forward takes the graph inputs as positional tensors.
    """

    def __init__(self, model: nn.Module, calls: list[_Call]) -> None:
        super().__init__()
        self.part_paths = [c.path for c in calls]
        self.n_inputs, self.recipes = _sources(calls)
        for path in self.part_paths:
            _attach(self, path, model.get_submodule(path))

    def run_parts(self, inputs: tuple[Any, ...]) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        flat: dict[str, list[Any]] = {}
        for path, (spec, made) in zip(self.part_paths, self.recipes):
            leaves = [
                inputs[a] if kind == "input" else flat[a][b] if kind == "output" else a
                for kind, a, b in made
            ]
            args, kwargs = pytree.tree_unflatten(leaves, spec)
            outputs[path] = self.get_submodule(path)(*args, **kwargs)
            flat[path] = pytree.tree_leaves(outputs[path])
        return outputs


def _graph_class(n_inputs: int) -> type[StagedGraph]:
    # torch.fx reads the forward's code for its placeholders: one named parameter per input
    names = ", ".join(f"input_{i}" for i in range(n_inputs))
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self.run_parts(({names},))\n", namespace)  # noqa: S102 - a fixed template
    return type("StagedGraph", (StagedGraph,), {"forward": namespace["forward"]})


# ---------------------------------------------------------------------------------------------
# the eager model around the compiled graph


class _GraphCall:
    """One call of the compiled graph shared by the stand-ins of all parts (a plain object, so
    the graph's parameters are not registered twice)."""

    def __init__(self, graph: nn.Module, calls: list[_Call], recipes: list[Any], input_shapes: list[tuple[int, ...]]) -> None:
        self.graph = graph
        self.first = calls[0].path
        self.recipes = {c.path: r for c, r in zip(calls, recipes)}
        self.output_specs = {c.path: pytree.tree_flatten(c.output)[1] for c in calls}
        self.input_shapes = input_shapes
        self.inputs: tuple[Any, ...] = ()
        self.flat: dict[str, list[Any]] = {}

    def __call__(self, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        leaves = pytree.tree_leaves((args, kwargs))
        spec, made = self.recipes[path]
        if path == self.first:
            self.inputs = tuple(x for x in leaves if isinstance(x, torch.Tensor))
            shapes = [tuple(x.shape) for x in self.inputs]
            if shapes != self.input_shapes:
                raise InputError(
                    f"the graph part was compiled for '{path}' inputs of shape {self.input_shapes}, this call gives {shapes} "
                    "(the eager stages before it resized or batched differently): compile with example inputs of this size"
                )
            out = self.graph(*self.inputs)
            self.flat = {p: pytree.tree_leaves(out[p]) for p in self.output_specs}
        else:
            expected = [self.inputs[a] if kind == "input" else self.flat[a][b] for kind, a, b in made if kind != "const"]
            given = [x for x in leaves if isinstance(x, torch.Tensor)]
            if len(given) != len(expected) or any(g is not e for g, e in zip(given, expected)):
                raise InputError(f"stages: '{path}' was called with tensors the compiled graph did not produce for it (the eager code between the parts changed)")
        return pytree.tree_unflatten(self.flat[path], self.output_specs[path])


class _PartStandIn(nn.Module):
    """Takes a graph part's place in the eager model; answers from the compiled graph."""

    def __init__(self, path: str, graph_call: _GraphCall) -> None:
        super().__init__()
        self.path = path
        self.graph_call = graph_call

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_call(self.path, args, kwargs)

    def extra_repr(self) -> str:
        return f"'{self.path}': compiled graph part"


class StagedModel(nn.Module):
    """The original model (a copy, eval mode) with its graph parts answered by the compiled graph."""

    def __init__(self, eager: nn.Module) -> None:
        super().__init__()
        self.eager = eager

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.eager(*args, **kwargs)


@dataclass
class StageSplit:
    """A model split at `stages`: the graph root to compile, its inputs, and where the cut is."""

    stages: Stages
    model_type: str
    root: StagedGraph
    graph_inputs: tuple[torch.Tensor, ...]
    eager: list[str]
    calls: list[_Call] = field(repr=False)
    model: nn.Module = field(repr=False)

    def graph_inputs_for(self, inputs: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        """The graph inputs the model's eager stages make from `inputs` (for calibration data)."""
        with preserved_state(self.model):  # the eager copy starts from the model's own state
            calls = _capture(self.model, inputs, self.stages.graph)
        return tuple(x for x in pytree.tree_leaves((calls[0].args, calls[0].kwargs)) if isinstance(x, torch.Tensor))

    def cut(self) -> dict[str, Any]:
        """Where the cut is, as plain data (manifest.json)."""
        return {
            "stages": self.stages.name,
            "graph": list(self.root.part_paths),
            "graph_inputs": [f"{self.root.part_paths[0]} input {i}: {list(x.shape)}" for i, x in enumerate(self.graph_inputs)],
            "eager": self.eager,
        }

    def notes(self) -> list[str]:
        """Report lines saying where the cut is."""
        shapes = ", ".join(str(tuple(x.shape)) for x in self.graph_inputs)
        return [
            f"stages ({self.stages.name}): the graph (and model.onnx) is {' -> '.join(self.root.part_paths)} of {self.model_type}, "
            f"on the tensor(s) {self.root.part_paths[0]} receives ({shapes}); its outputs are each part's outputs",
            f"stages: eager around the graph (run by CompiledModel, not in model.onnx): {', '.join(self.eager)}",
        ]

    def runner(self, graph: nn.Module) -> StagedModel:
        """A copy of the model whose graph parts answer from `graph` (the compiled graph part)."""
        eager = copy.deepcopy(self.model).eval()
        graph_call = _GraphCall(graph, self.calls, self.root.recipes, [tuple(x.shape) for x in self.graph_inputs])
        for path in self.root.part_paths:
            parent, _, name = path.rpartition(".")
            eager.get_submodule(parent).add_module(name, _PartStandIn(path, graph_call))
        return StagedModel(eager)


def _eager_parts(model: nn.Module, graph: Sequence[str], prefix: str = "") -> list[str]:
    """Submodules outside the graph part, and the forwards whose Python runs around it."""
    out = [f"{prefix or '<root>'} forward ({type(model).__name__})"]
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if path in graph:
            continue
        if any(p.startswith(path + ".") for p in graph):
            out += _eager_parts(child, graph, path)
        else:
            out.append(path)
    return out


def split_stages(model: nn.Module, inputs: tuple[Any, ...], stages: Stages | str | Sequence[str] | None) -> StageSplit | None:
    """Split `model` at `stages` (a preset when None); None when there is nothing to split.

    Raises:
        InputError: a path does not exist, a part is not called exactly once, or a part takes a
            tensor the code between the parts computes.
    """
    chosen = resolve_stages(model, stages)
    if chosen is None:
        return None
    copied = copy.deepcopy(model).eval()
    with preserved_state(copied):  # the graph parts keep the model's state, not this run's
        calls = _capture(copied, inputs, chosen.graph)
    root = _graph_class(_sources(calls)[0])(copied, calls).eval()
    first = calls[0]
    graph_inputs = tuple(x.detach().clone() for x in pytree.tree_leaves((first.args, first.kwargs)) if isinstance(x, torch.Tensor))
    eager = copy.deepcopy(model).eval()
    return StageSplit(chosen, type(model).__name__, root, graph_inputs, _eager_parts(model, chosen.graph), calls, eager)
