"""Comparing model outputs: flatten any tensor pytree and measure max abs / rel error."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxopt.frontend.inputs import copy_inputs

__all__ = ["Deviation", "TOLERANCES", "flatten_outputs", "compare_outputs", "recalibrate_batchnorm", "run_model", "tensor_mark", "update_digest"]

# (atol, rtol) per compute precision: a check passes when max_abs <= atol + rtol * max|reference|.
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (1e-5, 1e-4),
    "fp16": (1e-3, 1e-2),
    "int8": (1e-2, 5e-2),
}


@dataclass(frozen=True)
class Deviation:
    """How far one set of outputs is from a reference."""

    max_abs: float
    max_rel: float
    reference_scale: float
    same_structure: bool
    detail: str = ""

    def within(self, atol: float, rtol: float) -> bool:
        """True when the structure matches and max_abs <= atol + rtol * max|reference|."""
        return self.same_structure and self.max_abs <= atol + rtol * self.reference_scale

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "reference_scale": self.reference_scale,
            "same_structure": self.same_structure,
            "detail": self.detail,
        }


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """The tensors of an output pytree (tensor, tuple, list, dict), in a stable order."""
    leaves, _ = pytree.tree_flatten(outputs)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def output_signature(outputs: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every output tensor, for structure checks."""
    return [(tuple(t.shape), t.dtype) for t in flatten_outputs(outputs)]


def compare_outputs(candidate: Any, reference: Any) -> Deviation:
    """Max abs and max rel error of `candidate` against `reference` over all output tensors."""
    cand, ref = flatten_outputs(candidate), flatten_outputs(reference)
    if len(cand) != len(ref):
        return Deviation(float("inf"), float("inf"), 0.0, False, f"{len(cand)} outputs vs {len(ref)}")
    max_abs = max_rel = scale = 0.0
    for i, (c, r) in enumerate(zip(cand, ref)):
        if tuple(c.shape) != tuple(r.shape):
            return Deviation(float("inf"), float("inf"), 0.0, False, f"output {i}: shape {tuple(c.shape)} vs {tuple(r.shape)}")
        if r.numel() == 0:
            continue
        c64, r64 = c.detach().double(), r.detach().double()
        if not (torch.isfinite(r64).all() and torch.isfinite(c64).all()):
            same_nonfinite = torch.equal(torch.isfinite(c64), torch.isfinite(r64))
            finite = torch.isfinite(r64) & torch.isfinite(c64)
            if not same_nonfinite:
                return Deviation(float("inf"), float("inf"), 0.0, True, f"output {i}: non-finite values differ")
            c64, r64 = c64[finite], r64[finite]
            if r64.numel() == 0:
                continue
        diff = (c64 - r64).abs()
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / r64.abs().clamp_min(1e-12)).max()))
        scale = max(scale, float(r64.abs().max()))
    return Deviation(max_abs, max_rel, scale, True)


def tensor_mark(t: torch.Tensor) -> tuple[Any, ...]:
    """What changes when `t` is written in place or given other storage: its version counter (every in-place op
    bumps it) and its storage (``.data = ...`` swaps it); a tensor without strided storage (sparse) by its
    identity, an inference tensor (no version counter) by its bytes. Not seen: a write through ``.data`` or a
    numpy view, which bumps no version counter of `t` itself.

    Example:
        >>> t = torch.zeros(2)
        >>> before = tensor_mark(t)
        >>> _ = t.add_(1)
        >>> tensor_mark(t) == before
        False
    """
    if t.is_inference():
        digest = hashlib.sha256()
        update_digest(digest, t)
        return ("bytes", digest.hexdigest())
    return t._version, t.data_ptr() if t.layout == torch.strided else id(t)


def update_digest(digest: Any, t: torch.Tensor) -> None:
    """Fold a strided tensor's dtype, shape and bytes into a ``hashlib`` digest, without copying its bytes.

    Example:
        >>> import hashlib
        >>> a, b = hashlib.sha256(), hashlib.sha256()
        >>> update_digest(a, torch.ones(2)); update_digest(b, torch.ones(2, dtype=torch.float64))
        >>> a.hexdigest() == b.hexdigest()
        False
    """
    t = t.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def run_model(model: Any, inputs: tuple[Any, ...]) -> Any:
    """Run `model` on fresh copies of `inputs` without autograd (a forward that writes into its
    input changes neither the caller's tensors nor the next run's)."""
    with torch.no_grad():
        return model(*copy_inputs(inputs))


def recalibrate_batchnorm(gm: nn.Module, batches: Sequence[tuple[Any, ...]]) -> int:
    """Re-estimate every BatchNorm's running statistics on `batches` (a cumulative average),
    in place; returns how many BatchNorm modules were re-estimated (0 when there are none or
    a batch of one sample cannot give a per-channel variance, in which case nothing changes)."""
    bns = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or not batches:
        return 0
    saved = [(m.momentum, m.training, copy.deepcopy(m.state_dict())) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the batches
            m.train()
        for batch in batches:
            run_model(gm, batch)
    except (ValueError, RuntimeError):
        for m, (_, _, state) in zip(bns, saved):
            m.load_state_dict(state)
        return 0
    finally:
        for m, (momentum, training, _) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
    return len(bns)
