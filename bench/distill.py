"""Does distillation win back more of what pruning loses than labels alone, and where? A digits CNN
at a fifth of its FLOPs, the sweep that explains the answer, and one bundled perception model.

    python bench/distill.py [--parts main why camera camera_few] [--seeds 3] [--threads 1]

For each seed: train `fxopt.models.digits.DigitsCNN` (the teacher) on scikit-learn's 8x8 digits,
prune it with `fxopt.compile(..., passes=[PruneChannels(amount=0.8, by="flops", round_to=1)])`, then
fine-tune copies of the pruned graph with `fxopt.finetune` for the same steps, batches and seed.
A *regime* says how many steps and how many labelled images the fine-tune gets (the rest of the
training images are unlabelled inputs, which only distillation can use); an *arm* says what it
learns from (labels, + logit KD, + ICKD on features). No test data is used for selection (no
eval_fn; the last state is scored on the test split).

- ``main``: the headline table, each regime x arm, with a plain verdict per arm and regime.
- ``why``: the sweep that explains it (loss and gradient magnitudes, regime, temperature, weights,
  features, learning rate).
- ``camera``: `camera_multitask` trained with its recipe, pruned to half its FLOPs, fine-tuned
  with labels only, + SigmoidKD / dense KD on its heads, + ICKD on its trunk stages.
- ``camera_few``: the same with few labels (`--camera-labelled` batches, default 4, beside fresh
  unlabelled images).

On the 2-core development host, one thread each: main ~3 min, why ~15-35 min (load), each camera
part ~8-10 min; the camera teacher's weights are cached in ``--cache`` (default out/distill_cache).

Each part replaces its own section of bench/results/distill.md and leaves the others (a hand-written
``summary`` section, after ``main``, is kept as it is).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fxopt
from fxopt.distill import ICKD, Distill, LogitKD, TensorBatches, finetune
from fxopt.models.digits import DigitsCNN, accuracy, fit, load_digits_split
from fxopt.output.files import write_atomic
from fxopt.passes import PruneChannels
from fxopt.passes.distill import kept_channels

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/provenance.py, also when loaded by path
from provenance import code_version  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "results" / "distill.md"
AMOUNT = 0.8  # FLOPs removed
BATCH = 64
LR = 3e-3
ICKD_WEIGHT = 100.0  # the "Why" sweep: at weight 1 its gradient is ~1/60 of cross-entropy's
UNLABELLED = -1  # target of an image whose label the fine-tune may not use


# --- regimes and arms -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Regime:
    """How much the fine-tune gets: optimiser steps and labelled training images (None: all)."""

    steps: int
    labelled: int | None = None

    @property
    def name(self) -> str:
        labels = "all 1348 labels" if self.labelled is None else f"{self.labelled} labels + the rest unlabelled"
        return f"{self.steps} steps, {labels}"


@dataclass(frozen=True)
class Arm:
    """What the student learns from. ``kd_temperature`` None: no logit KD; ``ickd_weight`` 0: no ICKD.

    ``features`` names feature nodes (both graphs have them: pruning keeps names) or is ``"stages"``;
    ``kept`` False bridges channel counts with learned 1x1 adapters instead of the kept indices.
    """

    name: str
    kd_temperature: float | None = None
    kd_weight: float = 1.0
    task_weight: float = 1.0
    ickd_weight: float = 0.0
    ickd_grids: tuple[int, ...] = (1, 2)
    features: str | tuple[str, ...] = "stages"
    kept: bool = True
    lr: float = LR

    def distill(self, kept: dict[str, tuple[int, ...]]) -> Distill | None:
        if self.kd_temperature is None and not self.ickd_weight:
            return None if self.task_weight == 1.0 else Distill(task_weight=self.task_weight)
        features: Any = self.features if self.ickd_weight else ()
        return Distill(
            logits=LogitKD(self.kd_temperature) if self.kd_temperature else None, logit_weight=self.kd_weight,
            features=features, feature_loss=ICKD(self.ickd_grids) if self.ickd_weight else None,
            feature_weight=self.ickd_weight, kept=kept if self.kept else None, task_weight=self.task_weight)


LABELS = Arm("labels only")
KD_T4 = Arm("+ KD T=4, weight 1", kd_temperature=4.0)
KD_ICKD_W1 = Arm("+ KD T=4 + ICKD stages, weight 1", kd_temperature=4.0, ickd_weight=1.0)


class PartlyLabelled:
    """Batches of half labelled images (drawn from the first `labelled` of a seeded permutation) and
    half images from the whole training set with target `UNLABELLED`; with ``labelled=None`` plain
    shuffled batches of every image and its label. Re-iterable; each pass draws a new order."""

    def __init__(self, x: Tensor, y: Tensor, labelled: int | None, batch_size: int = BATCH, seed: int = 0) -> None:
        self.all = TensorBatches(x, y, batch_size=batch_size, seed=seed)
        self.labelled = labelled
        if labelled is not None:
            pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_000 + seed))[:labelled]
            half = batch_size // 2
            # the few labelled images are cycled on their own, across passes over the whole set
            self.labels = itertools.chain.from_iterable(itertools.repeat(TensorBatches(x[pick], y[pick], half, seed)))
            self.inputs = TensorBatches(x, torch.full_like(y, UNLABELLED), batch_size=batch_size - half, seed=seed + 1)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.labelled is None:
            yield from self.all
            return
        for (xl, yl), (xu, yu) in zip(self.labels, self.inputs):
            yield torch.cat([xl, xu]), torch.cat([yl, yu])


def task_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy over the labelled images of a batch (every batch has some)."""
    return nn.functional.cross_entropy(out, y, ignore_index=UNLABELLED)


# --- one seed ------------------------------------------------------------------------------------

@dataclass
class DigitsSetup:
    """A seed's split, trained teacher, pruned student and the channels pruning kept."""

    seed: int
    split: Any
    teacher: nn.Module
    pruned: torch.fx.GraphModule
    kept: dict[str, tuple[int, ...]]
    teacher_acc: float
    pruned_acc: float
    flops: float
    step_scale: float = 1.0  # every fine-tune's steps are multiplied by it (tests run tiny ones)

    def steps(self, steps: int) -> int:
        return max(1, round(steps * self.step_scale))


def digits_setup(seed: int, width: int = 16, teacher_epochs: int = 20, step_scale: float = 1.0) -> DigitsSetup:
    split = load_digits_split(seed)
    torch.manual_seed(seed)
    teacher = DigitsCNN(width=width)
    fit(teacher, split.x_train, split.y_train, epochs=teacher_epochs, seed=seed)
    x = split.x_train[:8]
    prune = PruneChannels(amount=AMOUNT, by="flops", round_to=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxopt.compile(teacher, "cpu", example_inputs=(x,), export=False, passes=[prune]).graph_module
        reference = fxopt.compile(teacher, "cpu", example_inputs=(x,), export=False).graph_module
    flops = fxopt.estimate_costs(pruned, "cpu").flops / fxopt.estimate_costs(reference, "cpu").flops
    return DigitsSetup(seed, split, teacher, pruned, kept_channels(prune), accuracy(teacher, split.x_test, split.y_test),
                       accuracy(pruned, split.x_test, split.y_test), flops, step_scale)


def run_arm(setup: DigitsSetup, regime: Regime, arm: Arm) -> float:
    """Test accuracy of a copy of the pruned graph fine-tuned in `regime` as `arm` says."""
    student = copy.deepcopy(setup.pruned)
    distill = arm.distill(setup.kept)
    split = setup.split
    result = finetune(
        student, PartlyLabelled(split.x_train, split.y_train, regime.labelled, seed=setup.seed), loss=task_loss,
        teacher=setup.teacher if distill is not None else None, distill=distill,
        steps=setup.steps(regime.steps), lr=arm.lr, seed=setup.seed, progress=False,
    )
    assert result.stopped_reason == "completed", result.summary()
    return accuracy(student, split.x_test, split.y_test)


# --- tables and verdicts -------------------------------------------------------------------------

def _mean_range(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    v = [x * scale for x in values]
    return f"{statistics.mean(v):.{digits}f} [{min(v):.{digits}f}, {max(v):.{digits}f}]"


def verdict_line(arm: str, base: Sequence[float], values: Sequence[float]) -> str:
    """A plain sentence: did `arm` beat labels only, on the mean, on every seed, and by more than
    labels only varies from seed to seed?"""
    diffs = [v - b for v, b in zip(values, base)]
    wins = sum(d > 0 for d in diffs)
    mean = statistics.mean(diffs) * 100
    spread = statistics.pstdev(base) * 100
    if mean > 0 and wins == len(diffs):
        helped = "helped" if mean > spread else "helped slightly (less than the seed spread)"
    else:
        helped = "did not clearly help" if mean > 0 else "did not help"
    return (f"{arm}: {helped}: {mean:+.2f} points vs labels only on the mean, better on {wins} of {len(diffs)} seeds "
            f"(seed-to-seed spread of labels only: {spread:.2f} points).")


def verdict(rows: list[dict[str, float]], arms: Sequence[str]) -> list[str]:
    """One verdict line per arm after the first (labels only), per-seed rows of accuracies."""
    base = [r[arms[0]] for r in rows]
    return ["- " + verdict_line(arm, base, [r[arm] for r in rows]) for arm in arms[1:]]


Cell = dict[int, float]  # seed -> accuracy


def _sweep(setups: list[DigitsSetup], runs: Sequence[tuple[Regime, Arm]]) -> dict[tuple[Regime, Arm], Cell]:
    cells: dict[tuple[Regime, Arm], Cell] = {}
    for regime, arm in runs:
        if (regime, arm) in cells:
            continue
        start = time.perf_counter()
        cells[(regime, arm)] = {s.seed: run_arm(s, regime, arm) for s in setups}
        print(f"{regime.name} | {arm.name}: {_mean_range(list(cells[(regime, arm)].values()))} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return cells


def _delta(cell: Cell, base: Cell) -> str:
    diffs = [cell[s] - base[s] for s in base]
    return f"{statistics.mean(diffs) * 100:+.2f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


# --- part: main -------------------------------------------------------------------------------------

MAIN_REGIMES = (Regime(300), Regime(30), Regime(300, labelled=50))


def main_arms() -> tuple[Arm, ...]:
    return (
        Arm("(a) labels only"),
        Arm("(b) + logit KD", kd_temperature=4.0),
        Arm("(c) + logit KD + ICKD (stage features, kept channels)", kd_temperature=4.0, ickd_weight=ICKD_WEIGHT),
    )


def part_main(setups: list[DigitsSetup], args: argparse.Namespace) -> str:
    arms = main_arms()
    cells = _sweep(setups, [(r, a) for r in MAIN_REGIMES for a in arms])
    seeds = [s.seed for s in setups]
    lines = [
        "# Distillation after pruning: a digits CNN at a fifth of its FLOPs",
        "",
        f"Generated by `python bench/distill.py --parts main --seeds {args.seeds}` (`make bench-distill` runs every part) "
        f"at fxopt {code_version()}, torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s).",
        "",
        f"Teacher: `DigitsCNN(width={args.width})` trained {args.teacher_epochs} epochs on `load_digits_split(seed)` "
        "(1348 train / 449 test images). Student: the teacher pruned by `PruneChannels(amount=0.8, by=\"flops\", "
        f"round_to=1)` (FLOPs left {_mean_range([s.flops for s in setups], 1.0)}, fold_batchnorm applied). "
        f"Every arm: `fxopt.finetune`, Adam lr {LR} with cosine decay, batches of {BATCH} in the same seeded order, "
        "cross-entropy on the labelled images; logit KD at T = 4 with weight 1 (the loss is T²·KL); ICKD over the stage "
        "features (last node per spatial resolution: 8x8, 4x4, 2x2; teacher channels sliced to those pruning kept) at "
        f"grids (1, 2) with weight {ICKD_WEIGHT:g} (the sweep below: at weight 1 it does nothing). With 50 labels, each "
        "batch is up to 32 labelled images (the same 50 throughout, cycled in shuffled order: 32, then 18) and 32 from "
        "all training images without their labels, which only distillation can use. No eval_fn: the last state is "
        "scored on the test split, which no arm sees.",
        "",
        f"Teacher {_mean_range([s.teacher_acc for s in setups])}, pruned and not fine-tuned "
        f"{_mean_range([s.pruned_acc for s in setups])}. Test accuracy (%), mean [min, max] over seeds {seeds}:",
        "",
        "| regime | " + " | ".join(a.name for a in arms) + " |",
        "|---" * (1 + len(arms)) + "|",
    ]
    for r in MAIN_REGIMES:
        lines.append(f"| {r.name} | " + " | ".join(_mean_range(list(cells[(r, a)].values())) for a in arms) + " |")
    lines += ["", "## Did distillation help?", ""]
    for r in MAIN_REGIMES:
        base = [cells[(r, arms[0])][s] for s in seeds]
        lines.append(f"{r.name}:")
        lines += ["- " + verdict_line(a.name, base, [cells[(r, a)][s] for s in seeds]) for a in arms[1:]]
        lines.append("")
    return "\n".join(lines)


# --- part: why ----------------------------------------------------------------------------------------

WHY_REGIMES = (Regime(300), Regime(300, labelled=50))


def _grad_norm(model: nn.Module, loss: Tensor) -> float:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)))


def magnitudes(setup: DigitsSetup, arm_after: Arm | None = None) -> dict[str, tuple[float, float]]:
    """Value and gradient norm (over the student's parameters) of each loss term on one training batch."""
    from fxopt.distill.loop import _prepare  # the loop's own hooked copies

    student = copy.deepcopy(setup.pruned)
    x, y = setup.split.x_train[:BATCH], setup.split.y_train[:BATCH]
    if arm_after is not None:
        finetune(student, PartlyLabelled(setup.split.x_train, setup.split.y_train, None, seed=setup.seed),
                 loss=task_loss, steps=setup.steps(300), lr=LR, seed=setup.seed, progress=False)
    d = Distill(logits=LogitKD(4.0), features="stages", feature_loss=ICKD((1, 2)), kept=setup.kept)
    models = _prepare(student, setup.teacher, d, (x,), torch.device("cpu"))
    student.train()
    terms: dict[str, Callable[[], Tensor]] = {"cross-entropy": lambda: task_loss(models.run((x,))[0], y)}
    for t in (1.0, 4.0):
        terms[f"logit KD T={t:g} (T²·KL)"] = lambda t=t: LogitKD(t)(*models.run((x,))[:2])
    terms["ICKD stages, grids (1, 2)"] = lambda: torch.stack([ICKD((1, 2))(s, t) for s, t in models.run((x,))[2]]).mean()
    out = {}
    for name, term in terms.items():
        value = term()
        out[name] = (float(value.detach()), _grad_norm(student, value))
    return out


def why_runs() -> dict[str, list[Arm]]:
    """The sweep's groups: arms compared in each of `WHY_REGIMES` against labels only."""
    kd = [Arm(f"KD T={t:g}, weight 1", kd_temperature=t) for t in (1.0, 2.0, 4.0, 8.0)]
    hinton = [Arm(f"Hinton α={a:g}: {1 - a:g}·CE + {a:g}·T²KL, T=4", kd_temperature=4.0, kd_weight=a,
                  task_weight=1 - a) for a in (0.1, 0.5, 0.9)]
    hinton.append(Arm("KD only (no labels), T=4", kd_temperature=4.0, task_weight=0.0))
    ickd = [Arm(f"ICKD stages, weight {w:g} (no KD)", ickd_weight=w) for w in (1.0, 10.0, 100.0)]
    ickd += [
        Arm("ICKD last stage (2x2), weight 100", ickd_weight=100.0, features=("features_4",)),
        Arm("ICKD stages, weight 100, 1x1 adapters", ickd_weight=100.0, kept=False),
        Arm("KD T=4 + ICKD stages weight 100", kd_temperature=4.0, ickd_weight=100.0),
    ]
    lrs = [Arm(f"labels only, lr {lr:g}", lr=lr) for lr in (1e-3, 1e-2)]
    lrs += [Arm(f"KD T=4, lr {lr:g}", kd_temperature=4.0, lr=lr) for lr in (1e-3, 1e-2)]
    return {"temperature": kd, "KD weight": hinton, "ICKD weight and features": ickd, "learning rate": lrs}


def part_why(setups: list[DigitsSetup], args: argparse.Namespace) -> str:
    seeds = [s.seed for s in setups]
    regimes = (Regime(30), Regime(100), Regime(300), Regime(300, labelled=200), Regime(300, labelled=50))
    regime_cells = _sweep(setups, [(r, a) for r in regimes for a in (LABELS, KD_T4, KD_ICKD_W1)])
    groups = why_runs()
    cells = _sweep(setups, [(r, a) for r in WHY_REGIMES for g in groups.values() for a in (LABELS, *g)])
    start_mag, end_mag = magnitudes(setups[0]), magnitudes(setups[0], arm_after=LABELS)
    lines = [
        "## Why: the sweep",
        "",
        f"Generated by `python bench/distill.py --parts why --seeds {args.seeds}` at fxopt {code_version()}, "
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s). Same teacher, student, batches and "
        f"schedule as the main table; seeds {seeds}. A cell is the mean test accuracy (%) and, beside it, the change "
        "vs labels only in the same regime (points) and on how many seeds it was better.",
        "",
        "### Loss magnitudes (seed 0, one batch of 64 training images)",
        "",
        "Value and gradient norm over the student's parameters of each term, at weight 1:",
        "",
        "| term | pruned student: value | gradient norm | after 300 labels-only steps: value | gradient norm |",
        "|---|---|---|---|---|",
    ]
    for name in start_mag:
        (v0, g0), (v1, g1) = start_mag[name], end_mag[name]
        lines.append(f"| {name} | {v0:.4g} | {g0:.3g} | {v1:.4g} | {g1:.3g} |")
    with torch.no_grad():
        t_out = setups[0].teacher(setups[0].split.x_train)
    probs = {t: float(torch.softmax(t_out / t, 1).max(1).values.mean()) for t in (1.0, 2.0, 4.0, 8.0)}
    train_acc = float((t_out.argmax(1) == setups[0].split.y_train).float().mean())
    lines += ["", f"The teacher on its training images (seed 0): accuracy {train_acc * 100:.2f}%, mean top-class "
              "probability " + ", ".join(f"{p:.3f} at T={t:g}" for t, p in probs.items()) + ".", "",
              "### Regime: steps and labels", "",
              "| regime | labels only | + KD T=4 | + KD T=4 + ICKD weight 1 |", "|---|---|---|---|"]
    for r in regimes:
        base = regime_cells[(r, LABELS)]
        lines.append(f"| {r.name} | {_mean_range(list(base.values()))} | "
                     + " | ".join(f"{statistics.mean(regime_cells[(r, a)].values()) * 100:.2f} "
                                  f"({_delta(regime_cells[(r, a)], base)})" for a in (KD_T4, KD_ICKD_W1)) + " |")
    for group, arms in groups.items():
        lines += ["", f"### {group[0].upper() + group[1:]}", "", "| arm | " + " | ".join(r.name for r in WHY_REGIMES) + " |",
                  "|---" * (1 + len(WHY_REGIMES)) + "|",
                  "| labels only | " + " | ".join(_mean_range(list(cells[(r, LABELS)].values())) for r in WHY_REGIMES) + " |"]
        for a in arms:
            lines.append(f"| {a.name} | " + " | ".join(
                f"{statistics.mean(cells[(r, a)].values()) * 100:.2f} ({_delta(cells[(r, a)], cells[(r, LABELS)])})"
                for r in WHY_REGIMES) + " |")
    return "\n".join(lines) + "\n"


# --- part: camera -------------------------------------------------------------------------------

CAMERA_AMOUNT = 0.5  # FLOPs removed
CAMERA_TRAIN_STEPS = 300  # the recipe's default (bench/results/train_models.md)
CAMERA_FINETUNE_STEPS = 100
CAMERA_LR = 1e-3
CAMERA_METRICS = ("seg_miou", "det_map50", "det_map75")
CAMERA_UNLABELLED = 4  # fresh images without labels beside each labelled batch (--camera-labelled)
CAMERA_FEW_BATCHES = 4  # camera_few: labelled batches of 8 (32 images)


CAMERA_HEATMAP_KD_WEIGHT = 500.0  # SigmoidKD averages over every cell, the focal loss over centres: ~1/500 of its gradient


def camera_arms(kept: dict[str, tuple[int, ...]], kd_weight: float, ickd_weight: float) -> dict[str, Distill | None]:
    from fxopt.distill import OutputKD, SigmoidKD

    kd = OutputKD({"heatmap": SigmoidKD(1.0), "seg": LogitKD(1.0)}, weights={"heatmap": CAMERA_HEATMAP_KD_WEIGHT})
    return {
        "(a) labels only": None,
        "(b) + dense KD (heatmap SigmoidKD, seg LogitKD)": Distill(logits=kd, logit_weight=kd_weight),
        "(c) + dense KD + ICKD (trunk stages, kept channels)": Distill(
            logits=kd, logit_weight=kd_weight, features="stages", feature_loss=ICKD((1, 2)),
            feature_weight=ickd_weight, kept=kept),
    }


def _camera_teacher(cache: Path | None) -> tuple[nn.Module, dict[str, float]]:
    """The recipe-trained teacher (seed 0, deterministic on one thread), its weights cached in `cache`."""
    name = "camera_multitask"
    path = cache / f"{name}_seed0_{CAMERA_TRAIN_STEPS}steps.pt" if cache is not None else None
    if path is not None and path.exists():
        teacher = fxopt.models.spec(name).build()
        teacher.load_state_dict(torch.load(path, weights_only=True))
        teacher.eval()
        with torch.no_grad():
            return teacher, fxopt.models.spec(name).recipe.evaluate(teacher)
    trained = fxopt.models.train(name, CAMERA_TRAIN_STEPS, seed=0, progress=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trained.model.state_dict(), path)
    return trained.model, trained.metrics


def _camera_magnitudes(pruned: torch.fx.GraphModule, teacher: nn.Module, kept: dict[str, tuple[int, ...]],
                       recipe: Any) -> list[str]:
    """Value and gradient norm of the task loss and of each distillation term, as a Markdown table."""
    from fxopt.distill import SigmoidKD
    from fxopt.distill.loop import _prepare  # the loop's own hooked copies

    student = copy.deepcopy(pruned)
    (x,), batch = recipe.batch(0, torch.Generator().manual_seed(1))
    models = _prepare(student, teacher, Distill(logits=LogitKD(1.0), features="stages", feature_loss=ICKD((1, 2)),
                                                kept=kept), (x,), torch.device("cpu"))
    student.train()
    terms: dict[str, Callable[[Any, Any, Any], Tensor]] = {
        "task (focal + L1 + pixel cross-entropy)": lambda o, t, p: recipe.loss(o, batch),
        "heatmap SigmoidKD T=1 (mean over cells)": lambda o, t, p: SigmoidKD(1.0)(o["heatmap"], t["heatmap"]),
        "seg LogitKD T=1 (mean over pixels)": lambda o, t, p: LogitKD(1.0)(o["seg"], t["seg"]),
        "ICKD trunk stages, grids (1, 2)": lambda o, t, p: torch.stack([ICKD((1, 2))(s, tt) for s, tt in p]).mean(),
    }
    lines = ["| term | value | gradient norm |", "|---|---|---|"]
    for name, term in terms.items():
        value = term(*models.run((x,)))
        lines.append(f"| {name} | {float(value.detach()):.4g} | {_grad_norm(student, value):.3g} |")
    return lines


class FewLabelledScenes:
    """A recipe's batches with few labels: `pool` fixed labelled batches, cycled, each beside
    `unlabelled` fresh images whose labels are not used (only distillation sees them). Yields
    ``((images,), labelled targets)``; the labelled images come first."""

    def __init__(self, recipe: Any, pool: int, unlabelled: int, seed: int) -> None:
        self.recipe, self.pool, self.unlabelled, self.seed = recipe, pool, unlabelled, seed

    def __iter__(self) -> Iterator[tuple[tuple[Tensor], Any]]:
        generator = torch.Generator().manual_seed(self.seed)
        labelled = [self.recipe.batch(i, generator) for i in range(self.pool)]
        step = 0
        while True:
            (images,), target = labelled[step % self.pool]
            (fresh,), _ = self.recipe.batch(self.pool + step, generator)
            yield (torch.cat([images, fresh[:self.unlabelled]]),), target
            step += 1


def _labelled_part_loss(recipe: Any) -> Callable[[Any, Any], Tensor]:
    """The recipe's loss on the labelled images only (the first ``len(target.images)`` of the batch)."""

    def loss(outputs: dict[str, Tensor], target: Any) -> Tensor:
        n = len(target.images)
        return recipe.loss({k: v[:n] for k, v in outputs.items()}, target)

    return loss


def part_camera(args: argparse.Namespace) -> str:
    """camera_multitask: trained with its recipe (seed 0), pruned to half its FLOPs, fine-tuned per seed."""
    from fxopt.distill import RecipeBatches
    from fxopt.passes.distill import stage_features

    start = time.perf_counter()
    name = "camera_multitask"
    recipe = fxopt.models.spec(name).recipe
    teacher, teacher_metrics = _camera_teacher(args.cache)
    x = recipe.batch(0, torch.Generator().manual_seed(0))[0][0][:1]
    prune = PruneChannels(amount=CAMERA_AMOUNT, by="flops")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxopt.compile(teacher, "cpu", example_inputs=(x,), export=False, passes=[prune]).graph_module
        reference = fxopt.compile(teacher, "cpu", example_inputs=(x,), export=False).graph_module
    flops = fxopt.estimate_costs(pruned, "cpu").flops / fxopt.estimate_costs(reference, "cpu").flops
    with torch.no_grad():
        pruned_metrics = recipe.evaluate(pruned.eval())
    kept = kept_channels(prune)
    magnitudes_lines = _camera_magnitudes(pruned, teacher, kept, recipe)
    steps = args.camera_steps or max(1, round(CAMERA_FINETUNE_STEPS * args.step_scale))
    arms = camera_arms(kept, args.camera_kd_weight, args.camera_ickd_weight)
    scores: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
    seconds: dict[str, list[float]] = {a: [] for a in arms}
    for seed in range(args.seeds):
        for arm, distill in arms.items():
            student = copy.deepcopy(pruned)
            t0 = time.perf_counter()
            if args.camera_labelled:
                data: Any = FewLabelledScenes(recipe, args.camera_labelled, CAMERA_UNLABELLED, seed=1000 + seed)
                loss: Any = _labelled_part_loss(recipe)
            else:
                data, loss = RecipeBatches(recipe, seed=1000 + seed), recipe.loss
            result = finetune(student, data, loss=loss,
                              teacher=teacher if distill is not None else None, distill=distill,
                              steps=steps, lr=CAMERA_LR, seed=seed, progress=False)
            assert result.stopped_reason == "completed", result.summary()
            seconds[arm].append(time.perf_counter() - t0)
            with torch.no_grad():
                scores[arm].append(recipe.evaluate(student))
            print(f"camera seed {seed} {arm}: {scores[arm][-1]} ({seconds[arm][-1]:.0f} s)", flush=True)
    seeds = list(range(args.seeds))
    few = args.camera_labelled
    regime = (f"{few} fixed labelled batches of 8 ({few * 8} images, cycled), each step beside {CAMERA_UNLABELLED} "
              "fresh images without labels that only distillation uses" if few else "fresh labelled batches of 8 every step")
    lines = [
        f"## A bundled perception model: camera_multitask at half its FLOPs, {'few labels' if few else 'all labels'}",
        "",
        f"Generated by `python bench/distill.py --parts camera --seeds {args.seeds}"
        f"{f' --camera-labelled {few}' if few else ''} --cache out/distill_cache` at fxopt {code_version()}, "
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s).",
        "",
        f"Teacher: `fxopt.models.train(\"{name}\", {CAMERA_TRAIN_STEPS}, seed=0)` (its recipe: generated scenes, "
        f"focal + L1 + pixel cross-entropy). Student: the teacher pruned by `PruneChannels(amount={CAMERA_AMOUNT}, "
        f"by=\"flops\")` (FLOPs left {flops:.2f}, fold_batchnorm applied). One teacher and one pruned student; "
        f"the seeds {seeds} vary the fine-tune's batches (`RecipeBatches(recipe, seed=1000 + seed)`) and "
        f"initialisation of anything random, so the spread below is the fine-tune's alone. Every arm: "
        f"`fxopt.finetune` for {steps} steps (a third of the teacher's training), Adam lr {CAMERA_LR} with cosine "
        f"decay, the recipe's loss on its labels. Data: {regime}. Dense KD = `OutputKD({{\"heatmap\": SigmoidKD(1), \"seg\": "
        f"LogitKD(1)}}, weights={{\"heatmap\": {CAMERA_HEATMAP_KD_WEIGHT:g}}})` at weight {args.camera_kd_weight:g} (the box head is not distilled; the heatmap weight puts its gradient at the focal loss's scale, see the magnitudes below); ICKD at grids (1, 2), "
        f"weight {args.camera_ickd_weight:g}, on the trunk stages `{stage_features(pruned)}` (the last node per "
        "resolution that every head reads: stem, FPN merges, FPN level 0), teacher channels sliced to those "
        "pruning kept. No eval_fn: the last state is scored on the recipe's held-out set (48 images, seed 10007).",
        "",
        f"Held-out metrics, mean [min, max] over seeds {seeds}:",
        "",
        "| model | " + " | ".join(CAMERA_METRICS) + " | fine-tune s |",
        "|---" * (2 + len(CAMERA_METRICS)) + "|",
        "| teacher (unpruned) | " + " | ".join(f"{teacher_metrics[m]:.3f}" for m in CAMERA_METRICS) + " | |",
        "| pruned, not fine-tuned | " + " | ".join(f"{pruned_metrics[m]:.3f}" for m in CAMERA_METRICS) + " | |",
    ]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(_mean_range([s[m] for s in scores[arm]], 1.0, 3)
                                               for m in CAMERA_METRICS)
                     + f" | {statistics.mean(seconds[arm]):.0f} |")
    lines += ["", "Loss terms on one training batch of 8 (the pruned student before fine-tuning), at weight 1:", "",
              *magnitudes_lines, "", "Did distillation help (points = metric x 100)?", ""]
    base = list(arms)[0]
    for arm in list(arms)[1:]:
        for m in CAMERA_METRICS:
            lines.append("- " + verdict_line(f"{arm}, {m}", [s[m] for s in scores[base]], [s[m] for s in scores[arm]]))
    lines += ["", f"This part ran in {time.perf_counter() - start:.0f} s.", ""]
    return "\n".join(lines)


# --- the results file ------------------------------------------------------------------------------

PARTS: dict[str, Callable[..., str]] = {"main": part_main, "why": part_why}
_MARK = "<!-- part: {} -->"


def merge_sections(old: str, new: dict[str, str]) -> str:
    """The results file with the sections of the parts in `new` replaced (or added) and the others kept."""
    found = dict(re.findall(r"<!-- part: (\w+) -->\n(.*?)(?=<!-- part: \w+ -->\n|\Z)", old, flags=re.S))
    found.update(new)
    known = ("main", "summary", "why", "camera", "camera_few_labels")  # summary: written by hand, kept
    order = [p for p in known if p in found] + [p for p in found if p not in known]
    return "".join(f"{_MARK.format(p)}\n{found[p].rstrip()}\n\n" for p in order).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["main", "why", "camera", "camera_few"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--camera-steps", type=int, default=None, help="camera_multitask fine-tune steps")
    parser.add_argument("--camera-kd-weight", type=float, default=1.0)
    parser.add_argument("--camera-labelled", type=int, default=None,
                        help="camera: fine-tune on this many fixed labelled batches (+ unlabelled images) instead of "
                             "fresh ones; camera_few: default 4")
    parser.add_argument("--camera-ickd-weight", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step-scale", type=float, default=1.0, help="multiply every fine-tune's steps (tests: 0.01)")
    parser.add_argument("--cache", type=Path, default=RESULTS_MD.parents[2] / "out" / "distill_cache",
                        help="folder for the camera teacher's trained weights")
    parser.add_argument("--out", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = {}
    digits_parts = [p for p in args.parts if p in PARTS]
    if digits_parts:
        setups = [digits_setup(seed, args.width, args.teacher_epochs, args.step_scale) for seed in range(args.seeds)]
        for part in digits_parts:
            start = time.perf_counter()
            sections[part] = PARTS[part](setups, args) + f"\nThis part ran in {time.perf_counter() - start:.0f} s.\n"
    if "camera" in args.parts:
        sections["camera_few_labels" if args.camera_labelled else "camera"] = part_camera(args)
    if "camera_few" in args.parts:
        few = argparse.Namespace(**{**vars(args), "camera_labelled": args.camera_labelled or CAMERA_FEW_BATCHES})
        sections["camera_few_labels"] = part_camera(few)
    text = merge_sections(args.out.read_text() if args.out.exists() else "", sections)
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
