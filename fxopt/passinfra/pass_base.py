"""The pass contract: a torch.fx `PassBase` with a name, a lossy flag and ordering constraints.

A pass reads what the compile run knows (target, example inputs, calibration data) from
`current_context()`, which the pass manager sets while the pass runs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxopt.errors import FxoptError
from fxopt.targets import TargetProfile, get_target

__all__ = ["CompileContext", "FxoptPass", "PassResult", "current_context", "use_context"]


@dataclass(frozen=True)
class CompileContext:
    """What one compile run knows, shared read-only by its passes.

    Args:
        target: the target being compiled for.
        example_inputs: positional inputs the model is traced and checked on.
        precision: the precision the model will run at on the target.
        options: data passes may need, e.g. ``calib_data`` (a list of input tuples),
            ``train_data``; unknown keys are kept for user passes.
        check_inputs: every input set the pass manager verifies on (the example inputs, their
            seeded variants, calibration batches); empty means the example inputs alone.
        finetune: the fine-tune `fxopt.compile` runs after the structural passes (a
            `fxopt.distill.FinetuneRequest`), or None: a pass choosing between candidates can
            fine-tune each the same way for fewer steps (slim's ``finetune_top`` re-rank).
    """

    target: TargetProfile
    example_inputs: tuple[Any, ...]
    precision: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    check_inputs: tuple[tuple[Any, ...], ...] = ()
    finetune: Any = None

    @property
    def verification_inputs(self) -> tuple[tuple[Any, ...], ...]:
        """The input sets checks run on: `check_inputs`, or the example inputs alone."""
        if self.check_inputs:
            return self.check_inputs
        return (self.example_inputs,) if self.example_inputs else ()

    @classmethod
    def create(
        cls,
        target: str | TargetProfile = "cpu",
        example_inputs: tuple[Any, ...] = (),
        precision: str | None = None,
        *,
        check_inputs: tuple[tuple[Any, ...], ...] = (),
        **options: Any,
    ) -> CompileContext:
        """Build a context from a target name and keyword options."""
        profile = get_target(target)
        return cls(
            target=profile,
            example_inputs=tuple(example_inputs),
            precision=precision or profile.default_precision,
            options=MappingProxyType(dict(options)),
            check_inputs=tuple(check_inputs),
        )


_CONTEXT: contextvars.ContextVar[CompileContext | None] = contextvars.ContextVar(
    "fxopt_compile_context", default=None
)


def current_context() -> CompileContext:
    """The context of the compile run in progress.

    Outside a run (e.g. a pass called from torch's own pass manager) this is a default
    context for the ``cpu`` target with no example inputs.
    """
    ctx = _CONTEXT.get()
    return ctx if ctx is not None else CompileContext.create("cpu")


@contextlib.contextmanager
def use_context(ctx: CompileContext) -> Iterator[CompileContext]:
    """Make `ctx` the current context for the duration of a ``with`` block."""
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


class FxoptPass(PassBase):
    """Base class of fxopt passes.

    Subclasses set the class attributes and implement ``call(gm) -> PassResult``; ``modified``
    must be true only when the graph changed.

    Attributes:
        name: the registry name, used in ordering constraints and reports.
        lossy: whether the pass may change the model's function (pruning, quantisation).
        after: names of passes that must run before this one when both are in a pipeline.
        before: names of passes that must run after this one when both are in a pipeline.
        reads_options: the `compile(**options)` keys the pass reads from `current_context()`;
            a key no pass in the pipeline reads is refused as a likely typo.
        raises_input_errors: True when an `InputError` the pass raises is the user's to fix at once (the
            fine-tune's data or loss is wrong): it stops the run. False (the default): like any other
            failure, the pass is rolled back and the run goes on (strict mode raises).
        unchanged_reason: set by `call` when it returns ``modified=False``, saying why (the
            report shows it; default "the pass found nothing to change").
        shares_weights: True when the pass never writes into the graph's existing parameters or
            buffers in place, only replaces those it changes (``module.weight = nn.Parameter(new)``):
            the copy it works on then shares every parameter with the graph before it instead of
            copying them (time and memory; buffers are copied unless `shares_buffers`), and the pass
            manager refuses, with a `PassError`, a pass that writes into one all the same (through
            ``.data`` it cannot see). False (the default, safe for any pass): its own copy of every
            weight, so it may re-estimate BatchNorm statistics or train in place.
        shares_buffers: with `shares_weights`, True when the pass also never writes a buffer in place
            and runs no module (a run may write a module's own buffer: an observer's statistics): its
            copy shares the buffers of torch's own modules too, under the same check, except those the
            trace saw written (the manager's checks run the copy). False (the default): buffers are copied.

    Example:
        >>> import torch
        >>> class CountNodes(FxoptPass):
        ...     name = "count_nodes"
        ...     def call(self, gm):
        ...         self.count = len(gm.graph.nodes)
        ...         return PassResult(gm, False)
        >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
        >>> CountNodes()(gm).modified
        False
    """

    name: ClassVar[str] = ""
    lossy: ClassVar[bool] = False
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    reads_options: ClassVar[tuple[str, ...]] = ()
    shares_weights: ClassVar[bool] = False
    shares_buffers: ClassVar[bool] = False
    raises_input_errors: ClassVar[bool] = False
    unchanged_reason: str = ""

    def options(self) -> dict[str, Any]:
        """The pass's settings, recorded in the report and manifest (override when configurable)."""
        return {}

    def check_options(self, options: Mapping[str, Any], target: Any = None) -> None:
        """Refuse, before any work, `compile(**options)` these settings cannot run with on `target`
        (the `TargetProfile`; raise `fxopt.InputError`); `compile` calls it for every pass in the
        pipeline. Default: accept."""

    def finds_work(self, graph_module: torch.fx.GraphModule) -> bool:
        """Whether `call` would change `graph_module`, decided by reading it only. The pass manager
        asks before it copies the graph for the pass: False records the pass "unchanged" without a
        copy, a run or a check (on a large graph the copy is most of an idle pass's cost). Default:
        True. Override only with a test that is never False where `call` would change the graph
        (`fxopt.testing.check_pass` holds a pass to it)."""
        return True

    def call(self, graph_module: torch.fx.GraphModule) -> PassResult:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__}.call")


def pass_name(p: Any) -> str:
    """The report name of any pass: fxopt passes have `name`; plain callables their own name."""
    name = getattr(p, "name", "") or ""
    if isinstance(name, str) and name:
        return name
    return getattr(p, "__name__", type(p).__name__)


def pass_attr(p: Any, attr: str, default: Any) -> Any:
    """An fxopt pass attribute with a default for plain torch.fx passes."""
    return getattr(p, attr, default)


class PassContractError(FxoptError):
    """A pass returned something other than a `PassResult` / GraphModule."""
