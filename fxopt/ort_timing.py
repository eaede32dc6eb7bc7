"""ONNX Runtime (CPU) latency of ONNX models on this host: one timing loop for the passes and the benchmarks.

A fixed thread count (one by default) and the median over interleaved runs: on a shared 2-core
machine, ONNX Runtime's default thread pool makes figures swing with whatever else runs, and a
burst of load then hits one candidate and not the other.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["ort_latencies_ms", "ort_session"]


def ort_session(onnx_model: Any, threads: int = 1) -> Any:
    """A CPU `onnxruntime.InferenceSession` of `onnx_model` with `threads` intra-op threads, one inter-op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_latencies_ms(
    onnx_models: Sequence[Any], inputs: tuple[Any, ...], runs: int, warmup: int = 3, threads: int = 1
) -> list[float]:
    """Median ONNX Runtime CPU latency of each model, in milliseconds.

    The models take turns run by run (after `warmup` untimed rounds), so a burst of load on the
    machine hits all of them alike; each figure is the median of its `runs` timings.

    Args:
        onnx_models: `onnx.ModelProto`s taking the same inputs.
        inputs: the inputs, in the models' input order (tensors; other values are skipped).
        runs: timed runs per model.
        warmup: untimed rounds first.
        threads: ONNX Runtime intra-op threads (fixed, not the library's default of one per core).

    Returns:
        The median latency of each model, in `onnx_models`' order.

    Example:
        >>> import torch
        >>> from fxopt.backends.onnx import export_onnx
        >>> model = export_onnx(torch.nn.Linear(4, 2), (torch.randn(1, 4),)).model
        >>> [ms > 0 for ms in ort_latencies_ms([model, model], (torch.randn(1, 4),), runs=5)]
        [True, True]
    """
    if runs < 1 or threads < 1:
        raise ValueError(f"runs and threads must be >= 1, got {runs} and {threads}")
    sessions = [ort_session(m, threads) for m in onnx_models]
    arrays = [x.detach().numpy() if hasattr(x, "detach") else x for x in inputs if hasattr(x, "shape")]
    feeds = [{i.name: x for i, x in zip(s.get_inputs(), arrays)} for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for step in range(warmup + runs):
        for session, feed, acc in zip(sessions, feeds, times):
            start = time.perf_counter()
            session.run(None, feed)
            if step >= warmup:
                acc.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]
