"""The bundled models' training figures quoted in README: each model trained with its recipe at
seed 0 on one CPU thread, held-out metrics beside the chance level.

    python bench/train_models.py [--models pointpillars camera_multitask motionnet] [--seed 0]

Writes bench/results/train_models.md (with the fxopt commit), so README's figures have a command
that reproduces them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

import fxopt
from fxopt.files import write_atomic

RESULTS_MD = Path(__file__).resolve().parent / "results" / "train_models.md"
# README's step counts (a few CPU minutes each)
STEPS = {"pointpillars": 800, "camera_multitask": 300, "motionnet": 300, "safety_supervisor": 300}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(STEPS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        start = time.process_time()
        result = fxopt.models.train(name, STEPS.get(name), seed=args.seed, progress=sys.stderr.isatty())
        cpu_s = time.process_time() - start
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
        chance = ", ".join(f"{k} {v:.3f}" for k, v in result.chance.items())
        rows.append(f"| {name} | {STEPS.get(name, 'recipe')} | {metrics} | {chance} | {cpu_s:.0f} |")
        print(rows[-1], flush=True)
    lines = [
        "# Bundled models: training figures",
        "",
        f"`python bench/train_models.py --seed {args.seed}` at fxopt commit `{_commit()}`, torch {torch.__version__}, "
        "one CPU thread on the 2-core development host (other work was running: CPU seconds, not wall time).",
        "",
        "| model | steps | held-out metrics | chance / constant predictor | CPU s |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    write_atomic(RESULTS_MD, "\n".join(lines))
    print(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
