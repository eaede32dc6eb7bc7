"""From compile's short requests (``distill="kd" | "ickd" | [...]``, ``recipe=``) to what
`fxopt.distill.finetune` takes: data, task loss, a `Distill` and an eval function.

The output distillation form follows the model's outputs: class logits ``(N, C)`` get `LogitKD`;
a dict or tuple of head outputs gets `OutputKD` with a loss per head, chosen by the head's name
(`OUTPUT_KD`); features are the student's trunk stages (`fxopt.passes.distill.stage_features`).
Default weights are the ones bench/results/distill.md measured to help.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fxopt.distill.device import training_device
from fxopt.distill.loop import Distill, with_recipe
from fxopt.distill.losses import ICKD, FeatureMSE, LogitKD, OutputKD, SigmoidKD
from fxopt.errors import InputError

__all__ = ["DISTILL_PARTS", "OUTPUT_KD", "FinetuneRequest", "FinetuneSetup", "check_distill", "resolve"]

KD_TEMPERATURE = 4.0  # Hinton's T for class logits; bench/results/distill.md, "Temperature"
DENSE_TEMPERATURE = 1.0  # per-pixel heads: the teacher's maps are already soft
ICKD_WEIGHT = 100.0  # ICKD is scale-free and its gradient ~1/60 of cross-entropy's at weight 1 ("Loss magnitudes")
FEATURE_MSE_WEIGHT = 1.0

DISTILL_PARTS = ("kd", "ickd", "mse")  # output KD; ICKD on trunk stages; FitNets MSE on them

# Per head name of a multi-head model's outputs: how its logits are distilled, and the weight.
# a dense map of independent probabilities (CenterNet heatmaps) -> binary KL per element; its mean
#   over every cell has ~1/500 of the gradient of a focal loss normalised by the centres
#   (bench/results/distill.md, camera_multitask's loss terms), hence the weight
# a per-pixel class map (segmentation, BEV category / state) -> softmax KL over dim 1 per pixel
OUTPUT_KD: dict[str, tuple[Callable[[], nn.Module], float]] = {
    "heatmap": (lambda: SigmoidKD(DENSE_TEMPERATURE), 500.0),
    "seg": (lambda: LogitKD(DENSE_TEMPERATURE), 1.0),
    "category": (lambda: LogitKD(DENSE_TEMPERATURE), 1.0),
    "state": (lambda: LogitKD(DENSE_TEMPERATURE), 1.0),
}


@dataclass(frozen=True)
class FinetuneSetup:
    """Keyword arguments for `finetune` (``finetune(student, **setup.kwargs(), steps=..., lr=...)``).

    Attributes:
        data: ``(inputs, target)`` batches.
        loss: the task loss, or None (distillation alone).
        distill: what to distil, or None (labels only).
        eval_fn: ``model -> metric`` (higher is better), or None.
        notes: what was chosen and why, one line each, for the report.
    """

    data: Iterable[Any]
    loss: Callable[[Any, Any], Tensor] | None
    distill: Distill | None
    eval_fn: Callable[[nn.Module], float] | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def kwargs(self) -> dict[str, Any]:
        return {"data": self.data, "loss": self.loss, "distill": self.distill, "eval_fn": self.eval_fn}


def check_distill(distill: Any) -> None:
    """Refuse, before any work, a `distill` that names no known part (`DISTILL_PARTS`).

    Example:
        >>> check_distill(["kd", "ickd"])
        >>> check_distill("kdd")
        Traceback (most recent call last):
        ...
        fxopt.errors.InputError: distill must name some of ['kd', 'ickd', 'mse'] (or be a Distill), got 'kdd'
    """
    if distill is not None and not isinstance(distill, Distill):
        _parts(distill)


def _parts(distill: str | Sequence[str]) -> tuple[str, ...]:
    parts = (distill,) if isinstance(distill, str) else tuple(distill)
    unknown = [p for p in parts if p not in DISTILL_PARTS]
    if unknown or not parts:
        raise InputError(f"distill must name some of {list(DISTILL_PARTS)} (or be a Distill), got {distill!r}")
    return parts


def _output_kd(output: Any) -> tuple[nn.Module, str]:
    if isinstance(output, Tensor):
        if output.dim() == 2:
            return LogitKD(KD_TEMPERATURE), f"output KD: LogitKD(T={KD_TEMPERATURE:g}) on the class logits"
        return LogitKD(DENSE_TEMPERATURE), f"output KD: LogitKD(T={DENSE_TEMPERATURE:g}) per position over dim 1 of the dense output"
    keys: Iterable[Any] = output.keys() if isinstance(output, Mapping) else range(len(output))
    keys = list(keys)
    losses = {k: OUTPUT_KD[k][0]() for k in keys if isinstance(k, str) and k in OUTPUT_KD}
    if not losses:
        raise InputError(f"distill='kd': no output named {sorted(OUTPUT_KD)}; give distill=Distill(logits=OutputKD({{...}}))"
                         " with a loss per head")
    skipped = [str(k) for k in keys if k not in losses]
    weights = {k: OUTPUT_KD[k][1] for k in losses}
    return OutputKD(losses, weights), ("output KD: " + ", ".join(
        f"{k}: {type(v).__name__} x {weights[k]:g}" for k, v in losses.items())
                              + (f"; not distilled: {', '.join(skipped)}" if skipped else ""))


def _describe(loss: Any) -> str:
    if isinstance(loss, OutputKD):
        return "OutputKD(" + ", ".join(f"{k}: {type(m).__name__} x {w:g}" for k, m, w in zip(loss.keys, loss.losses, loss.weights)) + ")"
    return type(loss).__name__


def resolve(
    distill: str | Sequence[str] | Distill | None,
    *,
    teacher: nn.Module,
    example_inputs: tuple[Any, ...],
    recipe: Any = None,
    data: Iterable[Any] | None = None,
    loss: Callable[[Any, Any], Tensor] | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    kept: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> FinetuneSetup:
    """Turn compile's fine-tune requests into `finetune` arguments.

    Args:
        distill: None (labels only); a `Distill` (used as given, `kept` filled in when it has none);
            or names from `DISTILL_PARTS`: ``"kd"`` distils the outputs (the recipe's own output KD
            where it carries one, ``recipe.distill``; else `LogitKD` at T = 4 on class logits,
            `OutputKD` per named head of a multi-head model, see `OUTPUT_KD`), ``"ickd"``
            adds `ICKD` at grids (1, 2) and weight 100 on the student's trunk stages, ``"mse"``
            FitNets regression on them; ``["kd", "ickd"]`` combines.
        teacher: the reference model (the traced original in compile); run once on
            `example_inputs` to see its outputs.
        example_inputs: a batch of model inputs.
        recipe: a bundled model's `TrainingRecipe`: supplies `data` (`RecipeBatches`), `loss` and
            `eval_fn` (its first metric) where they are not given.
        data, loss, eval_fn: as for `finetune`; given ones win over the recipe's.
        kept: ``{student node: kept teacher channels}`` (`fxopt.passes.distill.kept_channels` of
            the prune pass), so features compare on the kept channels with no adapter.
        seed: seeds the recipe's batches.

    Returns:
        A `FinetuneSetup`.

    Example:
        >>> import torch, fxopt
        >>> teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> setup = resolve("kd", teacher=teacher, example_inputs=(torch.randn(2, 4),),
        ...                 data=[((torch.randn(2, 4),), torch.tensor([0, 1]))], loss=torch.nn.CrossEntropyLoss())
        >>> type(setup.distill.logits).__name__, setup.notes
        ('LogitKD', ('output KD: LogitKD(T=4) on the class logits',))
    """
    data, loss, eval_fn = with_recipe(recipe, data, loss, eval_fn, seed)
    if data is None:
        raise InputError("fine-tuning needs train_data= ((inputs, target) batches) or recipe= (a bundled model's)")
    if distill is None:
        if loss is None:
            raise InputError("fine-tuning needs loss= (or recipe=) when nothing is distilled")
        return FinetuneSetup(data, loss, None, eval_fn, ("labels only",))
    if isinstance(distill, Distill):
        if distill.kept is None and kept is not None:
            from dataclasses import replace

            distill = replace(distill, kept=dict(kept))
        return FinetuneSetup(data, loss, distill, eval_fn, ("distill as given",))
    parts = _parts(distill)
    notes: list[str] = []
    logits = None
    recipe_kd = getattr(getattr(recipe, "distill", None), "logits", None)
    if "kd" in parts and recipe_kd is not None:  # a bundled model's own output KD, measured on it
        logits = recipe_kd
        notes.append(f"output KD: the recipe's {_describe(recipe_kd)}")
    elif "kd" in parts:
        was_training = teacher.training
        teacher.eval()
        with torch.no_grad():
            output = teacher(*example_inputs)
        teacher.train(was_training)
        logits, note = _output_kd(output)
        notes.append(note)
    feature_loss, weight = None, 1.0
    if "ickd" in parts and "mse" in parts:
        raise InputError("distill: 'ickd' and 'mse' both act on the features; name one")
    if "ickd" in parts:
        feature_loss, weight = ICKD((1, 2)), ICKD_WEIGHT
        notes.append(f"features: ICKD at grids (1, 2), weight {ICKD_WEIGHT:g}, on the trunk stages"
                     + (" (kept teacher channels)" if kept else ""))
    elif "mse" in parts:
        feature_loss, weight = FeatureMSE(), FEATURE_MSE_WEIGHT
        notes.append(f"features: FitNets MSE, weight {FEATURE_MSE_WEIGHT:g}, on the trunk stages")
    return FinetuneSetup(data, loss, Distill(
        logits=logits, features="stages" if feature_loss is not None else (), feature_loss=feature_loss,
        feature_weight=weight, kept=dict(kept) if kept else None), eval_fn, tuple(notes))


@dataclass(frozen=True)
class FinetuneRequest:
    """The fine-tune `fxopt.compile` runs after its structural passes, as a pass sees it
    (``CompileContext.finetune``): a pass choosing between candidates (slim's re-rank) fine-tunes
    each the same way, for fewer steps, and compares them on the metric compile's fine-tune keeps
    its best state by.

    Attributes: compile's ``distill``, ``recipe``, ``train_data`` (`data`), ``loss``, a scalar
    ``eval_fn`` (None where compile's returns a dict), ``finetune_lr`` (None: chosen as compile
    chooses it, `fxopt.distill.choose_lr`) and ``finetune_seed``; for the ``finetune`` pass, the
    ``teacher`` (compile's traced model; None: the graph as it comes to the pass), compile's summary
    table ``stages`` (see `fxopt.distill.step.tune_graph`) and the pipeline's ``passes`` (a prune
    run among them gives the kept channels to feature distillation); compile's ``device`` (where
    the steps run, `fxopt.distill.device.training_device`; None: CUDA when available, else the
    CPU), checked when the request is made.
    """

    distill: Any = None
    recipe: Any = None
    data: Any = None
    loss: Any = None
    eval_fn: Callable[[nn.Module], float] | None = None
    lr: float | None = None
    seed: int = 0
    teacher: nn.Module | None = None
    stages: Any = None
    passes: tuple[Any, ...] = ()
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        if self.device is not None:
            training_device(self.device)  # a device not available here is refused before any work

    @property
    def scores(self) -> bool:
        """Whether a tuned candidate gets a metric: a scalar eval_fn, or the recipe's first metric."""
        return self.eval_fn is not None or self.recipe is not None

    def tune_and_score(self, student: nn.Module, teacher: nn.Module, example_inputs: tuple[Any, ...], steps: int,
                       progress: bool = False) -> float:
        """Fine-tune `student` in place for `steps` steps as compile would, `teacher` teaching, and
        return its metric at the end (higher is better; no best-state restore)."""
        from fxopt.distill.loop import finetune
        from fxopt.distill.lr_range import choose_lr

        setup = resolve(self.distill, teacher=teacher, example_inputs=example_inputs, recipe=self.recipe, data=self.data,
                        loss=self.loss, eval_fn=self.eval_fn, seed=self.seed)
        if setup.eval_fn is None:
            raise InputError("a fine-tune request scores candidates with a scalar eval_fn or a recipe's metric; it has neither")
        by = teacher if setup.distill is not None else None
        lr = choose_lr(self.lr, recipe=self.recipe, student=student, data=setup.data, loss=setup.loss, teacher=by,
                       distill=setup.distill, steps=steps, seed=self.seed, device=self.device).lr
        finetune(student, data=setup.data, loss=setup.loss, distill=setup.distill, teacher=by, steps=steps, lr=lr, seed=self.seed,
                 progress=progress, device=self.device)
        student.eval()
        with torch.no_grad():
            return float(setup.eval_fn(student))
