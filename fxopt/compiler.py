"""`fxopt.compile`: trace -> ordered, verified passes -> ONNX lowering, and the `CompiledModel`."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxopt.cost_model import estimate_costs
from fxopt.errors import InputError
from fxopt.files import write_atomic
from fxopt.pass_base import CompileContext, pass_name
from fxopt.pass_manager import PassManager, resolve_passes
from fxopt.report import CompileReport, layer_rows, report_tables
from fxopt.targets import TargetProfile, get_target
from fxopt.tracing import leaves_of, normalize_inputs, trace

__all__ = ["compile", "CompiledModel", "default_pipeline", "state_dict_sha256"]

# Passes every pipeline starts with; fold_batchnorm finds its own place from its constraints.
CANONICAL_PASSES = ("canonicalize", "fold_batchnorm")


def default_pipeline(target: str | TargetProfile) -> list[str]:
    """Pass names `compile(passes=None)` runs for `target`."""
    return list(get_target(target).default_passes)


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over a module's state_dict (names, dtypes, shapes and bytes, in key order)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.context = context
        self.onnx_model = onnx_model
        self.manifest = manifest

    @property
    def target(self) -> TargetProfile:
        return self.context.target

    def forward(self, *args: Any) -> Any:
        return self.graph_module(*args)

    def save(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """Write model.onnx, report.md, report.json and manifest.json into `directory`.

        Every file is written through a temporary file and renamed, so an interrupted save
        never leaves a half-written file. Returns the paths written, by kind.
        """
        directory = os.fspath(directory)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise InputError(f"cannot save into '{directory}': it exists and is not a directory")
        paths: dict[str, str] = {}
        manifest = dict(self.manifest)
        if self.onnx_model is not None:
            data = self.onnx_model.SerializeToString()
            paths["onnx"] = os.path.join(directory, "model.onnx")
            write_atomic(paths["onnx"], data)
            manifest["files"] = {"model.onnx": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
        for extra_name, extra_text in self.report.extras.get("files", {}).items():
            paths[extra_name] = os.path.join(directory, extra_name)
            write_atomic(paths[extra_name], extra_text)
        paths["report_md"] = os.path.join(directory, "report.md")
        write_atomic(paths["report_md"], self.report.to_markdown())
        paths["report_json"] = os.path.join(directory, "report.json")
        write_atomic(paths["report_json"], self.report.to_json())
        paths["manifest"] = os.path.join(directory, "manifest.json")
        write_atomic(paths["manifest"], json.dumps(manifest, indent=2, default=str))
        return paths


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


def _conv_placement(gm: GraphModule, devices: list[str]) -> dict[str, str]:
    # the exporter emits one Conv per torch conv, in graph order, so the two sequences pair up
    convs = [n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.modules.conv._ConvNd)]
    return dict(zip(convs, devices)) if len(convs) == len(devices) else {}


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
        **options: data passes need, e.g. ``calib_data=`` (a list of input tuples).

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
    profile = get_target(target)
    if precision is not None and precision not in profile.precisions:
        raise InputError(f"target '{profile.name}' has no precision '{precision}'; it has {profile.precisions}")
    inputs = normalize_inputs(example_inputs)
    input_sha = state_dict_sha256(model)
    context = CompileContext.create(profile, inputs, precision, **options)
    gm = trace(model, inputs, leaf_modules=leaf_modules)
    traced_s = time.perf_counter() - start
    cost_before = estimate_costs(gm, profile, context.precision)
    manager = PassManager(_pipeline(profile, passes), strict=strict, progress=progress)
    result = manager.run(gm, context)
    final = result.graph_module
    passes_s = time.perf_counter() - start - traced_s
    cost_after = estimate_costs(final, profile, context.precision)
    onnx_info, onnx_model, notes, extras, placement = None, None, [], {}, None
    if export:
        from fxopt.backends.onnx import lower

        exported = lower(final, inputs, profile)
        onnx_info, onnx_model = exported.to_dict(), exported.model
        if profile.backend == "tensorrt":
            from fxopt.backends.tensorrt import plan_deployment

            deployment = plan_deployment(onnx_model, profile, context.precision)
            extras["files"] = deployment.files
            placement = _conv_placement(final, deployment.conv_devices())
            notes += deployment.notes
    export_s = time.perf_counter() - start - traced_s - passes_s
    report = CompileReport(
        model=type(model).__name__,
        target=profile.name,
        precision=context.precision,
        pipeline=manager.names,
        passes=result.records,
        leaves=list(leaves_of(gm)),
        cost_before=cost_before,
        cost_after=cost_after,
        layers=layer_rows(final, cost_after, placement),
        onnx=onnx_info,
        timings_s={"trace": traced_s, "passes": passes_s, "export": export_s, "total": time.perf_counter() - start},
        notes=notes,
        extras=extras,
        tables=report_tables(final),
    )
    manifest = {
        "versions": _versions(),
        "target": profile.to_dict(),
        "precision": context.precision,
        "passes": [{"name": r.name, "status": r.status, "options": r.options} for r in result.records],
        "input_state_dict_sha256": input_sha,
        "example_inputs": [list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs],
    }
    if state_dict_sha256(model) != input_sha:  # pragma: no cover - an internal invariant
        raise AssertionError("fxopt modified the user's model")
    return CompiledModel(final, report, context, onnx_model, manifest)
