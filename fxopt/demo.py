"""`make demo`: compile the bundled lidar detector and safety supervisor for Xavier and save them."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

DEMO_MODELS = ("pointpillars", "safety_supervisor")


def run(out_dir: str, target: str = "xavier", names: Sequence[str] = DEMO_MODELS) -> list[str]:
    """Compile each named model from `fxopt.models` for `target`, print its report, save it.

    Returns:
        The folders written, one per model.
    """
    import fxopt
    from fxopt import models

    written = []
    for name in names:
        torch.manual_seed(0)
        model = models.create(name)
        inputs = models.example_inputs(name)
        precision = models.spec(name).precision
        print(f"\n=== {name} ===", flush=True)
        compiled = fxopt.compile(model, target, example_inputs=inputs, precision=precision, progress=sys.stderr.isatty())
        print(compiled.report)
        folder = os.path.join(out_dir, name)
        compiled.save(folder)
        print(f"saved to {folder}/")
        written.append(folder)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out", help="output folder")
    parser.add_argument("--target", default="xavier")
    parser.add_argument("--models", default=",".join(DEMO_MODELS), help="comma-separated fxopt.models names")
    args = parser.parse_args(argv)
    run(args.out, args.target, [n for n in args.models.split(",") if n])
    return 0


if __name__ == "__main__":
    sys.exit(main())
