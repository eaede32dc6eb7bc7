"""Compile reports: per-pass and per-layer figures as terminal text, Markdown and JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from fxopt.costs.cost_model import CostSummary, NodeCost, estimate_costs
from fxopt.frontend.inputs import submodule
from fxopt.frontend.tracing import Leaf
from fxopt.passinfra.pass_manager import PassRecord

__all__ = ["CompileReport", "LayerRow", "PrecisionColumn", "PrecisionLayer", "layer_rows", "precision_comparison"]


@dataclass(frozen=True)
class LayerRow:
    """One computing node of the final graph."""

    node: str
    op: str
    kind: str
    params: int
    flops: int
    latency_ms: float
    precision: str
    placement: str = ""
    uncosted: str = ""  # why the cost model could not cost the node (its flops are then 0)
    roofline_ms: float = 0.0  # the lower bound for the same work (peak compute or memory bandwidth)

    def flops_text(self) -> str:
        return f"uncosted ({self.uncosted})" if self.uncosted else _si(self.flops)


def layer_rows(gm: GraphModule, cost: CostSummary, placement: dict[str, str] | None = None) -> list[LayerRow]:
    """Rows for every node that computes something (views and I/O are left out)."""
    rows = []
    for node in gm.graph.nodes:
        c = cost.per_node.get(node.name)
        if c is None or c.kind == "view":
            continue
        if node.op == "call_module":
            op = type(submodule(gm, str(node.target))).__name__
        else:
            op = getattr(node.target, "__name__", str(node.target))
        rows.append(LayerRow(
            node.name, op, c.kind, c.params, c.flops, c.latency_s * 1e3, cost.precision,
            (placement or {}).get(node.name, ""), c.uncosted, c.roofline_s * 1e3,
        ))
    return rows


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _change(before: float, after: float) -> str:
    return "" if before == 0 else f" ({(after - before) / before * 100:+.1f}%)"


@dataclass
class CompileReport:
    """What one `fxopt.compile` run did and measured."""

    model: str
    target: str
    precision: str
    pipeline: list[str]
    passes: list[PassRecord]
    leaves: list[Leaf]
    cost_before: CostSummary
    cost_after: CostSummary
    layers: list[LayerRow]
    onnx: dict[str, Any] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (what report.json holds)."""
        return {
            "model": self.model,
            "target": self.target,
            "precision": self.precision,
            "pipeline": self.pipeline,
            "passes": [r.to_dict() for r in self.passes],
            "leaves": [leaf.__dict__ for leaf in self.leaves],
            "cost_before": self.cost_before.to_dict(),
            "cost_after": self.cost_after.to_dict(),
            "layers": [row.__dict__ for row in self.layers],
            "onnx": self.onnx,
            "timings_s": self.timings_s,
            "notes": self.notes,
            "tables": self.tables,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def _summary_lines(self) -> list[str]:
        b, a = self.cost_before, self.cost_after
        lines = [
            f"params  {_si(b.params)} -> {_si(a.params)}{_change(b.params, a.params)}",
            f"FLOPs   {_si(b.flops)} -> {_si(a.flops)}{_change(b.flops, a.flops)}",
            f"est. {self.target} latency ({self.precision}, engine time)  "
            f"{b.latency_s * 1e3:.3f} ms -> {a.latency_s * 1e3:.3f} ms{_change(b.latency_s, a.latency_s)}",
        ]
        if a.host_overhead_s > 0:  # the report shows engine time; a host call adds this around it
            lines.append(f"a host call (Python, synchronisation, copies) adds about {a.host_overhead_s * 1e3:.3f} ms to each")
        if a.roofline_s > 0:  # what the estimate adds to the bare peak-throughput bound
            lines.append(f"roofline lower bound  {b.roofline_s * 1e3:.3f} ms -> {a.roofline_s * 1e3:.3f} ms "
                         f"(estimate / roofline {a.latency_s / a.roofline_s:.2f}x)")
        # a node without a cost is said so, never folded into the totals as a silent zero
        lines += [f"{when}: {c.uncosted_note()}" for when, c in (("before", b), ("after", a)) if not c.complete]
        return lines

    def _pass_rows(self) -> list[list[str]]:
        rows = []
        for r in self.passes:
            nodes = f"{r.before.nodes}->{r.after.nodes}" if r.before and r.after else ""
            err = f"{r.max_abs_error:.2g}" if r.status == "applied" else ""
            rows.append([r.name, r.status, "yes" if r.lossy else "no", nodes, err, f"{r.time_s * 1e3:.1f}", r.reason])
        return rows

    def __str__(self) -> str:
        lines = [f"fxopt: {self.model} for {self.target} ({self.precision})", ""]
        lines += self._summary_lines()
        lines += ["", "passes:"]
        for name, status, _lossy, nodes, err, ms, reason in self._pass_rows():
            extra = f"  max|err| {err}" if err else ""
            why = f"  -- {reason}" if reason else ""
            lines.append(f"  {name:<22} {status:<12} nodes {nodes:<10} {ms:>8} ms{extra}{why}")
        if self.leaves:
            lines += ["", "leaf modules (kept opaque):"]
            lines += [f"  {leaf.path} ({leaf.module_type}): {leaf.reason}" for leaf in self.leaves]
        if self.onnx:
            err, steps = self.onnx.get("max_abs_error_vs_torch"), self.onnx.get("max_error_in_output_int8_steps")
            verified = f", ONNX Runtime max|err| vs torch {err:.2g}" if err is not None else ""
            verified += f" ({steps:.2g} output int8 steps)" if err is not None and steps is not None else ""
            int8_error = self.onnx.get("int8_vs_float_max_abs_error")
            if int8_error is not None:
                verified += f"; int8 vs float graph {int8_error:.2g} ({self.onnx.get('int8_vs_float_in_output_int8_steps', 0):.2g} steps)"
            lines += ["", f"onnx: opset {self.onnx['opset']}, {self.onnx['nodes']} nodes{verified}"]
        top = sorted(self.layers, key=lambda r: -r.latency_ms)[:8]
        if top:
            lines += ["", "slowest layers (estimated):"]
            for row in top:
                where = f" [{row.placement}]" if row.placement else ""
                lines.append(f"  {row.node:<28} {row.op:<16} {row.flops_text():>8} FLOPs {row.latency_ms:8.4f} ms{where}")
        for title, rows in self.tables.items():
            lines += ["", f"{title}: {len(rows)} rows (see report.md)"]
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        if self.timings_s:
            lines += ["", "time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings_s.items())]
        return "\n".join(lines)

    def _dominant_layers(self, top: int = 8) -> list[str]:
        """The layers that take most of the estimated time, with their share (markdown lines)."""
        total = sum(r.latency_ms for r in self.layers)
        rows = sorted((r for r in self.layers if r.latency_ms > 0), key=lambda r: -r.latency_ms)[:top]
        if not rows or total <= 0:
            return []
        lines = ["", "## Where the time goes", "",
                 f"The {len(rows)} slowest of {len(self.layers)} layers take {sum(r.latency_ms for r in rows) / total:.0%} of the "
                 f"estimated layer time ({total:.4f} ms; the whole estimate adds the per-inference overhead).", "",
                 "| node | op | kind | est. ms | share | estimate / roofline | placement |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.node} | {r.op} | {r.kind} | {r.latency_ms:.4f} | {r.latency_ms / total:.1%} | "
                  f"{r.latency_ms / r.roofline_ms:.1f}x | {r.placement} |" if r.roofline_ms > 0 else
                  f"| {r.node} | {r.op} | {r.kind} | {r.latency_ms:.4f} | {r.latency_ms / total:.1%} | | {r.placement} |" for r in rows]
        return lines

    def to_markdown(self) -> str:
        """The report as Markdown (what report.md holds)."""
        out = [f"# fxopt report: {self.model} for `{self.target}` ({self.precision})", ""]
        out += [f"- {line}" for line in self._summary_lines()]
        out += ["", "## Passes", "", "| pass | status | lossy | nodes | max abs err | ms | reason |", "|---|---|---|---|---|---|---|"]
        out += ["| " + " | ".join(row) + " |" for row in self._pass_rows()]
        if self.leaves:
            out += ["", "## Leaf modules", "", "| module | type | reason |", "|---|---|---|"]
            out += [f"| `{leaf.path}` | {leaf.module_type} | {leaf.reason} |" for leaf in self.leaves]
        if self.onnx:
            out += ["", "## ONNX", ""] + [f"- {k}: {v}" for k, v in self.onnx.items()]
        out += self._dominant_layers()
        out += ["", "## Layers", "", "| node | op | kind | params | FLOPs | est. ms | roofline ms | precision | placement |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [
            f"| {r.node} | {r.op} | {r.kind} | {r.params} | {f'uncosted ({r.uncosted})' if r.uncosted else r.flops} | {r.latency_ms:.4f} "
            f"| {r.roofline_ms:.4f} | {r.precision} | {r.placement} |"
            for r in self.layers
        ]
        for title, rows in self.tables.items():
            out += ["", f"## {title}", "", *_markdown_table(rows)]
        if self.notes:
            out += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def _markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(empty)"]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def report_tables(gm: GraphModule) -> dict[str, list[dict[str, Any]]]:
    """Tables passes left for the report in ``gm.meta["fxopt_tables"]`` (title -> rows of plain data)."""
    return {title: [dict(r) for r in rows] for title, rows in gm.meta.get("fxopt_tables", {}).items()}


# --- int8 beside the higher precision, layer by layer ------------------------------------------------


@dataclass(frozen=True)
class PrecisionLayer:
    """One computing node costed at both precisions, and the one it runs at.

    Attributes:
        node, op: the node and its op (module type or function name).
        higher: its cost at the higher precision (fp16 on TensorRT, fp32 on ONNX Runtime).
        int8: its cost at int8.
        precision: what the compiled graph runs it at (``int8`` or the higher one).
        reason: why it is not int8 ("" when it is, or when int8 does not apply to it).
    """

    node: str
    op: str
    higher: NodeCost
    int8: NodeCost
    precision: str
    reason: str = ""

    @property
    def chosen(self) -> NodeCost:
        return self.int8 if self.precision == "int8" else self.higher


@dataclass(frozen=True)
class PrecisionColumn:
    """A column of the int8 comparison table: a header, a row's cell, and optionally its total.

    The table is `PRECISION_COLUMNS` in order; another estimate (e.g. a roofline bound) is one more
    entry. ``{higher}`` in a header becomes the higher precision's name.
    """

    header: str
    cell: Callable[[PrecisionLayer], str]
    total: Callable[[Sequence[PrecisionLayer]], str] | None = None


def _latency_column(header: str, pick: Callable[[PrecisionLayer], NodeCost]) -> PrecisionColumn:
    return PrecisionColumn(
        header, lambda r: f"{pick(r).latency_s * 1e3:.4f}", lambda rows: f"{sum(pick(r).latency_s for r in rows) * 1e3:.4f}"
    )


PRECISION_COLUMNS: tuple[PrecisionColumn, ...] = (
    PrecisionColumn("layer", lambda r: r.node, lambda rows: "total"),
    PrecisionColumn("op", lambda r: r.op),
    PrecisionColumn("FLOPs", lambda r: _si(r.higher.flops), lambda rows: _si(sum(r.higher.flops for r in rows))),
    _latency_column("est. ms {higher}", lambda r: r.higher),
    _latency_column("est. ms int8", lambda r: r.int8),
    PrecisionColumn("runs at", lambda r: r.precision),
    _latency_column("est. ms as compiled", lambda r: r.chosen),
    PrecisionColumn("why not int8", lambda r: r.reason),
)


def precision_layers(
    gm: GraphModule, target: Any, precisions: Mapping[str, str], reasons: Mapping[str, str], higher: str
) -> list[PrecisionLayer]:
    """Each computing node of a float graph (views left out) costed at `higher` and at int8.

    Args:
        gm: the graph without fake quantisation (shapes propagated), node names as compiled.
        target: the target whose cost model to use.
        precisions: node -> the precision it runs at (missing: `higher`).
        reasons: node -> why it is not int8.
        higher: the precision layers not in int8 run at.
    """
    fp, i8 = estimate_costs(gm, target, higher), estimate_costs(gm, target, "int8")
    rows = []
    for node in gm.graph.nodes:
        cost = fp.per_node.get(node.name)
        if cost is None or cost.kind == "view":
            continue
        op = type(submodule(gm, str(node.target))).__name__ if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))
        rows.append(PrecisionLayer(node.name, op, cost, i8.per_node[node.name], precisions.get(node.name, higher), reasons.get(node.name, "")))
    return rows


def precision_comparison(
    rows: Sequence[PrecisionLayer], higher: str, columns: Sequence[PrecisionColumn] = PRECISION_COLUMNS
) -> list[dict[str, str]]:
    """The per-layer table (one dict per layer, then a total row) for `CompileReport.tables`.

    Example:
        >>> from fxopt.costs.cost_model import NodeCost
        >>> fast, slow = NodeCost("conv", 0, 10, 4, 1e-3), NodeCost("conv", 0, 10, 8, 2e-3)
        >>> table = precision_comparison([PrecisionLayer("c", "Conv2d", slow, fast, "int8")], "fp16")
        >>> table[-1]["est. ms fp16"], table[-1]["est. ms int8"], table[-1]["est. ms as compiled"]
        ('2.0000', '1.0000', '1.0000')
    """
    headers = [c.header.format(higher=higher) for c in columns]
    table = [{h: c.cell(r) for h, c in zip(headers, columns)} for r in rows]
    return [*table, {h: c.total(rows) if c.total else "" for h, c in zip(headers, columns)}]
