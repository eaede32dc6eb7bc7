"""ONNX clean-up rewrites for older TensorRT releases: an op the target's parser lacks becomes its primitives.

`export_onnx(..., tensorrt_version=...)` runs `rewrite_for_tensorrt` inside its onnx-graphsurgeon clean-up,
so every rewritten file is verified against torch in ONNX Runtime like any other export (`verify_onnx`).
A rewrite is a row of `REWRITES`: the op, the first TensorRT release that imports it natively, and the
function that replaces one node. A rewrite that cannot apply to a node (say, an unknown rank) leaves it
alone, and the compatibility check (`fxopt.backends.tensorrt_compat`) reports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fxopt.backends.tensorrt_ops import parse_version

__all__ = ["OnnxRewrite", "REWRITES", "rewrite_for_tensorrt", "decompose_layer_norm"]


@dataclass(frozen=True)
class OnnxRewrite:
    """Replace `op_type` for TensorRT releases before `native_from`; `apply` returns False to leave a node."""

    op_type: str
    native_from: str
    apply: Callable[[Any, Any], bool]
    note: str


def _const(name: str, value: np.ndarray) -> Any:
    import onnx_graphsurgeon as gs

    return gs.Constant(name, np.asarray(value))


def _op(graph: Any, op: str, name: str, inputs: list[Any], attrs: dict[str, Any] | None = None, dtype: Any = None, shape: Any = None) -> Any:
    import onnx_graphsurgeon as gs

    out = gs.Variable(f"{name}_out", dtype=dtype, shape=shape)
    graph.nodes.append(gs.Node(op, name=name, inputs=inputs, outputs=[out], attrs=attrs or {}))
    return out


def decompose_layer_norm(graph: Any, node: Any) -> bool:
    """LayerNormalization(X, scale, bias) -> (X - mean) / sqrt(var + eps) * scale + bias, two-pass.

    The pattern is the one torch exports below opset 17 (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt,
    Div, Mul, Add), which TensorRT 8.5 recognises; subtracting the mean before squaring keeps the
    variance exact for inputs with a large mean. The optional Mean / InvStdDev outputs are kept.
    """
    x = node.inputs[0]
    axis = int(node.attrs.get("axis", -1))
    eps = float(node.attrs.get("epsilon", 1e-5))
    rank = len(x.shape) if x.shape is not None else None
    if axis >= 0 and rank is None:
        return False
    axes = list(range(axis - rank, 0)) if axis >= 0 else list(range(axis, 0))
    low_precision = x.dtype == np.float16 and int(node.attrs.get("stash_type", 1)) == 1
    name = node.name or "LayerNormalization"
    dtype = np.float32 if low_precision else (x.dtype or np.float32)
    src = _op(graph, "Cast", f"{name}/to_float", [x], {"to": 1}, np.float32, x.shape) if low_precision else x
    # a -> ReduceMean(a); a - mean; Pow(., 2); ReduceMean -> var; sqrt(var + eps); divide
    mean = _op(graph, "ReduceMean", f"{name}/ReduceMean", [src], {"axes": axes, "keepdims": 1}, dtype)
    centred = _op(graph, "Sub", f"{name}/Sub", [src, mean], dtype=dtype, shape=x.shape)
    square = _op(graph, "Pow", f"{name}/Pow", [centred, _const(f"{name}/two", np.array(2.0, dtype=dtype))], dtype=dtype, shape=x.shape)
    var = _op(graph, "ReduceMean", f"{name}/ReduceMean_1", [square], {"axes": axes, "keepdims": 1}, dtype)
    shifted = _op(graph, "Add", f"{name}/Add", [var, _const(f"{name}/epsilon", np.array(eps, dtype=dtype))], dtype=dtype)
    std = _op(graph, "Sqrt", f"{name}/Sqrt", [shifted], dtype=dtype)
    y = _op(graph, "Div", f"{name}/Div", [centred, std], dtype=dtype, shape=x.shape)
    if low_precision:
        y = _op(graph, "Cast", f"{name}/to_half", [y], {"to": 10}, np.float16, x.shape)
    y = _op(graph, "Mul", f"{name}/Mul", [y, node.inputs[1]], dtype=x.dtype, shape=x.shape)
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        y = _op(graph, "Add", f"{name}/Add_1", [y, node.inputs[2]], dtype=x.dtype, shape=x.shape)
    outputs = [y, mean, None]
    if len(node.outputs) > 2 and node.outputs[2].outputs:
        outputs[2] = _op(graph, "Reciprocal", f"{name}/Reciprocal", [std], dtype=dtype)
    for old, new in zip(node.outputs, outputs):
        if new is None or not (old.outputs or old in graph.outputs):
            continue
        _rewire(graph, old, new)
    node.outputs.clear()
    return True


def _rewire(graph: Any, old: Any, new: Any) -> None:
    # consumers of `old` read `new`; a graph output keeps its name through an Identity
    import onnx_graphsurgeon as gs

    for consumer in list(old.outputs):
        for i, tensor in enumerate(list(consumer.inputs)):
            if tensor is old:
                consumer.inputs[i] = new
    if old in graph.outputs:
        old.inputs.clear()
        graph.nodes.append(gs.Node("Identity", name=f"{old.name}/keep_name", inputs=[new], outputs=[old]))


# op -> the first release that imports it (onnx-tensorrt Changelog, 8.6 EA) and its decomposition
REWRITES: tuple[OnnxRewrite, ...] = (
    OnnxRewrite(
        "LayerNormalization", "8.6", decompose_layer_norm,
        "LayerNormalization decomposed into ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add (TensorRT < 8.6 has no importer); "
        "under fp16 TensorRT 8.5 may overflow in the variance of large activations: keep these layers in fp32 "
        "(trtexec --precisionConstraints=obey --layerPrecisions=<name>:fp32) if the engine's outputs drift",
    ),
)


def rewrite_for_tensorrt(graph: Any, tensorrt_version: str) -> list[str]:
    """Apply every rewrite of `REWRITES` that `tensorrt_version` needs to an onnx-graphsurgeon graph.

    Returns:
        One line per rewrite that changed something: how many nodes, and the rewrite's note.
        The caller runs ``graph.cleanup().toposort()`` afterwards.
    """
    version = parse_version(tensorrt_version)
    lines = []
    for rewrite in REWRITES:
        if version >= parse_version(rewrite.native_from):
            continue
        done = [n.name for n in list(graph.nodes) if n.op == rewrite.op_type and rewrite.apply(graph, n)]
        if done:
            lines.append(f"{len(done)} x {rewrite.note}")
    return lines
