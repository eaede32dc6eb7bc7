"""Compile-time benchmark: fxopt's phases beside their plain torch peers, measured in one run.

    python bench/compile_time.py [--filter REGEX] [--repeat 3] [--target xavier] [--no-write]

Per model it prints (median of --repeat runs, seconds):
- trace: `fxopt.trace` (automatic leaves + ShapeProp) vs plain `torch.fx.symbolic_trace`;
- passes: the default pipeline through `fxopt.PassManager` (copy, lint, recompile, shape
  re-propagation, numerics after each pass) vs the same passes called bare, one after another;
  their difference is the pass manager's overhead;
- export: `fxopt.backends.onnx.lower` as `compile` calls it (export, graphsurgeon clean-up, checker,
  ONNX Runtime parity; a large model lean) vs a bare `torch.onnx.export` with the same exporter and opset;
- total: one whole `fxopt.compile`.
Figures go to bench/results/compile_time.md. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "zoo"))

import zoo_cases as zc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import code_version, cpu_model  # noqa: E402

import fxopt  # noqa: E402
from fxopt.backends.onnx import lower  # noqa: E402
from fxopt.passinfra.pass_base import CompileContext, use_context  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "compile_time.md"
ZOO_MODELS = (
    "tv/resnet18", "tv/mobilenet_v3_small", "tv/efficientnet_b0", "tv/regnet_y_400mf",
    "tv/densenet121", "tv/convnext_tiny", "tv/vit_b_16", "tv/swin_t",
    "timm/efficientvit_m0", "timm/mobilevit_xxs",
)
BUNDLED_MODELS = ("pointpillars", "camera_multitask", "motionnet", "safety_supervisor")
PHASES = ("trace", "passes", "export")


def _median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bare_passes(gm: torch.fx.GraphModule, names: list[str], ctx: CompileContext) -> None:
    # the same passes the manager runs, without its copies and checks
    gm = copy.deepcopy(gm)
    with use_context(ctx):
        for p in fxopt.PassManager(names, check_numerics=False).passes:
            gm = p(gm).graph_module
            gm.recompile()


def _bare_export(gm: torch.fx.GraphModule, inputs: tuple[Any, ...], opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(gm, inputs, io.BytesIO(), opset_version=opset, dynamo=False)


def measure(name: str, model: torch.nn.Module, inputs: tuple[Any, ...], target: str, repeat: int) -> dict[str, Any]:
    """Seconds per phase for fxopt and its peer, and one whole compile, for one model."""
    row: dict[str, Any] = {"model": name}
    profile = fxopt.get_target(target)
    names = fxopt.default_pipeline(profile)
    ctx = CompileContext.create(profile, inputs)
    try:
        row["trace_peer"] = _median_time(lambda: torch.fx.symbolic_trace(copy.deepcopy(model)), repeat)
    except Exception:  # noqa: BLE001 - plain fx cannot trace it: that is the figure
        row["trace_peer"] = float("nan")
    row["trace"] = _median_time(lambda: fxopt.trace(model, inputs), repeat)
    gm = fxopt.trace(model, inputs)
    row["passes_peer"] = _median_time(lambda: _bare_passes(gm, names, ctx), repeat)
    row["passes"] = _median_time(lambda: fxopt.PassManager(names).run(gm, ctx), repeat)
    final = fxopt.PassManager(names).run(gm, ctx).graph_module
    row["export_peer"] = _median_time(lambda: _bare_export(final, inputs, profile.max_onnx_opset), repeat)
    row["export"] = _median_time(lambda: lower(final, inputs, profile, keep_weights_out=None), repeat)  # as compile: lean by size
    row["total"] = _median_time(lambda: fxopt.compile(model, profile, example_inputs=inputs), repeat)
    return row


def _cases(pattern: str, bundled: bool) -> list[tuple[str, Callable[[], tuple[torch.nn.Module, tuple[Any, ...]]]]]:
    by_name = {c.name: c for c in zc.all_cases()}
    cases = [(n, lambda c=by_name[n]: (c.build(), c.example_inputs())) for n in ZOO_MODELS]
    if bundled:
        from fxopt import models

        def build(n: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
            torch.manual_seed(0)
            return models.create(n).eval(), models.example_inputs(n)

        cases += [(f"fxopt/{n}", lambda n=n: build(n)) for n in BUNDLED_MODELS]
    return [(n, b) for n, b in cases if re.search(pattern, n)]


def render(rows: list[dict[str, Any]], target: str, repeat: int) -> str:
    """The Markdown table written to bench/results/compile_time.md."""
    def secs(x: float) -> str:
        return "fails" if math.isnan(x) else f"{x:.3f}"

    lines = [
        "# Compile time",
        "",
        f"Generated by `python bench/compile_time.py` at {code_version()} on {cpu_model()} (torch {torch.__version__}, CPU, 2 threads, target "
        f"{target}, median of {repeat} runs, seconds). Peers run in the same process on the same model:",
        "plain `torch.fx.symbolic_trace`; the same passes called bare (no copy, lint, shape or numerics checks);",
        "a bare `torch.onnx.export` at the same opset (no clean-up, checker or ONNX Runtime parity); fxopt's export lowers as",
        "`compile` does (a model of 64 MiB of weights or more lean: `fxopt.output.onnx_weights`).",
        "`overhead` = fxopt / peer for the pass phase: what verification costs.",
        "",
        "| model | trace fxopt | trace fx | passes fxopt | passes bare | pass overhead | export+verify fxopt | export bare | compile total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['trace']:.3f} | {secs(r['trace_peer'])} | {r['passes']:.3f} | {r['passes_peer']:.3f} | "
            f"{r['passes'] / max(r['passes_peer'], 1e-9):.1f}x | {r['export']:.3f} | {r['export_peer']:.3f} | {r['total']:.3f} |"
        )
    if rows:
        sums = {k: sum(r[k] for r in rows) for k in ("trace", "passes", "passes_peer", "export", "export_peer", "total")}
        traced = [r for r in rows if not math.isnan(r["trace_peer"])]
        sums["trace"] = sum(r["trace"] for r in traced)
        sums["trace_peer"] = sum(r["trace_peer"] for r in traced)
        lines += [
            "",
            f"Sums over {len(rows)} models (trace: over the {len(traced)} plain fx traces): trace {sums['trace']:.2f} s vs "
            f"{sums['trace_peer']:.2f} s plain fx; "
            f"passes {sums['passes']:.2f} s vs {sums['passes_peer']:.2f} s bare "
            f"({sums['passes'] / max(sums['passes_peer'], 1e-9):.1f}x); export {sums['export']:.2f} s vs "
            f"{sums['export_peer']:.2f} s bare; whole compile {sums['total']:.2f} s.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="", help="only models whose name matches this regex")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--target", default="xavier")
    parser.add_argument("--no-bundled", action="store_true", help="skip fxopt.models")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, build in _cases(args.filter, not args.no_bundled):
        model, inputs = build()
        row = measure(name, model, inputs, args.target, args.repeat)
        rows.append(row)
        print(f"{name:32s} trace {row['trace']:.3f}s (fx {row['trace_peer']:.3f}s)  passes {row['passes']:.3f}s "
              f"(bare {row['passes_peer']:.3f}s)  export {row['export']:.3f}s (bare {row['export_peer']:.3f}s)  "
              f"total {row['total']:.3f}s", flush=True)
    text = render(rows, args.target, args.repeat)
    print()
    print(text)
    if not args.no_write and not args.filter:
        from fxopt.output.files import write_atomic

        write_atomic(str(RESULTS), text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
