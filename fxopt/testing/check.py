"""`check_pass`: run one pass through the PassManager and assert the whole pass contract.

The contract: the pass is not rolled back; its graph lints, recompiles and re-propagates
shapes; a non-lossy pass reproduces the outputs, a lossy one keeps output structure, shapes
and dtypes (and reports its deviation); the user's model, the example inputs and the input
graph are untouched; the result lowers to ONNX and runs in ONNX Runtime with parity.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxopt.compiler import state_dict_sha256
from fxopt.errors import ExportError, FxoptError
from fxopt.frontend.tracing import normalize_inputs, propagate_shapes, trace
from fxopt.passinfra.pass_base import CompileContext, FxoptPass, pass_attr, pass_name, use_context
from fxopt.passinfra.pass_manager import PassManager, PassRecord
from fxopt.passinfra.registry import create_pass
from fxopt.testing.reproducer import reproducer, spec_of
from fxopt.verification.numerics import (
    TOLERANCES,
    Deviation,
    compare_outputs,
    output_signature,
    run_model,
)

__all__ = ["PassCheck", "check_pass"]


@dataclass(frozen=True)
class PassCheck:
    """What `check_pass` found when the contract held.

    Attributes:
        record: the PassManager's record of the pass (status, timings, deviation).
        graph_module: the graph after the pass.
        deviation: outputs after the pass against the traced input graph.
        onnx: the verified ONNX lowering of the result (None when ``export=False``, or when
            the input graph itself is refused by the ONNX backend: see `onnx_skipped`).
        onnx_skipped: why the ONNX check was not run ("" when it ran or was not asked for).
    """

    record: PassRecord
    graph_module: GraphModule
    deviation: Deviation
    onnx: Any = None
    onnx_skipped: str = ""

    @property
    def modified(self) -> bool:
        """Whether the pass changed the graph."""
        return self.record.status == "applied"


@dataclass(frozen=True)
class _Snapshot:
    """What must not change: weights (hash), module tree and modes, and the example inputs."""

    state_sha: str
    tree: tuple[tuple[str, str, bool], ...]
    text: str
    inputs: tuple[Any, ...]

    @classmethod
    def of(cls, model: nn.Module, inputs: tuple[Any, ...]) -> _Snapshot:
        tree = tuple(
            (name, f"{type(m).__module__}.{type(m).__qualname__}", m.training)
            for name, m in model.named_modules(remove_duplicate=False)
        )
        graph = str(model.graph) if isinstance(model, GraphModule) else ""
        copies = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)
        return cls(state_dict_sha256(model), tree, repr(model) + graph, copies)

    def differences(self, other: _Snapshot, what: str) -> list[str]:
        found = []
        if self.state_sha != other.state_sha:
            found.append(f"{what}: its state_dict changed (sha256 {self.state_sha[:12]} -> {other.state_sha[:12]})")
        if self.tree != other.tree or self.text != other.text:
            found.append(f"{what}: its module tree, modes or graph changed")
        same_inputs = all(
            torch.equal(a, b) if isinstance(a, torch.Tensor) else a is b for a, b in zip(self.inputs, other.inputs)
        )
        if not same_inputs:
            found.append(f"{what}: the example inputs were written to")
        return found


def _instantiate(pass_or_factory: Any) -> Any:
    """A fresh pass from a registered name, a class or a zero-argument factory; instances as is."""
    if isinstance(pass_or_factory, str):
        return create_pass(pass_or_factory)
    if isinstance(pass_or_factory, type):
        return pass_or_factory()
    if hasattr(pass_or_factory, "call") or not callable(pass_or_factory):
        return pass_or_factory
    try:
        params = inspect.signature(pass_or_factory).parameters.values()
    except (TypeError, ValueError):
        return pass_or_factory
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return pass_or_factory() if not required else pass_or_factory  # else a function pass gm -> result


def _graph_problems(gm: GraphModule, inputs: tuple[Any, ...]) -> list[str]:
    for step, run in (
        ("graph.lint()", gm.graph.lint),
        ("recompile()", gm.recompile),
        ("shape propagation", lambda: propagate_shapes(gm, inputs)),
    ):
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - each failure is a contract violation to report
            return [f"the result graph fails {step}: {type(exc).__name__}: {exc}"]
    return []


def _output_problems(outputs: Any, reference: Any, deviation: Deviation, lossy: bool, atol: float | None) -> list[str]:
    if pytree.tree_flatten(outputs)[1] != pytree.tree_flatten(reference)[1]:
        return [f"changed the output structure: {pytree.tree_flatten(reference)[1]} -> {pytree.tree_flatten(outputs)[1]}"]
    if output_signature(outputs) != output_signature(reference):
        return [f"changed the output shapes/dtypes: {output_signature(reference)} -> {output_signature(outputs)}"]
    default_atol, rtol = TOLERANCES["fp32"]
    if not lossy and not deviation.within(default_atol, rtol):
        limit = default_atol + rtol * deviation.reference_scale
        return [f"declares lossy=False but changed the outputs: max abs error {deviation.max_abs:.3g} > {limit:.3g}"]
    if atol is not None and deviation.max_abs > atol:
        kind = "lossy" if lossy else "non-lossy"
        return [f"{kind} pass deviates by max abs {deviation.max_abs:.3g}, more than the allowed atol={atol:g}"]
    return []


def _onnx_problems(final: GraphModule, before: GraphModule, inputs: tuple[Any, ...], context: CompileContext) -> tuple[list[str], Any]:
    """Problems of the result's ONNX lowering, and the export (or, as a str, why it was skipped)."""
    from fxopt.extensions import extension

    lower = extension("lower", "onnx")
    try:
        return [], lower(final, inputs, context.target)
    except FxoptError as exc:
        try:
            lower(before, inputs, context.target)
        except ExportError as original:
            # the backend refuses the model itself (e.g. a leaf branch it cannot script): not the pass's doing
            return [], f"the input graph is refused by the ONNX backend too: {original}"
        except FxoptError as original:
            blame = f"the input graph fails too ({type(original).__name__}), so this is not the pass's doing"
        else:
            blame = "the input graph lowers fine, so the pass broke it"
        return [f"the result does not lower to ONNX / verify in ONNX Runtime ({blame}): {type(exc).__name__}: {exc}"], None


def _raise(name: str, model: nn.Module, inputs: tuple[Any, ...], problems: list[str]) -> None:
    shapes = ", ".join(f"{tuple(x.shape)}:{str(x.dtype).removeprefix('torch.')}" for x in inputs if isinstance(x, torch.Tensor))
    lines = [f"pass '{name}' broke the pass contract on {type(model).__name__} (inputs {shapes}):"]
    lines += [f"  - {p}" for p in problems]
    if spec_of(model) is not None:
        lines += ["Reproducer (model, example_inputs = make_model()):", reproducer(model)]
    raise AssertionError("\n".join(lines))


def check_pass(
    pass_or_factory: Any,
    model: nn.Module,
    example_inputs: Any,
    *,
    atol: float | None = None,
    target: str = "cpu",
    export: bool = True,
    **options: Any,
) -> PassCheck:
    """Run one pass on `model` through `fxopt.PassManager` and assert the pass contract.

    Args:
        pass_or_factory: a registered pass name, a pass class, a zero-argument factory
            returning a pass (e.g. ``functools.partial(fxopt.create_pass, "prune", amount=0.3)``),
            or a pass instance / function pass.
        model: the module to trace; it must come back untouched.
        example_inputs: a tensor or tuple of positional inputs.
        atol: the largest max-abs deviation from the input graph's outputs allowed. A
            non-lossy pass must also meet the fp32 check (1e-5 + 1e-4 x max|output|); for a
            lossy pass with ``atol=None`` the deviation is only reported.
        target: the target the pass runs for (its context; ONNX opset of the lowering).
        export: also lower the result to ONNX and verify it in ONNX Runtime.
        **options: compile-context options the pass reads, e.g. ``calib_data=[inputs]``.

    Returns:
        A `PassCheck` with the record, the resulting graph, the deviation and the ONNX export.

    Raises:
        AssertionError: the contract is broken; the message lists every violation and, for a
            drawn model, its reproducer source.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(), torch.nn.ReLU())
        >>> check_pass("canonicalize", model, (torch.randn(2, 4),)).modified
        True
    """
    inputs = normalize_inputs(example_inputs)
    model_before = _Snapshot.of(model, inputs)
    gm = trace(model, inputs)
    graph_before = _Snapshot.of(gm, inputs)
    the_pass = _instantiate(pass_or_factory)
    name, lossy = pass_name(the_pass), bool(pass_attr(the_pass, "lossy", False))
    context = CompileContext.create(target, inputs, **options)
    result = PassManager([the_pass]).run(gm, context)
    record, final = result.records[0], result.graph_module
    reference = run_model(gm, inputs)
    problems: list[str] = []
    deviation, onnx_export = compare_outputs(reference, reference), None
    if record.status == "rolled_back":
        problems.append(f"the PassManager rolled it back: {record.reason}")
    else:
        problems += _graph_problems(final, inputs)
    if not problems:
        outputs = run_model(final, inputs)
        deviation = compare_outputs(outputs, reference)
        problems += _output_problems(outputs, reference, deviation, lossy, atol)
    problems += model_before.differences(_Snapshot.of(model, inputs), "the user's model")
    problems += graph_before.differences(_Snapshot.of(gm, inputs), "the input graph")
    skipped = ""
    if export and not problems:
        onnx_problems, onnx_export = _onnx_problems(final, gm, inputs, context)
        problems += onnx_problems
        if isinstance(onnx_export, str):
            skipped, onnx_export = onnx_export, None
    problems += _idle_claim_problems(pass_or_factory, gm, context)
    if problems:
        _raise(name, model, inputs, problems)
    return PassCheck(record, final, deviation, onnx_export, skipped)


def _idle_claim_problems(pass_or_factory: Any, gm: GraphModule, context: CompileContext) -> list[str]:
    """A pass whose `finds_work` says False on `gm` (the pass manager then skips it) must leave a
    copy of `gm` unchanged when it does run."""
    probe_pass = _instantiate(pass_or_factory)
    if not isinstance(probe_pass, FxoptPass):
        return []
    with use_context(context):
        if probe_pass.finds_work(gm):
            return []
        probe = copy.deepcopy(gm)
        try:
            result = probe_pass(probe)
        except Exception as exc:  # noqa: BLE001 - reported as a broken contract
            return [f"finds_work() said the pass would change nothing here, and call() then failed: {type(exc).__name__}: {exc}"]
    if result.modified or str(result.graph_module.graph) != str(gm.graph):
        return ["finds_work() said the pass would change nothing here, but call() changed the graph (the pass manager skips "
                "a pass on that answer)"]
    return []
