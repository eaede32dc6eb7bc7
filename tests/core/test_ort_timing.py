"""fxopt.verification.ort_timing: the one ONNX Runtime timing loop the quantize pass and the benchmarks share."""

from __future__ import annotations

import pytest
import torch

import fxopt.verification.ort_timing as ort_timing
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


def test_the_pruning_bench_times_with_the_shared_function():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "prune.py"
    source = path.read_text()
    assert "from fxopt.verification.ort_timing import ort_latencies_ms" in source and "def ort_latencies_ms" not in source


def test_isolated_timing_runs_in_a_child_and_a_crash_there_is_an_error_not_an_abort(monkeypatch):
    model = export_onnx(torch.nn.Linear(4, 2), (torch.randn(1, 4),)).model
    got = ort_timing.isolated_latencies_ms([model, model.SerializeToString()], (torch.randn(1, 4),), runs=3, warmup=1)
    assert len(got) == 2 and all(ms > 0 for ms in got)
    monkeypatch.setattr(ort_timing, "_CHILD", "import os; os.abort()")  # what a native ONNX Runtime abort looks like
    with pytest.raises(ort_timing.OrtCrashed, match="killed by signal 6"):
        ort_timing.isolated_latencies_ms([model], (torch.randn(1, 4),), runs=1)


def test_quantize_keeps_fp32_when_onnx_runtime_dies_on_the_int8_file(monkeypatch):
    import fxopt
    import fxopt.passes.quantize as q

    def crashed(*args, **kwargs):
        raise ort_timing.OrtCrashed("the ONNX Runtime timing process was killed by signal 6: abort")

    monkeypatch.setattr(q, "isolated_latencies_ms", crashed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = (torch.randn(1, 3, 8, 8),)
    compiled = fxopt.compile(model, "cpu", example_inputs=x, passes=["quantize"], calib_data=[x])
    record = next(r for r in compiled.report.passes if r.name == "quantize")
    assert record.status == "unchanged" and "ONNX Runtime failed on the int8 file" in record.reason
    assert "QuantizeLinear" not in {n.op_type for n in compiled.onnx_model.graph.node}


def test_isolated_outputs_match_in_process_and_errors_and_crashes_are_told_apart(monkeypatch):
    import numpy as np

    model = export_onnx(torch.nn.Linear(4, 2), (torch.randn(1, 4),)).model
    sets = [(torch.randn(1, 4),), (torch.randn(1, 4),)]
    got = ort_timing.isolated_outputs(model, sets)
    session = ort_timing.ort_session(model)
    for outputs, (x,) in zip(got, sets):
        np.testing.assert_array_equal(outputs[0], session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with pytest.raises(ort_timing.OrtFailed, match="INVALID_ARGUMENT|Invalid") as failed:
        ort_timing.isolated_outputs(model, [(torch.randn(1, 5),)])  # a wrong input shape: ONNX Runtime raises
    assert failed.value.stage == "run"
    monkeypatch.setattr(ort_timing, "_CHILD_RUN", "import os; os.abort()")
    with pytest.raises(ort_timing.OrtCrashed, match="killed by signal 6"):
        ort_timing.isolated_outputs(model, sets)


def test_int8_verification_survives_an_onnx_runtime_abort_as_a_verification_error(monkeypatch):
    import fxopt
    from fxopt.errors import VerificationError

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = (torch.randn(1, 3, 8, 8),)
    compiled = fxopt.compile(model, "xavier", example_inputs=x, precision="int8", calib_data=[x])
    steps = compiled.report.onnx["max_error_in_output_int8_steps"]
    assert steps is not None and 0 <= steps < 8 and "output int8 steps" in str(compiled.report)
    fp32 = fxopt.compile(model, "xavier", example_inputs=x)
    assert fp32.report.onnx["max_error_in_output_int8_steps"] is None  # no Q/DQ: in-process, no steps
    monkeypatch.setattr(ort_timing, "_CHILD_RUN", "import os; os.abort()")
    with pytest.raises(VerificationError, match="ONNX Runtime crashed on the exported int8 model"):
        fxopt.compile(model, "xavier", example_inputs=x, precision="int8", calib_data=[x])
