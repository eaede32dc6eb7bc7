"""ONNX lowering: export at the target's opset, clean up with onnx-graphsurgeon, check, verify in ORT.

The TorchScript-based exporter is used on purpose: the torch.export-based one writes opset 18
and cannot always convert down, while TensorRT 8.5 (Xavier) parses opsets up to 17.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import linecache
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch.utils import _pytree as pytree

from fxopt.errors import ExportError, VerificationError
from fxopt.frontend.inputs import check_tensor_outputs, copy_inputs
from fxopt.frontend.module_state import state_bytes
from fxopt.output.onnx_weights import (
    alias,
    checked,
    is_lean,
    is_stored,
    serialize,
    session,
    tensor_values,
    written,
)
from fxopt.passinfra.collector import collect_young, young_objects_only
from fxopt.targets import TargetProfile, get_target
from fxopt.verification.numerics import TOLERANCES, compare_outputs, flatten_outputs, run_model

__all__ = ["OnnxExport", "Parity", "batch_inputs", "export_onnx", "onnx_parity", "verify_onnx", "lower", "opset_of"]

# ONNX Runtime on CPU vs torch on CPU, fp32: max_abs <= ATOL + RTOL * max|reference|.
ATOL, RTOL = 1e-4, 1e-4
# An int8 file also passes when its own error against the float graph is at most this multiple of
# the fake-quant graph's: ONNX Runtime's kernels round some values the other way than torch, and in
# a deep net one such step can move the output by several output steps (a random-weight resnet18 at
# 64 px: a single flip moved it by 0.0135 of a 0.33 range). The file is then a different draw of the
# same quantisation noise (there: 0.9-1.1x the fake-quant graph's error), not a wrong file.
QUANT_ERROR_RATIO = 1.5


@dataclass
class OnnxExport:
    """An exported, checked and verified ONNX model."""

    model: onnx.ModelProto
    opset: int
    input_names: list[str]
    output_names: list[str]
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    node_count: int = 0
    findings: list[str] = field(default_factory=list)
    lowered_by: str = "trace"
    inputs_checked: int = 0
    rewrites: list[str] = field(default_factory=list)
    dynamic_batch: tuple[int, int, int] | None = None
    batch_sizes_checked: list[int] = field(default_factory=list)
    max_error_steps: float | None = None  # int8 files: the worst error in output quantisation steps (`output_steps`)
    int8_error: float | None = None  # int8 files: the fake-quant graph's own max abs error vs its float twin
    int8_error_steps: float | None = None  # ... in output int8 steps
    # a lean model's stores (`fxopt.output.onnx_weights`): `model` reads its weights from them while this export lives
    weights: list[Any] = field(default_factory=list, repr=False)

    def serialized(self) -> bytes:
        """The bytes of the self-contained file (a lean model's weights written in: `onnx_weights.serialize`)."""
        return serialize(self.model)

    def op_types(self) -> set[str]:
        return {n.op_type for n in self.model.graph.node}

    def to_dict(self) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "inputs": self.input_names,
            "outputs": self.output_names,
            "nodes": self.node_count,
            "max_abs_error_vs_torch": self.max_abs_error,
            "max_rel_error_vs_torch": self.max_rel_error,
            "max_error_in_output_int8_steps": self.max_error_steps,
            "int8_vs_float_max_abs_error": self.int8_error,
            "int8_vs_float_in_output_int8_steps": self.int8_error_steps,
            "inputs_checked": self.inputs_checked,
            "lowered_by": self.lowered_by,
            "findings": self.findings,
            "rewrites": self.rewrites,
            "op_types": sorted(self.op_types()),
            "dynamic_batch": list(self.dynamic_batch) if self.dynamic_batch else None,
            "batch_sizes_checked": self.batch_sizes_checked,
        }


def _output_names(outputs: Any) -> list[str]:
    # a lone tensor is "output"; pytree paths name the rest: dict keys as they are, indices as output_<i>
    names: list[str] = []
    for path, leaf in pytree.tree_flatten_with_path(outputs)[0]:
        if isinstance(leaf, torch.Tensor):
            parts = [re.sub(r"\W+", "", str(getattr(k, "key", getattr(k, "idx", k)))) for k in path]
            name = "_".join(parts) or "output"
            names.append(f"output_{name}" if name[0].isdigit() else name)
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset a model imports."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    opset: int = 17,
    cleanup: bool = True,
    tensorrt_version: str | None = None,
    dynamic_batch: bool = False,
    outputs: Any = None,
    keep_weights_out: bool | None = False,
) -> OnnxExport:
    """Export `module` to an in-memory ONNX model at `opset`, cleaned and checked.

    Args:
        module: the module or graph module to export (evaluated in its current mode).
        example_inputs: positional tensors; their shapes become the model's static shapes.
        opset: the default-domain opset to write.
        cleanup: fold constants and drop unused nodes with onnx-graphsurgeon.
        tensorrt_version: the TensorRT release that will parse the file (``"8.5"``): the clean-up
            rewrites ops that release lacks (`fxopt.backends.onnx_rewrites`); ``None`` rewrites nothing.
        dynamic_batch: make dim 0 of every input and output a symbolic ``batch`` axis.
        outputs: `module`'s outputs on `example_inputs` where already computed (they name the
            file's outputs); None runs `module` once.
        keep_weights_out: export a lean model (`fxopt.output.onnx_weights`): its weights stay in
            `module`'s tensors, read in place by the clean-up, the checker and ONNX Runtime, and are
            copied into the file only when it is written (`onnx_weights.chunks`, `serialize`). The
            model is then readable only while this `OnnxExport` lives (it holds the store), and
            ``onnx.save`` of it writes references, not weights: a caller opts in. None: lean when
            `module`'s weights take `LEAN_MIN_BYTES` or more (`compile` does so: the export then holds
            one copy of the weights instead of four). A graph lowered by scripting (an ONNX If) is
            exported as usual: with its weights left out the exporter names its nodes differently.

    Returns:
        An `OnnxExport` (not yet verified: see `verify_onnx`).

    Raises:
        ExportError: the module returns something other than tensors (None, a string), the
            exporter failed, wrote another opset, or the checker rejected the file.
    """
    if outputs is None:
        outputs = run_model(module, example_inputs)
    check_tensor_outputs(outputs, error=ExportError)  # None fails in ONNX Runtime's C++, a string is dropped
    input_names = [f"input_{i}" for i in range(len(example_inputs))] if len(example_inputs) > 1 else ["input"]
    output_names = _output_names(outputs)

    large = state_bytes(module) >= LEAN_MIN_BYTES
    lean = keep_weights_out if keep_weights_out is not None else large
    weights: dict[str, torch.Tensor] = {}
    left_out = [False]  # whether the last export left its weights out

    def export(m: torch.nn.Module, lean_ok: bool = True) -> tuple[bytes, list[warnings.WarningMessage]]:
        buffer = io.BytesIO()
        weights.clear()
        left_out[0] = False
        try:
            with warnings.catch_warnings(record=True) as caught, _exported_weights(weights if lean and lean_ok else None) as captured:
                warnings.simplefilter("always")
                torch.onnx.export(
                    m,
                    copy_inputs(tuple(example_inputs)),
                    buffer,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    do_constant_folding=True,
                    dynamic_axes={name: {0: "batch"} for name in (*input_names, *output_names)} if dynamic_batch else None,
                    dynamo=False,
                    export_params=not captured,
                )
                left_out[0] = captured
        except Exception as exc:
            raise ExportError(f"ONNX export at opset {opset} failed: {type(exc).__name__}: {exc}") from exc
        return buffer.getvalue(), [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]

    data, tracer_warnings = export(module)
    findings = [_finding(w, module) for w in tracer_warnings]
    lowered_by = "trace"
    branches = [f for w, f in zip(tracer_warnings, findings) if _is_branch(w, module)]
    if branches:
        # the tracer recorded only the branch the example inputs took: script the graph so
        # ONNX gets an If (TensorRT 8.5 parses it), or refuse
        data, findings, lowered_by = _export_scripted(module, export, branches)
    model = onnx.load_from_string(data)
    del data  # the weights live on in `model`: one copy of them at a time
    store = None
    if left_out[0]:
        store = _attach_weights(model, weights, input_names, module)
        weights.clear()
        if store is None:  # a weight only the file can hold (bfloat16, quantized), or none recorded: the usual export
            return export_onnx(module, example_inputs, opset=opset, cleanup=cleanup, tensorrt_version=tensorrt_version,
                               dynamic_batch=dynamic_batch, outputs=outputs, keep_weights_out=False)
    rewrites: list[str] = []
    if cleanup:
        with young_objects_only(collect_first=False):  # the clean-up's collections need not walk the caller's objects
            try:
                model = _cleanup(model, tensorrt_version, rewrites)
            except Exception as exc:
                raise ExportError(f"ONNX clean-up (onnx-graphsurgeon) failed: {type(exc).__name__}: {exc}") from exc
            if lean or large:  # onnx-graphsurgeon's graph holds a copy of every weight in reference cycles: free it before verification
                collect_young()
    written = opset_of(model)
    if written > opset:
        raise ExportError(f"the exporter wrote opset {written}, above the requested {opset}")
    try:
        _check_model(model)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the exported model: {exc}") from exc
    graph_inputs = [i.name for i in model.graph.input]
    return OnnxExport(
        model, written, graph_inputs, [o.name for o in model.graph.output], node_count=len(model.graph.node),
        findings=findings, lowered_by=lowered_by, rewrites=rewrites, weights=[store] if store is not None and is_lean(model) else [],
    )


LEAN_MIN_BYTES = 64 << 20  # a module with this many bytes of weights is exported lean (`export_onnx`'s keep_weights_out)


@contextlib.contextmanager
def _exported_weights(into: dict[str, torch.Tensor] | None) -> Iterator[bool]:
    """While the TorchScript exporter runs, record the weights it would write (after its constant
    folding) into `into`; yields whether it can be asked to leave them out (``export_params=False``).

    The exporter keeps them in a dict that ``_model_to_graph`` returns and no public call exposes;
    where that function is not found (another torch), nothing is recorded and the weights are
    exported as usual."""
    utils = None
    if into is not None:
        try:
            from torch.onnx._internal.torchscript_exporter import utils
        except ImportError:  # pragma: no cover - another torch
            utils = None
    original = getattr(utils, "_model_to_graph", None)
    if original is None:
        yield False
        return

    def recording(*args: Any, **kwargs: Any) -> Any:
        graph, params, out = original(*args, **kwargs)
        into.update(params)
        return graph, params, out

    utils._model_to_graph = recording
    try:
        yield True
    finally:
        utils._model_to_graph = original


def _attach_weights(model: onnx.ModelProto, weights: dict[str, torch.Tensor], input_names: list[str], module: torch.nn.Module) -> Any:
    """Turn the weight inputs of a model exported with ``export_params=False`` into initializers:
    stored (`WeightStore`, no copy) from `EXTERNAL_MIN_BYTES` on, written into the model below.
    Returns the store, or None, with `model` unchanged, when a weight is missing or of a kind a store cannot hold."""
    from onnx import numpy_helper

    from fxopt.output.onnx_weights import EXTERNAL_MIN_BYTES, WeightStore, storable

    inputs = [i for i in model.graph.input if i.name not in input_names]
    if any(i.name not in weights or not storable(weights[i.name]) for i in inputs):
        return None
    store = WeightStore()
    store.track(module.state_dict(keep_vars=True).items())  # what the exporter's folded weights were computed from
    for value_info in inputs:
        tensor = weights[value_info.name].detach()
        if tensor.numel() * tensor.element_size() >= EXTERNAL_MIN_BYTES:
            model.graph.initializer.append(store.add(value_info.name, tensor))
        else:
            model.graph.initializer.append(numpy_helper.from_array(tensor.cpu().contiguous().numpy().copy(), value_info.name))
    kept = [i for i in model.graph.input if i.name in input_names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return store


def _is_branch(w: warnings.WarningMessage, module: torch.nn.Module) -> bool:
    """An `if`/`while` on a tensor ("Converting a tensor to a Python boolean") inside a leaf.

    Only a leaf can branch on values: the rest of the graph was traced by fxopt, which
    specialised shape-only conditions and made every value-dependent one a leaf. Outside the
    leaves these warnings are shape checks in wrapped library code (torchvision's Swin padding,
    timm's asserts), static for the file's static shapes; they become report notes.
    """
    return "Python boolean" in str(w.message) and bool(_leaf_at(module, w.filename, w.lineno))


def _code_spans(cls: type) -> list[tuple[str, int, int]]:
    # (file, first line, last line) of each function a class defines: works for generated source too
    spans = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch."):
            continue
        for value in vars(klass).values():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None:
                lines = [line for _, _, line in code.co_lines() if line is not None]
                spans.append((code.co_filename, code.co_firstlineno, max(lines, default=code.co_firstlineno)))
    return spans


def _leaf_at(module: torch.nn.Module, filename: str, lineno: int) -> str:
    """The leaf (or a submodule of it) whose class code holds ``filename:lineno`` ('' if none)."""
    from fxopt.frontend.tracing import leaves_of

    if not isinstance(module, torch.fx.GraphModule):
        return ""
    for leaf in leaves_of(module):
        try:
            inner = module.get_submodule(leaf.path)
        except AttributeError:
            continue
        for cls in {type(m) for m in inner.modules()}:
            if any(file == filename and first <= lineno <= last for file, first, last in _code_spans(cls)):
                return f"leaf '{leaf.path}' ({leaf.module_type})"
    return ""


def _finding(w: warnings.WarningMessage, module: torch.nn.Module) -> str:
    where = _leaf_at(module, w.filename, w.lineno)
    source = linecache.getline(w.filename, w.lineno).strip()
    first = str(w.message).split(". ")[0]
    return f"{where + ' at ' if where else ''}{w.filename}:{w.lineno}: `{source}`: {first} (TorchScript exporter warning)"


def _scriptable_copy(module: torch.nn.Module) -> torch.nn.Module:
    module = copy.deepcopy(module)
    if isinstance(module, torch.fx.GraphModule):
        # fx writes the user's annotations as aliases (`_torch_Tensor_`) TorchScript cannot resolve
        for node in module.graph.nodes:
            node.type = None
            if node.op == "output":  # a scripted dict/list output has no ONNX form: flat tuple, same order
                node.args = (tuple(pytree.tree_leaves(node.args[0])),)
        module.recompile()
    return module


def _export_scripted(module: torch.nn.Module, export: Any, branches: list[str]) -> tuple[bytes, list[str], str]:
    """Export `module` scripted, so data-dependent branches become ONNX If nodes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(_scriptable_copy(module))
        data, tracer_warnings = export(scripted, False)
    except Exception as exc:  # noqa: BLE001 - any scripting failure leaves only the refusal
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        raise ExportError(
            "data-dependent control flow would be frozen into the ONNX file (the exporter records only the "
            f"branch the example inputs took): {'; '.join(branches)}. Scripting the graph to keep the branch "
            f"as an ONNX If failed ({reason[:300]}). Write the branch as tensor ops (torch.where) or make the "
            "module scriptable."
        ) from exc
    findings = [f"lowered with torch.jit.script so this branch is an ONNX If: {b}" for b in branches]
    return data, findings + [f"(scripted export) {w.message}" for w in tracer_warnings], "script"


def _cleanup(model: onnx.ModelProto, tensorrt_version: str | None = None, rewrites: list[str] | None = None) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    from fxopt.backends.onnx_rewrites import rewrite_for_tensorrt

    graph = gs.import_onnx(model)
    _read_stored_in_place(graph)
    try:
        _fold_constants(graph)
    except Exception as exc:  # noqa: BLE001 - folding is an optimisation; the unfolded graph is valid
        warnings.warn(f"onnx-graphsurgeon constant folding skipped: {exc}", stacklevel=2)
    if tensorrt_version is not None:
        applied = rewrite_for_tensorrt(graph, tensorrt_version)
        if rewrites is not None:
            rewrites.extend(applied)
    _uniform_constants_to_constant_of_shape(graph)
    graph.cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = model.ir_version
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model.opset_import)
    _scalar_quant_params(cleaned)
    if tensorrt_version is None:  # int32 Q/DQ is ONNX Runtime's; TensorRT 8.5 parses int8 only
        _quantize_gemm_bias(cleaned)
    return cleaned


# ops onnx-graphsurgeon's fold changes beyond evaluating nodes of constant inputs: shapes of static tensors,
# shape-tensor cast elision, branches of a constant condition
_FOLDED_BEYOND_CONSTANTS = frozenset({"Shape", "Size", "Cast", "If", "Loop", "Scan"})
_NEVER_FOLDED = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})  # as onnx-graphsurgeon
_CONSTANT_ATTRS = frozenset({"value", "value_float", "value_floats", "value_int", "value_ints"})


def _fold_constants(graph: Any) -> None:
    """onnx-graphsurgeon's ``fold_constants``, called only where it has something to fold.

    Its first step turns Constant nodes into constant tensors in place; every later step works on a
    copy of the whole graph, which is most of a large file's clean-up. The exporter has already folded
    what torch could, so after the first step (done here the same way) a graph often has no node whose
    inputs are all constant and nothing else the fold changes (`_FOLDED_BEYOND_CONSTANTS`); the fold
    would leave it as it is, and it is not run. The one such node the exporter leaves, an Identity of a
    weight (a weight used twice), becomes the same constant here without running the fold."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues

    for tensor in graph.tensors().values():
        if len(tensor.inputs) != 1 or tensor.inputs[0].op != "Constant":
            continue
        node = tensor.inputs[0]
        if len(node.attrs) != 1 or next(iter(node.attrs)) not in _CONSTANT_ATTRS:
            continue  # onnx-graphsurgeon leaves these too (with a warning)
        value = next(iter(node.attrs.values()))
        if isinstance(value, gs.Node.AttributeRef):
            continue
        tensor.to_constant(value._values if isinstance(value, gs.Constant) else np.array(value))
        tensor.inputs.clear()
    stored = _stored_values_type()
    for node in list(graph.nodes):  # the exporter's Identity of a shared weight: the fold would copy it through ONNX Runtime
        if node.op == "Identity" and len(node.inputs) == 1 and isinstance(node.inputs[0], gs.Constant) and len(node.outputs) == 1:
            source = node.inputs[0]._values
            if isinstance(source, stored):  # a lean model's weight: a second reference to the same array
                node.outputs[0].to_constant(stored(alias(source.tensor, node.outputs[0].name)))
            else:
                # its own values, as the fold's run gives: a weight still in the imported file is one TensorProto, which
                # the exporter renames in place for each constant holding it (two initializers of one name)
                node.outputs[0].to_constant(source.load() if isinstance(source, LazyValues) else source)
            node.outputs[0].inputs.clear()
    if _has_foldable(graph):
        _load_fold_inputs(graph)
        graph.fold_constants()


@functools.cache
def _stored_values_type() -> type:
    """onnx-graphsurgeon's lazy values of a stored weight (`fxopt.output.onnx_weights`): read from the store in place,
    and exported as the same external reference."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    class StoredValues(LazyValues):
        def load(self) -> np.ndarray:
            return tensor_values(self.tensor)

    return StoredValues


def _read_stored_in_place(graph: Any) -> None:
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues

    stored = _stored_values_type()
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and type(tensor._values) is LazyValues and is_stored(tensor._values.tensor):
            tensor._values = stored(tensor._values.tensor)


def _load_fold_inputs(graph: Any) -> None:
    """Give the stored weights the fold evaluates their values: it runs those nodes in ONNX Runtime on a model of its
    own, which has no store. The fold evaluates every node whose inputs are constants or outputs of such nodes,
    in subgraphs too (a weight the exporter could not fold itself is rare and small)."""
    import onnx_graphsurgeon as gs

    stored = _stored_values_type()
    folded: set[int] = set()

    def nodes(g: Any) -> Iterator[Any]:
        for node in g.nodes:
            yield node
            for sub in node.subgraphs():
                yield from nodes(sub)

    grew = True
    while grew:  # to a fixed point: the graph need not be in order here
        grew = False
        for node in nodes(graph):
            if node.op in _NEVER_FOLDED or all(id(t) in folded for t in node.outputs):
                continue
            if all(isinstance(t, gs.Constant) or t.is_empty() or id(t) in folded for t in node.inputs):
                folded.update(id(t) for t in node.outputs)
                grew = True
                for t in node.inputs:
                    if isinstance(t, gs.Constant) and isinstance(t._values, stored):
                        t._values, t.data_location = np.array(t._values.load()), None  # the values now live in the proto


def _has_foldable(graph: Any) -> bool:
    import onnx_graphsurgeon as gs

    if graph.functions:
        return True
    for node in graph.nodes:
        if not node.outputs:
            continue  # a node lowered above (its outputs are constants now), or dead: the clean-up drops it
        if node.op in _FOLDED_BEYOND_CONSTANTS or any(True for _ in node.subgraphs()):
            return True
        if node.op not in _NEVER_FOLDED and all(t.is_empty() or isinstance(t, gs.Constant) for t in node.inputs):
            return True
    return False


def _scalar_quant_params(model: onnx.ModelProto) -> int:
    """Write a per-tensor QuantizeLinear/DequantizeLinear's scale and zero point as scalars.

    The TorchScript exporter writes a one-element tensor (shape ``[1]``) for a fake-quant module's
    scale buffer. ONNX reads a 1-D scale as per-axis, and ONNX Runtime's QDQ fusions check for a
    scalar: with ``[1]`` its DQ -> Add -> Q never becomes QLinearAdd (measured on resnet18: 0 of
    8 adds fused, 8 with scalars). TensorRT's Q/DQ examples use scalars too. An initializer read
    by anything else than such a parameter slot keeps its shape. Returns how many were reshaped.
    """
    slots: dict[str, list[bool]] = {}
    for node in model.graph.node:
        per_tensor = node.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(a.name == "axis" for a in node.attribute)
        for index, name in enumerate(node.input):
            slots.setdefault(name, []).append(per_tensor and index in (1, 2))
    outputs = {o.name for o in model.graph.output}
    reshaped = 0
    for tensor in model.graph.initializer:
        if list(tensor.dims) == [1] and tensor.name not in outputs and all(slots.get(tensor.name, [False])):
            del tensor.dims[:]
            reshaped += 1
    return reshaped


def _quantize_gemm_bias(model: onnx.ModelProto) -> int:
    """Give a Gemm with both operands dequantised from int8 an int32 bias behind a DequantizeLinear.

    ONNX Runtime fuses DQ(A), DQ(B), DQ(int32 C) -> Gemm into QGemm only when every input is
    dequantised; with a float bias the Gemm runs in float and B's DequantizeLinear runs on every
    inference (measured on resnet18's 512 x 1000 head: 0.20 ms of 1.75). The bias is rounded to
    the grid ``scale_A * scale_B`` (an error of half a step of that product, far below the int8
    steps around it), the scheme ONNX Runtime's own quantize_static writes. Returns how many.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1

    def dequantised(name: str) -> tuple[np.ndarray, onnx.NodeProto] | None:
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in initializers:
            return None
        if len(node.input) > 2 and node.input[2] in initializers and tensor_values(initializers[node.input[2]]).any():
            return None  # a non-zero zero point
        return tensor_values(initializers[node.input[1]]).astype(np.float64), node

    done = 0
    for node in list(graph.node):
        if node.op_type != "Gemm" or len(node.input) != 3 or node.input[2] not in initializers or readers.get(node.input[2]) != 1:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        a, b = dequantised(node.input[0]), dequantised(node.input[1])
        if a is None or b is None or a[0].size != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        bias = tensor_values(initializers[node.input[2]]).astype(np.float64)
        b_axis = next((x.i for x in b[1].attribute if x.name == "axis"), 1)
        columns_axis = 0 if attrs.get("transB", 0) else 1
        if bias.ndim != 1 or (b[0].size > 1 and (b_axis != columns_axis or b[0].size != bias.size)):
            continue
        scale = (a[0].reshape(()) * b[0]).astype(np.float32)
        q = np.round(bias / scale.astype(np.float64))
        if np.abs(q).max(initial=0) >= 2**31 - 1 or not np.all(scale > 0):
            continue
        name = node.input[2]
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([numpy_helper.from_array(q.astype(np.int32), f"{name}_int32"),
                                  numpy_helper.from_array(scale if scale.size > 1 else scale.reshape(()), f"{name}_int32_scale")])
        dq = onnx.helper.make_node("DequantizeLinear", [f"{name}_int32", f"{name}_int32_scale"], [f"{name}_dequantized"],
                                   name=f"{node.name}_bias_dq", **({"axis": 0} if scale.size > 1 else {}))
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[2] = f"{name}_dequantized"
        done += 1
    return done


# A uniform constant this large is written as ConstantOfShape (a canvas of zeros, a mask of ones).
UNIFORM_CONSTANT_MIN_BYTES = 64 * 1024


def _uniform_constants_to_constant_of_shape(graph: Any) -> int:
    """Replace large constants whose elements are all equal by ConstantOfShape nodes.

    The TorchScript exporter writes ``x.new_zeros(static_shape)`` as a full Constant: a BEV
    canvas becomes tens of MB of zeros in the file. Returns how many constants were replaced.
    """
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues

    replaced = 0
    for tensor in list(graph.tensors().values()):
        if not isinstance(tensor, gs.Constant):
            continue
        lazy = tensor._values if isinstance(tensor._values, LazyValues) else None
        if (lazy.nbytes if lazy is not None else tensor.values.nbytes) < UNIFORM_CONSTANT_MIN_BYTES:
            continue
        # a weight still in the imported file is read for the test only: `Constant.values` would keep a numpy copy of
        # it, and of every other weight, until the clean-up ends (the exporter writes a lazy one's own TensorProto)
        values = lazy.load() if lazy is not None else tensor.values
        first = values.reshape(-1)[:1]
        if not (values == first[0]).all():
            continue
        shape = gs.Constant(f"{tensor.name}_shape", np.asarray(values.shape, dtype=np.int64))
        fill = gs.Constant(f"{tensor.name}_fill", first.copy())
        tensor.to_variable(dtype=values.dtype, shape=list(values.shape))
        tensor.type = "tensor_type"  # to_variable leaves it unset and export_onnx needs it
        graph.nodes.append(gs.Node("ConstantOfShape", inputs=[shape], outputs=[tensor], attrs={"value": fill}))
        replaced += 1
    return replaced


_LARGE_MODEL_BYTES = 64 << 20  # a model this large reaches the checker and ONNX Runtime as a file


def _check_model(model: onnx.ModelProto) -> None:
    """`onnx.checker.check_model` with shape inference; a large model from a file (`onnx_weights.written`), a lean one beside
    placeholders of its weights (`fxopt.output.onnx_weights.checked`)."""
    if is_lean(model):
        checked(model)
        return
    if model.ByteSize() < _LARGE_MODEL_BYTES:
        onnx.checker.check_model(model, full_check=True)
        return
    with written(model) as path:
        onnx.checker.check_model(path, full_check=True)


def _session(model: onnx.ModelProto) -> Any:
    """An ONNX Runtime session of `model`; a large one loaded from a file (`onnx_weights.written`), a lean one reading its
    weights in place (`fxopt.output.onnx_weights.session`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if is_lean(model):
        return session(model, options)
    if model.ByteSize() < _LARGE_MODEL_BYTES:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with written(model) as path:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx(exported: OnnxExport, example_inputs: tuple[Any, ...]) -> list[np.ndarray]:
    """Run an exported model in ONNX Runtime (CPU) on tensors; returns its outputs."""
    return _run_session(_session(exported.model), example_inputs)


def _run_session(session: Any, example_inputs: tuple[Any, ...]) -> list[np.ndarray]:
    feed_names = [i.name for i in session.get_inputs()]
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    feed = {name: t.detach().cpu().numpy() for name, t in zip(feed_names, tensors)}
    return session.run(None, feed)


def output_steps(model: onnx.ModelProto) -> list[float | None]:
    """Per graph output, the int8 step it is measured in: the scale of the DequantizeLinear that
    produces it (a quantised output), else ``None``: `error_in_steps` then takes the step a
    symmetric int8 tensor of the output's range would have, ``max|reference| / 127``."""

    initializers = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    steps: list[float | None] = []
    for output in model.graph.output:
        node = producers.get(output.name)
        scale = initializers.get(node.input[1]) if node is not None and node.op_type == "DequantizeLinear" else None
        values = tensor_values(scale) if scale is not None else None
        steps.append(float(values.reshape(-1)[0]) if values is not None and values.size == 1 else None)
    return steps


def error_in_steps(outputs: Sequence[Any], reference: Sequence[torch.Tensor], steps: Sequence[float | None]) -> float:
    """The largest ``|output - reference|`` in units of each output's int8 step (see `output_steps`).

    Example:
        >>> error_in_steps([np.array([1.0, 2.05])], [torch.tensor([1.0, 2.0])], [None])  # step 2/127
        3.175
    """
    worst = 0.0
    for out, ref, step in zip(outputs, reference, steps):
        ref64 = ref.detach().double()
        finite = torch.isfinite(ref64)
        if ref64.numel() == 0 or not finite.any():
            continue
        diff = (torch.as_tensor(np.asarray(out)).double() - ref64)[finite].abs().max()
        unit = step if step else float(ref64[finite].abs().max()) / 127
        if unit > 0:
            worst = max(worst, float(diff) / unit)
    return round(worst, 6)


def _isolated_outputs(exported: OnnxExport, sets: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """ONNX Runtime's outputs on each input set, from a child process (`fxopt.verification.ort_timing.isolated_outputs`)."""
    from fxopt.verification.ort_timing import OrtCrashed, OrtFailed, isolated_outputs

    try:
        return isolated_outputs(exported.model, sets)
    except OrtFailed as exc:
        verb = "load" if exc.stage == "load" else "run"
        raise VerificationError(f"ONNX Runtime cannot {verb} the exported model: {exc}") from exc
    except OrtCrashed as exc:
        raise VerificationError(f"ONNX Runtime crashed on the exported int8 model ({exc}); the file is not usable with this ONNX Runtime") from exc


@dataclass(frozen=True)
class _Int8Noise:
    """An int8 file's outputs against the float graph (`float_module`), beside the fake-quant graph's."""

    float_outputs: list[torch.Tensor]
    quant_error: Any  # the fake-quant graph's `Deviation` from the float graph
    file_error: Any  # the file's

    @staticmethod
    def of(onnx_outputs: list[torch.Tensor], reference: list[torch.Tensor], float_module: torch.nn.Module,
           inputs: tuple[Any, ...]) -> _Int8Noise | None:
        """``None`` when the structures differ (then only the fixed tolerance can pass the file)."""
        float_outputs = flatten_outputs(run_model(float_module, inputs))
        quant_error, file_error = compare_outputs(reference, float_outputs), compare_outputs(onnx_outputs, float_outputs)
        if not (quant_error.same_structure and file_error.same_structure):
            return None
        return _Int8Noise(float_outputs, quant_error, file_error)

    def file_as_good(self, atol: float) -> bool:
        # ONNX Runtime's integer kernels round some values the other way, and each such step travels on
        return self.file_error.max_abs <= QUANT_ERROR_RATIO * self.quant_error.max_abs + atol


@dataclass(frozen=True)
class Parity:
    """What verifying an ONNX file against torch found: the worst errors over every input set.

    Attributes:
        max_abs_error, max_rel_error: the file vs the torch graph.
        max_error_steps: int8 files: the worst error in output int8 steps (`error_in_steps`).
        int8_error, int8_error_steps: given the float graph, the fake-quant graph's own error vs it.
        inputs_checked: input sets compared.
    """

    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    max_error_steps: float | None = None
    int8_error: float | None = None
    int8_error_steps: float | None = None
    inputs_checked: int = 0

    def worst_with(self, other: Parity) -> Parity:
        """The worse of two checks of one file (another batch size); `inputs_checked` stays this one's."""
        def worst(a: float | None, b: float | None) -> float | None:
            return None if a is None and b is None else max(a or 0.0, b or 0.0)

        return Parity(max(self.max_abs_error, other.max_abs_error), max(self.max_rel_error, other.max_rel_error),
                      worst(self.max_error_steps, other.max_error_steps), worst(self.int8_error, other.int8_error),
                      worst(self.int8_error_steps, other.int8_error_steps), self.inputs_checked)

    def record_on(self, exported: OnnxExport) -> OnnxExport:
        exported.max_abs_error, exported.max_rel_error = self.max_abs_error, self.max_rel_error
        exported.max_error_steps, exported.inputs_checked = self.max_error_steps, self.inputs_checked
        exported.int8_error, exported.int8_error_steps = self.int8_error, self.int8_error_steps
        return exported


class _ParityCheck:
    """Compares the file's outputs with torch's set by set, raising on the first set that fails, and
    keeps the worst figures (`Parity`)."""

    def __init__(self, model: onnx.ModelProto, int8: bool, atol: float, rtol: float, float_module: torch.nn.Module | None, sets: int) -> None:
        self.steps, self.int8, self.atol, self.rtol, self.float_module, self.sets = output_steps(model), int8, atol, rtol, float_module, sets
        self.parity = Parity(max_error_steps=0.0 if int8 else None, int8_error=None if float_module is None else 0.0,
                             int8_error_steps=None if float_module is None else 0.0, inputs_checked=sets)

    def add(self, index: int, inputs: tuple[Any, ...], ort_outputs: list[Any], reference: list[torch.Tensor]) -> None:
        onnx_outputs = [torch.from_numpy(np.asarray(o)) for o in ort_outputs]
        deviation = compare_outputs(onnx_outputs, reference)
        noise = _Int8Noise.of(onnx_outputs, reference, self.float_module, inputs) if self.float_module is not None else None
        if not (deviation.within(self.atol, self.rtol) or (noise is not None and noise.file_as_good(self.atol))):
            raise VerificationError(self._failure(index, deviation, noise, ort_outputs, reference))
        found = Parity(deviation.max_abs, deviation.max_rel,
                       error_in_steps(ort_outputs, reference, self.steps) if self.int8 else None,
                       noise.quant_error.max_abs if noise is not None else None,
                       error_in_steps(noise.float_outputs, reference, self.steps) if noise is not None else None)
        self.parity = self.parity.worst_with(found)

    def _failure(self, index: int, deviation: Any, noise: _Int8Noise | None, ort_outputs: list[Any], reference: list[torch.Tensor]) -> str:
        which = "the example inputs" if index == 0 else f"verification input set {index} of {self.sets} (a seeded variant or calibration batch)"
        share = (f", nor is its error vs the float graph {noise.file_error.max_abs:.3g} within {QUANT_ERROR_RATIO:g} x the fake-quant "
                 f"graph's {noise.quant_error.max_abs:.3g} + {self.atol:g}") if noise is not None else ""
        steps = f", {error_in_steps(ort_outputs, reference, self.steps):.1f} output int8 steps" if self.int8 else ""
        return (f"ONNX Runtime output differs from torch on {which}: max abs error {deviation.max_abs:.3g} "
                f"(allowed {self.atol:g} + {self.rtol:g} x {deviation.reference_scale:.3g}{share}){steps} {deviation.detail}")


def _onnx_runtime_outputs(exported: OnnxExport, sets: list[tuple[Any, ...]], int8: bool) -> Iterator[list[Any]]:
    """ONNX Runtime's outputs on each input set: a file with Q/DQ in a child process (a native crash
    becomes a `VerificationError`), any other in this one."""
    if int8:
        yield from _isolated_outputs(exported, sets)
        return
    try:
        session = _session(exported.model)
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime cannot load the exported model: {exc}") from exc
    for inputs in sets:
        try:
            yield _run_session(session, inputs)
        except Exception as exc:
            raise VerificationError(f"ONNX Runtime cannot run the exported model: {exc}") from exc


def onnx_parity(
    exported: OnnxExport,
    module: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    check_inputs: Sequence[tuple[Any, ...]] = (),
    float_module: torch.nn.Module | None = None,
    known_outputs: Sequence[tuple[tuple[Any, ...], Any]] = (),
) -> Parity:
    """`verify_onnx`'s check, returning what it found instead of recording it on `exported`.

    `known_outputs`: (input set, `module`'s outputs on it) pairs already computed (the pass
    manager's last check, `PipelineResult.known_outputs`); a set given here, the same object, is not
    run through `module` again."""
    sets = [tuple(example_inputs)] + [tuple(s) for s in check_inputs if s is not example_inputs]
    int8 = bool({"QuantizeLinear", "DequantizeLinear"} & exported.op_types())
    check = _ParityCheck(exported.model, int8, atol, rtol, float_module, len(sets))
    known = {id(inputs): outputs for inputs, outputs in known_outputs}
    for index, (inputs, outputs) in enumerate(zip(sets, _onnx_runtime_outputs(exported, sets, int8))):
        reference = known[id(inputs)] if id(inputs) in known else run_model(module, inputs)
        check.add(index, inputs, outputs, flatten_outputs(reference))
    return check.parity


def verify_onnx(
    exported: OnnxExport,
    module: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    check_inputs: Sequence[tuple[Any, ...]] = (),
    float_module: torch.nn.Module | None = None,
) -> OnnxExport:
    """Run the ONNX model in ONNX Runtime and compare with `module` on the same inputs.

    Args:
        check_inputs: more input sets of the example's shapes to compare on (seeded variants,
            calibration batches); the example inputs are always checked first.
        float_module: for an int8 `module` (fake quantisation), the same graph without it. ONNX
            Runtime's kernels round some values the other way than torch, and each such step
            travels through the later layers: a deep int8 file also passes when its error vs
            this float graph is within `QUANT_ERROR_RATIO` x the fake-quant graph's.

    Returns:
        `exported`, with what the check found (`Parity`) recorded on it.

    Raises:
        VerificationError: outputs differ beyond ``atol + rtol * max|reference|`` (and, given
            `float_module`, the file is further from it than allowed above) on any input set (the
            message says which), or ORT fails.

    A file with Q/DQ nodes runs in a child process (a native crash of ONNX Runtime becomes a
    `VerificationError`), and its worst error is also given in output int8 steps
    (``max_error_steps``, `error_in_steps`): a step or two is integer rounding, more is a mismatch.
    """
    parity = onnx_parity(exported, module, example_inputs, atol=atol, rtol=rtol, check_inputs=check_inputs, float_module=float_module)
    return parity.record_on(exported)


def lower(
    module: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    target: str | TargetProfile,
    *,
    verify: bool = True,
    check_inputs: Sequence[tuple[Any, ...]] = (),
    dynamic_batch: tuple[int, int, int] | None = None,
    float_module: torch.nn.Module | None = None,
    known_outputs: Sequence[tuple[tuple[Any, ...], Any]] = (),
    keep_weights_out: bool | None = False,
) -> OnnxExport:
    """Export at the target's highest opset, rewritten for its TensorRT release where it has one, and
    verify in ONNX Runtime on the example inputs and every set in `check_inputs`.

    A file with Q/DQ nodes (int8) is compared with the torch fake-quant graph at the int8
    tolerance, or, when `float_module` (the graph without fake quantisation) is given, by being
    about as close to it as the fake-quant graph (`QUANT_ERROR_RATIO`): ONNX Runtime runs integer
    kernels whose rounding can move a value by a step.

    `known_outputs`: `module`'s outputs already computed on some of these input sets (see `onnx_parity`).
    `keep_weights_out`: see `export_onnx` (`compile` passes None: lean from `LEAN_MIN_BYTES` on).

    With ``dynamic_batch=(min, opt, max)`` dim 0 of every input and output is a symbolic batch axis,
    and the file is also verified at each of the three batch sizes (`batch_inputs`).

    Raises:
        VerificationError: at some batch size ONNX Runtime fails or differs from torch (a size
            the graph has baked in, e.g. ``x.view(1, -1)``).
    """
    profile = get_target(target)
    known = {id(inputs): outputs for inputs, outputs in known_outputs}
    exported = export_onnx(module, example_inputs, opset=profile.max_onnx_opset, tensorrt_version=profile.tensorrt_version,
                           dynamic_batch=dynamic_batch is not None, outputs=known.get(id(example_inputs)), keep_weights_out=keep_weights_out)
    if not verify:
        return exported
    atol, rtol = TOLERANCES["int8"] if "QuantizeLinear" in exported.op_types() else (ATOL, RTOL)
    parity = onnx_parity(exported, module, example_inputs, check_inputs=check_inputs, atol=atol, rtol=rtol, float_module=float_module,
                         known_outputs=known_outputs)
    if dynamic_batch is not None:
        for size in sorted(set(dynamic_batch)):
            try:
                parity = parity.worst_with(onnx_parity(exported, module, batch_inputs(example_inputs, size), atol=atol, rtol=rtol,
                                                       float_module=float_module))
            except VerificationError as exc:
                raise VerificationError(f"dynamic_batch: at batch size {size}: {exc} (does the model fix its batch size, "
                                        "e.g. x.view(1, -1) or a size read as a constant?)") from None
        exported.dynamic_batch, exported.batch_sizes_checked = tuple(dynamic_batch), sorted(set(dynamic_batch))
    parity.record_on(exported)
    return exported


def batch_inputs(inputs: tuple[Any, ...], size: int) -> tuple[Any, ...]:
    """`inputs` at batch `size`: every tensor's dim 0 repeated (seeded noise added to float inputs,
    so rows differ and a mixed-up batch shows) or cut to `size` rows."""
    generator = torch.Generator().manual_seed(size)
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            out.append(x)
            continue
        reps = -(-size // x.shape[0])
        y = x.repeat(reps, *([1] * (x.dim() - 1)))[:size].clone()
        if y.is_floating_point():
            y = y + 0.1 * y.std().clamp_min(1e-3) * torch.randn(y.shape, generator=generator, dtype=y.dtype)
        out.append(y)
    return tuple(out)
