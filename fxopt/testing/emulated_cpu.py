"""Run an ONNX file in ONNX Runtime on an emulated x86 CPU (QEMU user mode), to check on any host
what another kind of host computes: a VNNI machine can see the int8 kernels of an AVX2-only one.

QEMU's ``-cpu Haswell`` reports AVX2 without AVX-512 or VNNI, so ONNX Runtime's kernel dispatch picks
its AVX2 int8 kernels (``vpmaddubsw``); QEMU 7.2 emulates no AVX-512, so the AVX-512BW-without-VNNI
kernels cannot be reached this way. Only latency is meaningless under emulation: values are exact.
The child imports only onnxruntime and numpy (seconds under emulation, not torch).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from fxopt.errors import FxoptError

__all__ = ["EmulationError", "emulator", "run_onnx_emulated", "run_onnx_emulated_sets"]

_CHILD = """
import sys, numpy as np, onnxruntime as ort
folder = sys.argv[1]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.log_severity_level = 3
session = ort.InferenceSession(folder + "/model.onnx", options, providers=["CPUExecutionProvider"])
data = np.load(folder + "/inputs.npz")
names = [i.name for i in session.get_inputs()]
outputs = {}
for s in range(int(data["sets"])):
    for k, y in enumerate(session.run(None, {n: data[f"s{s}_x{j}"] for j, n in enumerate(names)})):
        outputs[f"s{s}_y{k}"] = y
np.savez(folder + "/outputs.npz", **outputs)
"""


class EmulationError(FxoptError):
    """The emulator is missing or the emulated run failed."""


def emulator() -> str | None:
    """The path of ``qemu-x86_64`` when installed (Debian's ``qemu-user``), else ``None``."""
    return shutil.which("qemu-x86_64")


def run_onnx_emulated(model: Any, inputs: Sequence[Any], cpu: str = "Haswell", timeout_s: float = 300.0) -> list[np.ndarray]:
    """Outputs of `model` (an ``onnx.ModelProto``) in ONNX Runtime (1 thread) on an emulated `cpu`.

    Args:
        model: the ONNX model.
        inputs: one array or tensor per graph input, in order.
        cpu: a QEMU CPU model (``Haswell``: AVX2, no AVX-512, no VNNI).
        timeout_s: limit for the emulated run.

    Returns:
        The outputs, as numpy arrays.

    Raises:
        EmulationError: see `run_onnx_emulated_sets`.
    """
    return run_onnx_emulated_sets(model, [inputs], cpu, timeout_s)[0]


def run_onnx_emulated_sets(model: Any, input_sets: Sequence[Sequence[Any]], cpu: str = "Haswell", timeout_s: float = 600.0) -> list[list[np.ndarray]]:
    """`run_onnx_emulated` over several input sets in one emulated process (one session).

    Returns:
        Per input set, the outputs as numpy arrays.

    Raises:
        EmulationError: no ``qemu-x86_64`` on this host (``apt-get install qemu-user``), not an
            x86-64 host, or the emulated run failed (its stderr's tail in the message).
    """
    qemu = emulator()
    if qemu is None:
        raise EmulationError("qemu-x86_64 is not installed: `apt-get install qemu-user` (Debian) runs ONNX Runtime on an emulated CPU")
    arrays: dict[str, Any] = {"sets": np.asarray(len(input_sets))}
    for s, inputs in enumerate(input_sets):
        arrays |= {f"s{s}_x{k}": x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x) for k, x in enumerate(inputs)}
    with tempfile.TemporaryDirectory(prefix="fxopt-emulated-") as folder:
        with open(os.path.join(folder, "model.onnx"), "wb") as f:
            f.write(model.SerializeToString())
        np.savez(os.path.join(folder, "inputs.npz"), **arrays)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"OMP_NUM_THREADS": "1"}
        run = subprocess.run([qemu, "-cpu", cpu, sys.executable, "-c", _CHILD, folder], capture_output=True, text=True,
                             timeout=timeout_s, env=env, check=False)
        if run.returncode != 0:
            raise EmulationError(f"ONNX Runtime on an emulated {cpu} failed (exit {run.returncode}): {run.stderr.strip()[-800:]}")
        with np.load(os.path.join(folder, "outputs.npz")) as out:
            count = len(out.files) // max(len(input_sets), 1)
            return [[out[f"s{s}_y{k}"] for k in range(count)] for s in range(len(input_sets))]
