"""TensorRT 8.5 compatibility of what fxopt exports, before and after the TensorRT rewrites; writes
bench/results/tensorrt_compat.md.

    python bench/tensorrt_compat.py [--zoo all|none|REGEX] [--drawn 50]

Each model is traced with fxopt, exported at opset 17 twice, without rewrites ("before") and with
``tensorrt_version="8.5"`` ("after", verified against torch in ONNX Runtime), and each file is checked
with `fxopt.backends.tensorrt_compat.check_tensorrt_compat`. Sources: the bundled models, `--drawn`
graphs drawn from `fxopt.testing.models()` (derandomised), and the zoo's models (tests/zoo/zoo_cases.py).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "zoo"))

import torch  # noqa: E402

import fxopt  # noqa: E402
from fxopt.backends.onnx import export_onnx, verify_onnx  # noqa: E402
from fxopt.backends.tensorrt_compat import check_tensorrt_compat  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/provenance.py, also when loaded by path
from provenance import code_version  # noqa: E402

RESULTS_MD = ROOT / "bench" / "results" / "tensorrt_compat.md"
VERSION = "8.5"


@dataclass
class Row:
    source: str
    name: str
    status: str = "checked"  # "checked" | "not traced" | "export failed" | "verify failed"
    before: list[str] = field(default_factory=list)  # error kinds, "Op: rule"
    after: list[str] = field(default_factory=list)
    warnings_after: list[str] = field(default_factory=list)
    detail: str = ""


def _kinds(report) -> list[str]:  # noqa: ANN001 - a CompatReport
    return sorted({f"{f.op_type or f.rule}: {f.message[:90]}" for f in report.errors})


def check_model(source: str, name: str, model: torch.nn.Module, inputs: tuple) -> Row:
    row = Row(source, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = fxopt.trace(model.eval(), inputs)
    except Exception as exc:  # noqa: BLE001 - a bench reports every failure and goes on
        row.status, row.detail = "not traced", f"{type(exc).__name__}: {str(exc)[:120]}"
        return row
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            before = export_onnx(gm, inputs, opset=17)
            row.before = _kinds(check_tensorrt_compat(before.model, VERSION, graph_module=gm))
            after = export_onnx(gm, inputs, opset=17, tensorrt_version=VERSION)
    except Exception as exc:  # noqa: BLE001
        row.status, row.detail = "export failed", f"{type(exc).__name__}: {str(exc)[:160]}"
        return row
    report = check_tensorrt_compat(after.model, VERSION, graph_module=gm)
    row.after, row.warnings_after = _kinds(report), sorted({f"{f.op_type or f.rule}: {f.message[:90]}" for f in report.warnings})
    try:
        verify_onnx(after, gm, inputs)
    except Exception as exc:  # noqa: BLE001
        row.status, row.detail = "verify failed", f"{type(exc).__name__}: {str(exc)[:160]}"
    return row


def bundled() -> list[tuple[str, torch.nn.Module, tuple]]:
    out = []
    for name in fxopt.models.names():
        torch.manual_seed(0)
        out.append((name, fxopt.models.create(name), fxopt.models.example_inputs(name)))
    return out


def drawn(count: int) -> list[tuple[str, torch.nn.Module, tuple]]:
    from hypothesis import HealthCheck, given, settings

    import fxopt.testing as ft

    got: list[tuple[str, torch.nn.Module, tuple]] = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ft.models())
    def collect(pair):  # noqa: ANN001
        got.append((f"drawn_{len(got):02d} ({type(pair[0]).__name__})", pair[0], pair[1]))

    collect()
    return got[:count]


def zoo(pattern: str) -> list[tuple[str, object]]:
    import zoo_cases as zc

    if pattern == "none":
        return []
    return [(c.name, c) for c in zc.all_cases() if pattern == "all" or re.search(pattern, c.name)]


def render(rows: list[Row], command: str, seconds: float) -> str:
    lines = [
        "# TensorRT 8.5 compatibility of exported models",
        "",
        f"`{command}` at {code_version()} ({seconds:.0f} s). Each model traced by fxopt, exported at opset 17 without",
        "TensorRT rewrites (before) and with `tensorrt_version=\"8.5\"` (after; verified against torch in ONNX Runtime),",
        "each file checked by `check_tensorrt_compat` against onnx-tensorrt's 8.5 support matrix. A model passes with",
        "no error-level finding (warnings are listed below).",
        "",
        "| source | models checked | pass before | pass after | not traced / export or verify failed |",
        "|---|---|---|---|---|",
    ]
    by_source = collections.defaultdict(list)
    for r in rows:
        by_source[r.source].append(r)
    for source, group in by_source.items():
        checked = [r for r in group if r.status in ("checked", "verify failed")]
        other = [r for r in group if r not in checked]
        lines.append(f"| {source} | {len(checked)} | {sum(not r.before for r in checked)} | "
                     f"{sum(not r.after and r.status == 'checked' for r in checked)} | {len(other)} |")
    failing_before = [r for r in rows if r.before]
    lines += ["", f"## Failing before the rewrites ({len(failing_before)})", ""]
    lines += [f"- {r.source} `{r.name}`: {'; '.join(r.before)}" for r in failing_before] or ["- none"]
    failing_after = [r for r in rows if r.after or r.status == "verify failed"]
    lines += ["", f"## Failing after the rewrites ({len(failing_after)})", ""]
    lines += [f"- {r.source} `{r.name}`: {'; '.join(r.after) or r.detail}" for r in failing_after] or ["- none"]
    not_checked = [r for r in rows if r.status in ("not traced", "export failed")]
    lines += ["", f"## Not checked ({len(not_checked)})", ""]
    lines += [f"- {r.source} `{r.name}`: {r.status}: {r.detail}" for r in not_checked] or ["- none"]
    counts = collections.Counter(w for r in rows for w in r.warnings_after)
    lines += ["", "## Warnings after the rewrites (models per kind)", ""]
    lines += [f"- {n} x {w}" for w, n in counts.most_common()] or ["- none"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zoo", default="all", help="'all', 'none', or a regex of zoo case names")
    parser.add_argument("--drawn", type=int, default=50, help="graphs drawn from fxopt.testing.models()")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows: list[Row] = []

    def run(source: str, name: str, build) -> None:  # noqa: ANN001
        t = time.perf_counter()
        try:
            model, inputs = build()
        except Exception as exc:  # noqa: BLE001
            rows.append(Row(source, name, "not traced", detail=f"build failed: {type(exc).__name__}: {str(exc)[:100]}"))
            return
        row = check_model(source, name, model, inputs)
        rows.append(row)
        print(f"{source:8s} {name:50s} {row.status:13s} before={len(row.before)} after={len(row.after)} {time.perf_counter() - t:5.1f}s {row.detail[:80]}", flush=True)

    for name, model, inputs in bundled():
        run("bundled", name, lambda m=model, i=inputs: (m, i))
    for name, model, inputs in drawn(args.drawn):
        run("drawn", name, lambda m=model, i=inputs: (m, i))
    for name, case in zoo(args.zoo):
        run("zoo", name, lambda c=case: (c.build(), c.example_inputs()))
    command = "python bench/tensorrt_compat.py" + "".join(f" {a}" for a in sys.argv[1:])
    text = render(rows, command, time.perf_counter() - start)
    print(text)
    if not args.no_write:
        RESULTS_MD.write_text(text)
        print(f"wrote {RESULTS_MD}")


if __name__ == "__main__":
    main()
