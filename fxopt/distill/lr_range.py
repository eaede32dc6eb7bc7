"""The fine-tune's learning rate when none is given: the recipe's, else a short range test (each
candidate rate trains the same start for a few steps; the lowest loss on held-back batches wins).

A fixed default cannot fit every net: 1e-4 left a digits CNN pruned to a fifth of its FLOPs at
55% after 150 steps where 1e-3 recovered 96% (bench/results/finetune_lr.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fxopt.distill.judge import HeldBack, hold_back
from fxopt.distill.loop import Distill, TensorBatches, trial_loss

__all__ = ["LR_CANDIDATES", "LrChoice", "choose_lr", "range_test", "trial_steps"]

# Adam rates a fine-tune after compression lands between (bench/results/finetune_lr.md): below
# 3e-4, 150 steps do not recover a heavily pruned net; above 3e-3, Adam unsettles a trained one
LR_CANDIDATES = (3e-4, 1e-3, 3e-3)


def trial_steps(steps: int) -> int:
    """Steps of each range-test arm: a fifth of the fine-tune, between 5 and 25."""
    return max(5, min(25, steps // 5))


@dataclass(frozen=True)
class LrChoice:
    """The learning rate a fine-tune ran at, and how it was chosen.

    Attributes:
        lr: the rate.
        how: ``"given"``, ``"the recipe's"`` or ``"range test"``.
        scores: for a range test, ``(lr, mean loss on the held-back batches)`` per candidate.
        trial_steps: steps of each range-test arm.
    """

    lr: float
    how: str
    scores: tuple[tuple[float, float], ...] = ()
    trial_steps: int = 0

    def note(self) -> str:
        """One report line: the rate and why."""
        if self.how != "range test":
            return f"lr {self.lr:g} ({self.how})"
        tried = ", ".join(f"{lr:g}: {score:.4g}" for lr, score in self.scores)
        return (f"lr {self.lr:g} chosen by a range test ({self.trial_steps} steps per rate from the same start; "
                f"loss on held-back batches {tried})")


def range_test(student: nn.Module, data: Iterable[Any], held: Sequence[Any], *, loss: Callable[[Any, Any], Tensor] | None,
               teacher: nn.Module | None, distill: Distill | None, steps: int, seed: int = 0,
               candidates: Sequence[float] = LR_CANDIDATES, device: str | torch.device | None = None) -> LrChoice:
    """Train `student` for `trial_steps(steps)` steps at each candidate rate, from the same state
    and on the same seeded batches, and pick the rate with the lowest loss on `held` (never
    trained on); `student` ends as it started. Ties go to the lower rate. The arms run on
    `device` (`finetune`'s ``device=``; None: CUDA when available, else the CPU).

    Example:
        >>> import torch
        >>> x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)); y = x @ torch.ones(4, 1)
        >>> model = torch.nn.Linear(4, 1)
        >>> before = model.weight.clone()
        >>> choice = range_test(model, [(x[:48], y[:48])], [(x[48:], y[48:])], loss=torch.nn.MSELoss(),
        ...                     teacher=None, distill=None, steps=50)
        >>> choice.lr, torch.equal(model.weight, before)
        (0.003, True)
    """
    assert held, "range_test needs held-back batches (hold_back always gives some)"
    start = {k: v.detach().clone() for k, v in student.state_dict().items()}
    was_training = student.training
    k = trial_steps(steps)
    scores = []
    try:
        for lr in candidates:
            scores.append((lr, trial_loss(student, _replay(data), held, loss=loss, teacher=teacher, distill=distill, steps=k, lr=lr, seed=seed,
                                      device=device)))
            student.load_state_dict(start)
    finally:
        student.load_state_dict(start)
        student.train(was_training)
    best = min(scores, key=lambda s: (s[1], s[0]))
    if not math.isfinite(best[1]):  # every arm diverged: the lowest rate is the least harm
        best = min(scores)
    return LrChoice(best[0], "range test", tuple(scores), k)


def _replay(data: Iterable[Any]) -> Iterable[Any]:
    # TensorBatches draws each pass's order from its own generator: every arm (and the fine-tune
    # after the test) starts from the seed
    return TensorBatches(data.x, data.y, data.batch_size, data.seed) if isinstance(data, TensorBatches) else data


def choose_lr(lr: float | None, *, recipe: Any, student: nn.Module, data: Iterable[Any],
              loss: Callable[[Any, Any], Tensor] | None, teacher: nn.Module | None, distill: Distill | None, steps: int,
              seed: int = 0, split: HeldBack | None = None, device: str | torch.device | None = None) -> LrChoice:
    """`lr` when given; else the recipe's ``finetune_lr`` (a bundled model's measured setting);
    else `range_test` on `device`, training on ``split.train`` and scoring on ``split.held``
    (default: ``hold_back(data, seed)``).

    Example:
        >>> import torch
        >>> choose_lr(None, recipe=None, student=nn.Linear(2, 1), data=[(torch.randn(8, 2), torch.randn(8, 1))] * 5,
        ...           loss=nn.MSELoss(), teacher=None, distill=None, steps=50).how
        'range test'
    """
    if lr is not None:
        return LrChoice(float(lr), "given")
    recipe_lr = getattr(recipe, "finetune_lr", None)
    if recipe_lr is not None:
        return LrChoice(float(recipe_lr), "the recipe's")
    split = split if split is not None else hold_back(data, seed)
    return range_test(student, split.train, split.held, loss=loss, teacher=teacher, distill=distill, steps=steps, seed=seed,
                      device=device)
