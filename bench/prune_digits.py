"""Accuracy evidence on real data: prune a digits CNN to half its FLOPs, fine-tune, compare with Torch-Pruning.

    python bench/prune_digits.py [--seeds 3] [--amounts 0.5 0.8] [--epochs 20] [--finetune-epochs 5]

For each seed: train `fxopt.models.digits.DigitsCNN` on scikit-learn's bundled 8x8 digits (fixed,
seeded split), prune it with fxopt (several importance criteria) and with Torch-Pruning at the same
FLOPs budget (half the FLOPs left, and a fifth as a harder case), then fine-tune every pruned model
with the same recipe. Writes bench/results/prune_digits.md.
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

import fxopt  # noqa: E402
from fxopt.models.digits import DigitsCNN, DigitsSplit, accuracy, fit, load_digits_split  # noqa: E402
from fxopt.output.files import write_atomic  # noqa: E402
from fxopt.passes import PruneChannels  # noqa: E402

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
        return result.module

    return prune


def _deployed(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """The graph fxopt's default pipeline makes of `model` (BatchNorm folded), as it would deploy it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.compile(model, "cpu", example_inputs=inputs, export=False).graph_module


METHODS: dict[str, Callable[..., nn.Module]] = {
    "fxopt l1 uniform": _fxopt_pruner("l1"),
    "fxopt l2 uniform": _fxopt_pruner("l2"),
    "fxopt bn_scale uniform": _fxopt_pruner("bn_scale"),
    "fxopt taylor uniform": _fxopt_pruner("taylor"),
    "fxopt l1 global": _fxopt_pruner("l1", "global"),
    "Torch-Pruning L1 uniform": _tp_pruner("uniform"),
    "Torch-Pruning L1 global": _tp_pruner("global"),
}


def run_seed(seed: int, args: argparse.Namespace) -> tuple[float, dict[float, list[MethodResult]]]:
    """Train one CNN, then prune + fine-tune it with every method at every amount.

    Returns the original test accuracy and, per amount, one result per method.
    """
    split = load_digits_split(seed)
    torch.manual_seed(seed)
    model = DigitsCNN(width=args.width)
    fit(model, split.x_train, split.y_train, epochs=args.epochs, seed=seed)
    original = accuracy(model, split.x_test, split.y_test)
    return original, {amount: _prune_all(model, split, amount, seed, args) for amount in args.amounts}


def _prune_all(model: nn.Module, split: DigitsSplit, amount: float, seed: int,
               args: argparse.Namespace) -> list[MethodResult]:
    inputs = (split.x_train[:8],)
    base = prune_bench.count(model, inputs)
    results = []
    for name, prune in METHODS.items():
        start = time.perf_counter()
        pruned = prune(copy.deepcopy(model), split, amount)
        elapsed = time.perf_counter() - start
        # every result is fine-tuned as deployed: fxopt's is folded already, Torch-Pruning's is not
        pruned = _deployed(pruned, inputs)
        counts = prune_bench.count(pruned, inputs)
        acc_pruned = accuracy(pruned, split.x_test, split.y_test)
        fit(pruned, split.x_train, split.y_train, epochs=args.finetune_epochs, lr=args.finetune_lr, seed=seed)
        results.append(MethodResult(name, counts.flops / base.flops, counts.params / base.params, acc_pruned,
                                    accuracy(pruned, split.x_test, split.y_test), elapsed))
    return results


def _mean_range(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0] * scale:.{digits}f}"
    return (f"{statistics.mean(values) * scale:.{digits}f} "
            f"[{min(values) * scale:.{digits}f}, {max(values) * scale:.{digits}f}]")


HEADER = ("method", "FLOPs ratio", "params ratio", "test acc after pruning", "after fine-tune",
          "change vs original (points)", "prune s")


def _table(originals: list[float], per_seed: list[list[MethodResult]]) -> list[str]:
    rows = []
    for i, name in enumerate(METHODS):
        rs = [seed_results[i] for seed_results in per_seed]
        drop = [r.acc_finetuned - o for r, o in zip(rs, originals)]
        rows.append((name, _mean_range([r.flops_ratio for r in rs]), _mean_range([r.params_ratio for r in rs]),
                     _mean_range([r.acc_pruned for r in rs]), _mean_range([r.acc_finetuned for r in rs]),
                     _mean_range(drop, 100, 1), _mean_range([r.prune_s for r in rs], digits=2)))
    return ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER), *["| " + " | ".join(r) + " |" for r in rows]]


def render(originals: list[float], per_seed: list[dict[float, list[MethodResult]]], args: argparse.Namespace,
           wall_s: float) -> str:
    """bench/results/prune_digits.md: per amount and method, mean and range over seeds."""
    sections = []
    for amount in args.amounts:
        sections += [f"## Remove {amount:.0%} of the FLOPs", "", *_table(originals, [s[amount] for s in per_seed]), ""]
    lines = [
        "# Pruning on real data: a digits CNN at half and at a fifth of its FLOPs",
        "",
        f"Generated by `python bench/prune_digits.py` (torch {torch.__version__}, CPU); whole run {wall_s:.0f} s.",
        "",
        "Data: `sklearn.datasets.load_digits` (1797 8x8 images, 10 classes), shuffled by the seed, 25% held",
        f"out for testing. Model: `fxopt.models.digits.DigitsCNN(width={args.width})` (3 conv-BN-ReLU blocks,",
        f"flatten, 2 linear layers), trained {args.epochs} epochs (Adam 3e-3, cosine decay). Each method",
        "removes the stated share of the FLOPs (fxopt: `PruneChannels(amount, by=\"flops\")`; Torch-Pruning:",
        "MetaPruner with L1 magnitude at the channel ratio found by regula falsi on its own MACs counter, as",
        "in bench/prune.py); every pruned model is then fine-tuned with the same recipe",
        f"({args.finetune_epochs} epochs, Adam {args.finetune_lr:g}, cosine decay) as its BatchNorm-folded",
        "graph (fxopt's output; Torch-Pruning's result passed through fxopt's default pipeline). `taylor`",
        f"scores on {CALIB_BATCHES} labelled training batches of 64. FLOPs/params ratios: pruned / original by",
        "`fxopt.estimate_costs`, BatchNorm folded in both. `prune s`: fxopt's whole compile (export off);",
        "Torch-Pruning's ratio search (the folding is not counted).",
        "",
        f"Seeds {', '.join(str(s) for s in range(args.seeds))}: mean [min, max] over seeds.",
        f"Original test accuracy: {_mean_range(originals)}.",
        "",
        *sections,
    ]
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (split, weights, batch order)")
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.5, 0.8],
                        help="fractions of the FLOPs to remove, one table each")
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
        for amount, r in ((a, r) for a, rs in results.items() for r in rs):
            print(f"  -{amount:.0%} {r.method:26s} FLOPs {r.flops_ratio:.3f} params {r.params_ratio:.3f} "
                  f"pruned {r.acc_pruned:.3f} fine-tuned {r.acc_finetuned:.3f} ({r.prune_s:.2f}s)", flush=True)
    text = render(originals, per_seed, args, time.perf_counter() - start)
    write_atomic(args.out, text)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
