"""The model registry: `create(name, **cfg)`, `example_inputs(name, **cfg)`, `names()`.

Each model module registers a `ModelSpec` at import; the registry imports the bundled model
modules the first time it is asked, so `import fxopt.models` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from fxopt.errors import InputError

__all__ = ["ModelSpec", "TrainingRecipe", "create", "example_inputs", "names", "register_model", "spec", "spec_of_model"]

# modules that register the bundled models (imported lazily, in this order)
BUNDLED_MODULES = (
    "fxopt.models.pointpillars",
    "fxopt.models.camera_multitask",
    "fxopt.models.motionnet",
    "fxopt.safety.supervisor",
)

_SPECS: dict[str, ModelSpec] = {}
_LOADED = False


@dataclass(frozen=True)
class ModelSpec:
    """How to build one bundled model and its example inputs.

    Attributes:
        name: registry name.
        build: ``(**cfg) -> nn.Module`` with random (seeded by the caller) weights.
        inputs: ``(**cfg) -> tuple`` of example inputs matching ``build(**cfg)``.
        summary: one line for listings.
        presets: names accepted as ``preset=`` (the small default config is always available).
        recipe: how `fxopt.models.train` trains it on generated data (None: not trainable here);
            a `TrainingRecipe` trains the default config only, a function ``(**cfg) -> TrainingRecipe``
            any config.
        config_recipe: ``(**cfg) -> TrainingRecipe`` for configs other than the default, when
            `recipe` is the default config's `TrainingRecipe` (see `fxopt.models.recipe`).
        precision: the precision it must be deployed at, whatever the target's default
            (``None``: the target's); e.g. fp32 for a supervisor whose pass-through must be exact.
        safety: the compile policy it is deployed under by default: ``"strict"`` (see
            `fxopt.safety.policy`: no lossy pass, the required precision, audited ops, a
            determinism check, `properties` and `equivalence` re-run on the lowered model) or
            ``None`` (an ordinary model).
        properties: the model's own property suite, ``(runner, model) -> {property: {"cases": n,
            "failures": k, "example": str | None}}``, where ``runner(*inputs) -> {output: array}``
            runs one implementation (the compiled graph, the ONNX file) on numpy inputs and
            ``model`` is the eager model compiled (or None: the default config); seeded and
            deterministic, a second or so, so strict compiles can run it every time.
        model_type: the class `build` returns, so `spec_of_model` can find the spec (and its
            safety policy and precision) of a model the user built directly.
        equivalence: ``(model, onnx_model) -> evidence dict`` (rows checked, max error, rule
            mismatches, passed) comparing the lowering with the eager model beyond the example
            inputs; it raises `fxopt.SafetyPolicyError` when they differ.
    """

    name: str
    build: Callable[..., nn.Module]
    inputs: Callable[..., tuple[Any, ...]]
    summary: str = ""
    presets: tuple[str, ...] = ()
    recipe: TrainingRecipe | Callable[..., TrainingRecipe] | None = None
    config_recipe: Callable[..., TrainingRecipe] | None = None
    precision: str | None = None
    safety: str | None = None
    properties: Callable[[Callable[..., Mapping[str, Any]], nn.Module | None], Mapping[str, Mapping[str, Any]]] | None = None
    equivalence: Callable[[nn.Module, Any], Mapping[str, Any]] | None = None
    model_type: type[nn.Module] | None = None


@dataclass(frozen=True)
class TrainingRecipe:
    """A short training recipe on generated data, used by `fxopt.models.train`.

    Attributes:
        batch: ``(step, generator) -> (inputs, targets)``: one training batch; ``inputs`` is the
            tuple of positional model inputs, ``targets`` whatever ``loss`` reads.
        loss: ``(outputs, targets) -> scalar tensor``.
        evaluate: ``(model) -> {metric: value}`` on a fixed, seeded held-out set (model in eval mode):
            the figures reported.
        validate: the same metrics on a validation set drawn apart from `evaluate`'s: what a
            fine-tune keeps its best state by and slim's re-rank scores on, so the reported figures
            are not the ones chosen on; None: `evaluate` serves both.
        chance: the same metrics for an untrained / constant predictor, to judge "above chance";
            a mapping, or a function computing it (called by `train`, so listing models stays cheap).
        steps: default number of optimiser steps (a few CPU minutes at most).
        lr: Adam learning rate.
        bn_batches: after the last step, re-estimate every BatchNorm's running statistics as the
            plain average over this many fresh recipe batches at the final weights ("precise
            BN"; 0: keep the running averages of training). A short recipe with a slow BatchNorm
            momentum needs it: the running statistics still average the weights of many steps
            ago, and a deep net's eval-mode outputs drift far from its training-mode ones.
        finetune_lr: Adam learning rate of a fine-tune after compression (`fxopt.compile`'s
            ``finetune_lr=None`` takes it); None: compile chooses one by a short range test.
        finetune_steps: the fine-tune's steps that met the model's accuracy goal (a recommendation:
            compile's ``finetune_steps`` is what runs; a WARNING's advice names it when fewer ran).
        distill: what ``distill="kd"`` distils for this model (a `fxopt.distill.Distill`, its
            `OutputKD` with one loss per head); None: `fxopt.distill.resolve` picks by head name.
    """

    batch: Callable[[int, Any], tuple[tuple[Any, ...], Any]]
    loss: Callable[[Any, Any], Any]
    evaluate: Callable[[nn.Module], dict[str, float]]
    chance: Mapping[str, float] | Callable[[], Mapping[str, float]]
    steps: int = 300
    lr: float = 1e-3
    bn_batches: int = 0
    finetune_lr: float | None = None
    finetune_steps: int | None = None
    distill: Any = None
    validate: Callable[[nn.Module], dict[str, float]] | None = None


def register_model(model_spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry; a name already taken by another spec is an error."""
    existing = _SPECS.get(model_spec.name)
    if existing is not None and existing.build is not model_spec.build:
        raise InputError(f"model name '{model_spec.name}' is already registered")
    _SPECS[model_spec.name] = model_spec
    return model_spec


def _load_bundled() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in BUNDLED_MODULES:
            importlib.import_module(module)


def names() -> list[str]:
    """Names of all registered models, sorted."""
    _load_bundled()
    return sorted(_SPECS)


def spec(name: str) -> ModelSpec:
    """The `ModelSpec` registered as `name`; raises `InputError` listing the known names."""
    _load_bundled()
    try:
        return _SPECS[name]
    except KeyError:
        raise InputError(f"unknown model '{name}'; known models: {', '.join(sorted(_SPECS))}") from None


def spec_of_model(model: nn.Module) -> ModelSpec | None:
    """The registered spec whose `model_type` `model` is an instance of (``None`` if none).

    Only specs already registered are searched (a model's class registers its spec when its
    module is imported), so asking about an arbitrary model imports nothing.

    Example:
        >>> from fxopt.safety import SafetySupervisor
        >>> spec_of_model(SafetySupervisor()).name, spec_of_model(nn.ReLU())
        ('safety_supervisor', None)
    """
    return next((s for s in _SPECS.values() if s.model_type is not None and isinstance(model, s.model_type)), None)


def create(name: str, **cfg: Any) -> nn.Module:
    """Build the model registered as `name` (random weights; seed torch first for repeatability).

    Example:
        >>> import torch, fxopt.models
        >>> _ = torch.manual_seed(0)
        >>> model = fxopt.models.create("safety_supervisor")
        >>> isinstance(model, torch.nn.Module)
        True
    """
    return spec(name).build(**cfg)


def example_inputs(name: str, **cfg: Any) -> tuple[Any, ...]:
    """Example inputs for `create(name, **cfg)` (a tuple of positional inputs)."""
    return tuple(spec(name).inputs(**cfg))
