"""ONNX Runtime (CPU) latency of ONNX models on this host: one timing loop for the passes and the benchmarks.

A fixed thread count (one by default) and the median over interleaved runs: on a shared 2-core
machine, ONNX Runtime's default thread pool makes figures swing with whatever else runs, and a
burst of load then hits one candidate and not the other.
"""

from __future__ import annotations

import contextlib
import pickle
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["OrtCrashed", "OrtFailed", "isolated_latencies_ms", "isolated_outputs", "ort_latencies_ms", "ort_session"]

# Run in a child interpreter by `isolated_latencies_ms`: this file is loaded on its own (it imports
# nothing of fxopt, torch or onnx), so the child starts in well under a second.
_CHILD = """
import importlib.util, pickle, sys
spec = importlib.util.spec_from_file_location("fxopt_ort_timing", sys.argv[1])
timing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(timing)
models, arrays, runs, warmup, threads = pickle.load(sys.stdin.buffer)
pickle.dump(timing.ort_latencies_ms(models, arrays, runs, warmup, threads), sys.stdout.buffer)
"""

# Run by `isolated_outputs`: ONNX Runtime's own errors come back as ("error", stage, message).
_CHILD_RUN = """
import importlib.util, pickle, sys
spec = importlib.util.spec_from_file_location("fxopt_ort_timing", sys.argv[1])
timing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(timing)
model, sets = pickle.load(sys.stdin.buffer)
try:
    session = timing.ort_session(model)
except Exception as exc:
    pickle.dump(("error", "load", f"{type(exc).__name__}: {exc}"), sys.stdout.buffer); sys.exit(0)
names = [i.name for i in session.get_inputs()]
outputs = []
for arrays in sets:
    try:
        outputs.append(session.run(None, dict(zip(names, arrays))))
    except Exception as exc:
        pickle.dump(("error", "run", f"{type(exc).__name__}: {exc}"), sys.stdout.buffer); sys.exit(0)
pickle.dump(("ok", outputs), sys.stdout.buffer)
"""


class OrtCrashed(RuntimeError):
    """ONNX Runtime died (a native abort or an error) while loading or running a model in the child."""


def _serialize(onnx_model: Any) -> bytes:
    # imported here, not at the top: the child loads this file alone
    from fxopt.output.onnx_weights import serialize

    return serialize(onnx_model)


def ort_session(onnx_model: Any, threads: int = 1) -> Any:
    """A CPU `onnxruntime.InferenceSession` of `onnx_model` (a model, its bytes or its path) with `threads` intra-op
    threads, one inter-op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    data = onnx_model if isinstance(onnx_model, (bytes, str)) else _serialize(onnx_model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


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


def isolated_latencies_ms(
    onnx_models: Sequence[Any], inputs: tuple[Any, ...], runs: int, warmup: int = 3, threads: int = 1, timeout_s: float = 600.0
) -> list[float]:
    """`ort_latencies_ms` in a child process, so a native crash of ONNX Runtime on some file (an
    abort in a graph optimiser, seen once on a drawn int8 model) cannot take the caller down.

    Raises:
        OrtCrashed: the child died or failed; the message gives its exit status and last output.
    """
    arrays = [x.detach().cpu().numpy() if hasattr(x, "detach") else x for x in inputs if hasattr(x, "shape")]
    models = [m if isinstance(m, bytes) else _serialize(m) for m in onnx_models]
    return list(_in_child(_CHILD, (models, arrays, runs, warmup, threads), "ONNX Runtime timing", timeout_s))


def _in_child(script: str, payload: Any, what: str, timeout_s: float) -> Any:
    """Run `script` (one of the child programs above) in a fresh interpreter with `payload` pickled
    on its stdin; its unpickled stdout. A death or a timeout is `OrtCrashed`, naming `what`."""
    try:
        proc = subprocess.run([sys.executable, "-c", script, __file__], input=pickle.dumps(payload), capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise OrtCrashed(f"{what} did not finish in {timeout_s:g} s") from None
    if proc.returncode != 0:
        how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with status {proc.returncode}"
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise OrtCrashed(f"the {what} process {how}: {tail[0][:300]}")
    return pickle.loads(proc.stdout)


class OrtFailed(RuntimeError):
    """ONNX Runtime raised an error (not a crash) in the child; ``stage`` is ``"load"`` or ``"run"``."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def _for_child(onnx_model: Any, stack: contextlib.ExitStack) -> bytes | str:
    """What the child gets of a model: a lean one (`fxopt.output.onnx_weights`) as the path of its file written piece by
    piece (`written`, removed when `stack` closes), not as its bytes pickled beside their copy; any other its bytes."""
    from fxopt.output.onnx_weights import is_lean, written

    return stack.enter_context(written(onnx_model)) if is_lean(onnx_model) else _serialize(onnx_model)


def isolated_outputs(onnx_model: Any, input_sets: Sequence[tuple[Any, ...]], timeout_s: float = 600.0) -> list[list[Any]]:
    """Run `onnx_model` in ONNX Runtime (CPU, one thread) on each input set, in a child process.

    Used to verify int8 files: a Q/DQ pattern once made ONNX Runtime abort natively while creating
    the session, which in-process would end the user's program instead of raising an error.

    Returns:
        The outputs (numpy arrays) of each input set, in order.

    Raises:
        OrtFailed: ONNX Runtime raised an error loading or running the model.
        OrtCrashed: the child died (a native abort, a signal) or timed out.

    Example:
        >>> import torch
        >>> from fxopt.backends.onnx import export_onnx
        >>> model = export_onnx(torch.nn.ReLU(), (torch.randn(1, 3),)).model
        >>> isolated_outputs(model, [(torch.tensor([[-1.0, 0.0, 2.0]]),)])[0][0].tolist()
        [[0.0, 0.0, 2.0]]
    """
    sets = [[x.detach().cpu().numpy() if hasattr(x, "detach") else x for x in inputs if hasattr(x, "shape")] for inputs in input_sets]
    with contextlib.ExitStack() as stack:
        model = onnx_model if isinstance(onnx_model, bytes) else _for_child(onnx_model, stack)
        result = _in_child(_CHILD_RUN, (model, sets), "ONNX Runtime", timeout_s)
    if result[0] == "error":
        raise OrtFailed(result[1], result[2])
    return result[1]
