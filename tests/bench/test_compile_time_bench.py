"""The compile-time benchmark runs on a tiny model and renders every phase beside its peer."""

from __future__ import annotations

import torch
from bench_loader import load_bench


def _bench_module():
    return load_bench('compile_time')


def test_measure_and_render_tiny_model() -> None:
    bench = _bench_module()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    row = bench.measure("tiny", model, (torch.randn(1, 3, 8, 8),), "xavier", repeat=1)
    for key in ("trace", "trace_peer", "passes", "passes_peer", "export", "export_peer", "total"):
        assert row[key] > 0.0, key
    text = bench.render([row], "xavier", 1)
    assert "| tiny |" in text and "Sums over 1 models" in text


def test_case_filter_selects_zoo_models_by_regex() -> None:
    bench = _bench_module()
    names = [n for n, _ in bench._cases("resnet18", bundled=False)]
    assert names == ["tv/resnet18"]


class ShapeBranch(torch.nn.Module):
    """Plain torch.fx cannot trace a branch on a shape; fxopt specialises it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1 if x.shape[-1] == 8 else x - 1


def test_a_model_plain_fx_cannot_trace_is_reported_as_failing_for_the_peer() -> None:
    bench = _bench_module()
    row = bench.measure("branchy", ShapeBranch(), (torch.randn(1, 8),), "cpu", repeat=1)
    assert row["trace"] > 0.0 and row["trace_peer"] != row["trace_peer"]  # nan
    text = bench.render([row], "cpu", 1)
    assert "| branchy | " in text and "| fails |" in text and "over the 0 plain fx traces" in text
