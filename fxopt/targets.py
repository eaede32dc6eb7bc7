"""Deployment targets as data: device facts, toolchain limits, precisions, alignment, cost-model knobs.

`xavier`, `orin` and `cpu` ship with fxopt; `register_target` adds more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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
        source: where the rules come from.
    """

    quantized_ops: tuple[str, ...] = ("conv", "conv_transpose", "linear", "matmul")
    residual_add: bool = True
    symmetric: bool = True
    quantize_outputs: bool = False
    unsigned_after_relu: bool = False
    source: str = ""


# TensorRT 8.5 explicit quantisation (Q/DQ): symmetric int8, per-channel weights, Q/DQ on the
# inputs of conv/deconv/gemm/matmul and on a residual add's other input, which TensorRT fuses
# into the conv (TensorRT developer guide, "Working with INT8": Q/DQ layer placement).
TENSORRT_QDQ = QuantScheme(source="TensorRT 8.5 developer guide, explicit quantization (Q/DQ placement)")
# ONNX Runtime on x86: QDQ with signed int8 activations and weights ("S8S8 with QDQ is the default
# and should be the first choice", ONNX Runtime quantization docs, data type selection); its QDQ
# fusions need no Q/DQ on a residual add.
ORT_QDQ = QuantScheme(
    residual_add=False, quantize_outputs=True, unsigned_after_relu=True,
    source="ONNX Runtime quantization docs (QDQ format: DQ -> op -> Q fuses into QLinear ops); measured in bench/results/quantize.md",
)


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
        launch_overhead_s: fixed cost per kernel (per graph node that computes).
        default_passes: names of the passes `compile(passes=None)` runs for this target.
        quant_scheme: where and how int8 runs (`QuantScheme`); ``None`` if it has no int8.

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
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, QuantScheme):
                value = dataclasses.asdict(value)
            out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out


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
    op_efficiency=_GPU_EFFICIENCY,
    launch_overhead_s=8e-6,
    quant_scheme=TENSORRT_QDQ,
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
