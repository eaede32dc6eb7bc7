"""What a pipeline trains, compresses and evaluates: a bundled model's recipe, or the user's own
model with their data factory, loss and metric.

Both give the nodes the same few steps (make the data, train, fine-tune, evaluate), so the DAG
does not care whose model it is. A task's `identity` (names, config, the source of the user's
functions, the checkpoint's SHA-256) is part of every fingerprint: changing any of it reruns
from the data node.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import fxopt
import fxopt.models
from fxopt.automation.artefacts import file_sha256
from fxopt.automation.errors import PipelineConfigError

__all__ = ["RecipeTask", "Task", "UserTask", "source_digest"]


def source_digest(fn: Any) -> str:
    """SHA-256 of a function's source (its qualified name where the source is unavailable).

    Example:
        >>> len(source_digest(source_digest))
        64
    """
    if isinstance(fn, functools.partial):  # its function's source and the arguments it fixes (no memory address)
        text = source_digest(fn.func) + repr(fn.args) + repr(sorted(fn.keywords.items()))
        return hashlib.sha256(text.encode()).hexdigest()
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        text = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    return hashlib.sha256(text.encode()).hexdigest()


def _single_samples(batches: Sequence[tuple[torch.Tensor, ...]], like: tuple[Any, ...], count: int) -> list[tuple[Any, ...]]:
    # calibration batches take the example inputs' shapes: split recipe batches along dim 0
    out: list[tuple[Any, ...]] = []
    for inputs in batches:
        size = inputs[0].shape[0] if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
        for i in range(size):
            sample = tuple(t[i:i + 1] if isinstance(t, torch.Tensor) and t.dim() else t for t in inputs)
            if all(not isinstance(a, torch.Tensor) or a.shape == b.shape for a, b in zip(sample, like)):
                out.append(sample)
            if len(out) == count:
                return out
    return out


class Task:
    """The interface every node uses; see `RecipeTask` and `UserTask`."""

    name: str

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def example_inputs(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def build(self) -> nn.Module:
        raise NotImplementedError

    def make_data(self, seed: int, calib_batches: int) -> dict[str, Any]:
        raise NotImplementedError

    def train(self, data: dict[str, Any], steps: int | None, seed: int,
              device: str | None = None) -> tuple[nn.Module, dict[str, float]]:
        """The trained model (on the CPU, in eval mode) and its metrics; the steps run on `device`."""
        raise NotImplementedError

    def finetune_source(self, data: dict[str, Any]) -> dict[str, Any]:
        """``recipe=`` or ``data=``/``loss=`` for `fxopt.distill.resolve`."""
        raise NotImplementedError

    def finetune_lr(self) -> float | None:
        return None

    def evaluate(self, model: Callable[..., Any], data: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError


@dataclass(frozen=True)
class RecipeTask(Task):
    """A bundled model (`fxopt.models.names()`) trained and scored by its recipe.

    Data: the recipe's seeded generator (calibration batches drawn from it; the training stream
    is the one `fxopt.models.train` draws from the same seed). Evaluation: the recipe's fixed,
    seeded held-out set and metrics.

    Example:
        >>> RecipeTask("motionnet").identity()["model"]
        'motionnet'
    """

    name: str
    config: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.name not in fxopt.models.names():
            raise PipelineConfigError(f"unknown model '{self.name}'; bundled models: {', '.join(fxopt.models.names())} "
                                      "(or pass a UserTask for your own model)")
        self.recipe  # noqa: B018 - refuse a model without a recipe now, before any work

    @property
    def cfg(self) -> dict[str, Any]:
        return dict(self.config)

    @property
    def recipe(self) -> Any:
        try:
            return fxopt.models.recipe(self.name, **self.cfg)
        except fxopt.InputError as error:
            raise PipelineConfigError(str(error)) from None

    def identity(self) -> dict[str, Any]:
        recipe = self.recipe  # its code and settings: a changed generator, loss or metric reruns from data
        return {"model": self.name, "config": sorted(self.cfg.items()),
                "recipe": {"batch": source_digest(recipe.batch), "loss": source_digest(recipe.loss),
                           "evaluate": source_digest(recipe.evaluate), "steps": recipe.steps, "lr": recipe.lr,
                           "validate": source_digest(recipe.validate) if recipe.validate is not None else None,
                           "bn_batches": recipe.bn_batches, "finetune_lr": recipe.finetune_lr}}

    def example_inputs(self) -> tuple[Any, ...]:
        return fxopt.models.example_inputs(self.name, **self.cfg)

    def build(self) -> nn.Module:
        return fxopt.models.create(self.name, **self.cfg)

    def make_data(self, seed: int, calib_batches: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed + 1_000_003)  # apart from train()'s stream
        batches = [tuple(self.recipe.batch(i, generator)[0]) for i in range(calib_batches)]
        calib = _single_samples(batches, self.example_inputs(), calib_batches)
        if not calib:
            raise PipelineConfigError(f"the recipe of '{self.name}' gave no batch of the example inputs' shapes")
        probe = self.recipe.batch(0, torch.Generator().manual_seed(seed))[0]  # the training stream's first batch
        return {"calib": calib, "train_probe": tuple(probe), "train": None, "eval": None}

    def train(self, data: dict[str, Any], steps: int | None, seed: int,
              device: str | None = None) -> tuple[nn.Module, dict[str, float]]:
        result = fxopt.models.train(self.name, steps, seed=seed, progress=False, device=device, **self.cfg)
        return result.model, dict(result.metrics)

    def finetune_source(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"recipe": self.recipe}

    def finetune_lr(self) -> float | None:
        return self.recipe.finetune_lr

    def evaluate(self, model: Callable[..., Any], data: dict[str, Any]) -> dict[str, float]:
        with torch.no_grad():
            return {k: float(v) for k, v in self.recipe.evaluate(model).items()}


@dataclass(frozen=True)
class UserTask(Task):
    """Your own model and data for the pipeline.

    Attributes:
        name: a short name for reports.
        build: ``() -> nn.Module`` with the architecture (weights come from `checkpoint` or training).
        data: ``(seed) -> {"train": [(inputs, target)], "eval": [(inputs, target)]}``; ``inputs`` is a
            tuple of positional tensors; an optional ``"calib": [inputs]`` (else the first train inputs).
        loss: ``(outputs, target) -> scalar`` for training and fine-tuning.
        metrics: ``(model, eval_batches) -> {metric: value}``; ``model`` is a callable on ``*inputs``
            (the deployed ONNX file in ONNX Runtime at evaluation). The first metric is the headline.
        example_inputs: one batch of positional inputs fixing the compiled shapes.
        checkpoint: a ``state_dict`` file for ``build()``; None trains for `train_steps` instead.
        train_steps, lr: training (when there is no checkpoint) with `fxopt.finetune` (labels only).

    Example:
        >>> import torch
        >>> task = UserTask("lin", build=lambda: torch.nn.Linear(4, 2),
        ...                 data=lambda seed: {"train": [], "eval": []}, loss=torch.nn.functional.cross_entropy,
        ...                 metrics=lambda model, batches: {"acc": 1.0}, example_inputs=(torch.zeros(1, 4),))
        >>> sorted(task.identity())
        ['build', 'checkpoint', 'data', 'example_inputs', 'loss', 'lr', 'metrics', 'name', 'train_steps']
    """

    name: str
    build_fn: Callable[[], nn.Module]
    data: Callable[[int], dict[str, Any]]
    loss: Callable[[Any, Any], torch.Tensor]
    metrics: Callable[[Callable[..., Any], list[Any]], dict[str, float]]
    example: tuple[Any, ...]
    checkpoint: str | None = None
    train_steps: int = 100
    lr: float = 1e-3

    def __init__(self, name: str, *, build: Callable[[], nn.Module], data: Callable[[int], dict[str, Any]],
                 loss: Callable[[Any, Any], torch.Tensor], metrics: Callable[[Callable[..., Any], list[Any]], dict[str, float]],
                 example_inputs: tuple[Any, ...], checkpoint: str | os.PathLike[str] | None = None,
                 train_steps: int = 100, lr: float = 1e-3) -> None:
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise PipelineConfigError(f"checkpoint '{checkpoint}' is not a file; give the state_dict saved by torch.save, "
                                      "or checkpoint=None to train")
        if train_steps < 0:
            raise PipelineConfigError(f"train_steps must be >= 0, got {train_steps}")
        for label, fn in (("build", build), ("data", data), ("loss", loss), ("metrics", metrics)):
            if not callable(fn):
                raise PipelineConfigError(f"UserTask {label}= must be callable, got {type(fn).__name__}")
        example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        for key, value in (("name", name), ("build_fn", build), ("data", data), ("loss", loss), ("metrics", metrics),
                           ("example", example), ("checkpoint", None if checkpoint is None else os.fspath(checkpoint)),
                           ("train_steps", train_steps), ("lr", lr)):
            object.__setattr__(self, key, value)

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name, "build": source_digest(self.build_fn), "data": source_digest(self.data),
            "loss": source_digest(self.loss), "metrics": source_digest(self.metrics),
            "example_inputs": [list(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in self.example],
            "checkpoint": None if self.checkpoint is None else file_sha256(self.checkpoint),
            "train_steps": self.train_steps, "lr": self.lr,
        }

    def example_inputs(self) -> tuple[Any, ...]:
        return self.example

    def build(self) -> nn.Module:
        model = self.build_fn()
        if not isinstance(model, nn.Module):
            raise PipelineConfigError(f"UserTask '{self.name}': build() returned {type(model).__name__}, not an nn.Module")
        return model

    def make_data(self, seed: int, calib_batches: int) -> dict[str, Any]:
        data = dict(self.data(seed))
        for key in ("train", "eval"):
            if not isinstance(data.get(key), (list, tuple)):
                raise PipelineConfigError(f"UserTask '{self.name}': data(seed) must return a dict with a list under '{key}'")
        if not data["eval"]:
            raise PipelineConfigError(f"UserTask '{self.name}': data(seed)['eval'] is empty; the deployed file is scored on it")
        calib = data.get("calib") or [tuple(b[0]) if isinstance(b[0], tuple) else (b[0],) for b in data["train"]]
        return {"calib": _single_samples(calib, self.example, calib_batches) or list(calib)[:calib_batches],
                "train": list(data["train"]), "eval": list(data["eval"])}

    def train(self, data: dict[str, Any], steps: int | None, seed: int,
              device: str | None = None) -> tuple[nn.Module, dict[str, float]]:
        torch.manual_seed(seed)
        model = self.build()
        if self.checkpoint is not None:
            model.load_state_dict(torch.load(self.checkpoint, map_location="cpu", weights_only=True))
        else:
            if not data["train"]:
                raise PipelineConfigError(f"UserTask '{self.name}': no checkpoint and no training batches")
            fxopt.finetune(model, data["train"], loss=self.loss, steps=self.train_steps if steps is None else steps,
                           lr=self.lr, seed=seed, progress=False, device=device)
        model.eval()
        with torch.no_grad():
            return model, {k: float(v) for k, v in self.metrics(model, data["eval"]).items()}

    def finetune_source(self, data: dict[str, Any]) -> dict[str, Any]:
        if not data["train"]:
            raise PipelineConfigError(f"UserTask '{self.name}': fine-tuning needs training batches in data(seed)['train']")
        return {"data": data["train"], "loss": self.loss}

    def finetune_lr(self) -> float | None:
        return self.lr

    def evaluate(self, model: Callable[..., Any], data: dict[str, Any]) -> dict[str, float]:
        with torch.no_grad():
            return {k: float(v) for k, v in self.metrics(model, data["eval"]).items()}
