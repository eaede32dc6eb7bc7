"""The pipeline's cache on MotionNet: a cold run, a warm rerun (nothing changed) and a one-option change
(the fine-tune's steps), each with its wall time and the nodes that ran; `--device`-free, CPU only.

    python bench/pipeline.py                                  # the issue's default config (long on 2 cores)
    python bench/pipeline.py --train-steps 20 --finetune-steps 10 --ratios 1.0,0.7 --out bench/results/pipeline.md

Writes a markdown table (bench/results/pipeline.md by default) with the commit and the host's CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/provenance.py, also when loaded by path
from provenance import code_version, cpu_model  # noqa: E402

import fxopt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="motionnet")
    parser.add_argument("--ratios", default="1.0,0.7,0.5")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--train-steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--qat-steps", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pipeline.md"))
    args = parser.parse_args(argv)
    options = {"latency_ratios": tuple(float(r) for r in args.ratios.split(",")), "precisions": (args.precision,),
               "train_steps": args.train_steps, "finetune_steps": args.finetune_steps, "qat_steps": args.qat_steps}
    runs = [("cold run", options), ("warm rerun, nothing changed", options),
            ("finetune_steps + 1 (one option)", {**options, "finetune_steps": args.finetune_steps + 1})]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, opts in runs:
            start = time.perf_counter()
            result = fxopt.pipeline.run(args.model, folder, progress=sys.stderr.isatty(), **opts)
            wall = time.perf_counter() - start
            stored = [n for n, e in result.events.items() if e["status"] == "stored"]
            rows.append((label, wall, result.ran, len(result.events), stored))
            print(f"{label}: {wall:.1f} s, {len(result.ran)}/{len(result.events)} nodes ran", flush=True)
        variants = result.rows
    lines = [
        f"# fxopt pipeline cache: {args.model}", "",
        f"`python bench/pipeline.py {' '.join(argv if argv is not None else sys.argv[1:])}`; {code_version()}; "
        f"CPU: {cpu_model()} ({len(__import__('os').sched_getaffinity(0))} cores visible); wall times on a shared machine.", "",
        f"Options: {options}", "",
        "The rest came from hamilton's cache, or (\"stored\") from an intact artefact of the same fingerprint: a node whose "
        "inputs reran but kept their SHA-256.", "",
        "| run | wall s | nodes ran | which | stored |", "|---|---|---|---|---|",
        *[f"| {label} | {wall:.1f} | {len(ran)}/{total} | {', '.join(ran) or '-'} | {', '.join(stored) or '-'} |"
          for label, wall, ran, total, stored in rows],
        "", "Deployed variants (last run; metrics of model.onnx in ONNX Runtime on the recipe's held-out set):", "",
        "| variant | latency ms (est.) | ratio achieved | ONNX KiB | " + " | ".join(variants[0]["metrics"]) + " |",
        "|---|---|---|---|" + "---|" * len(variants[0]["metrics"]),
        *[f"| {v['variant']} | {v['latency_ms']:.4f} | {v['achieved_ratio']:.3f} | {v['onnx_bytes'] / 1024:.1f} | "
          + " | ".join(f"{x:.4f}" for x in v["metrics"].values()) + " |" for v in variants],
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
