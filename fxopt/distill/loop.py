"""The fine-tune loop that wins back what pruning and int8 lose: task loss plus optional
distillation from a teacher, periodic evaluation keeping the best state, seeded and NaN-safe.

Works on any module, including the GraphModule of `fxopt.compile(...)` (pruned, or
fake-quantised by `QuantizeInt8`: fake quantisation passes gradients straight through, so this is
quantisation-aware training). Feature distillation adds `fxopt.passes.distill` hooks to a copy of
the graph that shares the student's parameters; the student's own graph never changes.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from fxopt.distill.device import home_device, to_device, training_device
from fxopt.errors import FxoptWarning, InputError, warn
from fxopt.frontend.tracing import propagate_shapes

__all__ = ["Distill", "FinetuneResult", "RecipeBatches", "TensorBatches", "finetune", "recipe_metric", "trial_loss"]


@dataclass(frozen=True)
class Distill:
    """What the student learns from the teacher, and how much each part weighs.

    Attributes:
        logits: a loss on ``(student output, teacher output)``, e.g. `LogitKD` or `SigmoidKD`;
            None: no output distillation.
        logit_weight: its weight.
        features: node names in both graphs, ``{student node: teacher node}``, or ``"stages"``
            (the last node at each spatial resolution); see `fxopt.passes.distill.match_features`.
        feature_loss: a loss on ``(student feature, teacher feature)``, e.g. `FeatureMSE`, `ICKD`;
            averaged over the matched features.
        feature_weight: its weight.
        kept: ``{student node: kept teacher channel indices}`` (`fxopt.passes.distill.kept_channels`
            of the prune pass): the teacher feature is sliced to them. Without it a channel count
            mismatch gets a learned 1×1 adapter (conv, or linear on 2-D features), used in
            training only and never exported.
        task_weight: weight of the task `loss` given to `finetune`.
    """

    logits: nn.Module | Callable[[Any, Any], Tensor] | None = None
    logit_weight: float = 1.0
    features: Sequence[str] | Mapping[str, str] | str = ()
    feature_loss: nn.Module | Callable[[Tensor, Tensor], Tensor] | None = None
    feature_weight: float = 1.0
    kept: Mapping[str, Sequence[int]] | None = None
    task_weight: float = 1.0


@dataclass
class FinetuneResult:
    """What a `finetune` run did.

    Attributes:
        steps_run: optimiser steps taken.
        history: one dict per step: ``step``, ``loss`` (the total) and its parts ``task``,
            ``logits``, ``features`` where present.
        evals: ``(step, metric)`` for every evaluation (step 0 is before training).
        best_metric: the best metric seen (None without `eval_fn`).
        best_step: the step whose state the student holds at the end (None: the last step).
        stopped_reason: ``"completed"`` or ``"non-finite loss (nan) at step k"``.
        notes: what happened that a user should know (a restored state, a stop).
        device: where the steps ran (``"cpu"``, ``"cuda:0"``).
    """

    steps_run: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    stopped_reason: str = "completed"
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"

    def summary(self) -> str:
        """One line per fact: steps, stop reason, best metric, notes."""
        lines = [f"fine-tune: {self.steps_run} steps, {self.stopped_reason}"]
        if self.best_metric is not None:
            lines.append(f"best metric {self.best_metric:.4f} at step {self.best_step}")
        return "\n".join(lines + self.notes)


class TensorBatches:
    """Shuffled mini-batches ``(x[idx], y[idx])`` of in-memory tensors; every pass over it draws
    a new order from its own seeded generator, so runs repeat exactly.

    Example:
        >>> batches = TensorBatches(torch.arange(5.0), torch.arange(5), batch_size=2, seed=0)
        >>> [len(y) for _, y in batches]
        [2, 2, 1]
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int = 64, seed: int = 0) -> None:
        if len(x) != len(y) or len(y) == 0 or batch_size < 1:
            raise InputError(f"need x and y of the same non-zero length and batch_size >= 1, got {len(x)}, {len(y)}, {batch_size}")
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.y), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]


class RecipeBatches:
    """The endless, seeded training batches of a bundled model's `TrainingRecipe`:
    ``recipe.batch(step, generator)`` for step 0, 1, ...; every pass starts again from `seed`.

    Example:
        >>> import fxopt
        >>> batches = RecipeBatches(fxopt.models.spec("safety_supervisor").recipe, seed=0)
        >>> inputs, target = next(iter(batches))
        >>> isinstance(inputs, tuple)
        True
    """

    def __init__(self, recipe: Any, seed: int = 0) -> None:
        if not callable(getattr(recipe, "batch", None)):
            raise InputError(f"recipe must be a TrainingRecipe (fxopt.models.spec(name).recipe), got {type(recipe).__name__}")
        self.recipe, self.seed = recipe, seed

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        generator = torch.Generator().manual_seed(self.seed)
        step = 0
        while True:
            yield self.recipe.batch(step, generator)
            step += 1


def with_recipe(recipe: Any, data: Any, loss: Any, eval_fn: Any, seed: int = 0) -> tuple[Any, Any, Any]:
    """``(data, loss, eval_fn)`` with what is missing taken from a bundled model's recipe (its
    seeded batches, its loss, its first metric); given ones win; no recipe: unchanged."""
    if recipe is None:
        return data, loss, eval_fn
    return (RecipeBatches(recipe, seed) if data is None else data, recipe.loss if loss is None else loss,
            recipe_metric(recipe) if eval_fn is None else eval_fn)


def recipe_metric(recipe: Any, metric: str | None = None) -> Callable[[nn.Module], float]:
    """``model -> recipe.validate(model)[metric]`` (default: the recipe's first metric), an `eval_fn`
    to select by: on the recipe's validation set, apart from the held-out set `recipe.evaluate`
    reports on (a recipe without ``validate``: `recipe.evaluate`).

    Higher must be better: a metric named ``*error*`` or ``*loss*`` is refused.
    """
    scorer = getattr(recipe, "validate", None) or recipe.evaluate

    def evaluate(model: nn.Module) -> float:
        scores = scorer(model)
        name = metric if metric is not None else next(iter(scores))
        if name not in scores:
            raise InputError(f"the recipe reports {sorted(scores)}, not '{name}'")
        if "error" in name or "loss" in name:
            raise InputError(f"eval metric '{name}' is lower-better; fine-tune keeps the highest: name another")
        return float(scores[name])

    return evaluate


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    rounds = 0
    while True:
        n = 0
        for batch in data:
            n += 1
            yield batch
        if n == 0:
            raise InputError("data yielded no batches" if rounds == 0 else
                             "data was exhausted after one pass; give a re-iterable (a list, a DataLoader, TensorBatches)")
        rounds += 1


def _unpack(batch: Any) -> tuple[tuple[Any, ...], Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise InputError(f"each batch must be (inputs, target), got {type(batch).__name__}")
    inputs, target = batch
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), target


def _with_shapes(gm: GraphModule, args: tuple[Any, ...]) -> None:
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        training = gm.training
        gm.eval()
        with torch.no_grad():
            propagate_shapes(gm, args)
        gm.train(training)


class _FeatureMatch(nn.Module):
    """Teacher features reduced to the student's channels (kept indices) or student features
    mapped to the teacher's (learned adapters); training only."""

    def __init__(self, pairs: list[Any]) -> None:
        super().__init__()
        self.pairs = pairs
        self.adapters = nn.ModuleDict()
        for p in pairs:
            if p.kept is not None:
                if len(p.kept) != p.student_channels:
                    raise InputError(f"feature '{p.student}': {len(p.kept)} kept indices for {p.student_channels} student channels")
            elif p.student_channels != p.teacher_channels:
                if p.student_channels is None or p.teacher_channels is None:
                    raise InputError(f"feature '{p.student}': channel counts unknown; the graphs need shapes")
                self.adapters[p.student] = _adapter(p.student_channels, p.teacher_channels)

    def forward(self, s_feats: dict[str, Tensor], t_feats: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        out = []
        for p in self.pairs:
            s, t = s_feats[p.student], t_feats[p.teacher]
            if p.kept is not None:
                t = t.index_select(1, torch.as_tensor(p.kept, device=t.device))
            elif p.student in self.adapters:
                s = self.adapters[p.student](s)
            out.append((s, t))
        return out


class _Adapter(nn.Module):
    """A 1×1 conv over dim 1 of any-rank features (a linear map of channels)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.movedim(1, -1)).movedim(-1, 1)


def _adapter(c_in: int, c_out: int) -> nn.Module:
    return _Adapter(c_in, c_out)


@dataclass
class _Models:
    """The forward functions one step runs: student (and hooked), teacher (and hooked)."""

    student: nn.Module
    teacher: nn.Module | None
    match: _FeatureMatch | None

    def run(self, args: tuple[Any, ...]) -> tuple[Any, Any, list[tuple[Tensor, Tensor]]]:
        out = self.student(*args)
        t_out, pairs = None, []
        if self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(*args)
        if self.match is not None:
            (out, s_feats), (t_out, t_feats) = out, t_out
            pairs = self.match(s_feats, t_feats)
        return out, t_out, pairs


def _prepare(student: nn.Module, teacher: nn.Module | None, distill: Distill | None, first: tuple[Any, ...],
             device: torch.device) -> _Models:
    if distill is None:
        return _Models(student, None, None)
    if teacher is None:
        raise InputError("distill= needs a teacher=")
    teacher.eval()
    features = distill.features
    if not features or distill.feature_loss is None:
        if features or distill.feature_loss is not None:
            raise InputError("feature distillation needs both Distill.features and Distill.feature_loss")
        return _Models(student, teacher, None)
    from fxopt.extensions import extension
    from fxopt.frontend.tracing import trace

    match_features, hooked_copy = extension("feature_hooks", "distill")

    if not isinstance(student, GraphModule):
        raise InputError("feature distillation needs the student as a GraphModule: fxopt.trace(model, x) or fxopt.compile(...).graph_module")
    if not isinstance(teacher, GraphModule):
        teacher = trace(teacher, first)
    _with_shapes(student, first)
    _with_shapes(teacher, first)
    pairs = match_features(student, teacher, features, kept=distill.kept)
    match = _FeatureMatch(pairs).to(device)
    return _Models(
        hooked_copy(student, list(dict.fromkeys(p.student for p in pairs))),
        hooked_copy(teacher, list(dict.fromkeys(p.teacher for p in pairs))),
        match,
    )


class _Placement:
    """The models of one run on the training device: the student moved there in place for the
    steps (and back to where it started on leaving, or while `at_home`), the teacher as a copy
    there (it may share weights with graphs that must stay where they are)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, device: torch.device) -> None:
        self.student, self.device, self.home = student, device, home_device(student)
        teacher = getattr(teacher, "graph_module", teacher)  # a CompiledModel
        self.teacher = teacher if teacher is None or home_device(teacher) == device else _copy_on(teacher, device)

    @property
    def rng_devices(self) -> list[int]:
        """The CUDA devices whose generators the run forks (seeded, restored afterwards)."""
        return [self.device.index] if self.device.type == "cuda" else []

    def __enter__(self) -> _Placement:
        if self.home != self.device:  # at home: not touched at all
            self.student.to(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.home != self.device:
            self.student.to(self.home)

    @contextmanager
    def at_home(self) -> Iterator[None]:
        """The student back on its own device meanwhile: an eval_fn written for it runs unchanged."""
        if self.home == self.device:
            yield
            return
        self.student.to(self.home)
        try:
            yield
        finally:
            self.student.to(self.device)


def _copy_on(module: nn.Module, device: torch.device) -> nn.Module:
    # each weight copied once, straight to the device (no second copy on the host)
    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        moved = t.detach().to(device)
        memo[id(t)] = nn.Parameter(moved, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else moved
    return copy.deepcopy(module, memo)


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _show_progress(progress: bool | None) -> bool:
    return bool(progress) if progress is not None else sys.stderr.isatty()


def finetune(
    student: nn.Module,
    data: Iterable[Any] | None = None,
    *,
    loss: Callable[[Any, Any], Tensor] | None = None,
    teacher: nn.Module | None = None,
    distill: Distill | None = None,
    steps: int,
    lr: float,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    schedule: str = "cosine",
    eval_fn: Callable[[nn.Module], float] | None = None,
    eval_every: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    recipe: Any = None,
    device: str | torch.device | None = None,
) -> FinetuneResult:
    """Fine-tune `student` in place for `steps` steps and leave it in eval mode.

    The loss of a step is ``task_weight · loss(output, target)`` plus, with a teacher,
    ``logit_weight · logits(output, teacher output)`` and ``feature_weight · mean over matched
    features of feature_loss(student feature, teacher feature)``. The teacher is run in eval
    mode without gradients.

    Args:
        student: the model to train (a module, or a GraphModule from `fxopt.compile`).
        data: a re-iterable of ``(inputs, target)`` batches, cycled as long as needed;
            ``inputs`` is a tensor or a tuple of positional inputs.
        loss: the task loss ``(output, target) -> scalar``; None trains on distillation alone.
        teacher: the reference model for distillation.
        distill: what to distil (`Distill`); needs `teacher`.
        steps: optimiser steps.
        lr: learning rate.
        optimizer: ``params -> torch.optim.Optimizer``; default Adam.
        schedule: ``"cosine"`` decays the rate to zero over `steps`; ``"constant"`` keeps it.
        eval_fn: ``student -> metric``, higher is better; run (in eval mode, no gradients)
            before training, every `eval_every` steps and at the end. The best state is restored.
        eval_every: steps between evaluations; default ``max(1, steps // 10)``.
        seed: seeds torch's generators for the run (adapters, dropout, a DataLoader's order);
            the global generator state is restored afterwards.
        progress: a tqdm bar on stderr; default when stderr is a terminal.
        recipe: a bundled model's `fxopt.models.TrainingRecipe` (``fxopt.models.spec(name).recipe``)
            standing in for what is not given: `data` (its seeded batches, `RecipeBatches`), `loss`
            and `eval_fn` (its first metric, `recipe_metric`).
        device: where the steps run: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a torch.device; None:
            CUDA when available, else the CPU (`fxopt.distill.device.training_device`; a device not
            available here is an `InputError`). The student moves there for the steps and comes back
            to the device it started on; the teacher runs there as a copy; each batch moves there
            at its step; `eval_fn` sees the student on its own device, so one written for the CPU
            runs unchanged.

    Returns:
        A `FinetuneResult`. A NaN/Inf loss stops the run before its step is taken; the best
        (or, without `eval_fn`, the last finite checkpoint) state is restored and a
        `fxopt.FxoptWarning` says so.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> x = torch.randn(64, 2); y = x.sum(dim=1, keepdim=True)
        >>> r = finetune(model, [(x, y)], loss=nn.MSELoss(), steps=50, lr=0.1, progress=False)
        >>> r.history[-1]["loss"] < r.history[0]["loss"], r.stopped_reason
        (True, 'completed')
    """
    data, loss, eval_fn = with_recipe(recipe, data, loss, eval_fn, seed)
    if data is None:
        raise InputError("finetune needs data= ((inputs, target) batches) or recipe=")
    if steps < 0 or lr <= 0 or (eval_every is not None and eval_every < 1):
        raise InputError(f"need steps >= 0, lr > 0 and eval_every >= 1, got {steps}, {lr}, {eval_every}")
    if schedule not in ("cosine", "constant"):
        raise InputError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if loss is None and distill is None:
        raise InputError("nothing to train on: give loss= and/or distill=")
    student = getattr(student, "graph_module", student) if not isinstance(student, GraphModule) else student
    every = eval_every or max(1, steps // 10)
    place = _Placement(student, teacher, training_device(device))
    with torch.random.fork_rng(devices=place.rng_devices), place:
        torch.manual_seed(seed)
        return _Loop(place, data, loss, distill, steps, lr, optimizer, schedule, eval_fn, every, progress).run()


def trial_loss(student: nn.Module, data: Iterable[Any], held: Sequence[Any], *, loss: Callable[[Any, Any], Tensor] | None,
               teacher: nn.Module | None, distill: Distill | None, steps: int, lr: float, seed: int = 0,
               device: str | torch.device | None = None) -> float:
    """Train `student` in place for `steps` steps at the constant rate `lr` (no evaluation, no
    restore) on `device` (as `finetune`'s), then return its mean loss on the `held` batches; inf
    where the loss diverged. One arm of a learning-rate range test (`fxopt.distill.lr_range`)."""
    student = getattr(student, "graph_module", student) if not isinstance(student, GraphModule) else student
    place = _Placement(student, teacher, training_device(device))
    with torch.random.fork_rng(devices=place.rng_devices), place, warnings.catch_warnings():
        warnings.simplefilter("ignore", FxoptWarning)  # a diverging arm is a result here, not news
        torch.manual_seed(seed)
        run = _Loop(place, data, loss, distill, steps, lr, None, "constant", None, max(1, steps), False)
        result = run.run()
        if result.stopped_reason != "completed":
            return math.inf
        value = run.objective(held)
    return value if math.isfinite(value) else math.inf


class _Loop:
    """One fine-tune run: the state `finetune` threads through its steps."""

    def __init__(self, place: _Placement, data: Iterable[Any], loss: Any, distill: Distill | None,
                 steps: int, lr: float, optimizer: Any, schedule: str, eval_fn: Any, every: int, progress: bool | None) -> None:
        student = place.student
        self.place, self.student, self.loss, self.distill, self.steps = place, student, loss, distill, steps
        self.eval_fn, self.every = eval_fn, every
        self.batches = _cycle(data)
        first = next(self.batches)
        self.pending = [first]
        self.models = _prepare(student, place.teacher, distill, to_device(_unpack(first)[0], place.device), place.device)
        params = [p for p in student.parameters() if p.requires_grad]
        if self.models.match is not None:
            params += list(self.models.match.parameters())
        if not params:
            raise InputError("the student has no trainable parameters")
        self.optimizer = (optimizer or (lambda ps: torch.optim.Adam(ps, lr=lr)))(params)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, steps))
                          if schedule == "cosine" else None)
        self.result = FinetuneResult(device=str(place.device))
        self.best_state: dict[str, Tensor] = _state(student)
        self.show = _show_progress(progress)

    def next_batch(self) -> tuple[tuple[Any, ...], Any]:
        return _unpack(self.pending.pop() if self.pending else next(self.batches))

    def step_loss(self) -> tuple[Tensor, dict[str, float]]:
        return self.terms(*self.next_batch())

    def terms(self, args: tuple[Any, ...], target: Any) -> tuple[Tensor, dict[str, float]]:
        """The step's loss on one batch (moved to the training device): the total and its parts."""
        args, target = to_device(args, self.place.device), to_device(target, self.place.device)
        out, t_out, pairs = self.models.run(args)
        d = self.distill or Distill()
        terms: dict[str, Tensor] = {}
        if self.loss is not None:
            terms["task"] = d.task_weight * self.loss(out, target)
            if terms["task"].numel() != 1:  # a per-sample loss: float() below would fail with torch's words
                raise InputError(f"loss(output, target) must return a scalar tensor, got shape {tuple(terms['task'].shape)}: reduce it, e.g. with .mean()")
        if d.logits is not None:
            terms["logits"] = d.logit_weight * d.logits(out, t_out)
        if pairs and d.feature_loss is not None:
            terms["features"] = d.feature_weight * torch.stack([d.feature_loss(s, t) for s, t in pairs]).mean()
        total = torch.stack(list(terms.values())).sum()
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def objective(self, batches: Sequence[Any]) -> float:
        """The mean loss of `batches` (what a step minimises), the student in eval mode, no gradients."""
        self.student.eval()
        with torch.no_grad():
            return sum(float(self.terms(*_unpack(b))[0]) for b in batches) / len(batches)

    def evaluate(self, step: int) -> None:
        if self.eval_fn is None:
            if step > 0:
                self.best_state = _state(self.student)  # the last finite checkpoint
            return
        self.student.eval()
        with self.place.at_home():
            with torch.no_grad():
                metric = float(self.eval_fn(self.student))
            if self.result.best_metric is None or metric > self.result.best_metric:
                self.result.best_metric, self.result.best_step = metric, step
                self.best_state = _state(self.student)  # kept on the student's own device
        self.student.train()
        self.result.evals.append((step, metric))

    def run(self) -> FinetuneResult:
        from tqdm.auto import tqdm

        r = self.result
        self.evaluate(0)
        self.student.train()
        bar = tqdm(total=self.steps, desc="fine-tune", disable=not self.show, leave=False)
        try:
            for step in range(1, self.steps + 1):
                total, parts = self.step_loss()
                value = float(total.detach())
                if not math.isfinite(value):
                    r.stopped_reason = f"non-finite loss ({value}) at step {step}"
                    break
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                r.steps_run = step
                r.history.append({"step": step, "loss": value, **parts})
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                if step % self.every == 0 or step == self.steps:
                    self.evaluate(step)
        finally:
            bar.close()
            self.student.eval()
        self._finish()
        return r

    def _finish(self) -> None:
        r = self.result
        stopped = r.stopped_reason != "completed"
        last_eval = r.evals[-1][0] if r.evals else None
        if self.eval_fn is not None and (stopped or r.best_step != last_eval):
            self.student.load_state_dict(self.best_state)
            last = f"; the last evaluation (step {last_eval}) gave {r.evals[-1][1]:.4f}" if not stopped else ""
            r.notes.append(f"restored the state of step {r.best_step} (metric {r.best_metric:.4f}){last}")
        elif self.eval_fn is None and stopped:
            self.student.load_state_dict(self.best_state)
            r.best_step = r.steps_run - r.steps_run % self.every
            r.notes.append(f"restored the last finite checkpoint (step {r.best_step})")
        if stopped:
            warn(f"fine-tune stopped: {r.stopped_reason}; {r.notes[-1]}")
