"""What a whole compile costs beside the bare path, on a deep residual net (issue 24, item 5).

    python bench/compile_cost.py [--blocks 343] [--repeat 5] [--large] [--no-write]

The net: a stem conv, `--blocks` residual blocks (conv-BN-ReLU-conv-BN, add, ReLU; 16 channels)
and a linear head, at 1x3x32x32; 343 blocks make 2,406 graph nodes. One thread. Measured in one
process, each arm once to warm up, then alternately `--repeat` times, each run ending with a full
garbage collection (timed: each arm pays for the reference cycles it leaves); medians:

- bare: `torch.fx.symbolic_trace` + `torch.onnx.export` (TorchScript exporter, opset 17) + one
  ONNX Runtime session run once (what a user without fxopt does, unchecked);
- fxopt: `fxopt.compile(model, "xavier", example_inputs=...)` with export (trace with leaf
  detection and state checks, the verified passes, ONNX clean-up, checker and ORT parity on every
  verification input set, the TensorRT build plan).

Peak memory: a child process per case builds an MLP of `--mlp-width` x `--mlp-depth` linear
layers (weights well above the activations), compiles it for "cpu" without export, with export, and
with export and then `save()`, and reports the high-water mark of its resident memory above the
baseline (model built and run once), as a multiple of the weights' bytes; the save case also gives
the peak of `save()` alone. `--large` adds an MLP above protobuf's 2 GiB (10 x 8192: 2.5 GiB of
weights, which the usual export refuses), compiled with export and saved (as ONNX external data);
it needs about 3x its weights of memory and its size of disk. Figures go to bench/results/compile_cost.md; nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import code_version, cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "compile_cost.md"


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.b1(self.c1(x)))
        return self.act(x + self.b2(self.c2(y)))


class DeepResidual(nn.Module):
    """A residual net of `blocks` blocks: 7 graph nodes each, plus 5 (343 blocks: 2,406 nodes)."""

    def __init__(self, blocks: int = 343, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def bare_path(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    import onnxruntime as ort

    gm = torch.fx.symbolic_trace(model)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(gm, inputs, buffer, opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})


def fxopt_path(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    import fxopt

    fxopt.compile(model, "xavier", example_inputs=inputs)


def time_arms(blocks: int, repeat: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, inputs = DeepResidual(blocks).eval(), (torch.randn(1, 3, 32, 32),)
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
    arms = {"bare": bare_path, "fxopt": fxopt_path}
    times: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    for fn in arms.values():
        fn(model, inputs)  # warm-up: imports, first-call caches
    for _ in range(repeat):
        for name, fn in arms.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(model, inputs)
            gc.collect()  # each arm pays for the garbage it leaves (its result's reference cycles), not the next arm
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    print(f"{nodes} nodes: wall bare {med['bare']:.2f} s, fxopt {med['fxopt']:.2f} s ({med['fxopt'] / med['bare']:.2f}x); "
          f"CPU bare {med_cpu['bare']:.2f} s, fxopt {med_cpu['fxopt']:.2f} s ({med_cpu['fxopt'] / med_cpu['bare']:.2f}x); "
          f"wall runs bare {[round(t, 2) for t in times['bare']]}, fxopt {[round(t, 2) for t in times['fxopt']]}", flush=True)
    return {"nodes": nodes, "bare": med["bare"], "fxopt": med["fxopt"], "bare_cpu": med_cpu["bare"], "fxopt_cpu": med_cpu["fxopt"],
            "times": times}


_MEMORY_CHILD = r'''
import gc, json, os, sys
import torch
from torch import nn
import fxopt

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

width, depth, export, save = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] != "0", sys.argv[3] == "save"
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())]).eval()
x = torch.randn(2, width)
with torch.no_grad():
    model(x)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart the high-water mark here
compiled = fxopt.compile(model, "cpu", example_inputs=(x,), export=export)
peak = status("VmHWM") - base
save_peak = None
if save:
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        compiled.save(folder + "/out")
        save_peak = status("VmHWM") - base
        files = sorted(os.listdir(folder + "/out"))
print(json.dumps({"weights": weights, "peak": peak, "save_peak": save_peak, "files": files if save else None}))
'''


def peak_memory(width: int, depth: int, case: str) -> dict[str, Any]:
    """`case`: "0" (no export), "1" (export) or "save" (export, then save)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(width), str(depth), case], capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = found["peak"] / found["weights"]
    save = found["save_peak"] / found["weights"] if found["save_peak"] is not None else None
    print(f"MLP {depth} x {width}: weights {found['weights'] / 2**20:.0f} MiB, case {case}: compile peak {ratio:.2f}x the weights"
          + (f", save() peak {save:.2f}x" if save is not None else ""), flush=True)
    return {"weights_mib": found["weights"] / 2**20, "ratio": ratio, "export": case != "0", "save_ratio": save,
            "shape": f"{depth} x {width}", "onnx_files": [f for f in found["files"] or [] if f.startswith("model.onnx")]}


def render(timing: dict[str, Any], memory: list[dict[str, Any]], repeat: int) -> str:
    ratio = timing["fxopt"] / timing["bare"]
    lines = [
        "# Compile cost beside the bare path",
        "",
        f"Generated by `python bench/compile_cost.py` at {code_version()} on {cpu_model()} (torch {torch.__version__}, one thread, "
        f"median of {repeat} alternated runs after a warm-up of each, each run ending with a timed full garbage collection).",
        "",
        "Goal (issue 24): a whole `fxopt.compile` with export at most 1.5x the bare path, with verification as strong; "
        "peak memory at most 1.2x the model's weights.",
        "",
        "| net | graph nodes | time | bare: symbolic_trace + torch.onnx.export + one ORT session (s) | fxopt.compile, xavier, export (s) | ratio |",
        "|---|---|---|---|---|---|",
        f"| deep residual, 1x3x32x32 | {timing['nodes']} | wall | {timing['bare']:.2f} | {timing['fxopt']:.2f} | {ratio:.2f}x |",
        f"| | | CPU (this process) | {timing['bare_cpu']:.2f} | {timing['fxopt_cpu']:.2f} | {timing['fxopt_cpu'] / timing['bare_cpu']:.2f}x |",
        "",
        "CPU time counts this process's own work (every thread), so it holds where other work shares the cores; wall time is what a "
        "user waits on an idle machine.",
        "",
        "Peak resident memory above the baseline during `fxopt.compile(..., \"cpu\")` of an MLP (linear layers, ReLU between), then during `save()`:",
        "",
        "| MLP (depth x width) | export | weights (MiB) | compile peak / weights | then `save()`: its peak / weights | ONNX files |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {m['shape']} | {'yes' if m['export'] else 'no'} | {m['weights_mib']:.0f} | {m['ratio']:.2f}x | "
              f"{'' if m['save_ratio'] is None else format(m['save_ratio'], '.2f') + 'x'} | {', '.join(m['onnx_files'])} |" for m in memory]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=343)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--mlp-width", type=int, default=4096)
    parser.add_argument("--mlp-depth", type=int, default=8)
    parser.add_argument("--large", action="store_true", help="also a 2.5 GiB MLP (above protobuf's limit), saved as external data")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    timing = time_arms(args.blocks, args.repeat)
    memory = [peak_memory(args.mlp_width, args.mlp_depth, case) for case in ("0", "1", "save")]
    if args.large:
        memory.append(peak_memory(8192, 10, "save"))
    text = render(timing, memory, args.repeat)
    print()
    print(text)
    if not args.no_write:
        from fxopt.output.files import write_atomic

        write_atomic(str(RESULTS), text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
