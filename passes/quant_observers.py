"""Int8 building blocks: range observers, the calibrators that turn a histogram into a range,
and the fake-quantisation modules the `quantize` pass inserts.

Fake quantisation uses `torch.fake_quantize_per_tensor_affine` / `..._per_channel_affine`: their
gradient is the straight-through estimator (1 inside the range, 0 outside), so the same graph can
be fine-tuned (QAT), and the TorchScript ONNX exporter writes each as a QuantizeLinear /
DequantizeLinear pair, which is TensorRT's explicit quantisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "CALIBRATORS",
    "FakeQuantize",
    "RangeObserver",
    "WeightFakeQuant",
    "amax_entropy",
    "amax_max",
    "amax_mse",
    "amax_percentile",
    "observing",
    "symmetric_scale",
    "WEIGHT_FAKE_QUANT",
]

QMIN, QMAX = -128, 127  # int8; zero point 0 (symmetric), as TensorRT's explicit quantisation needs
NUM_BINS = 2048  # histogram bins of |x| (TensorRT's entropy calibrator uses 2048 too)


def symmetric_scale(amax: Tensor | float) -> Tensor:
    """Scale mapping ``[-amax, amax]`` onto ``[-127, 127]`` (a zero range gets scale 1)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))


class RangeObserver:
    """Collects, over calibration batches, the largest |x| and then a histogram of |x|.

    Calibration runs twice over the data: the first pass fixes the range (`amax`), the second
    fills `NUM_BINS` bins over ``[0, amax]``. Memory is the histogram, not the activations.
    """

    def __init__(self, num_bins: int = NUM_BINS) -> None:
        self.num_bins = num_bins
        self.amax = 0.0
        self.hist: np.ndarray | None = None
        self.batches = 0

    def observe_range(self, x: Tensor) -> None:
        self.amax = max(self.amax, float(x.detach().abs().max())) if x.numel() else self.amax
        self.batches += 1

    def observe_histogram(self, x: Tensor) -> None:
        if self.amax <= 0:
            return
        values = x.detach().abs().float().reshape(-1).clamp(max=self.amax)
        counts = torch.histc(values, bins=self.num_bins, min=0.0, max=self.amax).double().numpy()
        self.hist = counts if self.hist is None else self.hist + counts

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.amax, self.num_bins + 1)


def amax_max(hist: np.ndarray, edges: np.ndarray) -> float:
    """The largest value seen (the top histogram edge).

    Example:
        >>> amax_max(np.array([3.0, 1.0]), np.array([0.0, 1.0, 2.0]))
        2.0
    """
    return float(edges[-1])


def amax_percentile(hist: np.ndarray, edges: np.ndarray, percentile: float = 99.99) -> float:
    """The |x| below which `percentile` % of the observed values lie (upper bin edge).

    Example:
        >>> amax_percentile(np.array([90.0, 9.0, 1.0]), np.array([0.0, 1.0, 2.0, 3.0]), 99.0)
        2.0
    """
    cdf = np.cumsum(hist) / max(hist.sum(), 1e-12)
    index = int(np.searchsorted(cdf, percentile / 100.0))
    return float(edges[min(index + 1, len(edges) - 1)])


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    # move a little mass onto empty bins so KL(p || q) stays finite (as TensorRT does)
    zeros = p == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if n_nonzero == 0:
        return p
    out = p.astype(np.float64).copy()
    out[zeros] = eps
    out[~zeros] -= eps * n_zero / n_nonzero
    return np.clip(out, 1e-12, None)


def amax_entropy(hist: np.ndarray, edges: np.ndarray, levels: int = 128, start: int | None = None) -> float:
    """The clipping point minimising KL(P || Q), TensorRT's entropy calibration (v2).

    For each candidate cut ``i`` (from `levels` bins up), P is the first ``i`` bins with the
    clipped tail added to the last one, Q is P merged into `levels` quantisation levels and
    spread back over the non-empty bins; the cut with the smallest divergence wins.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = np.abs(rng.standard_normal(200_000)); x[:5] = 40.0   # a few outliers
        >>> hist, edges = np.histogram(x, bins=2048, range=(0, 40))
        >>> 2.0 < amax_entropy(hist.astype(float), edges) < 10.0
        True
    """
    n = len(hist)
    if hist.sum() == 0:
        return float(edges[-1])
    # the first bin holds every exact zero (half of a ReLU's outputs): a spike that no clipping
    # point can represent makes the divergence favour tiny ranges; count it like its neighbour
    hist = hist.astype(np.float64).copy()
    hist[0] = hist[1] if n > 1 else hist[0]
    best_i, best_kl = n, math.inf
    for i in range(start or levels, n + 1, max(1, (n - levels) // 256)):
        p = hist[:i].astype(np.float64).copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] > 0
        q = np.zeros(i)
        chunks = np.array_split(np.arange(i), levels)
        for chunk in chunks:
            mass, support = hist[chunk].sum(), nonzero[chunk].sum()
            if support:
                q[chunk] = np.where(nonzero[chunk], mass / support, 0.0)
        if q.sum() == 0:  # every value of this range clipped into its last bin: no candidate
            continue
        p, q = _smooth(p / p.sum()), _smooth(q / q.sum())
        kl = float(np.sum(p * np.log(p / q)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(edges[best_i])


def amax_mse(hist: np.ndarray, edges: np.ndarray, candidates: int = 128) -> float:
    """The clipping point minimising the mean squared quantise-dequantise error over the histogram.

    Example:
        >>> hist, edges = np.histogram(np.linspace(0, 1, 10_001), bins=2048, range=(0, 1))
        >>> round(amax_mse(hist.astype(float), edges), 2)   # uniform data: clip nothing
        1.0
    """
    centers = (edges[:-1] + edges[1:]) / 2
    best, best_err = float(edges[-1]), math.inf
    for amax in np.linspace(edges[-1] / candidates, edges[-1], candidates):
        scale = amax / 127.0
        q = np.clip(np.round(centers / scale), 0, 127) * scale
        err = float(np.sum(hist * (q - centers) ** 2))
        if err < best_err:
            best, best_err = float(amax), err
    return best


CALIBRATORS: dict[str, Callable[..., float]] = {
    "max": amax_max,
    "percentile": amax_percentile,
    "entropy": amax_entropy,
    "mse": amax_mse,
}


class FakeQuantize(nn.Module):
    """Per-tensor int8 fake quantisation of an activation, zero point 0.

    Signed (``[-128, 127]``, symmetric) by default; ``unsigned=True`` uses ``[0, 255]`` for a
    tensor that is never negative (a ReLU's output), where ONNX Runtime's QDQ fusion then drops
    the ReLU into the conv before it. Exported to ONNX as QuantizeLinear + DequantizeLinear.
    Calibration observes its input through `observing` (a forward hook), so `forward` stays
    scriptable.

    Example:
        >>> fq = FakeQuantize(); fq.set_amax(1.27)
        >>> fq(torch.tensor([0.004, 0.006, 5.0])).tolist()
        [0.0, 0.009999999776482582, 1.2699999809265137]
        >>> u = FakeQuantize(unsigned=True); u.set_amax(2.55)
        >>> u(torch.tensor([-1.0, 0.01, 3.0])).tolist()
        [0.0, 0.009999999776482582, 2.549999952316284]
    """

    def __init__(self, unsigned: bool = False) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self.enabled: bool = True  # False: pass through (a layer kept in higher precision)
        self.unsigned: bool = unsigned

    @property
    def levels(self) -> float:
        return 255.0 if self.unsigned else 127.0

    def set_amax(self, amax: float) -> None:
        amax_t = torch.tensor([amax], dtype=torch.float32)
        self.scale.copy_(torch.where(amax_t > 0, amax_t / self.levels, torch.ones_like(amax_t)))

    @property
    def amax(self) -> float:
        return float(self.scale) * self.levels

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        # literal ranges: TorchScript cannot read module globals
        if self.unsigned:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, -128, 127)


class observing:  # noqa: N801 - used as a context manager, like torch.no_grad
    """While active, every `FakeQuantize` passes its input through unchanged and `observer`
    records it (``"range"``: the largest |x|; ``"histogram"``: the |x| histogram).

    Example:
        >>> fq, obs = FakeQuantize(), RangeObserver()
        >>> with observing({"x": (fq, obs)}, "range"):
        ...     _ = fq(torch.tensor([-3.0, 1.0]))
        >>> obs.amax
        3.0
    """

    def __init__(self, quantizers: dict[str, tuple[FakeQuantize, RangeObserver]], what: str) -> None:
        self.quantizers, self.what, self.handles = quantizers, what, []

    def __enter__(self) -> observing:
        for fq, obs in self.quantizers.values():
            record = obs.observe_range if self.what == "range" else obs.observe_histogram
            self.handles.append(fq.register_forward_hook(lambda _m, args, _out, record=record: (record(args[0]), args[0])[1]))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


class _WeightFakeQuant(nn.Module):
    """A weighted op whose weight is fake-quantised per output channel (scale: max |w| / `levels`).

    ``levels=64`` keeps every |q| <= 64 while the quantiser's range stays int8's ``[-128, 127]``
    (what the ONNX exporter writes as int8 Q/DQ): |w| <= max |w| puts ``round(w / scale)`` within
    ±64 (see `fxopt.targets.host` for the hosts that need it)."""

    AXIS = 0  # the weight's output-channel dim

    def __init__(self, module: nn.Module, levels: int = 127) -> None:
        super().__init__()
        if not 1 <= levels <= 127:
            raise ValueError(f"weight levels must be in [1, 127], got {levels}")
        self.module = module
        self.axis: int = self.AXIS  # an instance attribute, so TorchScript sees it
        self.enabled: bool = True  # False: the weight stays in higher precision
        self.levels: int = levels
        weight = module.weight.detach()
        dims = [d for d in range(weight.dim()) if d != self.axis]
        amax = weight.abs().amax(dim=dims).float()
        self.register_buffer("scale", torch.where(amax > 0, amax / levels, torch.ones_like(amax)))
        self.register_buffer("zero_point", torch.zeros(weight.shape[self.axis], dtype=torch.int32))

    def quantized_weight(self) -> Tensor:
        if not self.enabled:
            return self.module.weight
        # literals, not QMIN/QMAX: TorchScript cannot read module globals
        return torch.fake_quantize_per_channel_affine(self.module.weight, self.scale, self.zero_point, self.axis, -128, 127)


class _LinearFakeQuant(_WeightFakeQuant):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.module.bias)


class _ConvFakeQuant(_WeightFakeQuant):
    def forward(self, x: Tensor) -> Tensor:
        return self.module._conv_forward(x, self.quantized_weight(), self.module.bias)


class _ConvTransposeFakeQuant(_WeightFakeQuant):
    AXIS = 1  # a transposed conv's weight is (in, out / groups, ...)

    def forward(self, x: Tensor) -> Tensor:
        m = self.module
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[m.weight.dim() - 2]
        return fn(x, self.quantized_weight(), m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)


def WeightFakeQuant(module: nn.Module, levels: int = 127) -> nn.Module:  # noqa: N802 - a factory standing in for a class
    """`module` (conv, transposed conv with groups=1, linear) with its weight fake-quantised per
    output channel: dim 0 of a conv or linear weight, dim 1 of a transposed conv's; the largest
    |w| of a channel maps to ``±levels`` (127, or 64 for ONNX Runtime on x86 without VNNI).

    Example:
        >>> q = WeightFakeQuant(nn.Linear(4, 2))
        >>> tuple(q.scale.shape), type(q).__name__
        ((2,), '_LinearFakeQuant')
        >>> r = WeightFakeQuant(nn.Linear(4, 2), levels=64)
        >>> int((r.quantized_weight() / r.scale[:, None]).round().abs().max())
        64
    """
    if isinstance(module, nn.Linear):
        return _LinearFakeQuant(module, levels)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups > 1:
            raise ValueError("grouped transposed conv weights are not per-channel quantisable here")
        return _ConvTransposeFakeQuant(module, levels)
    if isinstance(module, nn.modules.conv._ConvNd):
        return _ConvFakeQuant(module, levels)
    raise TypeError(f"no weight fake quantisation for {type(module).__name__}")


WEIGHT_FAKE_QUANT = (_LinearFakeQuant, _ConvFakeQuant, _ConvTransposeFakeQuant)
