"""Which channel multiple should pruning keep for the `cpu` target (ONNX Runtime on this host)?

    python bench/cpu_alignment.py [--alignments 1 4 8 16] [--runs 30] [--filter REGEX]

For every model of the pruning bench (bench/prune.py: 16 torchvision/timm models, 1x3x128x128),
prune half the FLOPs with fxopt (L1, uniform) once per alignment (`round_to`), export each result
and the original to ONNX, and time them all in ONNX Runtime on one thread, interleaved run by run
(median of `--runs`). Writes bench/results/cpu_alignment.md: per model the latency of each pruned
variant relative to the original, and per alignment the median ratio, how often the pruned model
is slower than the original, and the FLOPs actually removed. The `cpu` target's fp32 alignment
(fxopt/targets/__init__.py) is the alignment with the lowest median ratio here.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import prune as prune_bench  # noqa: E402  (the bench's models, pruning call, counter and ORT timing)

from fxopt.backends.onnx import export_onnx  # noqa: E402
from fxopt.output.files import write_atomic  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "results" / "cpu_alignment.md"


def measure(case, alignments, runs):
    model, inputs = case.build(), case.example_inputs()
    base = prune_bench.count(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_models = [export_onnx(model, inputs, cleanup=False).model]
        flops = []
        for a in alignments:
            pruned = prune_bench.prune_fxopt(model, inputs, 0.5, "uniform", round_to=a)
            if pruned.module is None:
                raise RuntimeError(pruned.error)
            onnx_models.append(export_onnx(pruned.module, inputs, cleanup=False).model)
            flops.append(prune_bench.count(pruned.module, inputs).flops / base.flops)
    latencies = prune_bench.ort_latencies_ms(onnx_models, inputs, runs)
    return latencies[0], [lat / latencies[0] for lat in latencies[1:]], flops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alignments", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--filter", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows, ratios, removed, failed = [], {a: [] for a in args.alignments}, {a: [] for a in args.alignments}, []
    for case in prune_bench.bench_cases():
        if args.filter and not re.search(args.filter, case.name):
            continue
        try:
            original, rel, flops = measure(case, args.alignments, args.runs)
        except Exception as exc:  # noqa: BLE001 - a model that fails is listed, the sweep goes on
            failed.append(f"{case.name}: {type(exc).__name__}: {str(exc)[:160]}")
            print(f"{case.name}: failed: {exc}", flush=True)
            continue
        for a, r, f in zip(args.alignments, rel, flops):
            ratios[a].append(r)
            removed[a].append(1 - f)
        rows.append(f"| {case.name} | {original:.2f} | " + " | ".join(f"{r:.2f}" for r in rel) + " |")
        print(rows[-1], flush=True)
    summary = []
    for a in args.alignments:
        if ratios[a]:
            slower = sum(r > 1 for r in ratios[a])
            summary.append(f"| {a} | {statistics.median(ratios[a]):.3f} | {slower}/{len(ratios[a])} | "
                           f"{statistics.median(removed[a]):.3f} |")
    best = min((a for a in args.alignments if ratios[a]), key=lambda a: statistics.median(ratios[a]))
    lines = [
        "# `cpu` target: channel alignment by measurement",
        "",
        f"`python bench/cpu_alignment.py --runs {args.runs}` at {prune_bench.code_version()}, torch {torch.__version__}; "
        f"ONNX Runtime on one thread of the 2-core development host; 1x3x{prune_bench.SIZE}x{prune_bench.SIZE}; "
        f"fxopt prune 50% FLOPs, L1, uniform; {time.perf_counter() - start:.0f} s wall.",
        "",
        "## Per alignment (median over models)",
        "",
        "| round_to | pruned / original latency | pruned slower than original | FLOPs removed |",
        "|---|---|---|---|",
        *summary,
        "",
        f"Lowest median latency ratio: **round_to={best}**.",
        "",
        "## Per model: pruned latency / original latency",
        "",
        "| model | original ms | " + " | ".join(f"round_to={a}" for a in args.alignments) + " |",
        "|---|---|" + "---|" * len(args.alignments),
        *rows,
        "",
    ]
    if failed:
        lines += ["## Failed", "", *[f"- {f}" for f in failed], ""]
    write_atomic(RESULTS_MD, "\n".join(lines))
    print(f"best round_to={best}; wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
