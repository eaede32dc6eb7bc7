"""The pass manager: orders passes from their constraints, runs each on a copy, and verifies it.

After every pass it lints and recompiles the graph, re-propagates shapes and checks numerics on
the example inputs. A pass that raises or breaks its contract is rolled back and reported.

A pass may change the model's input size (NAS-slimming's resolution choice): it leaves the new
shapes in ``gm.meta["fxopt_input_shapes"]``; the pass is verified at the old size, then the run
goes on with every input (example, verification sets, ``calib_data``) resized, and
`PipelineResult.context` is the context the later steps must use.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import networkx as nx
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxopt.costs.cost_model import estimate_costs
from fxopt.errors import InputError, PassError, PassOrderError
from fxopt.frontend.copying import copy_children
from fxopt.frontend.inputs import resize_inputs
from fxopt.frontend.module_state import state_writes_of
from fxopt.frontend.tracing import propagate_shapes
from fxopt.passinfra.pass_base import CompileContext, FxoptPass, pass_attr, pass_name, use_context
from fxopt.passinfra.registry import create_pass
from fxopt.verification.numerics import (
    TOLERANCES,
    compare_outputs,
    output_signature,
    run_model,
    tensor_mark,
)

__all__ = ["FILES_META", "INPUT_SHAPES_META", "MANIFEST_META", "NOTES_META", "PRECISION_META", "SUMMARY_ROW_META", "PassManager", "PassRecord", "PipelineResult", "order_passes", "resolve_passes"]

INPUT_SHAPES_META = "fxopt_input_shapes"
FILES_META = "fxopt_files"  # files a pass leaves for the output folder: name -> bytes or text
MANIFEST_META = "fxopt_manifest"  # facts a pass records for manifest.json (plain data): key -> value
PRECISION_META = "fxopt_precision"  # the precision a pass made the graph run at ("int8": it holds Q/DQ)
NOTES_META = "fxopt_notes"  # report lines a pass leaves (a fine-tune's judgement): a list of str
SUMMARY_ROW_META = "fxopt_summary_row"  # a step's own measurement of its result for compile's summary table

PassLike = Any  # an FxoptPass, a torch.fx PassBase, or a callable gm -> PassResult | GraphModule


@dataclass(frozen=True)
class GraphStats:
    """Size of a graph at one point of the pipeline."""

    nodes: int
    params: int
    flops: int
    latency_ms: float

    @classmethod
    def of(cls, gm: GraphModule, context: CompileContext, cost: Any = None) -> GraphStats:
        """`gm`'s size; `cost`: its `estimate_costs` at the context's target and precision, when known."""
        cost = cost if cost is not None else estimate_costs(gm, context.target, context.precision)
        return cls(len(gm.graph.nodes), cost.params, cost.flops, cost.latency_s * 1e3)


@dataclass(frozen=True)
class PassRecord:
    """What happened when one pass ran.

    Attributes:
        status: ``applied`` (graph changed, checks passed), ``unchanged`` (pass made no change),
            ``rolled_back`` (raised or failed a check; the graph before it was kept).
    """

    name: str
    lossy: bool
    status: str
    options: dict[str, Any]
    reason: str = ""
    time_s: float = 0.0
    before: GraphStats | None = None
    after: GraphStats | None = None
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    inputs_checked: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("before", "after")}
        out["before"] = self.before.__dict__ if self.before else None
        out["after"] = self.after.__dict__ if self.after else None
        return out


@dataclass
class PipelineResult:
    """The final graph module, one record per pass in run order, and the context the run ended
    with (its inputs differ from the starting one's when a pass changed the input size)."""

    graph_module: GraphModule
    records: list[PassRecord] = field(default_factory=list)
    context: CompileContext | None = None
    outputs: list[Any] | None = None  # the final graph's outputs on `context.verification_inputs`, when checked
    cost: Any = None  # the final graph's `estimate_costs` at the context's target and precision

    def known_outputs(self) -> list[tuple[tuple[Any, ...], Any]]:
        """(input set, the final graph's outputs on it) for every verification set, so a later check
        (the ONNX file's parity) need not run the graph again; empty when numerics were not checked."""
        if self.outputs is None or self.context is None:
            return []
        return list(zip(self.context.verification_inputs, self.outputs))


def resolve_passes(passes: Sequence[PassLike | str]) -> list[PassLike]:
    """Turn registered names into fresh pass instances; pass objects are kept as they are.

    Raises:
        InputError: an entry is neither a name nor a pass (None, a number, a pass class
            instead of an instance, a torch module); the message names its position.
    """
    return [create_pass(p) if isinstance(p, str) else _checked_pass(p, i) for i, p in enumerate(passes)]


def _checked_pass(p: Any, index: int) -> PassLike:
    where = f"passes[{index}]"
    if isinstance(p, type):
        if issubclass(p, PassBase):
            raise InputError(f"{where} is the pass class {p.__name__}, not an instance: write {p.__name__}(...)")
        raise InputError(f"{where} is the class {p.__name__}, not a pass")
    if isinstance(p, nn.Module):
        raise InputError(f"{where} is a torch module ({type(p).__name__}), not a pass: give a registered name or an FxoptPass instance")
    if not (isinstance(p, PassBase) or callable(p)):
        raise InputError(
            f"{where} is {p!r} ({type(p).__name__}), not a pass: give a registered name (see fxopt.pass_names()), "
            "an FxoptPass / torch.fx PassBase instance, or a function gm -> PassResult"
        )
    return p


def order_passes(passes: Sequence[PassLike]) -> list[PassLike]:
    """Order passes so every `after`/`before` constraint holds, otherwise keeping list order.

    Constraints naming a pass that is not in the list are ignored.

    Raises:
        PassOrderError: the constraints form a cycle (the message names it).
    """
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(passes)))
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(passes):
        by_name.setdefault(pass_name(p), []).append(i)
    for i, p in enumerate(passes):
        for other in pass_attr(p, "after", ()):
            graph.add_edges_from((j, i) for j in by_name.get(other, ()) if j != i)
        for other in pass_attr(p, "before", ()):
            graph.add_edges_from((i, j) for j in by_name.get(other, ()) if j != i)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return [passes[i] for i in nx.lexicographical_topological_sort(graph, key=lambda i: i)]
    names = [pass_name(passes[a]) for a, _ in cycle] + [pass_name(passes[cycle[0][0]])]
    raise PassOrderError(f"pass ordering constraints form a cycle: {' -> '.join(names)}")


def _as_result(out: Any, fallback: GraphModule) -> PassResult:
    if isinstance(out, PassResult):
        return out
    if isinstance(out, GraphModule):
        return PassResult(out, True)
    if out is None:  # torch-style in-place function pass
        return PassResult(fallback, True)
    raise TypeError(f"a pass must return PassResult or GraphModule, got {type(out).__name__}")


class PassManager:
    """Runs passes in constraint order, each verified, with rollback on failure.

    Args:
        passes: pass instances, registered names, or callables ``gm -> PassResult``.
        strict: raise `PassError` on the first failed pass instead of rolling back and going on.
        check_numerics: compare outputs after each pass (on by default; the contract needs it).
        progress: show a progress bar on stderr.
        on_applied: called as ``on_applied(record, graph_module, pass)`` after each applied pass
            (compile's summary table measures the model after each lossy step).

    Example:
        >>> import torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(), torch.nn.ReLU())
        >>> x = (torch.randn(2, 4),)
        >>> ctx = fxopt.CompileContext.create("cpu", x)
        >>> result = PassManager(["canonicalize"]).run(fxopt.trace(model, x), ctx)
        >>> [r.status for r in result.records]
        ['applied']
    """

    def __init__(
        self,
        passes: Sequence[PassLike | str],
        *,
        strict: bool = False,
        check_numerics: bool = True,
        progress: bool = False,
        on_applied: Callable[[PassRecord, GraphModule, PassLike], None] | None = None,
    ) -> None:
        self.passes = order_passes(resolve_passes(passes))
        self.strict = strict
        self.check_numerics = check_numerics
        self.progress = progress
        self.on_applied = on_applied

    @property
    def names(self) -> list[str]:
        """Pass names in run order."""
        return [pass_name(p) for p in self.passes]

    def run(
        self,
        gm: GraphModule,
        context: CompileContext,
        *,
        cost: Any = None,
        known_outputs: Sequence[tuple[tuple[Any, ...], Any]] = (),
    ) -> PipelineResult:
        """Run the pipeline; each pass works on a copy, so `gm` itself is left intact (the result's graph is
        `gm` itself where no pass changed anything). `cost`: `gm`'s
        `estimate_costs` at the context's target and precision, when the caller has it;
        `known_outputs`: (input set, `gm`'s outputs on it) pairs already computed (the trace's run,
        `fxopt.frontend.tracing.trace_with_outputs`): a verification set given here, the same
        object, is not run again."""
        current = gm
        reference = _run_all(current, context, known_outputs) if context.verification_inputs else None
        result = PipelineResult(current)
        result.cost = cost if cost is not None else estimate_costs(current, context.target, context.precision)
        stats = GraphStats.of(current, context, result.cost)
        iterator: Any = self.passes
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(self.passes, desc="passes", unit="pass", leave=False)
        for p in iterator:
            if self.progress:
                iterator.set_postfix_str(pass_name(p))
            record, current, reference, stats = self._run_one(p, current, reference, stats, context, result)
            result.records.append(record)
            if self.on_applied is not None and record.status == "applied":
                self.on_applied(record, current, p)
            shapes = current.meta.pop(INPUT_SHAPES_META, None)
            if shapes is not None and record.status == "applied":
                context = with_input_shapes(context, shapes)
                shaped = _shape_run(current, context)
                reference = _run_all(current, context, shaped) if context.verification_inputs else None
                result.cost = estimate_costs(current, context.target, context.precision)
                stats = GraphStats.of(current, context, result.cost)
        result.graph_module, result.context = current, context
        result.outputs = reference if self.check_numerics else None
        return result

    def _run_one(
        self,
        p: PassLike,
        gm: GraphModule,
        reference: Any,
        stats: GraphStats,
        context: CompileContext,
        result: PipelineResult,
    ) -> tuple[PassRecord, GraphModule, Any, GraphStats]:
        name, lossy = pass_name(p), bool(pass_attr(p, "lossy", False))
        options = p.options() if hasattr(p, "options") else {}
        base = {"name": name, "lossy": lossy, "options": options, "before": stats}
        start = time.perf_counter()
        if isinstance(p, FxoptPass) and _idle(p, gm, context):  # nothing to copy, run or check
            why = p.unchanged_reason or "the pass found nothing to change"
            return PassRecord(**base, status="unchanged", reason=why, time_s=time.perf_counter() - start, after=stats), gm, reference, stats
        shared = _SharedWeights.of(gm, p.shares_buffers) if isinstance(p, FxoptPass) and p.shares_weights else None
        candidate = _copy_graph_module(gm, shared)
        try:
            try:
                with use_context(context):
                    res = _as_result(p(candidate), candidate)
            finally:  # also when the pass failed: a rollback goes back to the graph before it, which must be intact
                if shared is not None:
                    shared.check_untouched(name)
            new_gm = res.graph_module
            if not res.modified:
                if str(new_gm.graph) != str(gm.graph):
                    raise _ContractBroken("returned modified=False but changed the graph")
                # keep the copy: an analysis pass may have annotated node.meta / gm.meta
                _carry_meta(gm, new_gm)
                why = getattr(p, "unchanged_reason", "") or "the pass found nothing to change"
                record = PassRecord(**base, status="unchanged", reason=why, time_s=time.perf_counter() - start, after=stats)
                return record, new_gm, reference, stats
            _carry_meta(gm, new_gm)
            new_gm.graph.lint()
            new_gm.recompile()
            shaped = _shape_run(new_gm, context)
            outputs, deviation = reference, None
            if self.check_numerics and reference is not None:
                outputs = _run_all(new_gm, context, shaped)  # the shapes' run gave the example inputs' outputs
                deviation = _worst_deviation(outputs, reference, lossy)
            new_cost = estimate_costs(new_gm, context.target, context.precision)
            new_stats = GraphStats.of(new_gm, context, new_cost)
        except _WroteSharedWeight as exc:  # the graph before the pass is damaged: nothing to roll back to
            raise PassError(name, str(exc), ran_before=[r.name for r in result.records if r.status == "applied"]) from None
        except Exception as exc:  # noqa: BLE001 - every pass failure is reported, then rolled back or raised
            if isinstance(exc, InputError) and pass_attr(p, "raises_input_errors", False):
                raise  # the user's data or loss is wrong: a rollback would hide it
            reason = str(exc) if isinstance(exc, _ContractBroken) else f"{type(exc).__name__}: {exc}"
            if self.strict:
                ran = [r.name for r in result.records if r.status == "applied"]
                raise PassError(name, reason, ran_before=ran) from exc
            record = PassRecord(**base, status="rolled_back", reason=reason, time_s=time.perf_counter() - start, after=stats)
            return record, gm, reference, stats
        result.cost = new_cost
        record = PassRecord(
            **base,
            status="applied",
            time_s=time.perf_counter() - start,
            after=new_stats,
            max_abs_error=deviation.max_abs if deviation else 0.0,
            max_rel_error=deviation.max_rel if deviation else 0.0,
            inputs_checked=len(reference) if deviation else 0,
        )
        return record, new_gm, outputs, new_stats


class _ContractBroken(Exception):
    """A pass broke the pass contract (its reason goes into the report verbatim)."""


def with_input_shapes(context: CompileContext, shapes: Sequence[Any]) -> CompileContext:
    """`context` with its example inputs, verification sets and ``calib_data`` resized to
    `shapes` (one full shape per positional input; see `fxopt.frontend.inputs.resize_inputs`)."""
    options = dict(context.options)
    if options.get("calib_data"):
        options["calib_data"] = [resize_inputs(b, shapes) for b in options["calib_data"]]
    return dataclasses.replace(
        context,
        example_inputs=resize_inputs(context.example_inputs, shapes),
        check_inputs=tuple(resize_inputs(c, shapes) for c in context.check_inputs),
        options=MappingProxyType(options),
    )


def _shape_run(gm: GraphModule, context: CompileContext) -> list[tuple[tuple[Any, ...], Any]]:
    """Record `gm`'s shapes on the example inputs; the run's outputs there, as known outputs for `_run_all`
    (none where the root has hooks, which a node-by-node run skips)."""
    if not context.example_inputs:
        return []
    outputs = propagate_shapes(gm, context.example_inputs)
    return [] if gm._forward_hooks or gm._forward_pre_hooks else [(context.example_inputs, outputs)]


def _run_all(gm: GraphModule, context: CompileContext, known_outputs: Sequence[tuple[tuple[Any, ...], Any]] = ()) -> list[Any]:
    known = {id(inputs): outputs for inputs, outputs in known_outputs}
    return [known[id(inputs)] if id(inputs) in known else run_model(gm, inputs) for inputs in context.verification_inputs]


def _worst_deviation(outputs: list[Any], references: list[Any], lossy: bool) -> Any:
    """Check every input set; the largest deviation is the one reported."""
    worst = None
    for i, (out, ref) in enumerate(zip(outputs, references)):
        deviation = compare_outputs(out, ref)
        try:
            _check_deviation(deviation, lossy, out, ref)
        except _ContractBroken as exc:
            which = "the example inputs" if i == 0 else f"verification input set {i} of {len(references)} (a seeded variant or calibration batch)"
            raise _ContractBroken(f"{exc} on {which}") from None
        if worst is None or deviation.max_abs > worst.max_abs:
            worst = deviation
    return worst


def _check_deviation(deviation: Any, lossy: bool, outputs: Any, reference: Any) -> None:
    atol, rtol = TOLERANCES["fp32"]
    if output_signature(outputs) != output_signature(reference):
        raise _ContractBroken(
            f"changed the outputs' shapes/dtypes: {output_signature(reference)} -> {output_signature(outputs)}"
        )
    if not lossy and not deviation.within(atol, rtol):
        raise _ContractBroken(
            f"declares lossy=False but changed the outputs: max abs error {deviation.max_abs:.3g} "
            f"> {atol:g} + {rtol:g} x {deviation.reference_scale:.3g}"
        )


class _WroteSharedWeight(Exception):
    """A pass wrote into a weight it shares with the graph before it."""


@dataclass(frozen=True)
class _SharedWeights:
    """The parameters and buffers a pass's copy shares with the graph before it (copy on write: a
    pass replaces a tensor it changes), with what shows an in-place write: the version counter
    (every in-place op bumps it) and the storage (``.data = ...`` swaps it)."""

    tensors: dict[str, Any]
    marks: dict[str, tuple[Any, ...]]

    @classmethod
    def of(cls, gm: GraphModule, buffers: bool = False) -> _SharedWeights:
        # parameters; buffers only for a pass that runs no module, and not those a run may write (the manager's own
        # checks run the copy): a buffer whose write the trace left out, or any buffer of a module that is not
        # torch's own (a leaf counting its calls, an observer)
        tensors = dict(gm.named_parameters(remove_duplicate=False))
        if buffers:
            written = {w.name for w in state_writes_of(gm)}
            for path, module in gm.named_modules(remove_duplicate=False):
                if not type(module).__module__.startswith("torch."):
                    continue
                for name, buffer in module.named_buffers(recurse=False):
                    full = f"{path}.{name}" if path else name
                    if full not in written:
                        tensors[full] = buffer
        return cls(tensors, {name: tensor_mark(t) for name, t in tensors.items()})

    def memo(self) -> dict[int, Any]:
        return {id(t): t for t in self.tensors.values()}

    def check_untouched(self, pass_label: str) -> None:
        """Raise where a shared tensor was written in place. Not seen: a write through ``.data``
        (``p.data.mul_(2)``), which bumps no version counter of the parameter itself."""
        for name, t in self.tensors.items():
            if tensor_mark(t) != self.marks[name]:
                raise _WroteSharedWeight(
                    f"wrote into '{name}' in place, a tensor its copy shares with the graph before it (the graph it would roll "
                    f"back to is changed too); replace the tensor instead (module.weight = nn.Parameter(new)), or leave "
                    f"shares_weights False on the pass ({pass_label}) to get its own copy of every weight")


def _idle(p: FxoptPass, gm: GraphModule, context: CompileContext) -> bool:
    try:
        with use_context(context):
            return not p.finds_work(gm)
    except Exception:  # noqa: BLE001 - a failing test decides nothing: the pass runs, and its own failure is reported
        return False


def _copy_graph_module(gm: GraphModule, shared: _SharedWeights | None = None) -> GraphModule:
    """A copy of `gm` for a pass to change (gm.meta too, so a rolled-back pass leaves no trace);
    given `shared`, its parameters and buffers are `gm`'s own tensors, not copies."""
    memo = shared.memo() if shared is not None else {}
    copy_children(gm, memo)  # the module tree attribute by attribute, then the GraphModule's own deepcopy reuses it
    return copy.deepcopy(gm, memo)


def _carry_meta(src: GraphModule, dst: GraphModule) -> None:
    # a pass may return a brand-new GraphModule: keep what earlier steps recorded
    for key, value in src.meta.items():
        if key not in dst.meta:
            dst.meta[key] = copy.deepcopy(value)


def function_pass(fn: Callable[[GraphModule], Any], name: str, *, lossy: bool = False) -> Any:
    """Wrap a plain function ``gm -> PassResult | GraphModule | None`` as a named pass."""

    class _FunctionPass:
        def __call__(self, gm: GraphModule) -> Any:
            return fn(gm)

    p = _FunctionPass()
    p.name, p.lossy = name, lossy  # type: ignore[attr-defined]
    return p


