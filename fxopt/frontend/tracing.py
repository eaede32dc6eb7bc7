"""Tracing: nn.Module -> torch.fx.GraphModule with shapes on every node and automatic leaves.

Shapes are static (fixed by the example inputs), so control flow on shapes (``if H % 7``,
``len(x.shape)``, ``int(x.size(1))``) is specialised to the example inputs and recorded. A
submodule that still cannot be traced (data-dependent control flow, untraceable Python) becomes
a leaf and tracing is retried, so the rest of the model is still optimised.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node, Proxy, Tracer
from torch.fx import _symbolic_trace as fx_trace
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata
from torch.fx.proxy import Attribute
from torch.utils import _pytree as pytree

from fxopt.errors import InputError, TraceError
from fxopt.frontend.copying import copy_module
from fxopt.frontend.inputs import copy_inputs, leaf_module_paths, submodule
from fxopt.frontend.module_state import (
    StateSnapshot,
    check_state_writes,
    drop_state_writes,
    find_state_writes,
    judge_state_writes,
)

__all__ = ["Leaf", "trace", "trace_with_outputs", "propagate_shapes", "normalize_inputs", "leaves_of", "specialisations_of"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_MAX_RETRIES = 64
_UNKNOWN: Any = object()  # the value of a node the tracer could not evaluate

# Tensor attributes and methods whose result depends only on shape/dtype, never on values.
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized"})
_SHAPE_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "is_floating_point", "is_complex",
    "is_contiguous", "element_size", "get_device",
})
# Ops whose output shape depends on tensor values: shapes downstream of them are not static.
_VALUE_SHAPED_OPS = frozenset({
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "repeat_interleave",
    "bincount", "nms", "batched_nms", "tolist", "item",
})
# Ops whose result is random even on static arguments: never specialised on.
_RANDOM_OPS = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli",
    "multinomial", "normal", "poisson", "dropout", "uniform_", "normal_", "exponential_",
})


@dataclass(frozen=True)
class Leaf:
    """A submodule kept opaque in the graph, and why."""

    path: str
    module_type: str
    reason: str


def _op_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return str(getattr(target, "__name__", target)).rsplit(".", 1)[-1]


class _ValueMixin:
    """Python protocols a plain Proxy refuses, answered from the value on the example inputs."""

    tracer: _LeafTracer

    def __len__(self) -> int:
        return self.tracer.concrete(self, "len", len)  # type: ignore[arg-type]

    def __int__(self) -> int:
        return self.tracer.concrete(self, "int", int)  # type: ignore[arg-type]

    def __index__(self) -> int:
        return self.tracer.concrete(self, "index", operator.index)  # type: ignore[arg-type]

    def __float__(self) -> float:
        return self.tracer.concrete(self, "float", float)  # type: ignore[arg-type]

    def __getattr__(self, k: str) -> Any:
        tracer = self.__dict__.get("tracer")
        if k.startswith("__") or tracer is None:  # copy/pickle probes, or not initialised yet
            raise AttributeError(k)
        device_or_dtype = tracer.static_value(self, (torch.device, torch.dtype))
        if device_or_dtype is not _UNKNOWN:
            return getattr(device_or_dtype, k)  # x.device.type is "cpu" for every input
        return _ValueAttribute(self, k)  # type: ignore[arg-type]


class _ValueProxy(_ValueMixin, Proxy):
    """A Proxy whose tracer knows its value on the example inputs."""


class _ValueAttribute(_ValueMixin, Attribute):
    """``proxy.attr`` (e.g. ``x.shape``), with the same concrete protocols."""


class _LeafTracer(Tracer):
    """A tracer that keeps chosen submodules opaque, remembers where tracing broke, and
    evaluates every node on the example inputs so shape-only control flow can be specialised.

    A node is *static* when its value is a function of input shapes alone (``x.shape[2] // 7``);
    ``if``/``len``/``int`` on a static node use its value. A tensor has a *value-dependent shape*
    after ops like ``nonzero`` or a custom leaf; shapes read from it are not static.
    """

    def __init__(self, leaves: Iterable[str], inputs: tuple[Any, ...] = (), fixed: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.leaf_paths = set(leaves)
        self.failed_path: str | None = None
        self.fixed = dict(fixed or {})
        self.specialisations: list[str] = []
        self._n_inputs = len(inputs)
        self._placeholder_values = [pytree.tree_map(_clone, x) for x in inputs] + list(self.fixed.values())
        self._values: dict[Node, Any] = {}
        self._static: set[Node] = set()
        self._value_shaped: set[Node] = set()
        self._eager_depth = 0  # > 0 while `_evaluate` runs real code on the example values
        self._all_known = True  # every node's value so far is known

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_paths or super().is_leaf_module(
            m, module_qualified_name
        )

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self._eager_depth:  # a real run inside `_evaluate`: the module as in eager mode, hooks and all
            return forward(*args, **kwargs)
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:  # the innermost module is the culprit
                self.failed_path = path
            raise

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._eager_depth:  # a real run reads the real parameter, not a get_attr proxy of it
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None) -> tuple[Any, list[Any]]:
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if not self.fixed or not is_module or len(args) != 1 + self._n_inputs + len(self.fixed):
            return fn, args
        # forward parameters the example inputs leave out keep their defaults, as in eager mode
        for dropped in args[1 + self._n_inputs:]:
            self.graph.erase_node(dropped.node)
        return functools.partial(fn, **self.fixed), args[: 1 + self._n_inputs]

    def proxy(self, node: Node) -> Proxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **more: Any) -> Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        if kind == "placeholder":
            self._values[proxy.node] = self._placeholder_values.pop(0) if self._placeholder_values else _UNKNOWN
        else:
            self._track(proxy.node, kind, target, args, kwargs)
        value = self._values[proxy.node]
        if value is _UNKNOWN:
            self._all_known = False
        else:
            _record_meta(proxy.node, value)  # at once, as a run of the graph does (a later in-place op changes no record)
        return proxy

    def outputs_of(self, graph: torch.fx.Graph) -> Any:
        """The outputs of `graph` (this trace's) on the example inputs, from the value of every node the
        trace evaluated: a run of the graph node by node, done while tracing; its nodes' ``tensor_meta``
        and ``type`` are recorded as `propagate_shapes` does. `_UNKNOWN` where a node's value is not
        known (its evaluation failed): the graph is then run."""
        if not self._all_known:
            return _UNKNOWN
        output = None
        for node in graph.nodes:
            if node.op == "output":
                output = node
            elif node not in self._values:
                if node.op != "get_attr":  # pragma: no cover - every other node is made through create_proxy
                    return _UNKNOWN
                self._values[node] = value = self._run("get_attr", str(node.target), (), {})  # a tensor constant
                _record_meta(node, value)
        if output is None:  # pragma: no cover - a traced graph always ends in its output
            return _UNKNOWN
        outputs = map_aggregate(output.args[0], lambda a: self._values[a] if isinstance(a, Node) else a)
        _record_meta(output, outputs)
        return outputs

    # --- values of nodes on the example inputs -------------------------------------------

    def _value(self, a: Any) -> Any:
        return self._values.get(a.node, _UNKNOWN) if isinstance(a, Proxy) else a

    def _track(self, node: Node, kind: str, target: Any, args: Any, kwargs: Any) -> None:
        inputs: list[Node] = []
        map_aggregate((args, kwargs), lambda a: inputs.append(a.node) if isinstance(a, Proxy) else None)
        vargs, vkwargs = map_aggregate(args, self._value), map_aggregate(kwargs, self._value)
        known = not any(v is _UNKNOWN for v in pytree.tree_leaves((vargs, vkwargs)))
        self._values[node] = self._evaluate(kind, target, vargs, vkwargs) if known else _UNKNOWN
        if self._is_static(kind, target, inputs, args):
            self._static.add(node)
        if self._shape_depends_on_values(kind, target, inputs, vargs):
            self._value_shaped.add(node)

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        try:
            with self._eager():
                return self._run(kind, target, args, kwargs)
        except Exception:  # noqa: BLE001 - an unknown value only disables specialisation
            return _UNKNOWN

    @contextlib.contextmanager
    def _eager(self) -> Iterator[None]:
        """Step out of symbolic tracing for a moment, to run real code on the example values.

        torch.fx's patches of ``nn.Module.__call__`` / ``__getattr__`` stay in place (reverting and
        re-applying them re-types every module class, the larger part of tracing's time): they call
        this tracer's `call_module` and `getattr`, which run the real module and return the real
        attribute while `_eager_depth` is set; wrapped functions call the original on real values."""
        flag = fx_trace._get_is_fx_tracing()
        fx_trace._set_is_fx_tracing(False)
        self._eager_depth += 1
        try:
            yield
        finally:
            self._eager_depth -= 1
            fx_trace._set_is_fx_tracing(flag)

    def _run(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return submodule(self.root, target)(*args, **kwargs)
        if kind == "get_attr":
            return functools.reduce(getattr, target.split("."), self.root)
        return _UNKNOWN

    def _is_static(self, kind: str, target: Any, inputs: list[Node], args: Any) -> bool:
        if not inputs or _op_name(target) in _RANDOM_OPS or kind not in ("call_function", "call_method"):
            return False
        reads_shape = (target is getattr and args[1] in _SHAPE_ATTRS) or (kind == "call_method" and target in _SHAPE_METHODS)
        if reads_shape and inputs[0] not in self._value_shaped:
            return True  # x.shape, x.size(1), x.dim() of a tensor whose shape is static
        return all(n in self._static for n in inputs)

    def _shape_depends_on_values(self, kind: str, target: Any, inputs: list[Node], args: Any) -> bool:
        if kind == "call_module":
            return type(submodule(self.root, target)).__module__.split(".")[0] != "torch"
        if any(n in self._value_shaped for n in inputs) or _op_name(target) in _VALUE_SHAPED_OPS:
            return True
        if _op_name(target) == "where" and len(args) == 1:
            return True  # torch.where(cond) is nonzero
        # a size computed from tensor values (x.view(n) with n from .item()) makes the shape dynamic
        if any(n not in self._static and not isinstance(self._values.get(n), torch.Tensor) for n in inputs[1:]):
            return True
        return target is operator.getitem and _has_mask_index(args)

    # --- Python protocols on proxies -----------------------------------------------------

    def _structural(self, node: Node) -> bool:
        return node in self._static or node not in self._value_shaped

    def to_bool(self, obj: Proxy) -> bool:
        value = self._values.get(obj.node, _UNKNOWN)
        if obj.node not in self._static or value is _UNKNOWN:
            return super().to_bool(obj)
        result = bool(value)
        self.specialisations.append(f"{_user_frame()}: shape-only condition taken as {result}")
        return result

    def iter(self, obj: Proxy) -> Iterator[Any]:
        value = self._values.get(obj.node, _UNKNOWN)
        if value is _UNKNOWN or not self._structural(obj.node) or not isinstance(value, (list, tuple, torch.Tensor)):
            return super().iter(obj)
        return iter([obj[i] for i in range(len(value))])

    def static_value(self, obj: Proxy, types: tuple[type, ...]) -> Any:
        """The value of a static proxy of one of `types`, else `_UNKNOWN`."""
        value = self._values.get(obj.node, _UNKNOWN)
        return value if obj.node in self._static and isinstance(value, types) else _UNKNOWN

    def concrete(self, obj: Proxy, what: str, convert: Callable[[Any], Any]) -> Any:
        """`convert` of the proxy's value, when specialising on it is sound; raises otherwise."""
        value = self._values.get(obj.node, _UNKNOWN)
        structural = what == "len" and self._structural(obj.node)
        if value is _UNKNOWN or not (obj.node in self._static or structural):
            raise RuntimeError(f"'{what}' of a value that depends on tensor data cannot be traced symbolically")
        return convert(value)


def _clone(x: Any) -> Any:
    # the tracer evaluates in-place ops too: keep the caller's example inputs intact
    return x.clone() if isinstance(x, torch.Tensor) else x


def _has_mask_index(args: Any) -> bool:
    index = args[1] if len(args) > 1 else ()
    leaves = pytree.tree_leaves(index)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in leaves)


def _user_frame() -> str:
    frames = [f for f in traceback.extract_stack() if not _is_internal(f.filename)]
    return f"{frames[-1].filename}:{frames[-1].lineno}: {(frames[-1].line or '').strip()}" if frames else "?"


def _is_internal(filename: str) -> bool:
    return filename.startswith(_TORCH_DIR + os.sep) or filename == __file__


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
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_internal(f.filename)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def propagate_shapes(gm: GraphModule, example_inputs: tuple[Any, ...]) -> Any:
    """Record `tensor_meta` (shape, dtype) on every node by running `gm` on the inputs; returns
    the outputs of that run (what ``gm(*example_inputs)`` returns).

    The same record as torch.fx's ``ShapeProp`` (`tensor_metadata`), in a fraction of its time.

    Raises:
        RuntimeError: a node fails; the message names it and the cause, in one line.
    """
    with torch.no_grad():
        return _ShapeRecorder(gm).run(*copy_inputs(example_inputs))


class _NodeFailed(RuntimeError):
    """A node failed while `_ShapeRecorder` ran it (the cause is chained)."""


class _ShapeRecorder(torch.fx.Interpreter):
    """An interpreter that leaves ``meta["tensor_meta"]`` and ``meta["type"]`` on every node it runs."""

    def run_node(self, n: Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise _NodeFailed(f"shape propagation failed at {n.format_node()[:200]}: {_reason(exc)}") from exc
        _record_meta(n, result)
        return result


def _record_meta(n: Node, result: Any) -> None:
    """Leave ``meta["tensor_meta"]`` (where `result` holds a tensor) and ``meta["type"]`` on `n`."""
    found = False

    def record(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return tensor_metadata(obj)
        return obj

    meta = map_aggregate(result, record)
    if found:
        n.meta["tensor_meta"] = meta
    n.meta["type"] = type(result)


_MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """torch.fx's `TensorMetadata` of `t` (what ``ShapeProp`` records), read from the tensor's own
    contiguity flags instead of torch's Python reference implementation of them.

    Example:
        >>> tensor_metadata(torch.zeros(1, 3, 4, 4).to(memory_format=torch.channels_last)).memory_format
        torch.channels_last
    """
    sparse = t.layout != torch.strided
    memory_format = None
    if not sparse:
        if t.is_contiguous():
            memory_format = torch.contiguous_format
        elif t.dim() in _MEMORY_FORMATS and t.is_contiguous(memory_format=_MEMORY_FORMATS[t.dim()]):
            memory_format = _MEMORY_FORMATS[t.dim()]
    qparams: dict[str, Any] = {}
    if t.is_quantized:
        qparams["qscheme"] = scheme = t.qscheme()
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            qparams["scale"], qparams["zero_point"] = t.q_scale(), t.q_zero_point()
        else:
            qparams["scale"], qparams["zero_point"] = t.q_per_channel_scales().tolist(), t.q_per_channel_zero_points().tolist()
            qparams["axis"] = t.q_per_channel_axis()
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, () if sparse else t.stride(), memory_format, t.is_quantized, qparams)


def _run_failure_module(gm: GraphModule, example_inputs: tuple[Any, ...]) -> tuple[str | None, Exception | None, Any]:
    """Run `gm` node by node once, recording every node's ``tensor_meta`` (as `propagate_shapes`);
    returns (None, None, the outputs), or on failure (the module path owning the failing node, the
    exception, None)."""
    interp = _ShapeRecorder(gm)
    current: list[str | None] = [None]
    run_node = interp.run_node

    def tracking_run_node(n: torch.fx.Node) -> Any:
        stack = n.meta.get("nn_module_stack") or {}
        current[0] = next(reversed(stack.values()))[0] if stack else None
        return run_node(n)

    interp.run_node = tracking_run_node  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            outputs = interp.run(*copy_inputs(example_inputs))
    except Exception as exc:  # noqa: BLE001 - any failure of the traced program is reported
        cause = exc.__cause__ if isinstance(exc, _NodeFailed) and isinstance(exc.__cause__, Exception) else exc
        return current[0], cause, None
    return None, None, outputs


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

    A forward that writes the model's own buffers or parameters is refused where the written value
    reaches an output; where it cannot, the write is left out of the graph with an `FxoptWarning`
    (see `fxopt.frontend.module_state.state_writes_of`). The graph's state is the model's, whatever
    fxopt's own runs of the forward wrote.

    Args:
        model: the user's module; never modified.
        example_inputs: a tensor or tuple of positional inputs.
        leaf_modules: qualified names of submodules to keep opaque on purpose.

    Returns:
        The traced, shape-annotated GraphModule.

    Raises:
        InputError: the model does not run on `example_inputs`, or has lazy parameters not yet drawn.
        TraceError: tracing fails in the root module itself, so no leaf can help.
        StateWriteError: the forward writes a buffer or parameter whose value reaches an output.

    Example:
        >>> import torch
        >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()), torch.randn(1, 4))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    return trace_with_outputs(model, example_inputs, leaf_modules=leaf_modules)[0]


def trace_with_outputs(model: nn.Module, example_inputs: Any, *, leaf_modules: Iterable[str] = ()) -> tuple[GraphModule, Any]:
    """`trace`, and the graph's outputs on `example_inputs` from the run that checked it (the same
    values a later ``gm(*example_inputs)`` returns: every run starts from the model's state)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    root = copy_module(model).eval()
    state = StateSnapshot(root, original=model)  # the model's own state: every run below is undone before the graph takes it

    def run() -> Any:
        with torch.no_grad():
            return root(*copy_inputs(inputs))

    try:
        writes = find_state_writes(root, run, original=model)
    except Exception as exc:
        raise InputError(
            f"the model does not run on the example inputs "
            f"({', '.join(_describe(x) for x in inputs)}): {_reason(exc)}"
        ) from exc
    dropped = check_state_writes(judge_state_writes(root, run, writes), type(root).__name__)

    requested = leaf_module_paths(root, leaf_modules)  # a lone string is one path; unknown paths are refused
    leaves: dict[str, Leaf] = {p: Leaf(p, _type_of(root, p), "requested by the user") for p in requested}
    fixed = _defaults_after(root, len(inputs))
    for _ in range(_MAX_RETRIES):
        tracer = _LeafTracer(leaves, inputs, fixed)
        try:
            with torch.no_grad():
                graph = tracer.trace(root)
        except Exception as exc:
            path = tracer.failed_path
            if not path or path in leaves:
                raise TraceError(_reason(exc), module_path=path or "", source_line=_user_line(exc)) from exc
            leaves[path] = Leaf(path, _type_of(root, path), _reason(exc))
            continue
        finally:
            state.restore(root)  # tracing ran the forward's eager code on the model's state
        gm = GraphModule(tracer.root, graph, type(root).__name__)
        if dropped:
            drop_state_writes(gm, dropped)
        outputs = _UNKNOWN if dropped else tracer.outputs_of(graph)  # the trace evaluated every node: the graph ran
        if outputs is not _UNKNOWN:
            break
        failed_path, exc, outputs = _run_failure_module(gm, inputs)  # also records every node's shapes
        if exc is None:
            state.restore(root)  # the graph shares root's tensors: they hold the model's values, not those of this run
            break
        if not failed_path or failed_path in leaves:
            raise TraceError(
                f"the traced graph does not run: {_reason(exc)}", module_path=failed_path or ""
            ) from exc
        leaves[failed_path] = Leaf(failed_path, _type_of(root, failed_path), f"traced graph fails to run: {_reason(exc)}")
    else:  # pragma: no cover - a model with more than _MAX_RETRIES untraceable blocks
        raise TraceError(f"gave up after {_MAX_RETRIES} automatic leaves")
    gm.meta["fxopt_leaves"] = tuple(leaves.values())
    gm.meta["fxopt_specialisations"] = tuple(dict.fromkeys(tracer.specialisations))
    return gm, outputs


def leaves_of(gm: GraphModule) -> tuple[Leaf, ...]:
    """The leaves `trace` chose for `gm` (empty for a graph traced elsewhere)."""
    return tuple(gm.meta.get("fxopt_leaves", ()))


def specialisations_of(gm: GraphModule) -> tuple[str, ...]:
    """Shape-only conditions `trace` decided from the example inputs (``file:line: ...``)."""
    return tuple(gm.meta.get("fxopt_specialisations", ()))


def _defaults_after(root: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Defaults of the forward parameters the example inputs leave out ({} if not all have one)."""
    params = list(inspect.signature(type(root).forward).parameters.values())[1:]  # after self
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return {}
    rest = params[n_inputs:]
    return {} if any(p.default is inspect.Parameter.empty for p in rest) else {p.name: p.default for p in rest}


def _type_of(root: nn.Module, path: str) -> str:
    try:
        return type(root.get_submodule(path)).__name__
    except AttributeError:
        return "?"


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)}:{str(x.dtype).replace('torch.', '')}"
    return type(x).__name__
