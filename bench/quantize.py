"""Int8 post-training quantisation, fxopt vs its peers, on the same trained models and calibration data.

    python bench/quantize.py [--filter REGEX] [--runs 100] [--size 64]     (make bench-quant)

Per model, one fp32 ONNX file (fxopt's fp32 `cpu` compile: BatchNorm folded) is the reference and
the input of the ONNX-level tools; every tool gets the same calibration batches (batch 1):

- fxopt `cpu` and `xavier` (`precision="int8"`, default entropy calibrator; model inputs "max");
- ONNX Runtime `quantize_static` (QDQ, S8S8, per-channel weights, MinMax; after `quant_pre_process`);
- NNCF `nncf.quantize` on the ONNX file (defaults: performance preset, bias correction);
- torch.ao FX mode (`prepare_fx`/`convert_fx`, x86 qconfig and backend config) exported to ONNX
  (TorchScript exporter); timed in torch and marked so where the export fails;
- NVIDIA ModelOpt ONNX PTQ (`modelopt.onnx.quantization.quantize`, int8, its default calibration,
  CPU calibration, fp32 elsewhere so ONNX Runtime CPU can run it).

A tool that is not installed or fails is listed with its error; the bench goes on. Latency is ONNX
Runtime on the CPU with one thread, all files of a model interleaved run by run, median of `--runs`.
Writes bench/results/quantize.md on a full run (no --filter).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import fxopt
from fxopt.output.files import write_atomic
from fxopt.passes import QuantizeInt8

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/provenance.py, also when loaded by path
from provenance import code_version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "bench" / "results" / "quantize.md"
WEIGHTED = {"Conv": "conv", "ConvTranspose": "conv", "Gemm": "dense", "MatMul": "dense"}
QDQ = {"QuantizeLinear", "DequantizeLinear"}
# ops ONNX Runtime and TensorRT run on int8 as they are (a DQ moves across them)
PASS_THROUGH = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
# ONNX Runtime's int8 kernels, as its graph optimiser leaves them (QDQ groups fused)
ORT_INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
                    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
                    "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
# TensorRT fuses these into the conv/gemm before them; a Q/DQ between the two splits the fusion.
EPILOGUE = {"Relu", "Add", "Sum", "Sigmoid", "Clip", "LeakyRelu", "BatchNormalization", "Mul", "HardSigmoid"}
# TensorRT runs these in int8 or moves a DQ across them (Q/DQ propagation), so a DQ may feed them.
INT8_CONSUMERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool", "GlobalAveragePool",
                  "Concat", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Pad", "Resize"}


# --- models, data ------------------------------------------------------------------------------------

@dataclass
class Case:
    """A trained fp32 model with its calibration batches and evaluation inputs (all batch 1)."""

    name: str
    model: nn.Module
    calib: list[tuple[torch.Tensor]]
    eval_inputs: torch.Tensor  # (N, ...) evaluated one at a time
    labels: torch.Tensor | None  # None: accuracy is top-1 agreement with fp32
    note: str


def digits_case(seed: int = 0) -> Case:
    from fxopt.models.digits import DigitsCNN, accuracy, fit, load_digits_split

    split = load_digits_split(seed)
    torch.manual_seed(seed)
    model = DigitsCNN(width=16)
    fit(model, split.x_train, split.y_train, epochs=10, seed=seed)
    model.eval()
    acc = accuracy(model, split.x_test, split.y_test)
    calib = [(split.x_train[i:i + 1],) for i in range(0, 256, 8)]  # 32 training images
    return Case("digits CNN (width 16)", model, calib, split.x_test, split.y_test,
                f"scikit-learn digits, trained here 10 epochs (torch accuracy {acc:.4f}); "
                f"{len(split.y_test)} test images; calibration: 32 training images")


def structured_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images (coarse noise upsampled, per-image colour and contrast) plus fine noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 6, 6, generator=g)
    images = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = images * (0.5 + torch.rand(n, 1, 1, 1, generator=g)) + 0.5 * torch.randn(n, 3, 1, 1, generator=g)
    return images + 0.1 * torch.randn(n, 3, size, size, generator=g)


def resnet18_case(size: int = 64) -> Case:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.train()
    with torch.no_grad():  # BatchNorm statistics from data, so the random net is well scaled
        for batch in structured_images(128, size, seed=100).split(32):
            model(batch)
    model.eval()
    calib = [(x.unsqueeze(0),) for x in structured_images(32, size, seed=1)]
    return Case(f"resnet18 1x3x{size}x{size} (random weights)", model, calib, structured_images(200, size, seed=2),
                None, "torchvision resnet18, random init, BatchNorm statistics from 128 structured images; "
                "accuracy = top-1 agreement with fp32 on 200 seeded structured images; calibration: 32 others")


# --- the tools ----------------------------------------------------------------------------------------

def input_name(model: onnx.ModelProto) -> str:
    initializers = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in initializers)


def fxopt_int8(target: str, keep_faster: bool = True, int8_weights: str | None = None) -> Callable[[Case, onnx.ModelProto], onnx.ModelProto]:
    def run(case: Case, fp32: onnx.ModelProto) -> onnx.ModelProto:
        passes = None if keep_faster and int8_weights is None else ["fold_batchnorm", QuantizeInt8(keep_faster=keep_faster, int8_weights=int8_weights)]
        compiled = fxopt.compile(case.model, target, example_inputs=case.calib[0], precision="int8",
                                 calib_data=case.calib, passes=passes)
        run.compiled = compiled  # type: ignore[attr-defined]  # the xavier graph is costed later
        quantize = next(r for r in compiled.report.passes if r.name == "quantize")
        run.note = "" if quantize.status == "applied" else f"quantize {quantize.status}: {quantize.reason}"  # type: ignore[attr-defined]
        return compiled.onnx_model

    return run


class _Reader:
    """ONNX Runtime's CalibrationDataReader over the shared batches."""

    def __init__(self, name: str, calib: Sequence[tuple[torch.Tensor]]) -> None:
        self.feeds = iter([{name: b[0].numpy()} for b in calib])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def ort_static(case: Case, fp32: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (os.path.join(tmp, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(fp32, src)
        quant_pre_process(src, pre)
        quantize_static(pre, out, _Reader(input_name(fp32), case.calib), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
        return onnx.load(out)


def nncf_onnx(case: Case, fp32: onnx.ModelProto) -> onnx.ModelProto:
    import nncf

    name = input_name(fp32)
    dataset = nncf.Dataset([{name: b[0].numpy()} for b in case.calib])
    return nncf.quantize(fp32, dataset, subset_size=len(case.calib))


def torch_ao_x86(case: Case, fp32: onnx.ModelProto) -> onnx.ModelProto:
    import io

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.backend_config.x86 import get_x86_backend_config
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(case.model).eval(), get_default_qconfig_mapping("x86"), case.calib[0],
                          backend_config=get_x86_backend_config())
    with torch.no_grad():
        for batch in case.calib:
            prepared(*batch)
    quantized = convert_fx(prepared)
    torch_ao_x86.module = quantized  # type: ignore[attr-defined]  # timed in torch if the export fails
    buffer = io.BytesIO()
    torch.onnx.export(quantized, case.calib[0], buffer, opset_version=17, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


_MODELOPT = """
import sys, numpy as np
from modelopt.onnx.quantization import quantize
src, data, name, out = sys.argv[1:]
quantize(src, quantize_mode="int8", calibration_data={name: np.load(data)}, calibration_eps=["cpu"],
         high_precision_dtype="fp32", output_path=out, log_level="WARNING")
"""


def modelopt_onnx(case: Case, fp32: onnx.ModelProto) -> onnx.ModelProto:
    """In a child process: importing ModelOpt's ONNX quantisation patches ONNX Runtime's quantize_static."""
    import importlib.util

    if importlib.util.find_spec("modelopt") is None:
        raise ImportError("nvidia-modelopt (pip install -e '.[bench]')")
    with tempfile.TemporaryDirectory() as tmp:
        src, data, out = (os.path.join(tmp, f) for f in ("fp32.onnx", "calib.npy", "int8.onnx"))
        onnx.save(fp32, src)
        np.save(data, np.concatenate([b[0].numpy() for b in case.calib]))
        done = subprocess.run([sys.executable, "-c", _MODELOPT, src, data, input_name(fp32), out],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
        return onnx.load(out)


TOOLS: dict[str, Callable[[Case, onnx.ModelProto], onnx.ModelProto]] = {
    "fxopt cpu": fxopt_int8("cpu"),
    "fxopt cpu, int8 forced": fxopt_int8("cpu", keep_faster=False),
    "fxopt cpu, portable weights, int8 forced": fxopt_int8("cpu", keep_faster=False, int8_weights="portable"),
    "fxopt xavier": fxopt_int8("xavier"),
    "ORT quantize_static": ort_static,
    "NNCF": nncf_onnx,
    "torch.ao FX x86": torch_ao_x86,
    "ModelOpt ONNX": modelopt_onnx,
}


# --- what a file quantises ------------------------------------------------------------------------------

def _constants(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from initializers and Constant nodes only (weights and their Q/DQ)."""
    known = {i.name for i in graph.initializer}
    for node in graph.node:  # ONNX nodes are topologically sorted
        if node.op_type == "Constant" or all(not i or i in known for i in node.input):
            known.update(node.output)
    return known


@dataclass
class QdqStats:
    """Q/DQ counts and which ops read an int8 activation (a DequantizeLinear of a non-constant)."""

    quantize: int = 0
    dequantize: int = 0
    nonzero_zero_points: int = 0
    op_kinds: Counter = field(default_factory=Counter)
    # per Conv/ConvTranspose/Gemm/MatMul, in file order: (kind, weight shape, activation int8, weight int8)
    weighted: list[tuple[str, tuple[int, ...], bool, bool]] = field(default_factory=list)


def _zero_point_nonzero(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    if len(node.input) < 3 or not node.input[2]:
        return False
    values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name == node.input[2]}
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == node.input[2]:
            values[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    return node.input[2] in values and bool(np.any(values[node.input[2]]))


def _weight_shape(graph: onnx.GraphProto, tensor: str, producers: dict[str, onnx.NodeProto]) -> tuple[int, ...]:
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    while tensor not in shapes and tensor in producers:
        node = producers[tensor]
        if node.op_type == "Constant":
            return tuple(node.attribute[0].t.dims)
        tensor = node.input[0]
    return shapes.get(tensor, ())


def qdq_stats(model: onnx.ModelProto) -> QdqStats:
    """Count Q/DQ nodes and list the op kinds (and weighted ops) that read int8 tensors."""
    graph = model.graph
    constants = _constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    stats = QdqStats()
    act_dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in constants}
    weight_dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    direct_dq = set(act_dq)
    for node in graph.node:  # an int8 tensor stays int8 through a max-pool, flatten, reshape, ...
        if node.op_type in PASS_THROUGH and node.input[0] in act_dq:
            act_dq.add(node.output[0])
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            stats.quantize += 1
        elif node.op_type == "DequantizeLinear":
            stats.dequantize += 1
        if node.op_type in QDQ and node.input[0] not in constants:
            stats.nonzero_zero_points += _zero_point_nonzero(graph, node)
        if node.op_type in QDQ:
            continue
        if any(i in direct_dq for i in node.input):
            stats.op_kinds[node.op_type] += 1
        if node.op_type in WEIGHTED:
            data = node.input[:2] if node.op_type == "MatMul" and node.input[1] not in constants else node.input[:1]
            weight = node.input[1]
            stats.weighted.append((WEIGHTED[node.op_type], _weight_shape(graph, weight, producers),
                                   all(i in act_dq for i in data), weight in weight_dq or weight in act_dq))
    return stats


def tensorrt_fusion_breaks(model: onnx.ModelProto) -> list[str]:
    """Q/DQ placements that keep TensorRT from fusing or from running a layer in int8.

    - a Q on a conv/gemm output that also feeds its epilogue (ReLU, add, ...): splits conv+epilogue;
    - a DQ of an activation read by an op TensorRT neither runs in int8 nor moves the DQ across;
    - a weighted op with only one of activation / weight quantised (it runs in float);
    - a non-zero zero point (TensorRT's explicit quantisation is symmetric).
    """
    graph = model.graph
    constants = _constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    found = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            source = producers.get(node.input[0])
            if source is not None and source.op_type in WEIGHTED:
                epilogue = [c.op_type for c in consumers.get(node.input[0], []) if c.op_type in EPILOGUE]
                if epilogue:
                    found.append(f"Q on {source.op_type} {source.name} output, which also feeds {epilogue[0]}")
        if node.op_type == "DequantizeLinear" and node.input[0] not in constants:
            for user in consumers.get(node.output[0], []):
                if user.op_type not in INT8_CONSUMERS:
                    found.append(f"DQ {node.name} feeds {user.op_type} {user.name}")
    stats = qdq_stats(model)
    found += [f"{kind} with weight {shape}: only {'weight' if w else 'activation'} int8"
              for kind, shape, a, w in stats.weighted if a != w]
    if stats.nonzero_zero_points:
        found.append(f"{stats.nonzero_zero_points} activation Q/DQ with non-zero zero point")
    return found


def coverage_gaps(fxopt_file: QdqStats, peer: QdqStats) -> list[str] | None:
    """Weighted ops the peer runs in int8 (activation and weight) that fxopt's file does not.

    Ops are matched by kind and order; None when the two files' weighted ops do not line up.
    """
    if len(fxopt_file.weighted) != len(peer.weighted):
        return None
    for (k, s, _, _), (pk, ps, _, _) in zip(fxopt_file.weighted, peer.weighted):
        if k != pk or (s and ps and s != ps):  # a shape behind a Cast/Constant chain is unknown: ()
            return None
    return [f"{k} #{i} {s}" for i, ((k, s, a, w), (_, _, pa, pw)) in enumerate(zip(fxopt_file.weighted, peer.weighted))
            if pa and pw and not (a and w)]


# --- measuring -----------------------------------------------------------------------------------------

def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_kernels(model: onnx.ModelProto) -> str:
    """The int8 kernels ONNX Runtime's graph optimiser leaves in the file it runs (1 thread, CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    kinds = Counter(n.op_type for n in optimized.graph.node)
    int8 = {k: n for k, n in kinds.items() if k in ORT_INT8_KERNELS}
    float_compute = sum(n for k, n in kinds.items() if k in WEIGHTED or k in {"FusedConv", "FusedGemm", "FusedMatMul"})
    return (", ".join(f"{k} {n}" for k, n in sorted(int8.items())) or "none") + f"; float conv/gemm {float_compute}"


def outputs(run: Callable[[np.ndarray], np.ndarray], inputs: torch.Tensor) -> np.ndarray:
    return np.stack([run(x.unsqueeze(0).numpy()).reshape(-1) for x in inputs])


def onnx_runner(model: onnx.ModelProto) -> Callable[[np.ndarray], np.ndarray]:
    s = session(model)
    name = input_name(model)
    return lambda x: s.run(None, {name: x})[0]


def torch_runner(module: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def latencies_ms(runners: Sequence[Callable[[np.ndarray], np.ndarray]], x: np.ndarray, runs: int, warmup: int = 5) -> list[float]:
    """Median latency of each runner, interleaved run by run (a burst of load hits them all)."""
    times: list[list[float]] = [[] for _ in runners]
    for step in range(warmup + runs):
        for run, acc in zip(runners, times):
            t0 = time.perf_counter()
            run(x)
            if step >= warmup:
                acc.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


@dataclass
class Row:
    tool: str
    runner: Callable[[np.ndarray], np.ndarray] | None = None
    onnx: onnx.ModelProto | None = None
    timed_in: str = "ORT"
    error: str = ""
    accuracy: float = float("nan")
    max_error: float = float("nan")
    latency_ms: float = float("nan")
    stats: QdqStats | None = None
    breaks: list[str] = field(default_factory=list)
    kernels: str = "-"
    note: str = ""


def quantize_with(tool: str, case: Case, fp32: onnx.ModelProto) -> Row:
    row = Row(tool)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.onnx = TOOLS[tool](case, fp32)
        row.runner = onnx_runner(row.onnx)
        row.stats, row.breaks = qdq_stats(row.onnx), tensorrt_fusion_breaks(row.onnx)
        row.kernels, row.note = ort_kernels(row.onnx), getattr(TOOLS[tool], "note", "")
    except ImportError as exc:
        row.error = f"not installed: {exc}".splitlines()[0][:160]
    except Exception as exc:  # noqa: BLE001 - a failing tool is reported, the bench goes on
        module = getattr(TOOLS[tool], "module", None)
        if tool.startswith("torch.ao") and module is not None and row.onnx is None:
            row.runner, row.timed_in = torch_runner(module), "torch (ONNX export failed)"
            row.error = f"ONNX export: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        else:
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            traceback.print_exc()
    return row


def score(row: Row, case: Case, reference: np.ndarray) -> None:
    if row.runner is None:
        return
    got = outputs(row.runner, case.eval_inputs)
    row.max_error = float(np.abs(got - reference).max())
    truth = case.labels.numpy() if case.labels is not None else reference.argmax(1)
    row.accuracy = float((got.argmax(1) == truth).mean())


@dataclass
class ModelResult:
    case: Case
    rows: list[Row]
    fp32_ms: float
    fp32_torch_ms: float
    estimates: dict[str, float]
    gaps: dict[str, list[str] | None]


def run_case(case: Case, tools: Sequence[str], runs: int) -> ModelResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32_compiled = fxopt.compile(case.model, "cpu", example_inputs=case.calib[0], precision="fp32")
    fp32 = Row("fp32 (fxopt cpu, BN folded)", onnx_runner(fp32_compiled.onnx_model), fp32_compiled.onnx_model)
    fp32.stats, fp32.kernels = qdq_stats(fp32.onnx), ort_kernels(fp32.onnx)
    reference = outputs(fp32.runner, case.eval_inputs)
    rows = [fp32]
    for tool in tools:
        print(f"  {tool} ...", flush=True)
        rows.append(quantize_with(tool, case, fp32.onnx))
    for row in rows:
        score(row, case, reference)
    x = case.calib[0][0].numpy()
    timed = [r for r in rows if r.runner is not None]
    for row, ms in zip(timed, latencies_ms([r.runner for r in timed], x, runs)):
        row.latency_ms = ms
    fp32_torch_ms = latencies_ms([torch_runner(case.model)], x, runs)[0]  # beside a torch-timed tool
    estimates: dict[str, float] = {}
    xavier = getattr(TOOLS.get("fxopt xavier"), "compiled", None)
    if xavier is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xavier_fp32 = fxopt.compile(case.model, "xavier", example_inputs=case.calib[0], precision="fp16")
        estimates["int8"] = fxopt.estimate_costs(xavier.graph_module, "xavier", "int8").latency_s * 1e3
        estimates["fp16"] = fxopt.estimate_costs(xavier_fp32.graph_module, "xavier", "fp16").latency_s * 1e3
        estimates["int8 (same graph as fp16)"] = fxopt.estimate_costs(xavier_fp32.graph_module, "xavier", "int8").latency_s * 1e3
    ours = next((r.stats for r in rows if r.tool == "fxopt xavier" and r.stats), None)
    gaps = {r.tool: coverage_gaps(ours, r.stats) for r in rows[1:]
            if ours is not None and r.stats is not None and not r.tool.startswith("fxopt")}
    return ModelResult(case, rows, fp32.latency_ms, fp32_torch_ms, estimates, gaps)


# --- the AVX2-only host, emulated -------------------------------------------------------------------------

AVX2_HOST = ("avx2",)  # what fxopt's host detection sees on an AVX2-only x86 CPU


@dataclass
class EmulatedRow:
    tool: str
    accuracy: float = float("nan")
    max_error: float = float("nan")
    max_q: int | None = None
    note: str = ""


def weight_max_q(model: onnx.ModelProto) -> int | None:
    """The largest |q| of the file's int8 weights (constant inputs of a per-channel Q or an int8 DQ)."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    worst = None
    for node in model.graph.node:
        axis = [a.i for a in node.attribute if a.name == "axis"]
        if node.op_type == "QuantizeLinear" and node.input[0] in inits and node.input[1] in inits:
            w, scale = inits[node.input[0]], inits[node.input[1]]
            shape = [1] * w.ndim
            if scale.ndim and axis:
                shape[axis[0]] = -1
            q = np.abs(np.round(w / scale.reshape(shape if scale.ndim else ())))
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].dtype == np.int8:
            q = np.abs(inits[node.input[0]].astype(np.int64))
        else:
            continue
        worst = max(worst or 0, int(q.max()))
    return worst


def run_case_emulated(case: Case, tools: Sequence[str], cpu: str = "Haswell") -> list[EmulatedRow]:
    """Every tool's file run in ONNX Runtime on an emulated AVX2-only CPU (QEMU `cpu`): the outputs such a
    host computes, exact, though not its speed; fxopt compiles as it would on that host."""
    from fxopt.targets.host import simulated_host
    from fxopt.testing.emulated_cpu import run_onnx_emulated_sets

    sets = [(x.unsqueeze(0).numpy(),) for x in case.eval_inputs]
    with warnings.catch_warnings(), simulated_host(AVX2_HOST, name=f"emulated {cpu}"):
        warnings.simplefilter("ignore")
        fp32 = fxopt.compile(case.model, "cpu", example_inputs=case.calib[0], precision="fp32").onnx_model
        files = {"fp32 (fxopt cpu, BN folded)": fp32}
        rows = {}
        for tool in tools:
            print(f"  {tool} (for an AVX2-only host) ...", flush=True)
            try:
                files[tool] = TOOLS[tool](case, fp32)
            except Exception as exc:  # noqa: BLE001 - a failing tool is reported, the bench goes on
                rows[tool] = EmulatedRow(tool, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:140] if str(exc) else ''}")
    reference = None
    for tool, model in files.items():
        got = np.stack([out[0].reshape(-1) for out in run_onnx_emulated_sets(model, sets, cpu)])
        reference = got if reference is None else reference
        truth = case.labels.numpy() if case.labels is not None else reference.argmax(1)
        rows[tool] = EmulatedRow(tool, float((got.argmax(1) == truth).mean()), float(np.abs(got - reference).max()), weight_max_q(model),
                                 getattr(TOOLS.get(tool), "note", ""))
    return [rows[t] for t in ["fp32 (fxopt cpu, BN folded)", *tools] if t in rows]


def render_emulated(case: Case, rows: Sequence[EmulatedRow], cpu: str) -> list[str]:
    metric = "accuracy" if case.labels is not None else "top-1 agreement"
    lines = [f"### {case.name}, on an emulated {cpu} (AVX2, no VNNI)", "",
             f"| tool | {metric} | max abs output error vs fp32 | int8 weights max abs q |", "|---|---|---|---|"]
    for r in rows:
        if r.accuracy != r.accuracy:  # nan: the tool failed
            lines.append(f"| {r.tool} | - | - | - |")
        else:
            lines.append(f"| {r.tool} | {r.accuracy:.4f} | {r.max_error:.4g} | {'-' if r.max_q is None else r.max_q} |")
    notes = [r for r in rows if r.note]
    return lines + [""] + [f"- {r.tool}: {r.note}" for r in notes] + ([""] if notes else [])


def qemu_version() -> str:
    from fxopt.testing.emulated_cpu import emulator

    qemu = emulator()
    if qemu is None:
        return "not installed"
    return subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()[0]


# --- the report ------------------------------------------------------------------------------------------

def _kinds(stats: QdqStats | None) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(stats.op_kinds.items())) if stats and stats.op_kinds else "-"


def _weighted(stats: QdqStats | None) -> str:
    if stats is None or not stats.weighted:
        return "-"
    return f"{sum(a and w for _, _, a, w in stats.weighted)}/{len(stats.weighted)}"


def render_model(result: ModelResult) -> list[str]:
    case, metric = result.case, "accuracy" if result.case.labels is not None else "top-1 agreement"
    lines = [f"## {case.name}", "", case.note + ".", "",
             f"| tool | {metric} | max abs output error vs fp32 | latency ms | vs fp32 | Q / DQ nodes | "
             "int8 conv+gemm (act and weight) | ops reading an int8 activation | ORT runs | TensorRT fusion issues |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result.rows:
        if row.runner is None:
            lines.append(f"| {row.tool} | - | - | - | - | - | - | - | - | {row.error} |")
            continue
        base = result.fp32_ms if row.timed_in == "ORT" else result.fp32_torch_ms
        timed = "" if row.timed_in == "ORT" else f" ({row.timed_in}; torch fp32 {result.fp32_torch_ms:.3f} ms)"
        qdq = f"{row.stats.quantize} / {row.stats.dequantize}" if row.stats else "-"
        issues = f"{len(row.breaks)}: {row.breaks[0]}" + (" ..." if len(row.breaks) > 1 else "") if row.breaks else "0"
        lines.append(f"| {row.tool} | {row.accuracy:.4f} | {row.max_error:.4g} | {row.latency_ms:.3f}{timed} | "
                     f"{row.latency_ms / base:.2f} | {qdq} | {_weighted(row.stats)} | {_kinds(row.stats)} | {row.kernels} | "
                     f"{issues if row.tool != result.rows[0].tool else '-'} |")
    lines.append("")
    if result.estimates:
        e = result.estimates
        lines += [f"fxopt's xavier file, `fxopt.estimate_costs(gm, \"xavier\", ...)`: int8 (Q/DQ graph) "
                  f"{e['int8']:.4f} ms vs fp16 (fp32-compiled graph) {e['fp16']:.4f} ms, ratio "
                  f"{e['int8'] / e['fp16']:.2f}; int8 priced on the fp16 graph (no Q/DQ nodes) {e['int8 (same graph as fp16)']:.4f} ms.", ""]
    for tool, gap in result.gaps.items():
        if gap is None:
            lines.append(f"- vs {tool}: the files' conv/gemm lists do not line up (compared by kind, order and weight shape).")
        elif gap:
            lines.append(f"- vs {tool}: {len(gap)} conv/gemm int8 there but not in fxopt xavier: {', '.join(gap[:4])}.")
        else:
            lines.append(f"- vs {tool}: every conv/gemm it runs in int8 is int8 in fxopt's xavier file too.")
        adds = {r.tool: r.stats.op_kinds.get("Add", 0) for r in result.rows if r.stats}
        if adds.get(tool, 0) > adds.get("fxopt xavier", 0):
            lines[-1] = lines[-1][:-1] + (f"; it feeds int8 into {adds[tool]} Adds, fxopt xavier into "
                                          f"{adds.get('fxopt xavier', 0)} (residual rule: an add with one conv input).")
    notes = [r for r in result.rows if r.error or r.note]
    lines += [""] + [f"- {r.tool}: {r.error or r.note}" for r in notes] + ([""] if notes else [])
    return lines


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("torch", "onnx", "onnxruntime", "nncf", "nvidia-modelopt"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def host_line() -> str:
    from fxopt.targets.host import host_cpu

    cpu = host_cpu()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu.name} ({cpu.architecture}; int8 features {', '.join(cpu.features) or 'none'}; ONNX Runtime int8 kernels: "
            f"{cpu.int8_kernels}; load average at the end {load}: other work on the 2 cores widens the latency noise)")


def render(results: Sequence[ModelResult], args: argparse.Namespace, wall_s: float,
           emulated: Sequence[tuple[Case, list[EmulatedRow]]] = ()) -> str:
    lines = [
        "# Int8 post-training quantisation: fxopt vs ONNX Runtime, NNCF, torch.ao, ModelOpt",
        "",
        f"`python bench/quantize.py --runs {args.runs} --size {args.size}` (`make bench-quant`) at {code_version()}; "
        f"{versions()}; {wall_s:.0f} s wall.",
        "",
        f"Machine: the 2-core shared development host (x86-64, no GPU): {host_line()}. Latency: ONNX Runtime CPU execution "
        f"provider, **one thread**, default graph optimisations, batch 1, every file of a model interleaved run "
        f"by run, median of {args.runs} runs after 5 warm-ups; ratio vs the fp32 file of the same model. "
        "All tools quantise the same fp32 model with the same calibration batches; the ONNX-level tools "
        "(ORT, NNCF, ModelOpt) start from fxopt's fp32 `cpu` file (BatchNorm folded). Each tool runs at its "
        "defaults except where the module docstring says (ORT: per-channel; ModelOpt: fp32 outside Q/DQ, CPU calibration).",
        "",
        "Columns: *int8 conv+gemm*: Conv/ConvTranspose/Gemm/MatMul whose activation and weight are both "
        "dequantised from int8, of all of them. *Ops reading an int8 activation*: op kinds with an input from "
        "a DequantizeLinear of a non-constant tensor. *TensorRT fusion issues* (`tensorrt_fusion_breaks`): a Q "
        "between a conv/gemm and its epilogue (ReLU/add), a DQ read by an op TensorRT neither runs in int8 nor "
        "moves a DQ across, a weighted op with only one side int8, non-zero zero points; it matters for the "
        "xavier files, the CPU-only files are listed for comparison.",
        "",
    ]
    for result in results:
        lines += render_model(result)
    if emulated:
        lines += [
            f"## The same tools for an AVX2-only host (emulated {args.emulate})", "",
            f"Every file run in ONNX Runtime (1 thread) under `qemu-x86_64 -cpu {args.emulate}` ({qemu_version()}): "
            "ONNX Runtime's kernel dispatch sees AVX2 without AVX-512 or VNNI and runs its AVX2 int8 kernels, whose "
            "`vpmaddubsw` sums pairs of u8 x s8 products in saturating int16. Outputs are exact; latency under "
            "emulation means nothing, so none is given (the speed of int8 on such a host is not measured here). "
            "fxopt compiles as it would on that host (`fxopt.targets.host.simulated_host(('avx2',))`: weights at |q| <= 64), except "
            "that `fxopt cpu`'s keep-int8-if-faster timing runs natively on this host. "
            "Errors are against the fp32 file run the same way.", "",
        ]
        for case, rows in emulated:
            lines += render_emulated(case, rows, args.emulate)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="", help="only tools whose name matches (the report is not written)")
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18"], choices=["digits", "resnet18"])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="resnet18 input size")
    parser.add_argument("--emulate", default="Haswell", help="also run every file on this QEMU CPU model (AVX2-only); '' to skip")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    tools = [t for t in TOOLS if re.search(args.filter, t)]
    builders = {"digits": digits_case, "resnet18": lambda: resnet18_case(args.size)}
    results: list[ModelResult] = []
    emulated: list[tuple[Case, list[EmulatedRow]]] = []
    if args.emulate:
        from fxopt.testing.emulated_cpu import emulator

        if emulator() is None:
            print("qemu-x86_64 is not installed (make host-tools): no AVX2-only table", flush=True)
            args.emulate = ""
    for name in args.models:
        print(f"{name}: building", flush=True)
        case = builders[name]()
        results.append(run_case(case, tools, args.runs))
        print("\n".join(render_model(results[-1])), flush=True)
        if args.emulate:
            emulated.append((case, run_case_emulated(case, tools, args.emulate)))
            print("\n".join(render_emulated(case, emulated[-1][1], args.emulate)), flush=True)
    text = render(results, args, time.perf_counter() - start, emulated)
    if not args.filter and args.models == ["digits", "resnet18"]:
        write_atomic(RESULTS_MD, text)
        print(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
