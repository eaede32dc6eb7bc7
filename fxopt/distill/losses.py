"""Distillation losses: logit KD (softmax and sigmoid/dense), FitNets feature regression, ICKD, and
`OutputKD`, which applies one of them per output of a multi-head model.

Every loss takes ``(student, teacher)`` and detaches the teacher, so gradients reach the student
only; each is zero when the student equals the teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fxopt.errors import InputError

__all__ = ["FeatureMSE", "ICKD", "LogitKD", "OutputKD", "SigmoidKD", "channel_correlation"]


def _check_shapes(name: str, student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise InputError(
            f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ; "
            "match channels first (kept indices or an adapter)"
        )


class LogitKD(nn.Module):
    """Hinton et al.'s knowledge distillation on class logits.

    ``loss = T² · mean_n KL(softmax(t_n / T) ‖ softmax(s_n / T))`` over the class dim (dim 1);
    the T² keeps gradient magnitudes comparable across temperatures.

    Args:
        temperature: softening temperature T > 0.

    Example:
        >>> s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]])
        >>> float(LogitKD(4.0)(s, t))
        0.0
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise InputError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_shapes("LogitKD", student, teacher)
        t = self.temperature
        log_p_s = F.log_softmax(student / t, dim=1)
        log_p_t = F.log_softmax(teacher.detach() / t, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # per sample (and per position in dense maps)
        return t * t * kl.mean()


class SigmoidKD(nn.Module):
    """Knowledge distillation for independent (sigmoid) outputs: detection heatmaps, segmentation
    masks, multi-label logits. Each element is its own Bernoulli.

    ``loss = T² · mean_i [ p_i log(p_i / q_i) + (1 - p_i) log((1 - p_i) / (1 - q_i)) ]`` with
    ``p = sigmoid(t / T)`` (teacher) and ``q = sigmoid(s / T)`` (student), over every element.

    Args:
        temperature: softening temperature T > 0.

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> float(SigmoidKD()(x, x))
        0.0
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise InputError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_shapes("SigmoidKD", student, teacher)
        t = self.temperature
        s, tt = student / t, teacher.detach() / t
        p = torch.sigmoid(tt)
        # binary KL from logits, stable: log q = logsigmoid(s), log(1 - q) = logsigmoid(-s)
        kl = p * (F.logsigmoid(tt) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-tt) - F.logsigmoid(-s))
        return t * t * kl.mean()


class FeatureMSE(nn.Module):
    """FitNets feature regression: ``loss = mean((s - t)²)`` over every element.

    Example:
        >>> float(FeatureMSE()(torch.zeros(1, 2), torch.ones(1, 2)))
        1.0
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_shapes("FeatureMSE", student, teacher)
        return F.mse_loss(student, teacher.detach())


class OutputKD(nn.Module):
    """Distillation of a multi-head model's outputs: ``loss = Σ_k w_k · loss_k(s[k], t[k])`` over
    the named outputs of a dict (or the positions of a tuple); outputs not named are left out.

    Args:
        losses: ``{output key or index: loss}``, e.g. ``{"heatmap": SigmoidKD(), "seg": LogitKD(2.0)}``.
        weights: ``{key: weight}``; 1 where not given.

    Example:
        >>> kd = OutputKD({"seg": LogitKD(2.0)})
        >>> out = {"seg": torch.randn(2, 5, 4, 4), "box": torch.randn(2, 4, 4, 4)}
        >>> float(kd(out, out))
        0.0
    """

    def __init__(self, losses: Mapping[str | int, nn.Module], weights: Mapping[str | int, float] | None = None) -> None:
        super().__init__()
        if not losses:
            raise InputError("OutputKD needs at least one output to distil")
        unknown = set(weights or {}) - set(losses)
        if unknown:
            raise InputError(f"OutputKD weights for outputs without a loss: {sorted(map(str, unknown))}")
        self.keys = tuple(losses)
        self.losses = nn.ModuleList(losses.values())
        self.weights = tuple(float((weights or {}).get(k, 1.0)) for k in self.keys)

    def forward(self, student: Any, teacher: Any) -> Tensor:
        terms = []
        for key, loss, weight in zip(self.keys, self.losses, self.weights):
            try:
                s, t = student[key], teacher[key]
            except (KeyError, IndexError, TypeError):
                raise InputError(f"OutputKD: the model has no output {key!r}") from None
            terms.append(weight * loss(s, t))
        return torch.stack(terms).sum()


def channel_correlation(x: Tensor) -> Tensor:
    """The ``(N, C, C)`` inter-channel correlation of ``(N, C, *spatial)`` features:
    ``G = F̂ F̂ᵀ`` where each row of ``F̂`` is one channel's values over positions, L2-normalised
    (a channel that is zero everywhere gives zeros).

    Example:
        >>> channel_correlation(torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])).tolist()
        [[[1.0, 1.0], [1.0, 1.0]]]
    """
    f = F.normalize(x.flatten(2), dim=2, eps=1e-12)
    return f @ f.transpose(1, 2)


class ICKD(nn.Module):
    """Inter-channel correlation distillation (Liu et al., ICCV 2021), globally and per grid cell.

    For each grid ``g`` in `grids`, the ``(H, W)`` map is cut into ``g × g`` cells (as even as
    the size allows); in every cell ``k`` the channel correlation ``G = channel_correlation`` of
    student and teacher is compared:
    ``loss = mean_g mean_k mean_n (1 / C²) ‖G_s(n, k) − G_t(n, k)‖²_F``.
    ``grids=(1,)`` is the global form; ``(1, 2)`` adds the 2 × 2 cells. Correlations are of
    L2-normalised channels, so the loss is scale-free (each entry in [-1, 1]). Student and
    teacher need the same channels: match them first (kept indices or a 1×1 adapter).

    Args:
        grids: grid sizes; 1 is the whole map.

    Example:
        >>> x = torch.randn(2, 4, 6, 6)
        >>> float(ICKD(grids=(1, 2))(x, x))
        0.0
    """

    def __init__(self, grids: Sequence[int] = (1,)) -> None:
        super().__init__()
        grids = tuple(int(g) for g in grids)
        if not grids or min(grids) < 1:
            raise InputError(f"grids must be positive sizes, got {grids}")
        self.grids = grids

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_shapes("ICKD", student, teacher)
        teacher = teacher.detach()
        if student.dim() == 2:  # (N, C): one position per channel, correlation is all ±1 or 0
            student, teacher = student[..., None], teacher[..., None]
        c = student.shape[1]
        per_grid = []
        for g in self.grids:
            pairs = _even_cells(student, teacher, g)
            if pairs is None:  # cells of uneven size: one at a time
                pairs = [(s, t) for s, t in zip(_cells(student, g), _cells(teacher, g))]
            diffs = [(channel_correlation(s) - channel_correlation(t)).pow(2).sum(dim=(1, 2)) / (c * c) for s, t in pairs]
            per_grid.append(torch.stack([d.mean() for d in diffs]).mean())
        return torch.stack(per_grid).mean()


def _even_cells(student: Tensor, teacher: Tensor, g: int) -> list[tuple[Tensor, Tensor]] | None:
    """All g x g cells at once as a batch of ``N·g²`` maps, when they are the same size."""
    if g == 1 or student.dim() != 4:
        return [(student, teacher)]
    n, c, h, w = student.shape
    if h % g or w % g:
        return None

    def cut(x: Tensor) -> Tensor:  # (N, C, H, W) -> (N·g², C, H/g, W/g), cells of one image apart
        return x.reshape(n, c, g, h // g, g, w // g).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, c, h // g, w // g)

    return [(cut(student), cut(teacher))]


def _cells(x: Tensor, g: int) -> list[Tensor]:
    if g == 1 or x.dim() < 4:
        return [x]
    h, w = x.shape[-2], x.shape[-1]
    rows = [r for r in torch.tensor_split(torch.arange(h), min(g, h)) if len(r)]
    cols = [c for c in torch.tensor_split(torch.arange(w), min(g, w)) if len(c)]
    return [x[..., int(r[0]):int(r[-1]) + 1, int(c[0]):int(c[-1]) + 1] for r in rows for c in cols]
