"""`fxopt.compile`: trace -> ordered, verified passes -> ONNX lowering, and the `CompiledModel`."""

from __future__ import annotations

import hashlib
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxopt.costs.cost_model import estimate_costs
from fxopt.distill.device import training_device
from fxopt.distill.resolve import FinetuneRequest, check_distill
from fxopt.errors import InputError, warn
from fxopt.extensions import extension
from fxopt.frontend.inputs import (
    calibration_batches,
    check_tensor_outputs,
    check_train_batches,
    copy_inputs,
    describe_shapes,
    first_train_batch,
    leaf_module_paths,
    validate_inputs,
    verification_inputs,
)
from fxopt.frontend.module_state import state_bytes
from fxopt.frontend.stages import Stages, split_stages
from fxopt.frontend.tracing import leaves_of, normalize_inputs, trace_with_outputs
from fxopt.output.onnx_weights import (
    PROTOBUF_LIMIT,
    chunks,
    external_data,
    file_size,
    full_model,
    is_lean,
    stores,
)
from fxopt.output.output_folder import MANIFEST, check_output_folder, write_output_folder
from fxopt.output.progress import Phases
from fxopt.output.report import CompileReport, layer_rows, report_tables
from fxopt.passinfra import collector
from fxopt.passinfra.pass_base import CompileContext, pass_attr, pass_name
from fxopt.passinfra.pass_manager import (
    FILES_META,
    MANIFEST_META,
    NOTES_META,
    PRECISION_META,
    SUMMARY_ROW_META,
    PassManager,
    order_passes,
    resolve_passes,
)
from fxopt.passinfra.registry import create_pass
from fxopt.targets import TargetProfile, get_target
from fxopt.targets.host import host_cpu
from fxopt.verification.numerics import run_model, tensor_mark, update_digest

__all__ = ["compile", "CompiledModel", "default_pipeline", "state_dict_sha256"]

# Passes every pipeline starts with; fold_batchnorm finds its own place from its constraints.
CANONICAL_PASSES = ("canonicalize", "fold_batchnorm")
# compile(**options) keys read by the core itself (calibration batches also serve verification).
CORE_OPTIONS = ("calib_data",)


def default_pipeline(target: str | TargetProfile) -> list[str]:
    """Pass names `compile(passes=None)` runs for `target`."""
    return list(get_target(target).default_passes)


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over a module's state_dict (names, dtypes, shapes and bytes, in key order)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            update_digest(digest, value)
    return digest.hexdigest()


class CompiledModel(nn.Module):
    """The result of `fxopt.compile`: the optimised graph, its ONNX lowering and the report.

    Calling it runs the optimised torch graph.
    """

    def __init__(
        self,
        graph_module: GraphModule,
        report: CompileReport,
        context: CompileContext,
        onnx_model: Any,
        manifest: dict[str, Any],
        staged: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.staged = staged  # a staged compile: the model's eager stages around graph_module
        self.report = report
        self.context = context
        self._onnx = onnx_model  # lean when large (fxopt.output.onnx_weights): its stores are held here
        self._onnx_weights = stores(onnx_model) if onnx_model is not None else []
        self.manifest = manifest

    @property
    def onnx_model(self) -> Any:
        """The ONNX model (`onnx.ModelProto`, self-contained), or None without export.

        A model with 64 MiB of weights or more is kept lean during and after the compile (its weights are the graph
        module's tensors, `fxopt.output.onnx_weights`): each read of this property then builds a full copy (an edit of
        it reaches `save` only when the copy is set back), and `save` writes the file without one."""
        return full_model(self._onnx) if self._onnx is not None else None

    @onnx_model.setter
    def onnx_model(self, model: Any) -> None:
        """Replace the ONNX model `save` writes (a model edited by hand: edit the copy this property gives, then set it)."""
        self._onnx, self._onnx_weights = model, stores(model) if model is not None else []

    @property
    def target(self) -> TargetProfile:
        return self.context.target

    @property
    def input_shapes(self) -> list[Any]:
        """The shapes the compiled model takes (they differ from the example inputs' when slim
        chose another input size)."""
        return list(self.manifest["example_inputs"])

    def forward(self, *args: Any) -> Any:
        """Run the optimised torch graph (or, for a staged compile, the model around it).

        Raises:
            InputError: not the compiled inputs: another count, a non-tensor (a NumPy array), or
                a shape other than the example's (the ONNX file and the traced graph are fixed
                to it; with ``dynamic_batch`` the batch may range over (min, max)).
        """
        if self.staged is None:
            self._check_call(args)
        return self.graph_module(*args) if self.staged is None else self.staged(*args)

    def _check_call(self, args: tuple[Any, ...]) -> None:
        # consistent with a staged compile's check (fxopt.frontend.stages._GraphCall): expected vs got, in one line
        expected, low_high = self.manifest["example_inputs"], self.manifest.get("dynamic_batch")
        if len(args) != len(expected):
            raise InputError(f"the compiled model takes {len(expected)} input(s) (shapes {expected}), this call gives {len(args)}")
        dtypes = [getattr(x, "dtype", None) for x in self.context.example_inputs]
        for i, (x, shape) in enumerate(zip(args, expected)):
            if not isinstance(shape, list):  # a non-tensor example input (its type name)
                continue
            if not isinstance(x, torch.Tensor):
                kind = f"{type(x).__module__}.{type(x).__name__}" if type(x).__module__ != "builtins" else type(x).__name__
                hint = " (torch.from_numpy(a) makes one)" if kind.startswith("numpy.") else ""
                raise InputError(f"input {i} of the compiled model is {kind}, not a torch.Tensor{hint}")
            got = list(x.shape)
            batch_ok = got[:1] == shape[:1] or (low_high is not None and bool(got) and low_high[0] <= got[0] <= low_high[2])
            if got[1:] != shape[1:] or len(got) != len(shape) or not batch_ok:
                batches = f", batch {low_high[0]} to {low_high[2]}" if low_high is not None else ""
                raise InputError(
                    f"input {i} of the compiled model was compiled for shape {shape}{batches}, this call gives {got}: the ONNX "
                    "file and the traced graph are fixed to the example inputs' shapes; compile with example inputs of this "
                    "size" + ("" if low_high is not None else " (or dynamic_batch=(min, opt, max) for other batch sizes)")
                )
            if i < len(dtypes) and dtypes[i] is not None and x.dtype != dtypes[i]:
                raise InputError(f"input {i} of the compiled model is {x.dtype}, it was compiled for {dtypes[i]}")

    def save(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """Write model.onnx, the build plan, report.md, report.json and manifest.json as one folder.

        The whole set is written into a temporary folder and swapped in, so `directory` always
        holds one consistent compile (files of an earlier compile there are replaced, never
        mixed in); the manifest lists every file's SHA-256 (`fxopt verify DIR` checks them).
        A folder holding files no fxopt compile wrote is refused rather than replaced.

        A lean model (64 MiB of weights or more) is written one weight at a time, byte for byte the file a usual
        export gives; one above protobuf's 2 GiB is written as ONNX external data, model.onnx with its weights in
        model.onnx.data beside it (kind ``onnx_data``), which onnx, ONNX Runtime and TensorRT read from the model's path.

        Returns:
            The paths written, by kind (``onnx``, ``onnx_data`` for a model above 2 GiB, ``report_md``,
            ``report_json``, ``manifest``, and the build-plan file names).

        Raises:
            WeightsChangedError: a lean model's weight was written after the compile (nothing is written).
            InputError: `directory` is not a path, is a file, lies under a file, holds foreign
                files, or cannot be written.
        """
        if not isinstance(directory, (str, os.PathLike)):
            raise InputError(f"save() needs a folder path (a str or os.PathLike), got {type(directory).__name__}")
        files: dict[str, Any] = {}  # bytes, text, or byte chunks (write_output_folder)
        kinds: dict[str, str] = {}
        if self._onnx is not None and is_lean(self._onnx) and file_size(self._onnx) > PROTOBUF_LIMIT:
            # above protobuf's 2 GiB: the weights go to a data file beside model.onnx, which readers find from its path
            files["model.onnx"], files["model.onnx.data"] = external_data(self._onnx, "model.onnx.data")
            kinds["onnx"], kinds["onnx_data"] = "model.onnx", "model.onnx.data"
        elif self._onnx is not None:
            files["model.onnx"], kinds["onnx"] = chunks(self._onnx), "model.onnx"  # a lean model one weight at a time
        for extra_name, extra_text in self.report.extras.get("files", {}).items():
            files[extra_name], kinds[extra_name] = extra_text, extra_name
        files["report.md"], kinds["report_md"] = self.report.to_markdown(), "report.md"
        files["report.json"], kinds["report_json"] = self.report.to_json(), "report.json"
        kinds["manifest"] = MANIFEST
        try:
            written = write_output_folder(directory, files, dict(self.manifest))
        except OSError as exc:
            raise InputError(f"cannot save into '{os.fspath(directory)}': {exc.strerror or exc}; choose a writable folder") from exc
        return {kind: written[name] for kind, name in kinds.items()}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from fxopt import __version__

    return {
        "fxopt": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _pipeline(target: TargetProfile, passes: Sequence[Any] | None) -> list[Any]:
    if passes is None:
        return default_pipeline(target)
    if isinstance(passes, (str, bytes)):
        raise InputError(f"passes must be a list of pass names or instances, got the string {passes!r}")
    chosen = resolve_passes(list(passes))
    names = {pass_name(p) for p in chosen}
    return [name for name in CANONICAL_PASSES if name not in names] + chosen


def compile(  # noqa: A001 - the public name the design asks for
    model: nn.Module,
    target: str | TargetProfile = "xavier",
    *,
    example_inputs: Any,
    passes: Sequence[Any] | None = None,
    precision: str | None = None,
    strict: bool = False,
    export: bool = True,
    progress: bool = False,
    leaf_modules: Sequence[str] = (),
    save_to: str | os.PathLike[str] | None = None,
    safety: str | None = None,
    stages: Stages | str | Sequence[str] | None = None,
    train_data: Any = None,
    loss: Any = None,
    finetune_steps: int = 0,
    finetune_lr: float | None = None,
    finetune_seed: int = 0,
    qat_steps: int = 0,
    distill: Any = None,
    recipe: Any = None,
    eval_fn: Any = None,
    device: str | torch.device | None = None,
    dynamic_batch: tuple[int, int, int] | None = None,
    **options: Any,
) -> CompiledModel:
    """Compile `model` for `target`: trace, run verified passes, lower to ONNX and verify it.

    Args:
        model: the user's module; it is never modified (fxopt works on a deep copy).
        target: a registered target name (``"xavier"``, ``"orin"``, ``"cpu"``) or a profile.
        example_inputs: a tensor or tuple of positional inputs; they fix the traced shapes.
        passes: ``None`` runs the target's default pipeline; a list of registered names or
            pass instances chooses the transformations (canonicalisation still runs first).
        precision: the precision to plan for; the target's default if omitted.
        strict: stop with `fxopt.PassError` on the first failing pass instead of rolling back.
        export: lower to ONNX at the target's opset and verify it in ONNX Runtime.
        progress: show progress bars on stderr.
        leaf_modules: submodule paths to keep opaque on purpose.
        save_to: also save the result into this folder (checked before any work starts).
        safety: ``"strict"`` compiles under the safety policy (`fxopt.safety.policy`: no lossy
            pass, the model's required precision, audited ops, a determinism check, the model's
            property suite; evidence in the manifest); ``"off"`` compiles as any model; ``None``
            takes the policy of the model's registered spec (``"strict"`` for the supervisor).
        stages: compile only the tensor part of a model whose pre/post-processing cannot be a
            graph: the submodule path(s) whose calls form the graph (``("backbone", "head")``)
            or a `fxopt.Stages`; ``None`` uses the preset for torchvision detectors, else the
            whole model. The rest runs eagerly around the compiled graph (`fxopt.frontend.stages`).
        train_data: ``(inputs, target)`` batches for fine-tuning after the lossy passes (a list
            or DataLoader, cycled as needed).
        loss: the task loss ``(output, target) -> scalar`` of that fine-tune.
        finetune_steps: optimiser steps of `fxopt.finetune` on the transformed graph before it is
            lowered (0: none); the traced original is the teacher when `distill` is given.
        finetune_lr: Adam learning rate of that fine-tune; None: the recipe's ``finetune_lr`` (a
            bundled model's measured setting), else chosen by a short range test (`fxopt.distill.lr_range`:
            3e-4, 1e-3 and 3e-3 each train the same start for a few steps; the lowest loss on
            batches held back from training wins). Every fine-tune is judged: the report gives the
            metric of the input model, after the lossy passes and after the fine-tune (without eval
            data: top-1 agreement with the input model on held-back batches), and a result far below
            the input model (5 points, or agreement under 90%) is a `fxopt.FxoptWarning` and a
            WARNING line naming what to try.
        qat_steps: quantisation-aware training: with ``precision="int8"``, optimiser steps of
            `fxopt.finetune` on the calibrated fake-quantised graph (straight-through estimator, the
            scales kept from calibration) before it is lowered, with the same data, loss,
            distillation (the float model before int8 teaching), learning-rate choice and seed as
            the fine-tune; the report's summary gets an "after QAT" row beside "after int8" (0: PTQ only).
        finetune_seed: seeds that fine-tune (torch's generators and a recipe's batches): the same
            seed repeats it exactly; other seeds show how much of a result is the fine-tune's luck.
        device: where the fine-tune, QAT and slim's trial fine-tunes run (``"cpu"``, ``"cuda"``,
            ``"cuda:1"``); None: CUDA when available, else the CPU. The graph moves there for the
            steps and back to the CPU after them (ONNX export and verification run there); int8
            calibration, the passes' checks and the summary's metrics stay on the CPU. A device not
            available here is an `InputError` before any work.
        distill: ``"kd"``, ``"ickd"``, ``["kd", "ickd"]`` (see `fxopt.distill.resolve`: the
            output KD form follows the model's outputs) or an `fxopt.distill.Distill`; the kept
            channels of a `prune` pass in the pipeline are filled in for it.
        recipe: a bundled model's `TrainingRecipe` (``fxopt.models.spec(name).recipe``): its
            batches, loss and held-out evaluation stand in for `train_data`, `loss` and `eval_fn`
            (the fine-tune keeps the state best on its first metric; the summary shows them all).
        dynamic_batch: ``(min, opt, max)``: the ONNX file gets a symbolic batch axis (dim 0 of
            every input and output), is verified in ONNX Runtime at each of the three sizes, and
            the TensorRT build plan gets the matching optimisation profile. Static shapes otherwise.
        eval_fn: ``graph -> {metric: value}`` (or a number): the report's summary table gives
            the metric of the input model and after each lossy step (slim/prune, fine-tune, int8).
        **options: data passes need, e.g. ``calib_data=`` (a list of input tuples, also used
            for verification); an option no pass in the pipeline reads is an `InputError`.

    Every check (each pass, ONNX parity) runs on the example inputs plus seeded variants and
    the calibration batches of the same shapes; NaN/Inf or empty inputs are refused.

    Returns:
        A `CompiledModel`.

    Example:
        >>> import torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> compiled = fxopt.compile(model, "cpu", example_inputs=(torch.randn(1, 3, 16, 16),))
        >>> [r.status for r in compiled.report.passes]
        ['unchanged', 'applied']
        >>> compiled.report.onnx["opset"]
        17
    """
    start = time.perf_counter()
    large = isinstance(model, nn.Module) and state_bytes(model) >= collector.COLLECT_FIRST_MIN_BYTES
    with collector.young_objects_only(collect_first=True if large else None):  # collections walk the compile's own objects, not the user's model and torch's
        request = _request(model, target, example_inputs, passes=passes, precision=precision, strict=strict, export=export,
                           progress=progress, leaf_modules=leaf_modules, save_to=save_to, safety=safety, stages=stages,
                           tuning=_Tuning(train_data, loss, finetune_steps, finetune_lr, finetune_seed, qat_steps, distill, recipe, eval_fn,
                                          device),
                           dynamic_batch=dynamic_batch, options=options)
        phases = Phases(request.phase_names(), enabled=progress)
        try:
            with phases("trace"):
                traced = _trace(request, start)
            ran = _run_pipeline(request, traced, phases)
            with phases("export"):
                lowered = _lower(request, ran)
        finally:
            phases.close()
        compiled = _assemble(request, traced, ran, lowered, start)
        if save_to is not None:
            compiled.save(save_to)
        return compiled


@dataclass(frozen=True)
class _Tuning:
    """compile's fine-tune and QAT arguments, as given."""

    train_data: Any
    loss: Any
    finetune_steps: int
    finetune_lr: float | None
    finetune_seed: int
    qat_steps: int
    distill: Any
    recipe: Any
    eval_fn: Any
    device: Any = None

    @property
    def any(self) -> bool:
        return bool(self.finetune_steps or self.qat_steps)



@dataclass(frozen=True)
class _Request:
    """Everything one compile was asked, validated before any work (step 1)."""

    model: nn.Module
    profile: TargetProfile
    precision: str | None  # as asked (None: the target's default); the policy may set it
    inputs: tuple[Any, ...]  # the graph's example inputs (a staged compile's graph part's)
    input_notes: list[str]
    split: Any  # a staged compile's `StagedModel`, else None
    leaf_modules: Sequence[str]
    pipeline: list[Any]
    policy: Any  # the strict policy (`fxopt.safety.policy.StrictPolicy`) or `_NoPolicy`
    strict: bool
    export: bool
    progress: bool
    passes: Sequence[Any] | None
    tuning: _Tuning
    summary_eval: Any  # eval_fn, else the recipe's evaluation
    dynamic_batch: tuple[int, int, int] | None
    options: dict[str, Any]
    check_inputs: list[tuple[Any, ...]]
    input_sha: str
    input_marks: dict[str, tuple[Any, ...]]

    def phase_names(self) -> list[str]:
        return ["trace", "passes", "export"]  # fine-tune and QAT are passes


def _request(model: Any, target: Any, example_inputs: Any, *, passes: Any, precision: str | None, strict: bool, export: bool,
             progress: bool, leaf_modules: Any, save_to: Any, safety: str | None, stages: Any, tuning: _Tuning,
             dynamic_batch: Any, options: dict[str, Any]) -> _Request:
    """Step 1: validate every option and input, refusing what cannot work, before any work."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}"
                         + (" (wrap a function in an nn.Module whose forward calls it)" if callable(model) else ""))
    profile = get_target(target)
    if precision is not None and precision not in profile.precisions:
        raise InputError(f"target '{profile.name}' has no precision '{precision}'; it has {profile.precisions}")
    inputs = copy_inputs(normalize_inputs(example_inputs))  # the user's tensors are never run
    input_notes = validate_inputs(inputs)
    if save_to is not None:
        check_output_folder(os.fspath(save_to))  # before any work
    dynamic_batch = _dynamic_batch(dynamic_batch, export)
    if "calib_data" in options:
        options["calib_data"] = calibration_batches(options["calib_data"], like=inputs)
    split = split_stages(model, inputs, stages)  # None: the whole model is the graph
    if split is not None:
        inputs = split.graph_inputs
        if "calib_data" in options:
            options["calib_data"] = [split.graph_inputs_for(b) for b in options["calib_data"]]
    leaf_modules = leaf_module_paths(model if split is None else split.root, leaf_modules,
                                     where=type(model).__name__ if split is None else f"the graph part ({', '.join(split.root.part_paths)})")
    pipeline = resolve_passes(_pipeline(profile, passes))
    if (precision or profile.default_precision) == "int8" and "quantize" not in {pass_name(p) for p in pipeline}:
        pipeline.append(create_pass("quantize"))  # int8 is the quantize pass's Q/DQ, never an uncalibrated engine
    policy = _safety_policy(model, safety, export)
    if policy.strict and split is not None:
        raise InputError("safety='strict' verifies the whole model as one graph; a staged compile (stages=) cannot run under it")
    if policy.strict:
        precision = precision or policy.required_precision
        policy.check_request(pipeline, precision or profile.default_precision)
        strict = True  # a safety model never ships with a pass silently rolled back
    _check_request(pipeline, options, precision or profile.default_precision, profile)
    _check_tuning(tuning, options, precision or profile.default_precision, split is not None or policy.strict)
    summary_eval = tuning.eval_fn if tuning.eval_fn is not None else getattr(tuning.recipe, "evaluate", None)  # every metric of the recipe
    return _Request(model, profile, precision, inputs, input_notes, split, leaf_modules, pipeline, policy, strict, export, progress,
                    passes, tuning, summary_eval, dynamic_batch, options, verification_inputs(inputs, options.get("calib_data")),
                    state_dict_sha256(model), _state_marks(model))


def _state_marks(model: nn.Module) -> dict[str, tuple[Any, ...]]:
    """Each state tensor's identity and `tensor_mark`: the invariant check at the end of a compile (hashing every
    byte again costs as much as the input digest, seconds on a large model). Not seen: a write through ``.data``
    or a numpy view (the pass manager's copy-on-write check has the same blind spot)."""
    return {name: (id(t), *tensor_mark(t)) for name, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}


def _check_tuning(tuning: _Tuning, options: dict[str, Any], precision: str, staged_or_strict: bool) -> None:
    if tuning.device is not None:
        training_device(tuning.device)  # a device this host does not have, named with the ones it has
    if tuning.finetune_steps and options.get("resolutions") is not None:
        raise InputError("fine-tuning after slim's resolution choice is not supported: its training data and targets "
                         "have the example's size; leave out resolutions= or finetune_steps=")
    _check_qat(tuning.qat_steps, precision)
    if tuning.any and tuning.recipe is None and (tuning.train_data is None or (tuning.loss is None and tuning.distill is None)):
        raise InputError(f"{'finetune_steps' if tuning.finetune_steps else 'qat_steps'} needs train_data= ((inputs, target) batches) "
                         "and loss= and/or distill=, or recipe= (a bundled model's)")
    if tuning.any and staged_or_strict:
        raise InputError("fine-tuning and QAT are not available for a staged compile (stages=) or under safety='strict'")
    if tuning.any and tuning.train_data is not None:
        check_train_batches(tuning.train_data)
    if tuning.any and tuning.distill is not None:
        check_distill(tuning.distill)


@dataclass(frozen=True)
class _Traced:
    """Step 2: the traced graph (the teacher of any fine-tune), its cost and the compile's context."""

    gm: GraphModule
    seconds: float  # from compile's start
    cost_before: Any
    context: CompileContext
    known_outputs: list[tuple[tuple[Any, ...], Any]] = field(default_factory=list)  # (the example inputs, the graph's outputs on them)


def _trace(request: _Request, start: float) -> _Traced:
    """Step 2: trace (a deep copy of) the model; check before the passes what would fail later."""
    context = CompileContext.create(request.profile, request.inputs, request.precision, check_inputs=request.check_inputs, **request.options)
    gm, outputs = trace_with_outputs(request.model if request.split is None else request.split.root, request.inputs,
                                     leaf_modules=request.leaf_modules)
    if request.export:  # before the passes: the exporter would fail on them, or silently drop them
        check_tensor_outputs(outputs)
    if request.tuning.any and request.tuning.loss is not None:
        _check_loss(gm, request.tuning.train_data, request.tuning.loss)
    return _Traced(gm, time.perf_counter() - start, estimate_costs(gm, request.profile, context.precision), context,
                   [(request.inputs, outputs)])


@dataclass
class _PipelineRun:
    """Step 3: the pipeline's result: the final graph, the records, the summary and the report lines."""

    final: GraphModule
    result: Any  # the `PipelineResult`, with every pass record
    context: CompileContext
    ordered: list[Any]
    summary: _Summary
    notes: list[str]
    shipped: str
    seconds: float
    known_outputs: list[tuple[tuple[Any, ...], Any]] = field(default_factory=list)  # the final graph's outputs, checked


def _run_pipeline(request: _Request, traced: _Traced, phases: Phases) -> _PipelineRun:
    """Step 3: one verified pass-manager run over the requested passes and compile's tuning steps
    (``finetune`` after the structural passes, so int8 calibrates the tuned weights; ``qat`` after
    int8), each placed by its after/before constraints; the summary table sees the model after
    each lossy step."""
    start, profile, tuning, gm = time.perf_counter(), request.profile, request.tuning, traced.gm
    context, requested = traced.context, order_passes(request.pipeline)
    lossy_steps = tuning.any or context.precision == "int8" or any(pass_attr(p, "lossy", False) for p in requested)
    summary = _Summary(profile, context.precision, request.summary_eval, enabled=bool(lossy_steps))
    summary.add("input model", gm)
    pipeline = list(requested)
    if tuning.any:
        tune = FinetuneRequest(tuning.distill, tuning.recipe, tuning.train_data, tuning.loss, tuning.eval_fn if summary.scalar else None,
                               tuning.finetune_lr, tuning.finetune_seed, teacher=gm, stages=summary, passes=tuple(requested),
                               device=tuning.device)
        if tuning.finetune_steps:  # passes choosing between candidates fine-tune them the same way (slim's re-rank)
            context = replace(context, finetune=tune)
            pipeline.append(create_pass("finetune", steps=tuning.finetune_steps, progress=request.progress, **_fields(tune)))
        if tuning.qat_steps:
            pipeline.append(create_pass("qat", steps=tuning.qat_steps, progress=request.progress, **_fields(tune)))
    with phases("passes"):
        result = PassManager(pipeline, strict=request.strict, progress=request.progress, on_applied=summary.after_pass).run(
            gm, context, cost=traced.cost_before, known_outputs=traced.known_outputs)
    summary.flush()
    context, final = result.context or context, result.graph_module
    notes: list[str] = list(final.meta.get(NOTES_META, ()))
    shipped = _shipped_precision(final, profile, context.precision)
    if shipped != context.precision:  # int8 asked, but the quantize pass kept the float graph (slower here, nothing to quantise)
        notes.append(f"WARNING: precision {shipped}, not {context.precision}: the quantize pass kept the float graph "
                     "(its line in the passes table says why)")
    context = replace(context, precision=shipped)
    return _PipelineRun(final, result, context, order_passes(pipeline), summary, notes, shipped, time.perf_counter() - start,
                        result.known_outputs())


def _fields(request: Any) -> dict[str, Any]:
    return {f: getattr(request, f) for f in request.__dataclass_fields__}


@dataclass
class _Lowered:
    """Step 4: the ONNX file and what lowering found (report lines, build-plan files, placement)."""

    inputs: tuple[Any, ...]  # the compiled model's inputs (slim may have chosen another size)
    check_inputs: list[tuple[Any, ...]]
    onnx_info: dict[str, Any] | None = None
    onnx_model: Any = None
    onnx_weights: list[Any] = field(default_factory=list)  # a lean onnx_model's stores, held while it is
    notes: list[str] = field(default_factory=list)
    files: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, str] | None = None
    safety_evidence: dict[str, Any] = field(default_factory=lambda: {"policy": "off"})
    seconds: float = 0.0


def _lower(request: _Request, ran: _PipelineRun) -> _Lowered:
    """Step 4: ONNX at the target's opset, verified in ONNX Runtime; for TensorRT the compatibility
    check and the build plan; the safety policy's evidence."""
    start, profile, context, final = time.perf_counter(), request.profile, ran.context, ran.final
    lowered = _Lowered(request.inputs, request.check_inputs, files=dict(final.meta.get(FILES_META, {})))  # slim's trials.csv, pareto.png
    tuning = request.tuning
    requested = [*(request.passes or ()), *(["quantize"] if (request.precision or profile.default_precision) == "int8" else []),
                 *(["finetune"] if tuning.finetune_steps else []), *(["qat"] if tuning.qat_steps else [])]
    lowered.notes += _pass_warnings(ran.result.records, requested) + (request.split.notes() if request.split is not None else [])
    if context.example_inputs is not request.inputs:  # a pass (slim) chose another input size
        lowered.notes.append(f"WARNING: the compiled model takes input shape(s) {describe_shapes(context.example_inputs)} instead of "
                             f"{describe_shapes(request.inputs)} (slim's resolution choice): feed it inputs of the new size")
        lowered.inputs, lowered.check_inputs = context.example_inputs, context.verification_inputs
    if request.export:
        exported = extension("lower", "onnx")(final, lowered.inputs, profile, check_inputs=lowered.check_inputs, dynamic_batch=request.dynamic_batch,
                         float_module=_float_twin(final), known_outputs=ran.known_outputs, keep_weights_out=None)
        lowered.onnx_info, lowered.onnx_model, lowered.onnx_weights = exported.to_dict(), exported.model, exported.weights
        lowered.notes += [f"ONNX export: {finding}" for finding in exported.findings]
        if request.policy.strict:
            lowered.safety_evidence = request.policy.checks(request.model, final, exported.model, lowered.inputs, profile)
            lowered.notes += request.policy.summary(lowered.safety_evidence)
        if profile.backend == "tensorrt":
            _plan_tensorrt(request, ran, exported, lowered)
    lowered.seconds = time.perf_counter() - start
    return lowered


def _plan_tensorrt(request: _Request, ran: _PipelineRun, exported: Any, lowered: _Lowered) -> None:
    deployment = extension("deployment", "tensorrt")(exported, request.profile, ran.context.precision, request.dynamic_batch, ran.final)
    lowered.notes += deployment.notes
    lowered.files.update(deployment.files)
    lowered.placement = deployment.placement


def _assemble(request: _Request, traced: _Traced, ran: _PipelineRun, lowered: _Lowered, start: float) -> CompiledModel:
    """Step 5: the report, the manifest and the `CompiledModel`."""
    profile, context, final = request.profile, ran.context, ran.final
    known = ran.result.cost  # the pass manager's estimate of the final graph, unless int8 fell back to float
    cost_after = known if known is not None and known.precision == context.precision else estimate_costs(final, profile, context.precision)
    report = CompileReport(
        model=type(request.model).__name__,
        target=profile.name,
        precision=context.precision,
        pipeline=[pass_name(p) for p in ran.ordered],
        passes=ran.result.records,
        leaves=list(leaves_of(traced.gm)),
        cost_before=traced.cost_before,
        cost_after=cost_after,
        layers=layer_rows(final, cost_after, lowered.placement),
        onnx=lowered.onnx_info,
        timings_s={"trace": traced.seconds, "passes": ran.seconds, "export": lowered.seconds, "total": time.perf_counter() - start},
        notes=[*request.input_notes, *ran.notes, *lowered.notes],
        extras={"files": lowered.files} if lowered.files else {},
        tables={**report_tables(final), **ran.summary.table()},
    )
    manifest = {
        "versions": _versions(),
        "target": profile.to_dict(),
        "precision": context.precision,
        "passes": [{"name": r.name, "status": r.status, "options": r.options} for r in ran.result.records],
        "input_state_dict_sha256": request.input_sha,
        "example_inputs": [list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in lowered.inputs],
        "input_shapes_changed": context.example_inputs is not request.inputs,
        "dynamic_batch": list(request.dynamic_batch) if request.dynamic_batch else None,
        "verification_inputs": len(lowered.check_inputs),
        "safety": lowered.safety_evidence,
        "host": host_cpu().to_dict(),
        **final.meta.get(MANIFEST_META, {}),
    } | ({"stages": request.split.cut()} if request.split is not None else {})
    if _state_marks(request.model) != request.input_marks:  # pragma: no cover - an internal invariant
        raise AssertionError("fxopt modified the user's model")
    staged = request.split.runner(final) if request.split is not None else None
    return CompiledModel(final, report, context, lowered.onnx_model, manifest, staged)


@dataclass(frozen=True)
class _NoPolicy:
    """safety='off': no policy (a strict one comes from the ``safety_policy`` extension, `fxopt.safety.policy`)."""

    strict: bool = False
    required_precision: str | None = None


SAFETY_POLICIES = ("strict", "off")


def _safety_policy(model: nn.Module, safety: str | None, export: bool) -> Any:
    spec = extension("model_spec", "of_model")(model)
    if safety is not None and safety not in SAFETY_POLICIES:
        raise InputError(f"safety must be one of {SAFETY_POLICIES} or None (the model spec's default), got {safety!r}")
    chosen = safety if safety is not None else getattr(spec, "safety", None) or "off"
    if chosen == "strict" and not export:
        raise InputError("safety='strict' checks the ONNX file it deploys: it needs export=True")
    return extension("safety_policy", "strict")(spec) if chosen == "strict" else _NoPolicy()


def _check_qat(qat_steps: Any, precision: str) -> None:
    if isinstance(qat_steps, bool) or not isinstance(qat_steps, int) or qat_steps < 0:
        raise InputError(f"qat_steps must be an integer >= 0, got {qat_steps!r}")
    if qat_steps and precision != "int8":
        raise InputError(f"qat_steps trains through int8 fake quantisation; it needs precision='int8' (got '{precision}')")


class _Summary:
    """The report's one summary table: estimated latency (and the metric, given `eval_fn`) of
    the input model and after each lossy step."""

    TITLE = "summary: input model and after each step"

    def __init__(self, profile: TargetProfile, precision: str, eval_fn: Any, enabled: bool = True) -> None:
        self.profile, self.eval_fn, self.enabled = profile, eval_fn, enabled
        self.precisions = list(dict.fromkeys([profile.default_precision, precision]))
        self._rows: list[dict[str, Any]] = []
        self._metrics: list[tuple[str, dict[str, float]]] = []  # (stage, {metric: value}) of the rows with one
        self.scalar = False  # eval_fn returns one number (fine-tuning can then keep its best state)
        self._pending: tuple[list[str], GraphModule] | None = None  # structural steps not yet measured
        self._last: GraphModule | None = None  # the graph of the last row

    @property
    def rows(self) -> list[dict[str, Any]]:
        self.flush()
        return self._rows

    @property
    def metrics(self) -> list[tuple[str, dict[str, float]]]:
        self.flush()
        return self._metrics

    def after_pass(self, record: Any, gm: GraphModule, p: Any) -> None:
        """The pass manager's word that `p` was applied: a row after each lossy step. Structural steps
        in a row share one ("after slim + prune"); a step with a ``stage`` name gets "after <stage>", the
        row it measured itself where it did (a fine-tune judging its result); a step rolled back gets none."""
        if not (self.enabled and record.lossy):
            return
        stage = pass_attr(p, "stage", None)
        measured = gm.meta.pop(SUMMARY_ROW_META, None)  # the step measured its result to judge it
        if stage is None:
            self._pending = ([*(self._pending[0] if self._pending else ()), record.name], gm)
        elif measured is not None:
            self.flush()
            self._append(*measured, gm)
        else:
            self.add(f"after {stage}", gm)

    def flush(self) -> None:
        """Measure the structural steps waiting for their row."""
        if self._pending is not None:
            names, gm = self._pending
            self._pending = None
            self.add("after " + " + ".join(names), gm)

    def add(self, stage: str, gm: GraphModule) -> None:
        if not self.enabled:
            return
        self.flush()
        self._append(*self.measure(stage, gm), gm)

    def measure(self, stage: str, gm: GraphModule) -> tuple[dict[str, Any], dict[str, float] | None]:
        """`gm`'s row (estimated latency, size, the metric) and its metric values, not yet in the table: a
        step that judges itself measures its result, and the row goes in only when the step is applied."""
        row: dict[str, Any] = {"stage": stage}
        for p in self.precisions:
            cost = estimate_costs(gm, self.profile, p)
            row[f"est. {self.profile.name} latency ms ({p})"] = round(cost.latency_s * 1e3, 4)
        row["params"], row["FLOPs"] = cost.params, cost.flops
        if self.eval_fn is None:
            return row, None
        was_training = gm.training
        gm.eval()
        with torch.no_grad():
            metric = self.eval_fn(gm)
        gm.train(was_training)
        self.scalar = not isinstance(metric, dict)
        values = {k: float(v) for k, v in metric.items()} if isinstance(metric, dict) else {"metric": float(metric)}
        row.update({k: round(v, 4) for k, v in values.items()})
        return row, values

    def _append(self, row: dict[str, Any], values: dict[str, float] | None, gm: GraphModule) -> None:
        self._last = gm
        if values is not None:
            self._metrics.append((row["stage"], values))
        self._rows.append(row)

    def table(self) -> dict[str, list[dict[str, Any]]]:
        return {self.TITLE: self.rows} if len(self.rows) > 1 else {}


def _shipped_precision(gm: GraphModule, profile: TargetProfile, asked: str) -> str:
    """The precision the compiled graph runs at: int8 only when it holds fake quantisation, else the
    target's float default (what a quantize pass that kept the float graph leaves)."""
    if asked != "int8" or gm.meta.get(PRECISION_META) == "int8":
        return asked
    return profile.default_precision if profile.default_precision != "int8" else next(p for p in profile.precisions if p != "int8")


def _dynamic_batch(value: Any, export: bool) -> tuple[int, int, int] | None:
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not 1 <= value[0] <= value[1] <= value[2]:
        raise InputError(f"dynamic_batch must be (min, opt, max) batch sizes with 1 <= min <= opt <= max, got {value!r}")
    if not export:
        raise InputError("dynamic_batch shapes the ONNX file and its build plan: it needs export=True")
    return (value[0], value[1], value[2])


def _check_request(pipeline: list[Any], options: dict[str, Any], precision: str, profile: TargetProfile) -> None:
    """Refuse, before any work, options no pass reads and a precision no pass provides."""
    known = set(CORE_OPTIONS)
    for p in pipeline:
        known.update(pass_attr(p, "reads_options", ()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(
            f"unknown compile option(s) {', '.join(map(repr, unknown))}; known here: {', '.join(sorted(known))} "
            "(a pass reading other options declares them in its `reads_options`)"
        )
    for p in pipeline:  # what a pass's settings need from the options (prune's Taylor importance: calib_data)
        check = pass_attr(p, "check_options", None)
        if callable(check):
            check(options, target=profile)
    names = {pass_name(p) for p in pipeline}
    if (precision == "int8" or "quantize" in names) and not options.get("calib_data"):
        raise InputError(
            f"int8 for '{profile.name}' needs calib_data=[(x,), ...]: a few batches like the example inputs "
            "to calibrate the quantisation ranges (without it an int8 engine would run uncalibrated)"
        )


def _pass_warnings(records: list[Any], requested: Sequence[Any] | None) -> list[str]:
    """Loud report lines for passes the user asked for that were rolled back or changed nothing;
    each is also an `FxoptWarning`, since compile returns normally and the report may go unread."""
    asked = {p if isinstance(p, str) else pass_name(p) for p in (requested or ())}
    lines = [
        f"WARNING: requested pass '{r.name}' {'was rolled back' if r.status == 'rolled_back' else 'changed nothing'}: {r.reason}"
        for r in records if r.name in asked and r.status in ("rolled_back", "unchanged")
    ]
    for line in lines:
        warn(line.removeprefix("WARNING: "))  # at the caller of compile
    return lines


def _check_loss(gm: GraphModule, train_data: Any, loss: Any) -> None:
    """Refuse, before the passes, a fine-tune loss that raises or is not a scalar on the first batch."""
    batch = first_train_batch(train_data)
    if batch is None:  # the recipe's batches, or an iterable not to draw from (finetune checks the loss's shape)
        return
    inputs, target = batch
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    try:
        output = run_model(gm, inputs)
    except Exception as exc:  # noqa: BLE001 - the user's batch is wrong, whatever the model raises
        raise InputError(f"the model does not run on train_data's first batch ({describe_shapes(inputs)}): "
                         f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}") from exc
    try:
        with torch.no_grad():
            value = loss(output, target)
    except Exception as exc:  # noqa: BLE001 - the user's loss may raise anything
        raise InputError(f"loss(output, target) raises on train_data's first batch: {type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:200]}") from exc
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise InputError(f"loss(output, target) must return a scalar tensor (one number to minimise), got {got} on "
                         "train_data's first batch: reduce it, e.g. with .mean()")


def _float_twin(gm: GraphModule) -> GraphModule | None:
    """`gm` without its fake quantisation when it has any (the int8 file's verification measures the
    quantisation error against it), else ``None``."""
    return extension("float_twin", "int8")(gm)
