"""fxopt.ort_timing: the one ONNX Runtime timing loop the quantize pass and the benchmarks share."""

from __future__ import annotations

import doctest

import pytest
import torch

import fxopt.ort_timing as ort_timing
from fxopt.backends.onnx import export_onnx


def test_sessions_use_the_fixed_thread_count_and_models_are_interleaved(monkeypatch):
    model = export_onnx(torch.nn.Linear(4, 2), (torch.randn(1, 4),)).model
    threads, order = [], []
    real = ort_timing.ort_session

    def spy(onnx_model, threads_=1):
        session = real(onnx_model, threads_)
        threads.append(session.get_session_options().intra_op_num_threads)
        run = session.run
        tag = len(threads)

        class Session:
            def get_inputs(self):
                return session.get_inputs()

            def run(self, *args):
                order.append(tag)
                return run(*args)

        return Session()

    monkeypatch.setattr(ort_timing, "ort_session", spy)
    got = ort_timing.ort_latencies_ms([model, model], (torch.randn(1, 4),), runs=4, warmup=1, threads=2)
    assert threads == [2, 2] and len(got) == 2 and all(ms > 0 for ms in got)
    assert order == [1, 2] * 5  # warm-up round then four timed rounds, the two models taking turns


def test_bad_counts_are_refused():
    model = export_onnx(torch.nn.Linear(4, 2), (torch.randn(1, 4),)).model
    with pytest.raises(ValueError, match="runs and threads must be >= 1"):
        ort_timing.ort_latencies_ms([model], (torch.randn(1, 4),), runs=0)


def test_doctest():
    result = doctest.testmod(ort_timing)
    assert result.attempted > 0 and result.failed == 0


def test_the_pruning_bench_times_with_the_shared_function():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "prune.py"
    source = path.read_text()
    assert "from fxopt.ort_timing import ort_latencies_ms" in source and "def ort_latencies_ms" not in source
