"""Per-layer latency of the bundled models on a CUDA GPU in torch fp16 against fxopt's estimates.

    python bench/gpu_layers.py [--models pointpillars camera_multitask motionnet] [--runs 50]

Where a CUDA GPU is at hand (PyTorch and CUDA; TensorRT is not needed), this script

1. measures the GPU's dense fp16 matmul throughput and its copy bandwidth (micro-benchmarks), and
   builds a `TargetProfile` for it from the `xavier` profile's engine model with those two
   numbers in place of Xavier's;
2. compiles each bundled model (default config, fold_batchnorm, no export) and times every node
   of the graph on the GPU in fp16 (CUDA events around each node, median of `--runs`);
3. compares each node's time with the profile's per-node estimate: Spearman rank correlation
   over the layers, and the ratio of the totals.

torch runs each node as its own kernel(s), unfused, so the comparison is with the
profile's engine model switched to one kernel per node (``fuse_epilogues=False``): what is
checked is the ranking and scale of layer costs, not TensorRT's fusion. Results go to
bench/results/gpu_layers.md. Without a GPU it stops with a message (``--device cpu`` runs the
same code on the CPU, for a check of the script itself; the figures then mean little).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Interpreter

import fxopt
from fxopt.costs.cost_model import estimate_costs
from fxopt.output.files import write_atomic
from fxopt.targets import TargetProfile, get_target

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import code_version  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "results" / "gpu_layers.md"
MODELS = ("pointpillars", "camera_multitask", "motionnet")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_s(fn: Any, device: torch.device, runs: int) -> float:
    """Median seconds of `fn()` over `runs` (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_profile(device: torch.device, dtype: torch.dtype, runs: int = 10) -> TargetProfile:
    """A profile for `device`: measured matmul throughput and copy bandwidth in the xavier profile's engine model."""
    n = 4096 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    peak = 2 * n**3 / _time_s(lambda: a @ b, device, runs)
    x = torch.empty(64 * 2**20 // 2, device=device, dtype=dtype)
    y = torch.empty_like(x)
    bandwidth = 2 * x.numel() * x.element_size() / _time_s(lambda: y.copy_(x), device, runs)
    xavier = get_target("xavier")
    engine = xavier.engine.replace(fuse_epilogues=False, inference_overhead_s=0.0) if xavier.engine else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return xavier.replace(name=f"measured {name}", description=f"{name}: matmul {peak / 1e12:.1f} TFLOP/s, copy {bandwidth / 1e9:.0f} GB/s",
                          peak_ops_per_s={p: peak for p in xavier.precisions}, memory_bandwidth_bytes_per_s=bandwidth,
                          dla_cores=0, engine=engine)


class _NodeTimer(Interpreter):
    """Runs a graph node by node, timing each computing node (median over the runs it sees)."""

    def __init__(self, gm: GraphModule, device: torch.device) -> None:
        super().__init__(gm)
        self.device, self.times = device, {}

    def run_node(self, n: Any) -> Any:
        if n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        _sync(self.device)
        start = time.perf_counter()
        out = super().run_node(n)
        _sync(self.device)
        self.times.setdefault(n.name, []).append(time.perf_counter() - start)
        return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: list[float]) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        values = np.asarray(v)
        for value in set(v):  # ties share their mean rank
            r[values == value] = r[values == value].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 else float("nan")


def compare_model(name: str, profile: TargetProfile, device: torch.device, dtype: torch.dtype, runs: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = fxopt.models.create(name).eval()
    inputs = fxopt.models.example_inputs(name)
    gm = fxopt.compile(model, "xavier", example_inputs=inputs, export=False).graph_module
    cost = estimate_costs(gm, profile, "fp16")
    gm = gm.to(device=device, dtype=dtype)
    args = [x.to(device=device, dtype=dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else
            x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs]
    timer = _NodeTimer(gm, device)
    with torch.no_grad():
        for _ in range(3 + runs):
            timer.run(*args)
    measured = {k: statistics.median(v[3:]) for k, v in timer.times.items()}
    nodes = [k for k, c in cost.per_node.items() if k in measured and c.kind != "view" and c.latency_s > 0]
    est = [cost.per_node[k].latency_s for k in nodes]
    got = [measured[k] for k in nodes]
    top = sorted(nodes, key=lambda k: -measured[k])[:5]
    return {"model": name, "layers": len(nodes), "spearman": round(spearman(est, got), 3),
            "measured total ms": round(sum(got) * 1e3, 3), "estimated total ms": round(sum(est) * 1e3, 3),
            "estimate / measured": round(sum(est) / sum(got), 3),
            "slowest measured": ", ".join(f"{k} {measured[k] * 1e3:.3f} ms (est {cost.per_node[k].latency_s * 1e3:.3f})" for k in top)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_layers.py needs a CUDA GPU (PyTorch with CUDA); none is visible here", file=sys.stderr)
        return 2
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    profile = device_profile(device, dtype)
    rows = [compare_model(name, profile, device, dtype, args.runs) for name in args.models]
    keys = list(rows[0])
    text = "\n".join([
        "# Per-layer GPU latency in torch vs fxopt's estimate", "",
        f"`python bench/gpu_layers.py --runs {args.runs} --device {args.device}` at fxopt {code_version()}, torch "
        f"{torch.__version__}, {profile.description}, {str(dtype).removeprefix('torch.')}.", "",
        "The profile is xavier's engine model with this device's measured matmul throughput and copy bandwidth, one kernel "
        "per node (torch does not fuse). Spearman: rank correlation of estimated and measured per-node time.", "",
        "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
        *["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows], "",
    ])
    write_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
