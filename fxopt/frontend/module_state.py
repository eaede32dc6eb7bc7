"""Buffers and parameters a model's forward writes: found on a copy before tracing, refused where
the written value reaches an output, left out of the graph (with a warning) where it cannot.

A traced graph, and the ONNX file lowered from it, keep no state between calls: a forward that
writes its own buffer (``self.calls.add_(1)``, an EMA ``self.ema.mul_(0.5).add_(y)``) would be
compiled with one value of that buffer baked in, often the value fxopt's own runs left there. So
`find_state_writes` runs the forward once under a dispatch mode that sees every aten op writing
into a buffer's or parameter's storage (and a hook for ``self.buf = ...``), with a value
comparison for kernels that write without saying so; `judge_state_writes` follows the written
state's values through a second run to see whether they reach an output. `StateSnapshot` puts the
model's own state back after every run fxopt makes before the graph is built.
"""

from __future__ import annotations

import contextlib
import operator
import os
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fxopt.errors import InputError, StateWriteError, warn

__all__ = [
    "StateSnapshot",
    "StateWrite",
    "check_state_writes",
    "drop_state_writes",
    "find_state_writes",
    "judge_state_writes",
    "preserved_state",
    "state_bytes",
    "state_writes_of",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
# fxopt's own frames around a run of the forward: the user's line is deeper than these
_RUNNER_FILES = frozenset(os.path.join(os.path.dirname(__file__), f) for f in ("module_state.py", "tracing.py", "stages.py"))
_META_KEY = "fxopt_state_writes"

# Methods whose result is a view of their input: a write through it is a write to the input.
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "transpose", "permute", "t", "expand", "expand_as", "narrow", "select", "unfold", "contiguous",
})
_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem})


@dataclass(frozen=True)
class StateWrite:
    """One buffer or parameter a forward writes: how, where, and whether its value reaches an output.

    Attributes:
        name: qualified name in the model (``"block.ema"``).
        kind: ``"buffer"`` or ``"parameter"``.
        how: the write (``"written in place (add_)"``, ``"re-assigned"``, ``"changed"``).
        line: ``file:line: code`` of the write in the user's code, ``""`` when not known.
        reaches_output: the written value (read before or after the write) reaches an output.
    """

    name: str
    kind: str
    how: str
    line: str = ""
    reaches_output: bool = True

    def describe(self, *, line: bool = True) -> str:
        """One line: what is written, how, and (with `line`) where."""
        if not self.line:
            at = " (found by comparing its value before and after a run; the line is not known)"
        else:
            at = f" at {self.line}" if line else ""
        return f"{self.kind} '{self.name}' is {self.how}{at}"


# ---------------------------------------------------------------------------------------------
# the model's own state, kept and put back


def state_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers, each tensor counted once.

    Example:
        >>> state_bytes(torch.nn.Linear(4, 2))  # 8 weights and 2 biases of 4 bytes
        40
    """
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _named_state(module: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    for name, p in module.named_parameters(remove_duplicate=False):
        yield name, "parameter", p
    for name, b in module.named_buffers(remove_duplicate=False):
        yield name, "buffer", b


class StateSnapshot:
    """Every parameter and buffer of a module: the tensor object, its version counter and a copy
    of its value, so writes can be found (`changed`) and undone (`restore`).

    Raises:
        InputError: a lazy module (``nn.LazyLinear``) has not been run yet: its first forward
            would draw the weights, so fxopt would compile weights of its own making.

    Example:
        >>> m = torch.nn.BatchNorm1d(2)
        >>> snap = StateSnapshot(m)
        >>> _ = m.train()(torch.randn(4, 2))
        >>> sorted(snap.changed(m))
        ['num_batches_tracked', 'running_mean', 'running_var']
        >>> snap.restore(m); snap.changed(m)
        {}
    """

    def __init__(self, module: nn.Module, original: nn.Module | None = None) -> None:
        """`original`: a module of which `module` is a fresh deep copy, which nothing writes into
        (the user's model): its tensors serve as the saved values, instead of copies of them."""
        self.kinds: dict[str, str] = {}
        self.saved: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}
        kept = {name: t for name, _, t in _named_state(original)} if original is not None else {}
        for name, kind, t in _named_state(module):
            if isinstance(t, nn.parameter.UninitializedTensorMixin):
                raise InputError(
                    f"{kind} '{name}' of {type(module).__name__} is not initialised yet (a lazy module): its first forward "
                    "draws it, so fxopt would compile weights of its own making; run the model once on an input before compiling"
                )
            self.kinds[name] = kind
            value = kept.get(name)
            if value is None or value.shape != t.shape or value.dtype != t.dtype or value.device != t.device:
                value = t.detach().clone()
            self.saved[name] = (t, t._version, value.detach())

    def changed(self, module: nn.Module) -> dict[str, str]:
        """Names whose tensor was replaced, written in place, or holds another value, and how."""
        current = {name: t for name, _, t in _named_state(module)}
        how: dict[str, str] = {}
        for name, (obj, version, _) in self.saved.items():
            now = current.get(name)
            if now is not obj:
                how[name] = "re-assigned" if now is not None else "removed"
            elif obj._version != version:
                how[name] = "written in place"
        unwritten = [name for name in self.saved if name not in how]  # a write through .data bumps no version: its bits tell
        how.update((name, "changed") for name in self._other_bits(unwritten))
        return {name: how[name] for name in self.saved if name in how}

    def _other_bits(self, names: list[str]) -> list[str]:
        """Those of `names` whose tensor's bits differ from the saved value's (`_differing`)."""
        return _differing([(self.saved[n][0], self.saved[n][2]) for n in names], names)

    def restore(self, module: nn.Module) -> None:
        """Put every saved tensor back in its place, with its saved value."""
        owners = dict(module.named_modules(remove_duplicate=False))  # one walk of the tree, not one per tensor
        changed = set(self._other_bits([name for name, (obj, version, _) in self.saved.items() if obj._version == version]))
        for name, (obj, version, value) in self.saved.items():
            owner_path, _, attr = name.rpartition(".")
            owner = owners[owner_path] if owner_path in owners else module.get_submodule(owner_path)
            table = owner._parameters if self.kinds[name] == "parameter" else owner._buffers
            if table.get(attr) is not obj:
                table[attr] = obj  # type: ignore[assignment]
            if obj._version != version or name in changed:
                with torch.no_grad():
                    obj.copy_(value)
                self.saved[name] = (obj, obj._version, value)  # the copy back is no write of the model's


_COMPARE_CHUNK_BYTES = 16 << 20  # `_differing` compares this many bytes of small tensors at a time
_JOIN_MAX_BYTES = 64 << 10  # a tensor this small is joined to others for one comparison: one call costs more than copying it


def _differing(pairs: list[tuple[torch.Tensor, torch.Tensor]], names: list[str]) -> list[str]:
    """The names of the pairs whose tensors differ in any bit (`_same_bits`), in order. Small dense CPU
    tensors are compared a chunk of at most `_COMPARE_CHUNK_BYTES` at a time, each chunk one comparison
    of their bytes laid end to end (a model's thousands of small tensors cost a few comparisons, not one
    each; the copies take two chunks of memory at most); a chunk that differs, and every other tensor
    (above 64 KiB, or a quarter of a chunk: compared in place, as copying it would cost more than the
    call it saves), is compared pair by pair."""
    found: set[int] = set()
    chunk: list[int] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if len(chunk) == 1 or (chunk and not torch.equal(*(torch.cat([_bytes(pairs[i][side]) for i in chunk]) for side in (0, 1)))):
            found.update(i for i in chunk if not _same_bits(*pairs[i]))
        chunk.clear()
        size = 0

    for i, (a, b) in enumerate(pairs):
        nbytes = a.numel() * a.element_size()
        if nbytes > min(_JOIN_MAX_BYTES, _COMPARE_CHUNK_BYTES // 4) or not (_plain(a) and _plain(b) and a.shape == b.shape and a.dtype == b.dtype):
            if not _same_bits(a, b):  # a larger tensor alone, in place: no copy of it (nor memory beside the model's)
                found.add(i)
            continue
        if size + nbytes > _COMPARE_CHUNK_BYTES:
            flush()
        chunk.append(i)
        size += nbytes
    flush()
    return [names[i] for i in sorted(found)]


def _plain(t: torch.Tensor) -> bool:
    return t.layout == torch.strided and t.device.type == "cpu" and not t.is_quantized and t.numel() > 0


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bitwise, so a buffer holding NaN equals itself
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0 or a.is_sparse or a.device.type == "meta":
        return True
    if a.is_quantized:  # no byte view (it crashes); its integer values and parameters compare exactly
        return torch.equal(a, b)
    return torch.equal(_bytes(a), _bytes(b))


@contextlib.contextmanager
def preserved_state(module: nn.Module, original: nn.Module | None = None) -> Iterator[StateSnapshot]:
    """Run code on `module`, then put its parameters and buffers back as they were (from
    `original`'s tensors where it is given: see `StateSnapshot`).

    Example:
        >>> m = torch.nn.BatchNorm1d(2).train()
        >>> with preserved_state(m):
        ...     _ = m(torch.randn(4, 2))
        >>> int(m.num_batches_tracked)
        0
    """
    snapshot = StateSnapshot(module, original)
    try:
        yield snapshot
    finally:
        snapshot.restore(module)


# ---------------------------------------------------------------------------------------------
# watching a run


def _storage_key(t: torch.Tensor) -> int | None:
    if t.numel() == 0 or t.is_sparse or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without plain storage
        return None


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _user_line() -> str:
    # the deepest frame outside torch and fxopt's runners is the user's code that made the write
    frames = [f for f in traceback.extract_stack() if not f.filename.startswith(_TORCH_DIR + os.sep) and f.filename not in _RUNNER_FILES]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


_WRITTEN_ARGS: dict[Any, tuple[tuple[int, str], ...]] = {}
# Kernels that write arguments their schema does not mark: op -> (written positions, flag position).
_UNMARKED_WRITES = {
    "native_batch_norm": ((3, 4), 5),  # running_mean, running_var when training (F.batch_norm(training=True))
}


def _written_args(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments an aten op's schema marks as written (``Tensor(a!)``)."""
    if func not in _WRITTEN_ARGS:
        _WRITTEN_ARGS[func] = tuple(
            (i, a.name) for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write
        )
    return _WRITTEN_ARGS[func]


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an aten op call writes into."""
    found = [t for i, name in _written_args(func) for t in _tensors(args[i] if i < len(args) else kwargs.get(name))]
    positions, flag = _UNMARKED_WRITES.get(func.overloadpacket.__name__, ((), None))
    if flag is not None and len(args) > flag and args[flag] is True:
        found += [t for i in positions for t in _tensors(args[i])]
    return found


class _StateWatch(TorchDispatchMode):
    """Sees every aten op of a run: writes into the state's storage, and (given `seeds`) which
    state's values flow into each tensor."""

    def __init__(self, module: nn.Module, seeds: Iterable[str] = ()) -> None:
        super().__init__()
        self.names: dict[int, list[str]] = {}
        for name, _, t in _named_state(module):
            key = _storage_key(t)
            if key is not None:
                self.names.setdefault(key, []).append(name)
        self.paths = {id(m): path for path, m in module.named_modules(remove_duplicate=False)}
        self.writes: dict[str, tuple[str, str]] = {}  # name -> (how, line), the first write
        seeded = set(seeds)
        self.flow: dict[int, frozenset[str]] = {}  # storage -> the seeded state its value derives from
        for key, names in self.names.items():
            if seeded & set(names):
                self.flow[key] = frozenset(seeded & set(names))
        self.tracking = bool(seeded)
        self.escaped: set[str] = set()  # seeded state read into Python (item(), bool())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for t in _written(func, args, kwargs):
            for name in self.names.get(_storage_key(t) or -1, ()):
                self.writes.setdefault(name, (f"written in place ({func.overloadpacket.__name__})", _user_line()))
        if not self.tracking:
            return func(*args, **kwargs)
        inputs = {k for k in map(_storage_key, _tensors((args, kwargs))) if k is not None}
        sources = frozenset().union(*(self.flow.get(k, frozenset()) for k in inputs))
        out = func(*args, **kwargs)
        for leaf in pytree.tree_leaves(out):
            key = _storage_key(leaf) if isinstance(leaf, torch.Tensor) else None
            if sources and not isinstance(leaf, torch.Tensor) and leaf is not None:
                self.escaped |= sources  # a Python number or bool made from the state
            elif key is not None and sources:
                self.flow[key] = self.flow.get(key, frozenset()) | sources
            elif key is not None and key not in inputs:
                self.flow.pop(key, None)  # a fresh tensor where a freed one was
        return out

    def on_assign(self, module: nn.Module, name: str, _value: Any) -> None:
        """A buffer or parameter set by assignment (``self.buf = ...``)."""
        path = self.paths.get(id(module))
        if path is not None:
            qualified = f"{path}.{name}" if path else name
            self.writes.setdefault(qualified, ("re-assigned", _user_line()))

    def reached(self, output: Any) -> set[str]:
        """Seeded state whose values reach `output` (or were read into Python on the way)."""
        found = set(self.escaped)
        for t in _tensors(output):
            found |= self.flow.get(_storage_key(t) or -1, frozenset())
        return found


@contextlib.contextmanager
def _watching(module: nn.Module, seeds: Iterable[str] = ()) -> Iterator[_StateWatch]:
    watch = _StateWatch(module, seeds)
    hooks = [
        nn.modules.module.register_module_buffer_registration_hook(watch.on_assign),
        nn.modules.module.register_module_parameter_registration_hook(watch.on_assign),
    ]
    try:
        with watch:
            yield watch
    finally:
        for h in hooks:
            h.remove()


def find_state_writes(module: nn.Module, run: Callable[[], Any], original: nn.Module | None = None) -> list[StateWrite]:
    """The buffers and parameters of `module` that `run()` (one forward) writes, in name order.

    A plain run compared with a snapshot finds them (at no cost to a model that writes nothing);
    when it does, a second run under a dispatch mode finds the line of each write. `module`'s
    state is put back afterwards (from `original`'s tensors where `module` is its fresh copy, so
    no copy of the weights is made). Exceptions of `run` propagate unchanged.

    Example:
        >>> class Counter(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.register_buffer("calls", torch.zeros(()))
        ...     def forward(self, x):
        ...         self.calls.add_(1)
        ...         return x * self.calls
        >>> m = Counter()
        >>> [(w.name, w.how) for w in find_state_writes(m, lambda: m(torch.ones(2)))]
        [('calls', 'written in place (add_)')]
        >>> float(m.calls)
        0.0
    """
    snapshot = StateSnapshot(module, original)
    try:
        run()
        changed = snapshot.changed(module)
    except BaseException:
        snapshot.restore(module)
        raise
    if not changed:
        return []  # nothing was written: nothing to put back (the usual case, at one compare of the state)
    snapshot.restore(module)
    with preserved_state(module, original) as snapshot:
        with _watching(module) as watch:
            run()
        changed |= snapshot.changed(module)
    found = dict(watch.writes)
    for name, how in changed.items():
        found.setdefault(name, (how, ""))
    return [StateWrite(n, snapshot.kinds.get(n, "buffer"), *found[n]) for n in sorted(found) if n in snapshot.kinds]


def judge_state_writes(module: nn.Module, run: Callable[[], Any], writes: list[StateWrite]) -> list[StateWrite]:
    """`writes` with `reaches_output` set: does the written state's value (read before or after
    the write) flow into an output of `run()`, or into Python (``.item()``, ``if``)?

    A second check runs the forward twice in a row: outputs that differ mean the state reaches
    them, whatever the data flow said. `module`'s state is put back afterwards.
    """
    if not writes:
        return []
    names = [w.name for w in writes]
    with preserved_state(module):
        with _watching(module, names) as watch:
            first = run()
        reached = watch.reached(first)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            again = run()
            torch.manual_seed(0)
            third = run()
    outputs_move = not _same_outputs(again, third)
    return [replace(w, reaches_output=w.name in reached or outputs_move) for w in writes]


def _same_outputs(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(_same_bits(x, y) for x, y in zip(ta, tb))


def check_state_writes(writes: list[StateWrite], model_type: str) -> list[StateWrite]:
    """Refuse writes whose value reaches an output; warn about the others and return them.

    Raises:
        StateWriteError: a written buffer or parameter reaches an output; names each and its line.
    """
    refused = [w for w in writes if w.reaches_output]
    if refused:
        first = refused[0]
        listed = "; ".join(w.describe(line=w is not first) for w in refused)  # the first one's line ends the message
        raise StateWriteError(
            f"the forward of {model_type} writes its own state and the written value reaches an output: {listed}. "
            "A compiled graph (and model.onnx) keeps no state between calls: it would bake in one value and differ from "
            "the model from the next call on. Keep the state outside the model (pass it in as an input and return its "
            "new value), or compute the output without writing the buffer or parameter",
            names=[w.name for w in refused],
            module_path=first.name.rpartition(".")[0],
            source_line=first.line,
        )
    for w in writes:
        warn(_dropped_line(w))
    return writes


def _dropped_line(w: StateWrite) -> str:
    return (f"{w.describe()}; its value never reaches an output, so the compiled graph and model.onnx leave the write out "
            f"(the {w.kind} keeps the model's value)")


# ---------------------------------------------------------------------------------------------
# the graph without the dropped writes


def _writes_in_place(node: Node) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or "out" in node.kwargs or (name.endswith("_") and not name.endswith("__"))
    return False


def _write_target(node: Node) -> Any:
    """The tensor an in-place node writes: ``out=``, else its first argument."""
    return node.kwargs.get("out", node.args[0] if node.args else None)


def _state_root(node: Any) -> str | None:
    """The state a node's value is a view of (through views and in-place ops), else None."""
    while isinstance(node, Node):
        if node.op == "get_attr":
            return str(node.target)
        through = node.op == "call_method" and (node.target in _VIEW_METHODS or _writes_in_place(node))
        through |= node.op == "call_function" and node.target is operator.getitem
        if not through or not node.args:
            return None
        node = node.args[0]
    return None


def drop_state_writes(gm: GraphModule, writes: list[StateWrite]) -> int:
    """Erase the graph's in-place writes into `writes`' state (whose values reach no output), and
    the computation only they used; record `writes` in ``gm.meta`` (see `state_writes_of`).

    Returns:
        How many write nodes were erased (0 when the forward wrote outside the traced code).
    """
    names = {w.name for w in writes}
    gm.meta[_META_KEY] = tuple(writes)
    dropped = [n for n in gm.graph.nodes if _writes_in_place(n) and _state_root(_write_target(n)) in names]
    feeders: list[Node] = []
    for node in reversed(dropped):
        feeders += node.all_input_nodes
        node.replace_all_uses_with(_write_target(node))  # an in-place op returns the tensor it wrote
        gm.graph.erase_node(node)
    erased = set(dropped)
    while feeders:  # what only fed the erased writes goes too
        node = feeders.pop()
        pure = node.op in ("call_function", "call_method", "get_attr") and not _writes_in_place(node)
        if node not in erased and pure and not node.users:
            feeders += node.all_input_nodes
            erased.add(node)
            gm.graph.erase_node(node)
    if dropped:
        gm.graph.lint()
        gm.recompile()
    return len(dropped)


def state_writes_of(gm: GraphModule) -> tuple[StateWrite, ...]:
    """The state writes `fxopt.trace` left out of `gm` (their values reach no output)."""
    return tuple(gm.meta.get(_META_KEY, ()))
