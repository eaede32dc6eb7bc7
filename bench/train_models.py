"""The bundled models' training figures quoted in README: each model trained with its recipe at
seed 0 on one CPU thread, held-out metrics beside the chance level.

    python bench/train_models.py [--models pointpillars camera_multitask motionnet] [--seed 0]

Writes bench/results/train_models.md (with the fxopt commit), so README's figures have a command
that reproduces them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fxopt
from fxopt.output.files import write_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/provenance.py, also when loaded by path
from provenance import code_version  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "results" / "train_models.md"
# README's step counts (a few CPU minutes each)
STEPS = {"pointpillars": 800, "camera_multitask": 300, "motionnet": 300, "safety_supervisor": 300}


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
        f"`python bench/train_models.py --seed {args.seed}` at fxopt {code_version()}, torch {torch.__version__}, "
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
