"""Structured channel pruning, fxopt vs Torch-Pruning, side by side on torchvision/timm models.

    python bench/prune.py [--filter REGEX] [--quick] [--amount 0.5] [--allocation uniform|global]

Both prune the same random-weight model to the same FLOPs budget with magnitude (L1) importance
and the same allocation. Torch-Pruning takes a channel ratio, so its ratio is searched (regula
falsi on its own FLOPs counter) and the whole search is charged to it; the time of its last,
single prune is shown too. Writes bench/results/prune.md on a full run.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "zoo"))

import zoo_cases as zc  # noqa: E402

import fxopt  # noqa: E402
from fxopt.backends.onnx import export_onnx, verify_onnx  # noqa: E402
from fxopt.output.files import write_atomic  # noqa: E402
from fxopt.verification.numerics import output_signature, run_model  # noqa: E402
from fxopt.verification.ort_timing import ort_latencies_ms  # noqa: E402 - one thread, interleaved, median (bench/cpu_alignment.py too)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/provenance.py, also when loaded by path
from provenance import code_version  # noqa: E402

RESULTS_MD = ROOT / "bench" / "results" / "prune.md"
TOLERANCE = 0.05  # achieved FLOPs ratio within 5 points of the request counts as "at budget"
SIZE = 128
MODELS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    # (zoo case name, source, builder kwargs beyond the zoo's)
    ("tv/resnet18", "torchvision", {}),
    ("tv/resnet50", "torchvision", {}),
    ("tv/mobilenet_v2", "torchvision", {}),
    ("tv/mobilenet_v3_large", "torchvision", {}),
    ("tv/efficientnet_b0", "torchvision", {}),
    ("tv/regnet_x_400mf", "torchvision", {}),
    ("tv/regnet_y_400mf", "torchvision", {}),
    ("tv/densenet121", "torchvision", {}),
    ("tv/convnext_tiny", "torchvision", {}),
    ("tv/vit_b_16", "torchvision", {"image_size": SIZE}),
    ("tv/swin_t", "torchvision", {}),
    ("tv/shufflenet_v2_x1_0", "torchvision", {}),
    ("tv/mnasnet1_0", "torchvision", {}),
    ("tv/googlenet", "torchvision", {"aux_logits": False, "init_weights": False}),
    ("timm/vit_tiny_patch16_224", "timm", {"img_size": SIZE}),
    ("timm/resnet26d", "timm", {}),
)
QUICK = ("tv/resnet18", "tv/mobilenet_v3_large", "tv/efficientnet_b0", "timm/vit_tiny_patch16_224")


def bench_cases(size: int = SIZE) -> list[zc.ZooCase]:
    """The benchmarked models as zoo cases at ``1x3x{size}x{size}`` (random weights, no download)."""
    cases = []
    for name, source, extra in MODELS:
        builder = name.split("/", 1)[1]
        kwargs = ({"weights": None} if source == "torchvision" else {}) | extra
        if "image_size" in kwargs:
            kwargs["image_size"] = size
        if "img_size" in kwargs:
            kwargs["img_size"] = size
        cases.append(zc.ZooCase(name, source, builder, "classification", (1, 3, size, size), kwargs))
    return cases


# ---------------------------------------------------------------------------------------------
# Counting: one counter for every model (fxopt's, after the default canonical pipeline)


@dataclass(frozen=True)
class Counts:
    """FLOPs by fxopt's cost model (BatchNorm folded, as deployed), params, and TP's MACs."""

    flops: int
    params: int
    tp_macs: int


def count(model: nn.Module, inputs: tuple[Any, ...]) -> Counts:
    """Count a model the same way whoever pruned it.

    FLOPs are `fxopt.estimate_costs` of the graph after fxopt's default pipeline (canonicalise,
    fold BatchNorm), so a pruned graph that already had its BatchNorms folded is not favoured.
    """
    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = fxopt.compile(model, "cpu", example_inputs=inputs, export=False)
        macs, _ = tp.utils.count_ops_and_params(model, inputs)
    params = sum(p.numel() for p in model.parameters())
    return Counts(compiled.report.cost_after.flops, params, int(macs))


# ---------------------------------------------------------------------------------------------
# The two pruners


@dataclass
class Pruned:
    """One pruner's result on one model."""

    ok: bool = False  # pruned, output shape kept, ONNX opset 17 runs in ORT and matches, at budget
    error: str = ""
    time_s: float = 0.0  # wall time charged to the pruner
    single_s: float | None = None  # Torch-Pruning: the final prune alone (no search)
    pass_s: float | None = None  # fxopt: the prune pass alone (from the compile report)
    trials: int = 1
    detail: str = ""
    counts: Counts | None = None
    shape_ok: bool = False
    onnx_ok: bool = False
    latency_ms: float | None = None
    module: nn.Module | None = field(default=None, repr=False)
    onnx: Any = field(default=None, repr=False)  # the verified ONNX model, until latency is measured


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:limit]


def prune_fxopt(model: nn.Module, inputs: tuple[Any, ...], amount: float, allocation: str,
                round_to: int | None = None) -> Pruned:
    """`fxopt.compile` with `PruneChannels` (L1, FLOPs budget); ONNX export left to the checks."""
    from fxopt.passes import PruneChannels

    result = Pruned()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = fxopt.compile(
            model, "cpu", example_inputs=inputs, export=False,
            passes=[PruneChannels(amount=amount, by="flops", allocation=allocation, importance="l1", round_to=round_to)],
        )
    result.time_s = time.perf_counter() - start
    record = next((r for r in compiled.report.passes if r.name == "prune"), None)
    if record is None or record.status != "applied":
        status = "missing" if record is None else f"{record.status}: {record.reason}"
        result.error = f"prune pass {status}"[:200]
        return result
    result.pass_s = record.time_s
    result.module = compiled.graph_module
    return result


def _tp_setup(model: nn.Module, classes: int) -> tuple[list[nn.Module], dict[nn.Module, int], Callable[[nn.Module], None]]:
    """Ignored layers (the classifier), attention head counts, and the attribute fix-up after.

    These follow Torch-Pruning's documented recipes for torchvision and timm transformers: the
    layers producing the `classes` logits are ignored so the output keeps its shape.
    """
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    ignored += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == classes]
    num_heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            num_heads[m] = m.num_heads
        elif hasattr(m, "qkv") and isinstance(getattr(m, "num_heads", None), int):
            num_heads[m.qkv] = m.num_heads

    def fix(pruned: nn.Module) -> None:
        # modules that cache a width in a plain attribute must learn the new one
        if hasattr(pruned, "conv_proj") and hasattr(pruned, "hidden_dim"):
            pruned.hidden_dim = pruned.conv_proj.out_channels
        for m in pruned.modules():
            if hasattr(m, "qkv") and hasattr(m, "head_dim") and isinstance(getattr(m, "num_heads", None), int):
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                if hasattr(m, "attn_dim"):
                    m.attn_dim = m.num_heads * m.head_dim

    return ignored, num_heads, fix


def _tp_prune_once(model: nn.Module, inputs: tuple[Any, ...], ratio: float, allocation: str,
                   round_to: int | None = None) -> nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        classes = pruned.eval()(*inputs).shape[-1]
    ignored, num_heads, fix = _tp_setup(pruned, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            pruned, inputs, importance=tp.importance.MagnitudeImportance(p=1),
            global_pruning=allocation == "global", pruning_ratio=ratio, max_pruning_ratio=0.9,
            ignored_layers=ignored, num_heads=num_heads, round_to=round_to,
        )
        pruner.step()
    fix(pruned)
    return pruned.eval()


def _tp_macs(model: nn.Module, inputs: tuple[Any, ...]) -> float:
    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(tp.utils.count_ops_and_params(model, inputs)[0])


def prune_tp(
    model: nn.Module, inputs: tuple[Any, ...], amount: float, allocation: str,
    *, round_to: int | None = None, tol: float = 0.01, max_trials: int = 10,
) -> Pruned:
    """Torch-Pruning MetaPruner (L1 magnitude) at the channel ratio that removes `amount` of its MACs.

    The ratio is found by regula falsi (Illinois) on Torch-Pruning's own counter, each trial a
    fresh copy pruned from scratch; the search stops within `tol` of the budget.
    """
    result = Pruned()
    start = time.perf_counter()
    goal = 1.0 - amount
    base = _tp_macs(model, inputs)

    def excess(ratio: float) -> tuple[float, nn.Module, float]:
        t0 = time.perf_counter()
        pruned = _tp_prune_once(model, inputs, ratio, allocation, round_to)
        single = time.perf_counter() - t0
        return _tp_macs(pruned, inputs) / base - goal, pruned, single

    lo, hi = 0.0, 0.9
    f_lo, f_hi = 1.0 - goal, None
    ratio = 1.0 - goal ** 0.5  # exact when every conv loses the same share of in and out channels
    best: tuple[float, nn.Module, float, float] | None = None
    side = 0
    for trial in range(1, max_trials + 1):
        err, pruned, single = excess(ratio)
        result.trials = trial
        if best is None or abs(err) < abs(best[0]):
            best = (err, pruned, single, ratio)
        if abs(err) <= tol:
            break
        if err > 0:  # too many MACs left: prune more
            lo, f_lo = ratio, err
            if side == 1 and f_hi is not None:
                f_hi /= 2
            side = 1
        else:
            hi, f_hi = ratio, err
            if side == -1:
                f_lo /= 2
            side = -1
        ratio = (lo + hi) / 2 if f_hi is None else lo + (hi - lo) * f_lo / (f_lo - f_hi)
    assert best is not None
    result.time_s = time.perf_counter() - start
    result.single_s, result.module = best[2], best[1]
    result.detail = f"{best[3]:.3f} ({result.trials})"
    return result


# ---------------------------------------------------------------------------------------------
# Checks and latency


def check(result: Pruned, inputs: tuple[Any, ...], reference_out: Any, base: Counts, amount: float) -> None:
    """Fill in shape, counts and the verified ONNX model of a pruned module; `ok` when all hold."""
    module = result.module
    assert module is not None
    result.shape_ok = output_signature(run_model(module, inputs)) == output_signature(reference_out)
    result.counts = count(module, inputs)
    result.onnx = verify_onnx(export_onnx(module, inputs, opset=17, cleanup=False), module, inputs).model
    result.onnx_ok = True
    ratio = result.counts.flops / base.flops
    at_budget = abs(ratio - (1.0 - amount)) <= TOLERANCE
    result.ok = result.shape_ok and at_budget
    if not result.shape_ok:
        result.error = "output shape changed"
    elif not at_budget:
        result.error = f"FLOPs ratio {ratio:.3f} is not within {TOLERANCE:g} of {1 - amount:g}"


def _run_side(prune: Callable[[], Pruned], inputs: tuple[Any, ...], reference_out: Any, base: Counts,
              amount: float) -> Pruned:
    result = Pruned()
    try:
        result = prune()
        if result.module is not None:
            check(result, inputs, reference_out, base, amount)
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        result.ok = False
        result.error = _short(exc)
        if "--debug" in sys.argv:
            traceback.print_exc()
    result.module = None  # free memory; only figures are kept
    return result


@dataclass
class Row:
    """One model: the original and both pruned versions."""

    name: str
    input_shape: tuple[int, ...]
    base: Counts | None = None
    base_latency_ms: float | None = None
    error: str = ""
    fxopt: Pruned = field(default_factory=Pruned)
    tp: Pruned = field(default_factory=Pruned)


def run_model_case(case: zc.ZooCase, amount: float, allocation: str, runs: int, round_to: int | None = None) -> Row:
    """Build, count and time the original, then prune with both tools and check each result."""
    row = Row(case.name, case.input_shape)
    try:
        model, inputs = case.build(), case.example_inputs()
        reference_out = run_model(model, inputs)
        row.base = count(model, inputs)
        base_onnx = export_onnx(model, inputs, opset=17, cleanup=False).model
    except Exception as exc:  # noqa: BLE001
        row.error = f"original: {_short(exc)}"
        return row
    row.fxopt = _run_side(lambda: prune_fxopt(model, inputs, amount, allocation, round_to), inputs, reference_out,
                          row.base, amount)
    row.tp = _run_side(lambda: prune_tp(model, inputs, amount, allocation, round_to=round_to), inputs, reference_out,
                       row.base, amount)
    sides = [p for p in (row.fxopt, row.tp) if p.onnx is not None]
    try:
        latencies = ort_latencies_ms([base_onnx] + [p.onnx for p in sides], inputs, runs)
    except Exception as exc:  # noqa: BLE001
        row.error = f"latency: {_short(exc)}"
        return row
    row.base_latency_ms = latencies[0]
    for p, ms in zip(sides, latencies[1:]):
        p.latency_ms, p.onnx = ms, None
    return row


# ---------------------------------------------------------------------------------------------
# Rendering


def _ratio(part: Counts | None, base: Counts | None, key: str) -> str:
    if part is None or base is None or not getattr(base, key):
        return ""
    return f"{getattr(part, key) / getattr(base, key):.3f}"


def _ms(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _secs(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _status(p: Pruned) -> str:
    return "ok" if p.ok else "FAIL"


HEADER = (
    "model", "fxopt s", "fxopt pass s", "TP s (search)", "TP s (1 prune)", "TP/fxopt time", "TP channel ratio (trials)", "FLOPs fxopt", "FLOPs TP",
    "params fxopt", "params TP", "TP MACs fxopt", "TP MACs TP", "fxopt", "TP",
    "ORT ms orig", "ORT ms fxopt", "ORT ms TP",
)


def table_rows(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        f, t = r.fxopt, r.tp
        speed = f"{t.time_s / f.time_s:.2f}" if f.time_s and t.time_s else ""
        out.append((
            r.name, _secs(f.time_s or None), _secs(f.pass_s), _secs(t.time_s or None), _secs(t.single_s), speed, t.detail,
            _ratio(f.counts, r.base, "flops"), _ratio(t.counts, r.base, "flops"),
            _ratio(f.counts, r.base, "params"), _ratio(t.counts, r.base, "params"),
            _ratio(f.counts, r.base, "tp_macs"), _ratio(t.counts, r.base, "tp_macs"),
            _status(f), _status(t), _ms(r.base_latency_ms), _ms(f.latency_ms), _ms(t.latency_ms),
        ))
    return out


def summary(rows: Sequence[Row]) -> list[str]:
    n = len(rows)
    f_ok, t_ok = sum(r.fxopt.ok for r in rows), sum(r.tp.ok for r in rows)
    f_time, t_time = sum(r.fxopt.time_s for r in rows), sum(r.tp.time_s for r in rows)
    t_single = sum(r.tp.single_s or 0.0 for r in rows)
    f_pass = sum(r.fxopt.pass_s or 0.0 for r in rows)
    lines = [
        f"pruned correctly: fxopt {f_ok}/{n}, Torch-Pruning {t_ok}/{n}",
        f"total pruning time: fxopt {f_time:.1f} s, Torch-Pruning {t_time:.1f} s with its ratio search "
        f"(TP/fxopt = {t_time / f_time:.2f}), {t_single:.1f} s for its final prunes alone"
        f" (TP/fxopt = {t_single / f_time:.2f})" if f_time else "no fxopt time measured",
        f"the prune pass alone (analysis, budget search, slicing, and the pass manager's checks of it): "
        f"fxopt {f_pass:.1f} s vs Torch-Pruning's search {t_time:.1f} s (TP/fxopt = {t_time / f_pass:.2f}) "
        f"and its final prunes {t_single:.1f} s (TP/fxopt = {t_single / f_pass:.2f})" if f_pass else "no pass time measured",
    ]
    both = [r for r in rows if r.fxopt.ok and r.tp.ok]
    if both:
        fl = statistics.median(r.fxopt.latency_ms / r.base_latency_ms for r in both)
        tl = statistics.median(r.tp.latency_ms / r.base_latency_ms for r in both)
        lines.append(f"median ORT latency vs original, on the {len(both)} models both pruned correctly: "
                     f"fxopt {fl:.3f}, Torch-Pruning {tl:.3f}")
    return lines


def failures(rows: Sequence[Row]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for r in rows:
        if r.error:
            out.append((r.name, "both", r.error))
        for tool, p in (("fxopt", r.fxopt), ("Torch-Pruning", r.tp)):
            if not r.error and not p.ok:
                out.append((r.name, tool, p.error))
    return out


def _rounding(round_to: int | None) -> str:
    if round_to:
        return str(round_to)
    return f"{fxopt.get_target('cpu').alignment('fp32')} for fxopt (the cpu target's alignment) and 1 for Torch-Pruning (its default)"


def render_markdown(rows: Sequence[Row], args: argparse.Namespace, wall_s: float, version: str) -> str:
    """bench/results/prune.md."""
    import torch_pruning as tp

    lines = [
        "# Structured channel pruning: fxopt vs Torch-Pruning",
        "",
        f"Generated by `python bench/prune.py` (fxopt {version}, Torch-Pruning {tp.__version__}, torch "
        f"{torch.__version__}, CPU, {torch.get_num_threads()} torch thread(s), random weights, input "
        f"1x3x{args.size}x{args.size}); whole run {wall_s / 60:.1f} min.",
        "",
        f"Request: remove {args.amount:.0%} of the FLOPs, {args.allocation} allocation, L1 magnitude importance,",
        f"channel counts rounded to multiples of {_rounding(args.round_to)}, classifier kept. fxopt: `fxopt.compile(model, \"cpu\", passes=[PruneChannels(amount, by=\"flops\", ...)],",
        "export=False)`; its time is the whole compile (trace, canonicalise, prune, fold BatchNorm, per-pass",
        "numerical checks). Torch-Pruning: `MetaPruner(MagnitudeImportance(p=1), pruning_ratio=r)` with",
        "its documented head settings for transformers; it takes a channel ratio, so r is searched by",
        "regula falsi on `tp.utils.count_ops_and_params` until its MACs are within 1 point of the",
        "request (at most 10 trials, the closest kept), each trial pruning a fresh copy; the whole search",
        "is its time (`TP s (search)`), the final prune alone is `TP s (1 prune)`, and the ratio it",
        "settled on and the trials it took are in `TP channel ratio (trials)`.",
        "",
        "FLOPs and params ratios are pruned / original, all counted the same way: FLOPs by",
        "`fxopt.estimate_costs` after fxopt's default pipeline (BatchNorm folded) for the original and",
        "both results; `TP MACs` columns use Torch-Pruning's own counter. A result is `ok` when pruning ran,",
        "the output shape is kept, it exports to ONNX opset 17 and matches in ONNX Runtime (all three through",
        "`fxopt.backends.onnx.export_onnx(cleanup=False)` + `verify_onnx`: the TorchScript exporter and",
        "`onnx.checker`, max abs error <= 1e-4 + 1e-4 x max|output|), and its FLOPs",
        f"ratio is within {TOLERANCE:g} of the request. ORT ms: median of {args.runs} ONNX Runtime CPU runs,",
        "one thread, same exporter for all three, the three models taking turns run by run. Wall times",
        "on a shared 2-core machine are noisy.",
        "",
        "## Summary",
        "",
        *[f"- {line}" for line in summary(rows)],
        "",
        "## Per model",
        "",
        *zc._md_table(HEADER, table_rows(rows)),
        "",
        "## Failures",
        "",
        *zc._md_table(("model", "tool", "reason / detail"), failures(rows)),
        "",
    ]
    return "\n".join(lines)


def text_table(rows: Sequence[Row]) -> str:
    body = [HEADER, *table_rows(rows)]
    widths = [max(len(str(r[i])) for r in body) for i in range(len(HEADER))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in body)


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="", help="only models whose name matches this regex")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} at 64 px, 5 runs")
    parser.add_argument("--amount", type=float, default=0.5, help="fraction of the FLOPs to remove")
    parser.add_argument("--allocation", choices=("uniform", "global"), default="uniform")
    parser.add_argument("--size", type=int, default=SIZE, help="input height and width")
    parser.add_argument("--round-to", type=int, default=None,
                        help="channel multiple kept by both pruners (default none: the cpu target's fp32 alignment 1)")
    parser.add_argument("--runs", type=int, default=50, help="ONNX Runtime runs per latency")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: "
                        "bench/results/prune.md on a full run, nothing otherwise)")
    parser.add_argument("--mem-limit-gb", type=float, default=10.0, help="address-space limit of this "
                        "process, so a pruner that runs away fails with MemoryError (0: none)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.runs = 64, 5
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    torch.set_num_threads(1)
    if args.mem_limit_gb > 0:  # the machine is shared: one model must not take all its memory
        import resource

        limit, hard = int(args.mem_limit_gb * 2**30), resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    cases = [c for c in bench_cases(args.size) if re.search(args.filter, c.name)]
    if args.quick:
        cases = [c for c in cases if c.name in QUICK]
    rows, start, version = [], time.perf_counter(), code_version()
    for i, case in enumerate(cases, 1):
        row = run_model_case(case, args.amount, args.allocation, args.runs, args.round_to)
        rows.append(row)
        print(f"[{i}/{len(cases)}] {case.name:28s} fxopt {_status(row.fxopt)} {row.fxopt.time_s:6.1f}s  "
              f"TP {_status(row.tp)} {row.tp.time_s:6.1f}s  {row.error or row.fxopt.error or row.tp.error}"[:200],
              flush=True)
    print()
    print(text_table(rows))
    print()
    print("\n".join(summary(rows)))
    out = args.out or (RESULTS_MD if not (args.filter or args.quick) else None)
    if out is not None:
        write_atomic(out, render_markdown(rows, args, time.perf_counter() - start, version))
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
