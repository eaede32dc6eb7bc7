"""The report's latency story: the estimate beside its roofline lower bound, and where the time goes."""

from __future__ import annotations

import re

import torch
from torch import nn

import fxopt


def test_report_gives_the_roofline_bound_and_the_dominant_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 8, 1)).eval()
    compiled = fxopt.compile(model, "xavier", example_inputs=(torch.randn(1, 3, 64, 64),), export=False)
    report = compiled.report
    md = report.to_markdown()
    bound = re.search(r"roofline lower bound\s+[\d.]+ ms -> ([\d.]+) ms \(estimate / roofline ([\d.]+)x\)", md)
    assert bound and float(bound.group(2)) >= 1.0
    assert float(bound.group(1)) == round(report.cost_after.roofline_s * 1e3, 3)
    assert all(0 <= r.roofline_ms <= r.latency_ms + 1e-12 for r in report.layers)
    section = md.split("## Where the time goes")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| node")]
    slowest = max(report.layers, key=lambda r: r.latency_ms)
    assert rows[0].startswith(f"| {slowest.node} |")  # the slowest layer first, with its share
    shares = [float(line.split("|")[5].strip().rstrip("%")) for line in rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.0 + 1e-6
