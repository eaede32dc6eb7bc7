"""Judging a fine-tune after compression: the metric (or, without one, agreement with the teacher on
batches held back from training) of the input model, after the lossy passes and after the
fine-tune; a result far below the input model is a `fxopt.FxoptWarning` and a WARNING line saying
what to try. "completed" says the loop ran, not that the model recovered.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fxopt.distill.loop import RecipeBatches, TensorBatches, _unpack
from fxopt.errors import InputError, warn

__all__ = ["MAX_DROP_POINTS", "MIN_AGREEMENT", "HeldBack", "HeldOutJudge", "advice", "agreement", "held_loss", "hold_back", "judge_agreement",
           "judge_held_loss", "judge_metrics", "points"]

MAX_DROP_POINTS = 5.0  # a metric further below the input model than this is far below
MIN_AGREEMENT = 0.90  # top-1 agreement with the teacher below this is far below
HELD_FRACTION = 0.1  # of a user's batches (or samples) held back to judge on, at most HELD_MAX_BATCHES
HELD_MAX_BATCHES = 4
HELD_SEED_OFFSET = 7919  # a recipe's held-back batches are drawn from another seed than its training ones


@dataclass(frozen=True)
class HeldBack:
    """Training batches and batches held back from them.

    Attributes:
        train: the batches to train on.
        held: the batches to judge (and range-test) on.
        overlaps: True where `held` could not be split off (an iterable of unknown length): they
            are also trained on.
    """

    train: Iterable[Any]
    held: list[Any]
    overlaps: bool = False

    def describe(self) -> str:
        """``"3 held-back batches (192 samples)"``, saying when they were also trained on."""
        samples = sum(_batch_size(b) for b in self.held)
        what = f"{len(self.held)} held-back batch{'es' if len(self.held) != 1 else ''}" + (f" ({samples} samples)" if samples else "")
        return what + (" (also trained on: give a list, TensorBatches or eval_fn= for a held-out judgement)" if self.overlaps else "")


def _batch_size(batch: Any) -> int:
    args, _ = _unpack(batch)
    first = args[0] if args else None
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 0


def hold_back(data: Iterable[Any], seed: int = 0) -> HeldBack:
    """Split `data` into training batches and a tenth held back (at most 4 batches).

    A list or tuple of batches loses its last batches; `TensorBatches` its last samples; a recipe's
    endless `RecipeBatches` keeps all and gets fresh batches drawn from another seed; any other
    iterable (a DataLoader) keeps all and lends its first two batches (`HeldBack.overlaps`).

    Example:
        >>> batches = [(torch.zeros(2, 3), torch.zeros(2)) for _ in range(20)]
        >>> split = hold_back(batches)
        >>> len(split.train), len(split.held), split.overlaps
        (18, 2, False)
    """
    if isinstance(data, TensorBatches):
        n, size = len(data.y), data.batch_size
        h = min(max(1, round(n * HELD_FRACTION)), HELD_MAX_BATCHES * size)
        if n - h >= 1 and n >= 10:
            held = [(data.x[i:min(i + size, n)], data.y[i:min(i + size, n)]) for i in range(n - h, n, size)]
            return HeldBack(TensorBatches(data.x[:n - h], data.y[:n - h], size, data.seed), held)
    elif isinstance(data, RecipeBatches):
        generator = torch.Generator().manual_seed(data.seed + HELD_SEED_OFFSET)
        return HeldBack(data, [data.recipe.batch(i, generator) for i in range(2)])
    elif isinstance(data, Sequence) and len(data) >= 5:
        h = min(HELD_MAX_BATCHES, max(1, round(len(data) * HELD_FRACTION)))
        return HeldBack(list(data[:-h]), list(data[-h:]))
    held = list(itertools.islice(iter(data), 2))
    if not held:
        raise InputError("the fine-tune's data yielded no batches")
    return HeldBack(data, held, overlaps=True)


def _classes(output: Any) -> Tensor | None:
    # class scores over dim 1 (logits (N, C), or per position (N, C, ...)): their top-1
    if isinstance(output, Tensor) and output.is_floating_point() and output.dim() >= 2 and output.shape[1] > 1:
        return output.argmax(dim=1)
    return None


def agreement(model: nn.Module, teacher: nn.Module, batches: Sequence[Any]) -> float | None:
    """The share of top-1 predictions (per sample, or per position of a dense map) where `model`
    agrees with `teacher` on `batches`; None where the outputs are not class scores over dim 1.

    Example:
        >>> teacher = nn.Linear(3, 4)
        >>> agreement(teacher, teacher, [(torch.randn(8, 3), None)])
        1.0
    """
    same = total = 0
    model.eval()
    teacher.eval()
    with torch.no_grad():
        for batch in batches:
            args, _ = _unpack(batch)
            s, t = _classes(model(*args)), _classes(teacher(*args))
            if s is None or t is None or s.shape != t.shape:
                return None
            same += int((s == t).sum())
            total += s.numel()
    return same / total if total else None


def held_loss(model: nn.Module, batches: Sequence[Any], loss: Callable[[Any, Any], Tensor]) -> float:
    """The mean task loss of `model` (eval mode, no gradients) on `batches`."""
    model.eval()
    with torch.no_grad():
        return sum(float(loss(model(*_unpack(b)[0]), _unpack(b)[1])) for b in batches) / len(batches)


def points(before: float, after: float) -> float:
    """``after - before`` in points: x100 for metrics on a 0..1 scale, as is for ones already in
    percent (either value above 1)."""
    return (after - before) * (100.0 if max(abs(before), abs(after)) <= 1.0 else 1.0)


def _lower_better(name: str) -> bool:
    return "error" in name or "loss" in name


def advice(steps: int, lr: float, lr_how: str, distilled: bool, recipe_steps: int | None = None) -> str:
    """What to try when a fine-tune left the model far below: more steps, a higher rate, distillation,
    a milder budget."""
    more = f"more finetune_steps (ran {steps}" + (f"; the recipe's fine-tune uses {recipe_steps}" if recipe_steps and recipe_steps > steps else "") + ")"
    tries = [more, f"a higher finetune_lr (ran {lr:g}, {lr_how})"]
    if not distilled:
        tries.append("distill='kd' (the input model teaches)")
    return "try " + ", ".join(tries) + ", or a milder compression budget"


def _warn(text: str) -> str:
    warn(text)
    return f"WARNING: {text}"


def judge_metrics(stages: Sequence[tuple[str, Mapping[str, float]]], advice_text: str) -> list[str]:
    """Report lines for each metric at each stage (the first: the input model, the last: after the
    fine-tune), and a warning per higher-is-better metric more than `MAX_DROP_POINTS` below the
    input model at the end.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     lines = judge_metrics([("input model", {"acc": 0.99}), ("after prune", {"acc": 0.4}),
        ...                            ("after fine-tune", {"acc": 0.9})], "try more steps")
        >>> lines[0]
        'fine-tune judged on acc: input model 0.9900, after prune 0.4000, after fine-tune 0.9000 (-9.0 points vs the input model)'
        >>> lines[1].startswith("WARNING: after fine-tune, acc is 9.0 points below the input model"), len(caught)
        (True, 1)
    """
    (_, first), (last_stage, last) = stages[0], stages[-1]
    lines, far = [], []
    for name in first:
        if name not in last:
            continue
        values = ", ".join(f"{stage} {m[name]:.4f}" for stage, m in stages if name in m)
        change = points(first[name], last[name])
        judged = "" if not _lower_better(name) else "; lower is better, not judged"
        lines.append(f"fine-tune judged on {name}: {values} ({change:+.1f} points vs the input model{judged})")
        if not _lower_better(name) and (-change > MAX_DROP_POINTS or not math.isfinite(last[name])):
            far.append((name, change))
    for name, change in far:
        lines.append(_warn(f"{last_stage}, {name} is {-change:.1f} points below the input model ({first[name]:.4f} -> "
                           f"{last[name]:.4f}; more than {MAX_DROP_POINTS:g}): {advice_text}"))
    return lines


def judge_agreement(stages: Sequence[tuple[str, float]], held: HeldBack, advice_text: str) -> list[str]:
    """Report lines for top-1 agreement with the teacher at each stage, and a warning when it ends
    below `MIN_AGREEMENT`."""
    values = ", ".join(f"{stage} {100 * v:.1f}%" for stage, v in stages)
    lines = [f"fine-tune judged on top-1 agreement with the input model on {held.describe()}: {values}"]
    if stages[-1][1] < MIN_AGREEMENT:
        lines.append(_warn(f"{stages[-1][0]}, the model agrees with the input model on {100 * stages[-1][1]:.1f}% of "
                           f"held-back predictions (below {100 * MIN_AGREEMENT:.0f}%): {advice_text}"))
    return lines


def judge_held_loss(stages: Sequence[tuple[str, float]], held: HeldBack, advice_text: str) -> list[str]:
    """Report lines for the task loss on held-back batches at each stage (the first: the input
    model); a warning when the fine-tune ends above both the input model's and the lossy passes'
    loss, or at more than twice the input model's (outputs that are not class scores have no agreement to judge)."""
    values = ", ".join(f"{stage} {v:.4g}" for stage, v in stages)
    lines = [f"fine-tune judged on the task loss on {held.describe()}: {values}"]
    original, before, after = stages[0][1], stages[-2][1], stages[-1][1]
    worse = after > original + 1e-6 and after > before  # the fine-tune made it worse, and it is worse than the input model
    if not math.isfinite(after) or worse or after > 2 * original + 1e-6:
        lines.append(_warn(f"{stages[-1][0]}, the held-back task loss is {after:.4g} (input model {original:.4g}, before the "
                           f"fine-tune {before:.4g}): {advice_text}"))
    return lines


class HeldOutJudge:
    """Judges a fine-tune without eval data: top-1 agreement with the teacher on held-back batches
    where the outputs are class scores, else the task loss on them.

    ``measure(stage, model)`` once per stage (the input model is measured on construction), then
    ``lines(advice)``.
    """

    def __init__(self, teacher: nn.Module, held: HeldBack, loss: Callable[[Any, Any], Tensor] | None) -> None:
        self.teacher, self.held, self.loss = teacher, held, loss
        self.by_agreement = agreement(teacher, teacher, held.held) is not None
        self.stages: list[tuple[str, float]] = []
        if self.by_agreement:
            self.stages.append(("input model", 1.0))
        elif loss is not None:
            self.stages.append(("input model", held_loss(teacher, held.held, loss)))

    def measure(self, stage: str, model: nn.Module) -> None:
        """Score `model` as it is now, under the name `stage`."""
        if self.by_agreement:
            value = agreement(model, self.teacher, self.held.held)
            self.stages.append((stage, value if value is not None else 0.0))
        elif self.loss is not None:
            self.stages.append((stage, held_loss(model, self.held.held, self.loss)))

    def lines(self, advice_text: str) -> list[str]:
        """The report lines (and warnings) of the stages measured."""
        if self.by_agreement:
            return judge_agreement(self.stages, self.held, advice_text)
        if self.loss is not None:
            return judge_held_loss(self.stages, self.held, advice_text)
        return ["fine-tune not judged: the outputs are not class scores and nothing gives a task loss or a metric; "
                "give eval_fn= (or loss=) to judge it"]
