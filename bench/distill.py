"""Does distillation win back more of what pruning loses than labels alone? A digits CNN at a fifth of its FLOPs.

    python bench/distill.py [--seeds 3] [--steps 300] [--width 16]

For each seed: train `fxopt.models.digits.DigitsCNN` (the teacher) on scikit-learn's 8x8 digits,
prune it with `fxopt.compile(..., passes=[PruneChannels(amount=0.8, by="flops", round_to=1)])`, then
fine-tune copies of the pruned graph with `fxopt.finetune` for the same steps, batches and seed:
(a) labels only, (b) + logit KD, (c) + logit KD + ICKD on the stage features (teacher channels
sliced to the ones pruning kept), (d) as (c) with learned 1x1 adapters instead of the kept indices.
No test data is used for selection (no eval_fn; the last state is scored). Writes bench/results/distill.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import fxopt
from fxopt.distill import ICKD, Distill, LogitKD, TensorBatches, finetune
from fxopt.files import write_atomic
from fxopt.models.digits import DigitsCNN, accuracy, fit, load_digits_split
from fxopt.passes import PruneChannels
from fxopt.passes.distill import kept_channels

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/provenance.py, also when loaded by path
from provenance import code_version  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "results" / "distill.md"
AMOUNT = 0.8  # FLOPs removed
BATCH = 64
LR = 3e-3
TEMPERATURE = 4.0
ICKD_GRIDS = (1, 2)
FEATURE_WEIGHT = 1.0


def _arms(kept: dict[str, tuple[int, ...]]) -> dict[str, Distill | None]:
    kd = LogitKD(TEMPERATURE)
    return {
        "(a) labels only": None,
        "(b) labels + logit KD": Distill(logits=kd),
        "(c) labels + logit KD + ICKD (kept channels)": Distill(
            logits=kd, features="stages", feature_loss=ICKD(ICKD_GRIDS), feature_weight=FEATURE_WEIGHT, kept=kept),
        "(d) labels + logit KD + ICKD (1x1 adapters)": Distill(
            logits=kd, features="stages", feature_loss=ICKD(ICKD_GRIDS), feature_weight=FEATURE_WEIGHT),
    }


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Test accuracies of the teacher, the pruned graph and each fine-tune arm for one seed."""
    split = load_digits_split(seed)
    torch.manual_seed(seed)
    teacher = DigitsCNN(width=args.width)
    fit(teacher, split.x_train, split.y_train, epochs=args.teacher_epochs, seed=seed)
    x = split.x_train[:8]
    prune = PruneChannels(amount=AMOUNT, by="flops", round_to=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = fxopt.compile(teacher, "cpu", example_inputs=(x,), export=False, passes=[prune]).graph_module
        reference = fxopt.compile(teacher, "cpu", example_inputs=(x,), export=False).graph_module
    flops = fxopt.estimate_costs(pruned, "cpu").flops / fxopt.estimate_costs(reference, "cpu").flops
    row = {"teacher": accuracy(teacher, split.x_test, split.y_test), "pruned": accuracy(pruned, split.x_test, split.y_test),
           "flops": flops}
    for name, distill in _arms(kept_channels(prune)).items():
        student = copy.deepcopy(pruned)
        start = time.perf_counter()
        result = finetune(
            student, TensorBatches(split.x_train, split.y_train, batch_size=BATCH, seed=seed),
            loss=nn.CrossEntropyLoss(), teacher=teacher if distill else None, distill=distill,
            steps=args.steps, lr=LR, seed=seed, progress=False,
        )
        assert result.stopped_reason == "completed", result.summary()
        row[name] = accuracy(student, split.x_test, split.y_test)
        row[name + " s"] = time.perf_counter() - start
        print(f"seed {seed} {name}: {row[name]:.4f} ({row[name + ' s']:.1f} s)", flush=True)
    return row


def _mean_range(values: Sequence[float], scale: float = 100.0) -> str:
    return f"{statistics.mean(values) * scale:.2f} [{min(values) * scale:.2f}, {max(values) * scale:.2f}]"


def verdict(rows: list[dict[str, float]], arms: Sequence[str]) -> list[str]:
    """Plain sentences: did each distillation arm beat labels only, on the mean and on every seed?"""
    base = arms[0]
    lines = []
    for arm in arms[1:]:
        diffs = [r[arm] - r[base] for r in rows]
        wins = sum(d > 0 for d in diffs)
        mean = statistics.mean(diffs) * 100
        spread = statistics.pstdev([r[base] for r in rows]) * 100
        helped = "helped" if mean > 0 and wins == len(rows) else "did not clearly help" if mean > 0 else "did not help"
        lines.append(f"- {arm}: {helped}: {mean:+.2f} points vs labels only on the mean, better on {wins} of "
                     f"{len(rows)} seeds (seed-to-seed spread of labels only: {spread:.2f} points).")
    return lines


def render(rows: list[dict[str, float]], args: argparse.Namespace, wall_s: float) -> str:
    arms = list(_arms({}))
    lines = [
        "# Distillation after pruning: a digits CNN at a fifth of its FLOPs",
        "",
        f"Generated by `python bench/distill.py --seeds {args.seeds} --steps {args.steps} --width {args.width}` "
        f"(`make bench-distill`) at fxopt {code_version()}, torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} threads; whole run {wall_s:.0f} s.",
        "",
        f"Teacher: `DigitsCNN(width={args.width})` trained {args.teacher_epochs} epochs on `load_digits_split(seed)` "
        "(1348 train / 449 test images). Student: the teacher pruned by `PruneChannels(amount=0.8, by=\"flops\", "
        f"round_to=1)` (FLOPs left {_mean_range([r['flops'] for r in rows], 1.0)}, fold_batchnorm applied to both). "
        f"Every arm: `fxopt.finetune` for {args.steps} steps, Adam lr {LR} with cosine decay, batches of {BATCH} in the "
        f"same seeded order, cross-entropy on the labels; logit KD at T = {TEMPERATURE} with weight 1; ICKD over the "
        f"stage features (last node per spatial resolution: 8x8, 4x4, 2x2) at grids {ICKD_GRIDS} with weight "
        f"{FEATURE_WEIGHT}. No eval_fn: the last state is scored on the test split, which no arm sees.",
        "",
        f"Test accuracy (%), mean [min, max] over seeds {list(range(args.seeds))}:",
        "",
        "| model | accuracy | fine-tune s |",
        "|---|---|---|",
        f"| teacher (unpruned) | {_mean_range([r['teacher'] for r in rows])} | |",
        f"| pruned, not fine-tuned | {_mean_range([r['pruned'] for r in rows])} | |",
    ]
    for arm in arms:
        lines.append(f"| {arm} | {_mean_range([r[arm] for r in rows])} | "
                     f"{statistics.mean(r[arm + ' s'] for r in rows):.1f} |")
    lines += ["", "Per seed (%):", "", "| seed | teacher | pruned | " + " | ".join(a.split(")")[0] + ")" for a in arms) + " |",
              "|---" * (3 + len(arms)) + "|"]
    for seed, r in enumerate(rows):
        lines.append(f"| {seed} | {r['teacher'] * 100:.2f} | {r['pruned'] * 100:.2f} | "
                     + " | ".join(f"{r[a] * 100:.2f}" for a in arms) + " |")
    lines += ["", "## Did distillation help?", "", *verdict(rows, arms), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = [run_seed(seed, args) for seed in range(args.seeds)]
    text = render(rows, args, time.perf_counter() - start)
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
