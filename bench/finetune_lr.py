"""The fine-tune's learning rate after heavy pruning: fixed rates against compile's default (a range test).

    python bench/finetune_lr.py [--seeds 2] [--steps 150] [--nets digits_cnn digits_mlp bev_cnn]

Three nets, each trained, pruned to a fifth of its FLOPs on `cpu` (`PruneChannels(amount=0.8,
by="flops", round_to=1)`) and fine-tuned by `fxopt.compile(..., train_data=, loss=cross-entropy,
finetune_steps=--steps)` at each fixed `finetune_lr` and at the default (``None``: a range test of
3e-4 / 1e-3 / 3e-3). Nobody tuned the range test on the MLP or the BEV net:

- **digits_cnn**: `fxopt.models.digits.DigitsCNN(width=16)`, 20 epochs on scikit-learn's digits
  (the case of issue 23: 1e-4 left it at 54-58%);
- **digits_mlp**: 64 -> 256 -> 128 -> 10 ReLU MLP on the same digits, flattened;
- **bev_cnn**: a 4-conv fully-convolutional net (width 16) labelling each cell of a 32x32 BEV grid
  (`fxopt.models.bev_sequence_data`, 5 frames x 4 height bins stacked as 20 channels) as
  background / vehicle / pedestrian, trained 200 steps on 256 scenes; metric: mIoU on 64 held-out scenes.

Metric after fine-tune on held-out data the fine-tune never sees (digits: the test split).
Writes bench/results/finetune_lr.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import code_version, cpu_model  # noqa: E402

import fxopt  # noqa: E402
from fxopt.distill import TensorBatches  # noqa: E402
from fxopt.models.bev_sequence_data import BEV_CATEGORIES, BevSequenceConfig, generate_bev_batch  # noqa: E402
from fxopt.models.digits import DigitsCNN, accuracy, fit, load_digits_split  # noqa: E402
from fxopt.models.metrics import segmentation_miou  # noqa: E402
from fxopt.output.files import write_atomic  # noqa: E402
from fxopt.passes import PruneChannels  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "results" / "finetune_lr.md"
FIXED_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
AMOUNT = 0.8  # of the FLOPs removed
BEV = BevSequenceConfig(grid=32)


@dataclass
class Task:
    """One net: how to train it, its fine-tune batches, example input and held-out metric."""

    name: str
    teacher: nn.Module
    batches: Any
    example: torch.Tensor
    metric: Callable[[nn.Module], float]


class DigitsMLP(nn.Module):
    """A plain ReLU MLP on flattened 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BevCNN(nn.Module):
    """Per-cell category logits from stacked occupancy frames."""

    def __init__(self, c_in: int = 20, width: int = 16) -> None:
        super().__init__()

        def block(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())

        self.body = nn.Sequential(block(c_in, width), block(width, 2 * width), block(2 * width, 2 * width), block(2 * width, width))
        self.head = nn.Conv2d(width, len(BEV_CATEGORIES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1, 2)))


def _digits(seed: int, mlp: bool) -> Task:
    split = load_digits_split(seed)
    torch.manual_seed(seed)
    model = DigitsMLP() if mlp else DigitsCNN(width=16)
    fit(model, split.x_train, split.y_train, epochs=20, seed=seed)
    return Task("digits_mlp" if mlp else "digits_cnn", model.eval(), TensorBatches(split.x_train, split.y_train, 64, seed=seed),
                split.x_train[:8], lambda m: accuracy(m, split.x_test, split.y_test))


def _bev_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = generate_bev_batch(n, BEV, seed=seed)
    return b.occupancy, b.category


def _bev(seed: int, train_steps: int = 200) -> Task:
    torch.manual_seed(seed)
    model = BevCNN()
    x, y = _bev_set(256, 1000 + seed)
    # background dominates the cells: weight the object classes up so the net learns them
    weight = torch.tensor([0.2, 1.0, 1.0])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(train_steps):
        idx = torch.randint(0, len(y), (16,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx], weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = _bev_set(64, 2000 + seed)

    def miou(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float(segmentation_miou(m(xt).argmax(1), yt, len(BEV_CATEGORIES))["miou"])

    return Task("bev_cnn", model, TensorBatches(x, y, 16, seed=seed), x[:2], miou)


TASKS: dict[str, Callable[[int], Task]] = {
    "digits_cnn": lambda seed: _digits(seed, mlp=False),
    "digits_mlp": lambda seed: _digits(seed, mlp=True),
    "bev_cnn": _bev,
}


def _compile(task: Task, lr: float | None, steps: int, seed: int) -> tuple[nn.Module, Any, int, float]:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fxopt.compile(task.teacher, "cpu", example_inputs=(task.example,), export=False,
                                 passes=[PruneChannels(amount=AMOUNT, by="flops", round_to=1)],
                                 train_data=task.batches, loss=F.cross_entropy, finetune_steps=steps, finetune_lr=lr,
                                 finetune_seed=seed)
    warned = sum(issubclass(w.category, fxopt.FxoptWarning) and "fine-tune" in str(w.message) for w in caught)
    return compiled.graph_module, compiled.report, warned, time.perf_counter() - start


def run(names: Sequence[str], seeds: int, steps: int) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per net, seed and arm: the metric of the original, after pruning, after fine-tune."""
    rows, notes = [], []
    for name in names:
        for seed in range(seeds):
            task = TASKS[name](seed)
            original = task.metric(task.teacher)
            pruned = fxopt.compile(task.teacher, "cpu", example_inputs=(task.example,), export=False,
                                   passes=[PruneChannels(amount=AMOUNT, by="flops", round_to=1)]).graph_module
            after_prune = task.metric(pruned)
            for lr in (*FIXED_LRS, None):
                gm, report, warned, seconds = _compile(task, lr, steps, seed)
                chose = next((n.split("fine-tune: ", 1)[1] for n in report.notes if n.startswith("fine-tune: lr")), "")
                judged = next((n for n in report.notes if n.startswith("fine-tune judged")), "")
                rows.append({"net": name, "seed": seed, "finetune_lr": "default (None)" if lr is None else f"{lr:g}",
                             "original": round(original, 4), "after prune": round(after_prune, 4),
                             "after fine-tune": round(task.metric(gm), 4), "warned": warned, "compile s": round(seconds, 1)})
                if lr is None:
                    notes.append(f"{name} seed {seed}: {chose}; {judged.split(': ', 1)[1] if judged else 'no judgement line'}")
                print(rows[-1], flush=True)
    return rows, notes


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per net and arm: the mean metric after fine-tune over seeds, and the drop from the original in points."""
    lines = ["| net | finetune_lr | mean after fine-tune | worst drop vs original (points) | runs warned |", "|---|---|---|---|---|"]
    for net in dict.fromkeys(r["net"] for r in rows):
        for arm in dict.fromkeys(r["finetune_lr"] for r in rows if r["net"] == net):
            mine = [r for r in rows if r["net"] == net and r["finetune_lr"] == arm]
            drop = max(100 * (r["original"] - r["after fine-tune"]) for r in mine)
            lines.append(f"| {net} | {arm} | {statistics.mean(r['after fine-tune'] for r in mine):.4f} | {drop:.1f} | "
                         f"{sum(r['warned'] > 0 for r in mine)}/{len(mine)} |")
    return lines


def render(rows: list[dict[str, Any]], notes: list[str], args: argparse.Namespace, seconds: float) -> str:
    keys = list(rows[0])
    return "\n".join([
        "# Fine-tune learning rate after pruning to a fifth of the FLOPs: fixed rates vs the default", "",
        f"Generated by `python bench/finetune_lr.py --seeds {args.seeds} --steps {args.steps} --nets {' '.join(args.nets)}` at fxopt "
        f"{code_version()}, torch {torch.__version__}, CPU {cpu_model()}, {torch.get_num_threads()} thread(s); whole run {seconds:.0f} s.", "",
        f"Each net is trained (seed = teacher and fine-tune seed), pruned by `PruneChannels(amount={AMOUNT}, by=\"flops\", round_to=1)` "
        f"on `cpu` and fine-tuned by compile for {args.steps} Adam steps (cross-entropy on the training batches, no distillation, "
        "no eval data: the default judges on held-back batches). Metric: test accuracy (digits), mIoU on 64 held-out scenes (bev_cnn). "
        "`warned`: fine-tune FxoptWarnings of the compile (far below the input model).", "",
        *summary(rows), "",
        "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
        *["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows], "",
        "What the default chose:", "", *[f"- {n}" for n in notes], "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, notes = run(args.nets, args.seeds, args.steps)
    text = render(rows, notes, args, time.perf_counter() - start)
    write_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
