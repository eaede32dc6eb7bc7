"""The pipeline's training on a GPU against the CPU: a cold `fxopt.pipeline` run of MotionNet with
``device="cpu"`` and one with ``device="cuda"``, each into a fresh folder, their wall times per node
kind (train, fine-tune, lower with QAT when asked) and the speed-up. Needs a CUDA GPU; refuses without.

    python bench/gpu_pipeline.py                                   # the recipe's training, 100 fine-tune steps
    python bench/gpu_pipeline.py --train-steps 100 --finetune-steps 50 --ratios 1.0,0.7 --qat-steps 20

Writes bench/results/gpu_pipeline.md (by default) with the commit, the CPU, the GPU and torch's build.
Compression, int8 calibration, lowering and the evaluation of the deployed ONNX run on the CPU in
both runs, so the speed-up of the whole run is smaller than that of its training nodes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/provenance.py, also when loaded by path
from provenance import code_version, cpu_model  # noqa: E402

import fxopt  # noqa: E402

KINDS = ("data", "train", "compress", "finetune", "lower", "evaluate")


@dataclass
class DeviceRun:
    """One cold pipeline run: its device, wall time, seconds per node kind and deployed metrics."""

    device: str
    wall_s: float
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> metric -> value


def run_on(device: str, model: str, options: dict[str, Any]) -> DeviceRun:
    """A cold run into a fresh folder on `device`."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = fxopt.pipeline.run(model, folder, progress=sys.stderr.isatty(), device=device, **options)
        wall = time.perf_counter() - start
    seconds = dict.fromkeys(KINDS, 0.0)
    for name, event in result.events.items():
        seconds[name.split("__")[0]] += float(event["seconds"])
    return DeviceRun(device, wall, seconds, {row["variant"]: dict(row["metrics"]) for row in result.rows})


def report_lines(cpu: DeviceRun, gpu: DeviceRun, *, command: str, options: dict[str, Any], gpu_name: str) -> list[str]:
    """The markdown report: wall time and seconds per node kind on each device, the speed-up, and the
    deployed files' metrics from each run side by side (they differ by the GPU's rounding only)."""

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "-"

    rows = [("whole run (wall)", cpu.wall_s, gpu.wall_s)] + [(kind, cpu.seconds[kind], gpu.seconds[kind]) for kind in KINDS]
    metrics = sorted({m for v in cpu.metrics.values() for m in v})
    return [
        "# fxopt pipeline: training on the GPU against the CPU", "",
        f"`{command}`; {code_version()}; CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} cores visible, "
        f"torch threads {torch.get_num_threads()}); GPU: {gpu_name}; torch {torch.__version__}, CUDA {torch.version.cuda}.", "",
        f"Options: {options}. Each run is cold (a fresh folder). `device=` moves training, the fine-tune and QAT; "
        "compression, int8 calibration, lowering and the ONNX Runtime evaluation run on the CPU in both.", "",
        "| nodes | CPU s | GPU s | speed-up |", "|---|---|---|---|",
        *[f"| {label} | {a:.1f} | {b:.1f} | {ratio(a, b)} |" for label, a, b in rows],
        "", "Deployed model.onnx on the recipe's held-out set (CPU-trained / GPU-trained):", "",
        "| variant | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics),
        *[f"| {variant} | " + " | ".join(f"{cpu.metrics[variant][m]:.4f} / {gpu.metrics[variant].get(m, float('nan')):.4f}"
                                          for m in metrics) + " |" for variant in cpu.metrics],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="motionnet")
    parser.add_argument("--ratios", default="1.0,0.7")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--train-steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--qat-steps", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_pipeline.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench/gpu_pipeline.py needs a CUDA GPU (torch {torch.__version__}, built with CUDA {torch.version.cuda}, "
              "sees none); nothing was run or written", file=sys.stderr)
        return 2
    options = {"latency_ratios": tuple(float(r) for r in args.ratios.split(",")), "precisions": (args.precision,),
               "train_steps": args.train_steps, "finetune_steps": args.finetune_steps, "qat_steps": args.qat_steps}
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = run_on(device, args.model, options)
        print(f"{device}: {runs[device].wall_s:.1f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in runs[device].seconds.items()),
              flush=True)
    command = "python bench/gpu_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = report_lines(runs["cpu"], runs["cuda"], command=command.strip(), options=options,
                         gpu_name=torch.cuda.get_device_name())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
