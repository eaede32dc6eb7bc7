"""Accuracy evidence on real data: prune a digits CNN to half its FLOPs, fine-tune, compare with Torch-Pruning.

    python bench/prune_digits.py [--seeds 3] [--amount 0.5] [--epochs 20] [--finetune-epochs 5]

For each seed: train `fxopt.models.digits.DigitsCNN` on scikit-learn's bundled 8x8 digits (fixed,
seeded split), prune it with fxopt (several importance criteria) and with Torch-Pruning at the same
FLOPs budget, then fine-tune every pruned model with the same recipe. Writes
bench/results/prune_digits.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import prune as prune_bench  # noqa: E402  (bench/prune.py: Torch-Pruning side and the shared counter)
from fxopt.models.digits import DigitsCNN, DigitsSplit, accuracy, fit, load_digits_split  # noqa: E402
from fxopt.passes import PruneChannels  # noqa: E402

import fxopt  # noqa: E402
from fxopt.files import write_atomic  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "results" / "prune_digits.md"
CALIB_BATCHES = 4  # taylor importance: batches of 64 training images (with labels)


@dataclass
class MethodResult:
    """One pruning method on one seed."""

    method: str
    flops_ratio: float  # pruned / original, fxopt's counter, BatchNorm folded in both
    params_ratio: float
    acc_pruned: float  # test accuracy right after pruning
    acc_finetuned: float  # after the fine-tune recipe
    prune_s: float


def _fxopt_pruner(importance: str, allocation: str = "uniform") -> Callable[..., nn.Module]:
    def prune(model: nn.Module, split: DigitsSplit, amount: float) -> nn.Module:
        x, y = split.x_train, split.y_train
        calib = [(x[i * 64:(i + 1) * 64],) for i in range(CALIB_BATCHES)]
        labels = [y[i * 64:(i + 1) * 64] for i in range(CALIB_BATCHES)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = fxopt.compile(
                model, "cpu", example_inputs=(x[:8],), export=False,
                passes=[PruneChannels(amount=amount, by="flops", allocation=allocation, importance=importance)],
                calib_data=calib, calib_labels=labels,
            )
        record = next(r for r in compiled.report.passes if r.name == "prune")
        if record.status != "applied":
            raise RuntimeError(f"fxopt prune pass {record.status}: {record.reason}")
        return compiled.graph_module

    return prune


def _tp_pruner(allocation: str = "uniform") -> Callable[..., nn.Module]:
    def prune(model: nn.Module, split: DigitsSplit, amount: float) -> nn.Module:
        result = prune_bench.prune_tp(model, (split.x_train[:8],), amount, allocation)
        assert result.module is not None
        # fine-tuned as deployed, like fxopt's result: BatchNorm folded by fxopt's default pipeline
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fxopt.compile(result.module, "cpu", example_inputs=(split.x_train[:8],), export=False).graph_module

    return prune


METHODS: dict[str, Callable[..., nn.Module]] = {
    "fxopt l1 uniform": _fxopt_pruner("l1"),
    "fxopt l2 uniform": _fxopt_pruner("l2"),
    "fxopt bn_scale uniform": _fxopt_pruner("bn_scale"),
    "fxopt taylor uniform": _fxopt_pruner("taylor"),
    "fxopt l1 global": _fxopt_pruner("l1", "global"),
    "Torch-Pruning L1 uniform": _tp_pruner("uniform"),
    "Torch-Pruning L1 global": _tp_pruner("global"),
}


def run_seed(seed: int, args: argparse.Namespace) -> tuple[float, list[MethodResult]]:
    """Train one CNN, then prune + fine-tune it with every method; returns (original acc, results)."""
    split = load_digits_split(seed)
    torch.manual_seed(seed)
    model = DigitsCNN(width=args.width)
    fit(model, split.x_train, split.y_train, epochs=args.epochs, seed=seed)
    original = accuracy(model, split.x_test, split.y_test)
    inputs = (split.x_train[:8],)
    base = prune_bench.count(model, inputs)
    results = []
    for name, prune in METHODS.items():
        start = time.perf_counter()
        pruned = prune(copy.deepcopy(model), split, args.amount)
        elapsed = time.perf_counter() - start
        counts = prune_bench.count(pruned, inputs)
        acc_pruned = accuracy(pruned, split.x_test, split.y_test)
        fit(pruned, split.x_train, split.y_train, epochs=args.finetune_epochs, lr=args.finetune_lr, seed=seed)
        results.append(MethodResult(name, counts.flops / base.flops, counts.params / base.params, acc_pruned,
                                    accuracy(pruned, split.x_test, split.y_test), elapsed))
    return original, results


def _mean_range(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0] * scale:.{digits}f}"
    return (f"{statistics.mean(values) * scale:.{digits}f} "
            f"({min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f})")


def render(originals: list[float], per_seed: list[list[MethodResult]], args: argparse.Namespace, wall_s: float) -> str:
    """bench/results/prune_digits.md: per method, mean and range over seeds."""
    header = ("method", "FLOPs ratio", "params ratio", "test acc after pruning", "after fine-tune",
              "change vs original (points)", "prune s")
    rows = []
    for i, name in enumerate(METHODS):
        rs = [seed_results[i] for seed_results in per_seed]
        drop = [r.acc_finetuned - o for r, o in zip(rs, originals)]
        rows.append((name, _mean_range([r.flops_ratio for r in rs]), _mean_range([r.params_ratio for r in rs]),
                     _mean_range([r.acc_pruned for r in rs]), _mean_range([r.acc_finetuned for r in rs]),
                     _mean_range(drop, 100, 1), _mean_range([r.prune_s for r in rs], digits=2)))
    lines = [
        "# Pruning on real data: digits CNN at half the FLOPs",
        "",
        f"Generated by `python bench/prune_digits.py` (torch {torch.__version__}, CPU); whole run {wall_s:.0f} s.",
        "",
        "Data: `sklearn.datasets.load_digits` (1797 8x8 images, 10 classes), shuffled by the seed, 25% held",
        f"out for testing. Model: `fxopt.models.digits.DigitsCNN(width={args.width})` (3 conv-BN-ReLU blocks,",
        f"flatten, 2 linear layers), trained {args.epochs} epochs (Adam 3e-3, cosine decay). Each method",
        f"removes {args.amount:.0%} of the FLOPs (fxopt: `PruneChannels(amount, by=\"flops\")`; Torch-Pruning:",
        "MetaPruner with L1 magnitude at the channel ratio found by regula falsi on its own MACs counter, as",
        "in bench/prune.py); every pruned model is then fine-tuned with the same recipe",
        f"({args.finetune_epochs} epochs, Adam {args.finetune_lr:g}, cosine decay) as its BatchNorm-folded",
        "graph (fxopt's output; Torch-Pruning's result passed through fxopt's default pipeline). `taylor`",
        f"scores on {CALIB_BATCHES} labelled training batches of 64. FLOPs/params ratios: pruned / original by",
        "`fxopt.estimate_costs`, BatchNorm folded in both.",
        "",
        f"Seeds {', '.join(str(s) for s in range(args.seeds))}: mean (min-max) over seeds.",
        f"Original test accuracy: {_mean_range(originals)}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
    ]
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (split, weights, batch order)")
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of the FLOPs to remove")
    parser.add_argument("--width", type=int, default=16, help="DigitsCNN width")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of the original")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=RESULTS_MD)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    originals, per_seed = [], []
    for seed in range(args.seeds):
        original, results = run_seed(seed, args)
        originals.append(original)
        per_seed.append(results)
        print(f"seed {seed}: original {original:.3f}")
        for r in results:
            print(f"  {r.method:26s} FLOPs {r.flops_ratio:.3f} params {r.params_ratio:.3f} "
                  f"pruned {r.acc_pruned:.3f} fine-tuned {r.acc_finetuned:.3f} ({r.prune_s:.2f}s)", flush=True)
    text = render(originals, per_seed, args, time.perf_counter() - start)
    write_atomic(args.out, text)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
