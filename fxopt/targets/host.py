"""The compiling host's CPU, where a result depends on it: which int8 kernels ONNX Runtime runs here.

On x86, ONNX Runtime's U8S8 kernels (QLinearConv, QGemm, and the QDQ graphs it fuses into them)
multiply uint8 activations by int8 weights. With VNNI (``vpdpbusd``, AVX-512 or AVX) or AMX the
products are summed in int32 and exact. Without it (AVX2, or AVX-512BW before VNNI) they use
``vpmaddubsw``, which adds two products into a *saturating int16*: 255 x 127 x 2 = 64770 > 32767, so
full-range weights give wrong sums. Weights limited to |q| <= 64 keep every pair within 255 x 64 x 2 =
32640 (ONNX Runtime's ``reduce_range`` convention, its quantization guide's "saturation" note).
Signed activations do not help: ONNX Runtime shifts S8S8 to U8S8 on x86.

`host_cpu()` detects this once per process (``torch.cpu.get_capabilities()``, else /proc/cpuinfo);
`simulated_host` stands in another host, for tests of the logic that depends on it.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from fxopt.errors import InputError

__all__ = [
    "INT8_WEIGHT_CHOICES", "HostCpu", "Int8Weights", "host_cpu", "int8_weights_for", "simulated_host",
]

# the int8 features ONNX Runtime's kernel dispatch looks at, as torch.cpu.get_capabilities() names them
_INT8_FEATURES = ("avx2", "avx512_bw", "avx512_vnni", "avx_vnni", "amx_int8")
# /proc/cpuinfo spells a few of them differently
_CPUINFO_NAMES = {"avx512bw": "avx512_bw"}
# int32 accumulation of u8 x s8 products, in the order ONNX Runtime prefers its kernels
_EXACT_INT8 = ("amx_int8", "avx512_vnni", "avx_vnni")

FULL_LEVELS = 127  # |q| <= 127: symmetric int8
REDUCED_LEVELS = 64  # |q| <= 64: no int16 pair sum of u8 x s8 products saturates (255 * 64 * 2 = 32640)


@dataclass(frozen=True)
class HostCpu:
    """The host's CPU as far as a result depends on it.

    Attributes:
        name: the CPU's model name.
        architecture: ``platform.machine()`` (``x86_64``, ``aarch64`` ...).
        features: the int8-relevant ISA features present (``avx2``, ``avx512_bw``, ``avx512_vnni``,
            ``avx_vnni``, ``amx_int8``).
        source: where they were read (``torch.cpu.get_capabilities``, ``/proc/cpuinfo``, ``simulated``).

    Example:
        >>> HostCpu("Haswell", "x86_64", ("avx2",), "simulated").exact_int8
        False
        >>> HostCpu("Sapphire Rapids", "x86_64", ("avx2", "avx512_vnni", "amx_int8"), "simulated").int8_kernels
        'amx_int8'
    """

    name: str
    architecture: str
    features: tuple[str, ...]
    source: str

    @property
    def x86(self) -> bool:
        return self.architecture.lower() in ("x86_64", "amd64", "i686", "x86")

    @property
    def exact_int8(self) -> bool:
        """ONNX Runtime's int8 kernels sum full-range products exactly here (VNNI or AMX on x86)."""
        return self.x86 and any(f in self.features for f in _EXACT_INT8)

    @property
    def int8_kernels(self) -> str:
        """The instruction ONNX Runtime's U8S8 kernels multiply with here, in words."""
        exact = [f for f in _EXACT_INT8 if f in self.features]
        if not self.x86:
            return f"{self.architecture} (not checked by fxopt)"
        if exact:
            return exact[0]
        return "vpmaddubsw (saturating int16 pair sums: " + ("AVX-512BW" if "avx512_bw" in self.features else "AVX2") + ", no VNNI)"

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"exact_int8": self.exact_int8, "int8_kernels": self.int8_kernels}


_SIMULATED: list[HostCpu] = []


@functools.lru_cache(maxsize=1)
def _detected() -> HostCpu:
    arch = platform.machine() or "unknown"
    try:
        import torch

        caps = torch.cpu.get_capabilities()
        return HostCpu(str(caps.get("cpu_name", "unknown")), arch, tuple(f for f in _INT8_FEATURES if caps.get(f)), "torch.cpu.get_capabilities")
    except (AttributeError, RuntimeError):  # an older torch: read the kernel's view
        return _from_cpuinfo(arch)


def _from_cpuinfo(arch: str, path: str = "/proc/cpuinfo") -> HostCpu:
    name, flags = "unknown", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        return HostCpu(name, arch, (), "unknown (no /proc/cpuinfo)")
    found = {_CPUINFO_NAMES.get(f, f) for f in flags}
    return HostCpu(name, arch, tuple(f for f in _INT8_FEATURES if f in found), path)


def host_cpu() -> HostCpu:
    """The CPU this process runs on (or the one `simulated_host` stands in)."""
    return _SIMULATED[-1] if _SIMULATED else _detected()


@contextlib.contextmanager
def simulated_host(features: tuple[str, ...], name: str = "simulated", architecture: str = "x86_64") -> Iterator[HostCpu]:
    """Within the block, `host_cpu()` answers a host with these ISA `features` (for tests of logic
    that depends on the host; the kernels ONNX Runtime really runs are still this machine's).

    Example:
        >>> with simulated_host(("avx2",)) as cpu:
        ...     host_cpu().exact_int8
        False
    """
    cpu = HostCpu(name, architecture, tuple(features), "simulated")
    _SIMULATED.append(cpu)
    try:
        yield cpu
    finally:
        _SIMULATED.remove(cpu)


INT8_WEIGHT_CHOICES = ("host", "portable", "full")


@dataclass(frozen=True)
class Int8Weights:
    """The int8 weight range one compile uses, and why.

    Attributes:
        choice: what was asked (``host``, ``portable``, ``full``).
        levels: the largest |q| a weight takes (127 or 64); its scale is ``max|w| / levels``.
        why: one line for the report.
        host: the CPU it was decided on (``None`` where the runtime's accumulation is exact anyway).
    """

    choice: str
    levels: int
    why: str
    host: HostCpu | None = None

    def to_dict(self) -> dict[str, object]:
        return {"choice": self.choice, "max_abs_q": self.levels, "why": self.why, "host": self.host.to_dict() if self.host else None}


def int8_weights_for(scheme_range: str, choice: str | None = None) -> Int8Weights:
    """The weight range for a target whose runtime needs `scheme_range` (a `QuantScheme.weight_range`).

    Args:
        scheme_range: ``"full"`` (the runtime sums int8 products in int32: TensorRT) or ``"host"``
            (ONNX Runtime on this CPU: exact only with VNNI/AMX).
        choice: ``None`` or ``"host"``: full range where this host's kernels are exact, else |q| <= 64;
            ``"portable"``: |q| <= 64, exact on every x86 CPU (a file meant for other hosts);
            ``"full"``: ±127 (refused where this host's kernels would saturate).

    Example:
        >>> with simulated_host(("avx2",)):
        ...     int8_weights_for("host").levels
        64
        >>> with simulated_host(("avx2", "avx512_vnni")):
        ...     int8_weights_for("host").levels, int8_weights_for("host", "portable").levels
        (127, 64)
    """
    if choice is not None and choice not in INT8_WEIGHT_CHOICES:
        raise InputError(f"int8_weights must be one of {INT8_WEIGHT_CHOICES}, got {choice!r}")
    if scheme_range == "full":
        if choice == "portable":
            raise InputError("int8_weights='portable' is for ONNX Runtime targets (cpu); this target's runtime sums int8 products "
                             "in int32, so its weights always use the full range")
        return Int8Weights(choice or "full", FULL_LEVELS, "full range (|q| <= 127): the runtime sums int8 products in int32")
    cpu = host_cpu()
    if choice == "portable":
        return Int8Weights(choice, REDUCED_LEVELS, "|q| <= 64 (int8_weights='portable'): exact on every x86 CPU, VNNI or not", cpu)
    if not cpu.x86:
        return Int8Weights(choice or "host", REDUCED_LEVELS if choice != "full" else FULL_LEVELS,
                           f"{'full range' if choice == 'full' else '|q| <= 64'}: fxopt has not checked ONNX Runtime's int8 kernels on "
                           f"{cpu.architecture}; |q| <= 64 is exact on every x86 CPU", cpu)
    if cpu.exact_int8:
        return Int8Weights(choice or "host", FULL_LEVELS, f"full range (|q| <= 127): this host's int8 kernels ({cpu.int8_kernels}) sum in int32; "
                           "int8_weights='portable' makes a file exact on CPUs without VNNI too", cpu)
    if choice == "full":
        raise InputError(f"int8_weights='full' would be wrong on this host: ONNX Runtime's int8 kernels here use {cpu.int8_kernels}, "
                         "and full-range weights overflow them; use 'host' or 'portable' (|q| <= 64)")
    return Int8Weights("host", REDUCED_LEVELS, f"|q| <= 64: this host's int8 kernels use {cpu.int8_kernels}, "
                       "which full-range weights overflow (exact on every x86 CPU)", cpu)
