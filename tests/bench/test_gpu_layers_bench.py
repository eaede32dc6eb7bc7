"""bench/gpu_layers.py: its pieces run on the CPU (the GPU run itself needs a device CI does not have)."""

from __future__ import annotations

import pytest
import torch
from bench_loader import load_bench
from scipy.stats import spearmanr


def _bench():
    return load_bench('gpu_layers')


def test_spearman_matches_scipy_with_ties():
    bench = _bench()
    a, b = [3.0, 1.0, 2.0, 2.0, 5.0], [0.3, 0.2, 0.1, 0.25, 0.9]
    assert bench.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)


def test_node_timer_times_every_computing_node_and_the_profile_is_measured():
    bench = _bench()
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
    timer = bench._NodeTimer(gm, torch.device("cpu"))
    timer.run(torch.randn(1, 3, 8, 8))
    assert set(timer.times) == {n.name for n in gm.graph.nodes if n.op == "call_module"}
    profile = bench.device_profile(torch.device("cpu"), torch.float32, runs=1)
    assert profile.peak_ops_per_s["fp16"] > 0 and profile.memory_bandwidth_bytes_per_s > 0
    assert profile.engine is not None and not profile.engine.fuse_epilogues


def test_without_a_gpu_it_says_so(monkeypatch, capsys, tmp_path):
    bench = _bench()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path / "x.md")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "x.md").exists()
