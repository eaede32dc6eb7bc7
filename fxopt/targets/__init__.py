"""Deployment targets as data: device facts, toolchain limits, precisions, alignment, cost-model knobs.

`xavier`, `orin` and `cpu` ship with fxopt; `register_target` adds more.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fxopt.errors import TargetError

PRECISIONS = ("fp32", "fp16", "int8")
BYTES_PER_ELEMENT = MappingProxyType({"fp32": 4, "fp16": 2, "int8": 1})


def _frozen(mapping: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class QuantScheme:
    """Where and how a target runs int8: data the `quantize` pass reads, not rules inside it.

    Attributes:
        quantized_ops: op kinds whose activation inputs get a Q/DQ pair (``conv``,
            ``conv_transpose``, ``linear``, ``matmul``); their weights are quantised per
            output channel.
        residual_add: also quantise the other input of an add whose one input is a quantised
            conv's output, so TensorRT fuses the add into the conv's epilogue in int8.
        symmetric: zero point 0 (TensorRT's explicit quantisation accepts nothing else).
        quantize_outputs: also quantise the outputs of those ops (after a ReLU that follows one)
            and of adds fed by them, so a runtime that fuses DQ -> op -> Q runs the op in int8.
        unsigned_after_relu: quantise a ReLU's output as uint8 with zero point 0 (its range is
            never negative), which lets ONNX Runtime fold the ReLU into the conv.
        weight_range: ``"full"``: weights use |q| <= 127 (the runtime sums int8 products in int32);
            ``"host"``: decided from the compiling host's CPU (`fxopt.targets.host.int8_weights_for`: ONNX
            Runtime's x86 kernels without VNNI saturate on full-range weights, so they get |q| <= 64).
        source: where the rules come from.
    """

    quantized_ops: tuple[str, ...] = ("conv", "conv_transpose", "linear", "matmul")
    residual_add: bool = True
    symmetric: bool = True
    quantize_outputs: bool = False
    unsigned_after_relu: bool = False
    weight_range: str = "full"
    source: str = ""

    def __post_init__(self) -> None:
        if self.weight_range not in ("full", "host"):
            raise TargetError(f"QuantScheme.weight_range must be 'full' or 'host', got {self.weight_range!r}")


# TensorRT 8.5 explicit quantisation (Q/DQ): symmetric int8, per-channel weights, Q/DQ on the
# inputs of conv/deconv/gemm/matmul and on a residual add's other input, which TensorRT fuses
# into the conv (TensorRT developer guide, "Working with INT8": Q/DQ layer placement).
TENSORRT_QDQ = QuantScheme(source="TensorRT 8.5 developer guide, explicit quantization (Q/DQ placement)")
# ONNX Runtime on x86: QDQ with signed int8 activations and weights ("S8S8 with QDQ is the default
# and should be the first choice", ONNX Runtime quantization docs, data type selection); its QDQ
# fusions need no Q/DQ on a residual add. Its x86 int8 kernels are exact only with VNNI/AMX, so the
# weight range follows the compiling host (fxopt/targets/host.py).
ORT_QDQ = QuantScheme(
    residual_add=False, quantize_outputs=True, unsigned_after_relu=True, weight_range="host",
    source="ONNX Runtime quantization docs (QDQ format: DQ -> op -> Q fuses into QLinear ops); measured in bench/results/quantize.md",
)


@dataclass(frozen=True)
class EngineModel:
    """What a TensorRT engine does that a per-node roofline does not: data `fxopt.costs.engine_cost` reads.

    A kernel's compute efficiency is ``op_efficiency[kind] * precision_efficiency[precision] *
    m / (m + half_size[kind]) * k / (k + half_depth[kind])``, with ``m`` its output elements (the
    parallel work) and ``k`` its reduction depth (input channels x kernel area): large maps reach
    the op's full efficiency, small batch-1 layers far less. A kind missing from ``half_size`` or
    ``half_depth`` falls back to its ``"default"`` entry, else to no size dependence.

    Attributes:
        inference_overhead_s: the engine's fixed cost of one inference (enqueueing its kernels, the
            input/output reformats), added once to the engine time.
        host_overhead_s: what a host call adds around the engine (a Python call into the runtime,
            the synchronisation, input and output copies): not part of the engine time
            `fxopt.estimate_costs` reports, but beside it (`CostSummary.host_overhead_s`), for a
            figure timed from the host.
        bandwidth_efficiency: fraction of the DRAM bandwidth a memory-bound kernel reaches.
        precision_efficiency: per precision, a factor on every op efficiency (e.g. fp32 runs
            without tensor cores, int8 kernels reach less of their peak than fp16 ones).
        half_size: per op kind, the output elements at which a kernel reaches half its efficiency.
        half_depth: per op kind, the reduction depth at which a kernel reaches half its efficiency.
        fuse_epilogues: a conv/linear/matmul runs its BatchNorm, bias, activation and one residual
            add in one kernel, and consecutive pointwise ops run as one kernel (TensorRT's layer
            fusions); the fused nodes cost nothing of their own.
        copies_are_kernels: transposes/permutes, slices, split/chunk and concat/stack are copy
            kernels (a read and a write of their data), not free views.
        pad_channels: conv/linear channels are rounded up to the target's channel alignment (the
            tensor-core kernels compute on the padded channels).
        winograd_precisions: precisions whose 3x3 stride-1 convs run as Winograd F(2x2, 3x3)
            transforms, 16 multiplies where a direct conv does 36 (cuDNN's fp32 CUDA-core path;
            the fp16/int8 tensor-core kernels are implicit GEMMs).
        source: where the numbers come from (a bench and commit, or a calibration file).
    """

    inference_overhead_s: float = 0.0
    host_overhead_s: float = 0.0
    bandwidth_efficiency: float = 1.0
    precision_efficiency: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    half_size: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    half_depth: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    fuse_epilogues: bool = True
    copies_are_kernels: bool = True
    pad_channels: bool = True
    winograd_precisions: tuple[str, ...] = ("fp32",)
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("precision_efficiency", "half_size", "half_depth"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def size_factor(self, kind: str, size: float, depth: float) -> float:
        """The share of its full efficiency a `kind` kernel of `size` outputs and `depth` reaches."""
        m_half = self.half_size.get(kind, self.half_size.get("default", 0.0))
        k_half = self.half_depth.get(kind, self.half_depth.get("default", 0.0))
        return (size / (size + m_half) if m_half > 0 else 1.0) * (depth / (depth + k_half) if k_half > 0 else 1.0)

    def replace(self, **changes: object) -> EngineModel:
        """A copy with some fields changed, e.g. fitted parameters."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DlaModel:
    """How one DLA core runs the layers TensorRT places on it: data `fxopt.costs.engine_cost.dla_kernel_latency_s` reads.

    A DLA layer takes the slower of its FLOPs at ``efficiency[precision]`` of the core's peak
    (`TargetProfile.dla_peak_ops_per_s`) and its bytes at ``bandwidth_efficiency`` of the DRAM
    bandwidth, plus ``layer_overhead_s``. Each switch between DLA and GPU costs a reformat of the
    tensor that crosses (a GPU copy kernel) plus ``transition_s`` (the hand-over between the engines).

    Attributes:
        efficiency: per precision (fp16, int8), the fraction of the DLA peak its convolutions reach.
        bandwidth_efficiency: fraction of the DRAM bandwidth a memory-bound DLA layer reaches.
        layer_overhead_s: fixed cost per DLA layer.
        transition_s: fixed cost per DLA<->GPU switch, besides the reformat copy.
        source: where the numbers come from.
    """

    efficiency: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    bandwidth_efficiency: float = 0.5
    layer_overhead_s: float = 0.0
    transition_s: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "efficiency", _frozen(self.efficiency))

    def replace(self, **changes: object) -> DlaModel:
        """A copy with some fields changed, e.g. fitted parameters."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TargetProfile:
    """Everything fxopt needs to know about a device and its toolchain.

    Args:
        name: registry key, e.g. ``"xavier"``.
        description: one line for humans.
        backend: ``"tensorrt"`` or ``"onnxruntime"``: what finally runs the model.
        max_onnx_opset: the highest ONNX opset the target's runtime parses.
        tensorrt_version: ``"8.5"`` etc., or ``None`` when the target does not use TensorRT.
        precisions: precisions the device runs, fastest last.
        default_precision: the precision compile uses when none is asked for.
        peak_ops_per_s: peak arithmetic throughput per precision (FLOP/s, or OP/s for int8).
        memory_bandwidth_bytes_per_s: DRAM bandwidth.
        dla_cores: number of NVIDIA Deep Learning Accelerator cores (0 if none).
        dla_peak_ops_per_s: peak throughput of one DLA core per precision.
        channel_alignment: channel multiple the fast kernels want, per precision.
        op_efficiency: fraction of peak a kind of op reaches (the roofline's compute ceiling).
        launch_overhead_s: fixed cost per kernel (per graph node that computes, or per fused
            kernel when ``engine`` is set).
        default_passes: names of the passes `compile(passes=None)` runs for this target.
        quant_scheme: where and how int8 runs (`QuantScheme`); ``None`` if it has no int8.
        engine: how the target's runtime builds kernels from the graph (`EngineModel`: fusion,
            copies, size-dependent efficiency, per-inference overhead); ``None``: each node is
            one kernel costed by its roofline (max of compute at ``op_efficiency`` and memory
            time) plus ``launch_overhead_s``.
        dla: how a DLA core runs its layers (`DlaModel`); ``None`` where the target has no DLA
            latency model (the placement report then gives no times).

    Example:
        >>> from fxopt.targets import get_target
        >>> get_target("xavier").max_onnx_opset
        17
    """

    name: str
    description: str
    backend: str
    max_onnx_opset: int
    tensorrt_version: str | None
    precisions: tuple[str, ...]
    default_precision: str
    peak_ops_per_s: Mapping[str, float]
    memory_bandwidth_bytes_per_s: float
    dla_cores: int = 0
    dla_peak_ops_per_s: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    channel_alignment: Mapping[str, int] = field(default_factory=lambda: _frozen({}))
    op_efficiency: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    launch_overhead_s: float = 0.0
    default_passes: tuple[str, ...] = ("canonicalize", "fold_batchnorm")
    quant_scheme: QuantScheme | None = None
    engine: EngineModel | None = None
    dla: DlaModel | None = None

    def __post_init__(self) -> None:
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise TargetError(f"target '{self.name}': unknown precisions {unknown}; use {PRECISIONS}")
        if self.default_precision not in self.precisions:
            raise TargetError(
                f"target '{self.name}': default precision '{self.default_precision}' "
                f"is not among its precisions {self.precisions}"
            )
        missing = [p for p in self.precisions if p not in self.peak_ops_per_s]
        if missing:
            raise TargetError(f"target '{self.name}': no peak throughput for {missing}")
        for name in ("peak_ops_per_s", "dla_peak_ops_per_s", "channel_alignment", "op_efficiency"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def alignment(self, precision: str | None = None) -> int:
        """Channel multiple the target's fast kernels want at `precision` (1 = any)."""
        return int(self.channel_alignment.get(precision or self.default_precision, 1))

    def efficiency(self, op_kind: str) -> float:
        """Fraction of peak throughput that `op_kind` reaches on this target."""
        return float(self.op_efficiency.get(op_kind, self.op_efficiency.get("default", 0.5)))

    def replace(self, **changes: object) -> TargetProfile:
        """A copy with some fields changed, e.g. a calibrated efficiency table."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        """Plain-data view for manifests and reports."""
        return _plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "profile") -> TargetProfile:
        """The inverse of `to_dict`: a profile from plain data (e.g. a calibrated profile file).

        Raises:
            TargetError: a field is unknown, missing or of the wrong type; the message names it
                and `where` the data came from.
        """
        return _from_plain(cls, data, where)


def _plain(value: object) -> Any:
    # frozen dataclasses and mapping proxies -> JSON-ready dicts, lists and scalars
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


_NESTED: dict[str, type] = {"quant_scheme": QuantScheme, "engine": EngineModel, "dla": DlaModel}


def _from_plain(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise TargetError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TargetError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in _NESTED and value is not None:
            value = _from_plain(_NESTED[name], value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TargetError(f"{where}: {exc}") from None


def load_target(path: str | Path, *, register: bool = True, overwrite: bool = True) -> TargetProfile:
    """Read a profile written by `TargetProfile.to_dict` (e.g. by ``fxopt calibrate-target``).

    Args:
        path: a JSON file holding one profile.
        register: also `register_target` it, so ``compile(target=name)`` finds it.
        overwrite: replace a registered target of the same name.

    Returns:
        The profile.

    Raises:
        TargetError: the file cannot be read, is not JSON, or a field is wrong (the message
            names the file and the field).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise TargetError(f"cannot read target profile {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise TargetError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    profile = TargetProfile.from_dict(data, where=str(path))
    return register_target(profile, overwrite=overwrite) if register else profile


# Per-op-kind fraction of peak; depthwise and small-channel convs are memory bound on GPUs.
_GPU_EFFICIENCY = {
    "conv": 0.55,
    "conv_depthwise": 0.10,
    "conv_transpose": 0.40,
    "linear": 0.45,
    "matmul": 0.45,
    "pool": 1.0,
    "elementwise": 1.0,
    "norm": 1.0,
    "default": 0.5,
}

# The xavier engine model's parameters, fitted by bench/xavier_latency.py (`make bench-latency`, issue 26) to 73
# published batch-1 TensorRT figures of AGX Xavier: 23 timed as engine work (bench/data/xavier_engine_time.json:
# MLPerf SingleStream, NetsPresso's computation-only latencies, jetson-inference) and 50 timed from Python
# (bench/data/xavier_published.json), compared with engine + host_overhead_s. Held out by network family:
# 70% (51/73) within ±25%, median |log ratio| 0.14; engine-time fp16 76% / 0.14, int8 33% / 0.25
# (bench/results/xavier_latency.md). Products (conv, linear, matmul) share one peak efficiency; fp32 above 1 is
# Winograd-like algorithms the direct FLOP count does not see.
_XAVIER_PRODUCTS = ("conv", "conv_transpose", "linear", "matmul", "leaf", "unknown", "default")
_XAVIER_MEMORY_KINDS = ("pool", "elementwise", "norm", "copy")
_XAVIER_EFFICIENCY = {
    **{kind: 0.7979 for kind in _XAVIER_PRODUCTS},
    "conv_depthwise": 0.0996,
    **{kind: 1.0 for kind in _XAVIER_MEMORY_KINDS},  # memory bound: bandwidth_efficiency applies
}
_XAVIER_ENGINE = EngineModel(
    inference_overhead_s=50.11e-6,  # the engine's own per-inference cost (was 202 us when host calls were counted in it)
    host_overhead_s=102.9e-6,       # a Python call around the engine: beside the estimate, not in it
    bandwidth_efficiency=0.671,
    precision_efficiency={"fp32": 1.292, "fp16": 1.0, "int8": 0.8025},
    # output elements and reduction depth at half efficiency; memory-bound kinds have no size dependence (0), else
    # "default" would price a global pool (64 outputs, depth 1) as a product at 2e-5 of the peak (issue 26)
    half_size={**{kind: 5.253e4 for kind in (*_XAVIER_PRODUCTS, "conv_depthwise")}, **{kind: 0.0 for kind in _XAVIER_MEMORY_KINDS}},
    half_depth={**{kind: 63.24 for kind in _XAVIER_PRODUCTS}, **{kind: 0.0 for kind in _XAVIER_MEMORY_KINDS}},
    source="bench/xavier_latency.py, issue 26 (bench/results/xavier_latency.md)",
)


# One Xavier DLA core (NVDLA v1): convolution efficiency per precision fitted by bench/xavier_latency.py to the
# published DLA-vs-GPU pairs of AGX Xavier: Paddle Lite's TensorRT guide (JetPack 4.4.1, TensorRT 7.1.3, MAXN:
# ResNet-50 fp16 6.66 vs 3.15 ms and, an earlier page, 6.92 vs 3.57 ms; int8 3.96 vs 2.27 ms) and HaX-CoNN's
# per-layer profiles (JetPack 4.5.1, TensorRT 7.1.3, MAXN: BVLC GoogLeNet fp16 3.84 vs 1.72 ms, AlexNet 4.41 vs
# 1.79 ms). Held out network by network it misses issue 26's ±35% (see the results' DLA section); int8 rests on
# one figure. A switch costs a GPU reformat copy plus a hand-over taken as the engine's per-inference overhead
# (no published figure for it); a DLA layer reaches half the DRAM bandwidth (assumed).
_XAVIER_DLA = DlaModel(
    efficiency={"fp16": 0.4380, "int8": 0.4375},
    bandwidth_efficiency=0.5,
    layer_overhead_s=0.0,
    transition_s=50e-6,
    source="bench/xavier_latency.py (bench/results/xavier_latency.md, DLA section)",
)

XAVIER = TargetProfile(
    name="xavier",
    description="NVIDIA Jetson AGX Xavier (JetPack 5.1: TensorRT 8.5, Volta GPU + 2 DLA)",
    backend="tensorrt",
    # TensorRT 8.5's ONNX parser supports opsets 7..17 (TensorRT 8.5 support matrix).
    max_onnx_opset=17,
    tensorrt_version="8.5",
    precisions=("fp32", "fp16", "int8"),
    default_precision="fp16",
    # Volta GV10B: 512 CUDA cores, 64 tensor cores at 1.377 GHz (Jetson AGX Xavier data sheet):
    # fp32 512*2*1.377e9 = 1.41 TFLOPS; tensor-core fp16 11.3 TFLOPS; GPU int8 22.6 TOPS.
    peak_ops_per_s={"fp32": 1.41e12, "fp16": 11.3e12, "int8": 22.6e12},
    # 256-bit LPDDR4x at 2133 MHz: 137 GB/s (data sheet).
    memory_bandwidth_bytes_per_s=137e9,
    # Two NVDLA v1 cores, 5.7 int8 TOPS / 2.8 fp16 TFLOPS each (data sheet); no fp32 on DLA.
    dla_cores=2,
    dla_peak_ops_per_s={"fp16": 2.8e12, "int8": 5.7e12},
    # Tensor-core kernels want channels in multiples of 8 (fp16) and 32 (int8 IMMA).
    channel_alignment={"fp32": 1, "fp16": 8, "int8": 32},
    op_efficiency=_XAVIER_EFFICIENCY,
    launch_overhead_s=14.62e-6,
    quant_scheme=TENSORRT_QDQ,
    engine=_XAVIER_ENGINE,
    dla=_XAVIER_DLA,
)

ORIN = TargetProfile(
    name="orin",
    description="NVIDIA Jetson AGX Orin 64GB (JetPack 5.1: TensorRT 8.5, Ampere GPU + 2 DLA)",
    backend="tensorrt",
    max_onnx_opset=17,
    tensorrt_version="8.5",
    precisions=("fp32", "fp16", "int8"),
    default_precision="fp16",
    # Ampere GA10B: 2048 CUDA cores, 64 tensor cores at 1.3 GHz: fp32 5.3 TFLOPS;
    # dense tensor-core fp16 ~42.5 TFLOPS, dense int8 85 TOPS (170 sparse) (Orin data sheet).
    peak_ops_per_s={"fp32": 5.3e12, "fp16": 42.5e12, "int8": 85e12},
    # 256-bit LPDDR5: 204.8 GB/s.
    memory_bandwidth_bytes_per_s=204.8e9,
    # Two NVDLA v2 cores: 105 sparse int8 TOPS in all, so ~26 dense int8 TOPS each.
    dla_cores=2,
    dla_peak_ops_per_s={"fp16": 13e12, "int8": 26e12},
    channel_alignment={"fp32": 1, "fp16": 8, "int8": 32},
    op_efficiency=_GPU_EFFICIENCY,
    launch_overhead_s=5e-6,
    quant_scheme=TENSORRT_QDQ,
)

CPU = TargetProfile(
    name="cpu",
    description="ONNX Runtime on this host's CPU (the target measured for real in CI)",
    backend="onnxruntime",
    max_onnx_opset=17,
    tensorrt_version=None,
    precisions=("fp32", "int8"),
    default_precision="fp32",
    # Nominal 2-core AVX2 host: 2 cores * 2.5 GHz * 32 FLOP/cycle; calibrate with a measured run.
    peak_ops_per_s={"fp32": 160e9, "int8": 320e9},
    memory_bandwidth_bytes_per_s=20e9,
    # Measured (bench/results/cpu_alignment.md): pruning 16 models to half their FLOPs, ONNX Runtime
    # latency vs the original was 0.88 at round_to=1 (3/16 slower than unpruned), 0.65 at 4, 0.59 at 8,
    # 0.54 at 16: the AVX-512 host's 16 fp32 lanes. int8 is not measured yet.
    channel_alignment={"fp32": 16, "int8": 4},
    op_efficiency={
        "conv": 0.4,
        "conv_depthwise": 0.15,
        "conv_transpose": 0.3,
        "linear": 0.5,
        "matmul": 0.5,
        "default": 0.5,
    },
    launch_overhead_s=2e-6,
    quant_scheme=ORT_QDQ,
)

_REGISTRY: dict[str, TargetProfile] = {t.name: t for t in (XAVIER, ORIN, CPU)}


def register_target(profile: TargetProfile, *, overwrite: bool = False) -> TargetProfile:
    """Add a target to the registry so `compile(target=name)` finds it.

    Args:
        profile: the target's data.
        overwrite: replace a target of the same name instead of raising.

    Returns:
        The registered profile.
    """
    if profile.name in _REGISTRY and not overwrite:
        raise TargetError(f"target '{profile.name}' is already registered; pass overwrite=True")
    _REGISTRY[profile.name] = profile
    return profile


def get_target(target: str | TargetProfile) -> TargetProfile:
    """Look a target up by name (a `TargetProfile` is returned as it is).

    Raises:
        TargetError: the name is unknown; the message lists the known ones.
    """
    if isinstance(target, TargetProfile):
        return target
    try:
        return _REGISTRY[target]
    except KeyError:
        raise TargetError(
            f"unknown target '{target}'; known targets: {', '.join(sorted(_REGISTRY))}"
        ) from None


def target_names() -> list[str]:
    """Names of the registered targets, sorted."""
    return sorted(_REGISTRY)
