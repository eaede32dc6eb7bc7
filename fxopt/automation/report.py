"""The run's report: one self-contained HTML page (plots embedded as base64 PNG) and report.md.

Per variant: estimated target latency, ONNX size, the deployed file's metrics in ONNX Runtime;
the accuracy-versus-latency Pareto plot; per-layer latency bars; which nodes ran or came from
the cache and how long each took.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fxopt.automation.artefacts import ArtefactStore
from fxopt.automation.config import PipelineConfig, Variant
from fxopt.automation.tasks import Task
from fxopt.output.files import write_atomic

__all__ = ["budget_warnings", "pareto_front", "variant_rows", "write_report"]

TOP_LAYERS = 12


def variant_rows(store: ArtefactStore, records: dict[str, Any], config: PipelineConfig,
                 variant_nodes: Callable[[Variant], dict[str, str]]) -> list[dict[str, Any]]:
    """One row per variant from its artefacts (evaluate's metrics.json, compress's summary)."""
    rows = []
    for variant in config.variants():
        names = variant_nodes(variant)
        evaluated = json.loads((store.folder(records[names["evaluate"]]) / "metrics.json").read_text())
        compress = store.check(records[names["compress"]])["summary"]
        rows.append({
            "variant": variant.tag, "latency_ratio": variant.latency_ratio, "target": variant.target,
            "precision": evaluated["precision"], "latency_ms": evaluated["latency ms (est.)"],
            "achieved_ratio": compress.get("achieved ratio"), "onnx_bytes": evaluated["onnx bytes"],
            "metrics": evaluated["metrics (onnx)"], "layers": evaluated["layers"],
            "deployed": str(store.folder(records[names["lower"]]) / "deploy"),
        })
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both lower latency and higher metric.

    Example:
        >>> pareto_front([(1.0, 0.9), (0.5, 0.8), (0.7, 0.7)])
        [0, 1]
    """
    return [i for i, (lat, acc) in enumerate(points)
            if not any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for l2, a2 in points)]


def _headline(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    name = next(iter(rows[0]["metrics"]), "")
    lower_is_better = any(word in name for word in ("error", "loss"))
    return name, lower_is_better


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(rows: list[dict[str, Any]]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    name, lower = _headline(rows)
    points = [(r["latency_ms"], -r["metrics"].get(name, 0.0) if lower else r["metrics"].get(name, 0.0)) for r in rows]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in points], [r["metrics"].get(name, 0.0) for r in rows], color="tab:blue", label="variant")
    ordered = sorted(front, key=lambda i: points[i][0])
    ax.plot([points[i][0] for i in ordered], [rows[i]["metrics"].get(name, 0.0) for i in ordered], color="tab:red",
            marker="o", label="Pareto front")
    for r in rows:
        ax.annotate(r["variant"], (r["latency_ms"], r["metrics"].get(name, 0.0)), fontsize=7)
    ax.set_xlabel(f"estimated {rows[0]['target']} latency (ms)")
    ax.set_ylabel(f"{name} (deployed ONNX)")
    ax.set_title("accuracy vs latency")
    ax.legend()
    plots = {"pareto": _png(fig)}
    plt.close(fig)
    for r in rows:
        layers = sorted(r["layers"], key=lambda x: -x["latency_ms"])[:TOP_LAYERS][::-1]
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(layers) + 1))
        ax.barh([x["node"] for x in layers], [x["latency_ms"] for x in layers], color="tab:green")
        ax.set_xlabel("estimated latency (ms)")
        ax.set_title(f"{r['variant']}: slowest {len(layers)} layers")
        plots[f"layers {r['variant']}"] = _png(fig)
        plt.close(fig)
    return plots


def _tables(rows: list[dict[str, Any]], events: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    metric_names = list(rows[0]["metrics"])
    header = ["variant", "precision", "latency ms (est.)", "ratio achieved", "ONNX KiB", *metric_names]
    body = [[r["variant"], r["precision"], f"{r['latency_ms']:.4f}",
             "" if r["achieved_ratio"] is None else f"{r['achieved_ratio']:.3f}", f"{r['onnx_bytes'] / 1024:.1f}",
             *[f"{r['metrics'].get(m, float('nan')):.4f}" for m in metric_names]] for r in rows]
    timing = [[name, e["status"], f"{e['seconds']:.2f}", f"{e.get('computed_seconds', e['seconds']):.2f}", e["reason"]]
              for name, e in events.items()]
    return header, body, timing


TIMING = ["node", "status", "seconds (this run)", "seconds (when computed)", "why"]


def _trained_line(trained: dict[str, float]) -> str:
    return ("The trained model before compression (torch, fp32, the same metrics): "
            + ", ".join(f"{k} {v:.4f}" for k, v in trained.items()) + ".") if trained else ""


def budget_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One WARNING per variant whose compression stopped above its latency budget.

    Example:
        >>> budget_warnings([{"variant": "r050_xavier_int8", "latency_ratio": 0.5, "achieved_ratio": 0.8}])[0][:44]
        'WARNING: r050_xavier_int8 asked for 0.50x of'
    """
    return [f"WARNING: {r['variant']} asked for {r['latency_ratio']:.2f}x of the trained model's estimated latency and got "
            f"{r['achieved_ratio']:.3f}x (the compression's floor for this model on this target); try compress='slim', "
            "a larger ratio, or a larger model config"
            for r in rows if r.get("achieved_ratio") is not None and r["achieved_ratio"] > r["latency_ratio"] + 0.01]


def _markdown(title: str, header: list[str], body: list[list[str]], timing: list[list[str]], ran: int, trained: str) -> str:
    def table(h: list[str], rows: list[list[str]]) -> str:
        return "\n".join(["| " + " | ".join(h) + " |", "|" + "---|" * len(h)] + ["| " + " | ".join(r) + " |" for r in rows])

    return (f"# {title}\n\nMetrics are those of the deployed model.onnx in ONNX Runtime on held-out data; latency is "
            f"fxopt's estimate for the target.\n\n## Variants\n\n{table(header, body)}\n\n{trained}\n\n## Nodes ({ran} ran, "
            f"{len(timing) - ran} from the cache)\n\n{table(TIMING, timing)}\n\n"
            "Plots: report.html.\n")


def _html(title: str, header: list[str], body: list[list[str]], timing: list[list[str]], plots: dict[str, str], trained: str) -> str:
    def table(h: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in h)
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{cells}</table>"

    images = "".join(f'<figure><img class="plot" alt="{html.escape(k)}" src="data:image/png;base64,{v}">'
                     f"<figcaption>{html.escape(k)}</figcaption></figure>" for k, v in plots.items())
    style = ("body{font-family:sans-serif;margin:2em;background:#fff;color:#111}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #999;padding:4px 8px;font-size:13px}th{background:#dde}figure{display:inline-block;margin:1em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><p>Metrics: the deployed model.onnx in ONNX Runtime on held-out "
            f"data. Latency: fxopt's estimate for the target.</p><h2>Variants</h2>{table(header, body)}<p>{html.escape(trained)}</p>"
            f"<h2>Plots</h2>{images}<h2>Nodes</h2>{table(TIMING, timing)}</body></html>\n")


def write_report(out: Path, task: Task, config: PipelineConfig, rows: list[dict[str, Any]],
                 events: dict[str, dict[str, Any]], *, trained: dict[str, float] | None = None) -> tuple[Path, Path]:
    """Write ``out/report.md`` and ``out/report.html`` (atomically); returns their paths."""
    title = f"fxopt pipeline: {task.name}"
    header, body, timing = _tables(rows, events)
    ran = sum(1 for e in events.values() if e["status"] == "ran")
    md, page = out / "report.md", out / "report.html"
    line = " ".join([_trained_line(trained or {}), *budget_warnings(rows)]).strip()
    write_atomic(md, _markdown(title, header, body, timing, ran, line))
    write_atomic(page, _html(title, header, body, timing, _plots(rows), line))
    write_atomic(out / "report.json", json.dumps({"variants": rows, "nodes": events}, indent=1, default=str))
    return md, page
