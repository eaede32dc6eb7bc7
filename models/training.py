"""`fxopt.models.train`: run a bundled model's short training recipe on generated data."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxopt.distill.device import home_device, to_device, training_device
from fxopt.errors import InputError
from fxopt.models.registry import TrainingRecipe, spec
from fxopt.verification.numerics import recalibrate_batchnorm

__all__ = ["TrainResult", "recipe", "train"]


@dataclass
class TrainResult:
    """A trained model and what its training measured.

    Attributes:
        model: the trained module, in eval mode.
        metrics: the recipe's held-out metrics after training.
        chance: the same metrics for a constant / untrained predictor.
        losses: the training loss at every step.
        time_s: wall time of the training loop.
    """

    model: nn.Module
    metrics: dict[str, float]
    chance: dict[str, float]
    losses: list[float] = field(default_factory=list)
    time_s: float = 0.0


def train(
    name: str,
    steps: int | None = None,
    *,
    seed: int = 0,
    progress: bool | None = None,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    **cfg: Any,
) -> TrainResult:
    """Train the model registered as `name` with its recipe and evaluate it.

    Args:
        name: a name from `fxopt.models.names()` whose spec has a recipe.
        steps: optimiser steps (the recipe's default if omitted).
        seed: seeds the weights and the data stream.
        progress: show a progress bar (default: when stderr is a terminal).
        model: train this module (a deep copy is not taken: pass a copy to keep the original)
            instead of a fresh ``create(name, **cfg)``; used to fine-tune compressed models.
        device: where the optimiser steps run (``"cpu"``, ``"cuda"``, ``"cuda:1"``; None: CUDA when
            available, else the CPU; a device not available here is an `InputError`, before any
            work). The model moves there for the steps, each batch at its step; it comes back to
            the device it started on (a fresh one: the CPU) before the BatchNorm re-estimate and
            the evaluation, which run there as the recipe wrote them.
        **cfg: the model config, as for ``create``.

    Returns:
        A `TrainResult`.
    """
    recipe = _recipe(name, cfg)
    steps = recipe.steps if steps is None else steps
    if steps < 0:
        raise InputError(f"steps must be >= 0, got {steps}")
    where = training_device(device)
    torch.manual_seed(seed)
    net = model if model is not None else spec(name).build(**cfg)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = _optimise(net, name, recipe, steps, generator, where, sys.stderr.isatty() if progress is None else progress)
    if recipe.bn_batches:
        recalibrate_batchnorm(net, [tuple(recipe.batch(steps + i, generator)[0]) for i in range(recipe.bn_batches)])
    elapsed = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        metrics = recipe.evaluate(net)
    chance = recipe.chance() if callable(recipe.chance) else recipe.chance
    return TrainResult(net, metrics, dict(chance), losses, elapsed)


def _optimise(net: nn.Module, name: str, recipe: TrainingRecipe, steps: int, generator: torch.Generator,
              where: torch.device, show: bool) -> list[float]:
    """`steps` Adam steps on the recipe's batches, on `where`; `net` ends on its own device again."""
    home = home_device(net)
    if home != where:
        net.to(where)
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=recipe.lr)
    iterator: Any = range(steps)
    if show:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"train {name}", unit="step", leave=False)
    losses: list[float] = []
    net.train()
    try:
        for step in iterator:
            inputs, targets = to_device(recipe.batch(step, generator), where)
            loss = recipe.loss(net(*inputs), targets)
            if not torch.isfinite(loss):
                raise InputError(f"training '{name}' diverged at step {step} (loss {float(loss.detach())})")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if show:
                iterator.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        if home != where:
            net.to(home)
    return losses


def recipe(name: str, **cfg: Any) -> TrainingRecipe:
    """The `TrainingRecipe` that trains ``create(name, **cfg)`` (its batches, loss and held-out
    metrics at that config's input size).

    Example:
        >>> recipe("camera_multitask") is spec("camera_multitask").recipe
        True
    """
    return _recipe(name, cfg)


def _recipe(name: str, cfg: dict[str, Any]) -> TrainingRecipe:
    model_spec = spec(name)
    found = model_spec.recipe
    if found is None:
        raise InputError(f"model '{name}' has no training recipe")
    if isinstance(found, TrainingRecipe):
        if not cfg:
            return found
        if model_spec.config_recipe is None:  # its data fits the default config only
            raise InputError(
                f"the training recipe of '{name}' trains its default config only; got config {sorted(cfg)}"
            )
        return model_spec.config_recipe(**cfg)
    return found(**cfg)
