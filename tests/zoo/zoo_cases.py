"""Model-zoo cases (torchvision + a fixed, seeded timm sample) and the runner that checks one.

Used by the zoo suite (`tests/zoo/test_zoo.py`), `bench/zoo.py` and `bench/compile_time.py`.
"""

from __future__ import annotations

import copy
import json
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxopt
from fxopt.frontend.stages import preset_for, split_stages
from fxopt.verification.numerics import compare_outputs, run_model

ZOO_DIR = Path(__file__).resolve().parent
ROOT = ZOO_DIR.parent.parent
TIMM_SAMPLE = ZOO_DIR / "timm_sample.json"
EXPECTED = ZOO_DIR / "expected_passes.json"
RESULTS_MD = ROOT / "bench" / "results" / "zoo.md"

TARGETS = ("cpu", "xavier")
# compiled torch graph vs the original eval-mode model: max_abs <= ATOL + RTOL * max|ref|
ATOL = RTOL = 1e-4


@dataclass(frozen=True)
class ZooCase:
    """One model of the zoo: how to build it and what to feed it."""

    name: str  # "<source>/<model>", unique
    source: str  # "torchvision" | "timm"
    builder: str  # torchvision builder / timm model name
    kind: str  # "classification" | "segmentation" | "detection" | "video"
    input_shape: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The model with seeded random weights, in eval mode (nothing is downloaded)."""
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.source == "timm":
                import timm

                model = timm.create_model(self.builder, pretrained=False, **self.kwargs)
            else:
                import torchvision.models as tvm

                model = tvm.get_model(self.builder, **self.kwargs)
        return model.eval()

    def example_inputs(self) -> tuple[Any, ...]:
        """Seeded inputs; detection models take a list of CHW images."""
        x = torch.randn(self.input_shape, generator=torch.Generator().manual_seed(0))
        return ([x],) if self.kind == "detection" else (x,)


def _tv(builder: str, size: int = 64, kind: str = "classification", **kwargs: Any) -> ZooCase:
    shape: tuple[int, ...] = (3, size, size) if kind == "detection" else (1, 3, size, size)
    if kind == "video":
        shape = (1, 3, 4, size, size)
    no_download = {"weights": None} | ({"weights_backbone": None} if kind in ("detection", "segmentation") else {})
    return ZooCase(f"tv/{builder}", "torchvision", builder, kind, shape, no_download | kwargs)


_NO_AUX = {"aux_logits": False, "init_weights": False}
# Detection transforms resize to min_size; keep it small so the sweep stays fast.
_SMALL_DET = {"min_size": 128, "max_size": 128}

TORCHVISION_CASES: tuple[ZooCase, ...] = (
    _tv("resnet18"),
    _tv("resnet50"),
    _tv("resnext50_32x4d"),
    _tv("wide_resnet50_2"),
    _tv("mobilenet_v2"),
    _tv("mobilenet_v3_small"),
    _tv("mobilenet_v3_large"),
    _tv("efficientnet_b0"),
    _tv("efficientnet_v2_s"),
    _tv("regnet_x_400mf"),
    _tv("regnet_y_400mf"),
    _tv("convnext_tiny"),
    _tv("densenet121"),
    _tv("squeezenet1_1"),
    _tv("shufflenet_v2_x0_5"),
    _tv("mnasnet0_5"),
    _tv("googlenet", **_NO_AUX),
    _tv("inception_v3", 96, **_NO_AUX),
    # 224 px: at 64 px their adaptive pools upsample 1x1 -> 6x6 / 7x7, which opset 17 cannot export
    _tv("alexnet", 224),
    _tv("vgg11_bn", 224),
    _tv("vit_b_16", image_size=64),
    _tv("swin_t"),
    _tv("swin_v2_t"),
    _tv("maxvit_t", 224),
    _tv("r3d_18", 32, kind="video"),
    _tv("fcn_resnet50", 96, kind="segmentation"),
    _tv("deeplabv3_mobilenet_v3_large", 96, kind="segmentation"),
    _tv("deeplabv3_resnet50", 96, kind="segmentation"),
    _tv("lraspp_mobilenet_v3_large", 96, kind="segmentation"),
    _tv("fasterrcnn_mobilenet_v3_large_320_fpn", 128, kind="detection", **_SMALL_DET),
    _tv("retinanet_resnet50_fpn", 128, kind="detection", **_SMALL_DET),
    _tv("fcos_resnet50_fpn", 128, kind="detection", **_SMALL_DET),
    _tv("maskrcnn_resnet50_fpn", 128, kind="detection", **_SMALL_DET),
    _tv("ssdlite320_mobilenet_v3_large", 128, kind="detection"),
)


def timm_cases(path: Path = TIMM_SAMPLE) -> tuple[ZooCase, ...]:
    """The committed timm sample (see `sample_timm` for how it was drawn)."""
    data = json.loads(path.read_text())
    return tuple(
        ZooCase(f"timm/{m['name']}", "timm", m["name"], "classification", tuple(m["input_shape"]), m["kwargs"])
        for m in data["models"]
    )


def all_cases() -> tuple[ZooCase, ...]:
    """Every zoo case, torchvision first."""
    return TORCHVISION_CASES + timm_cases()


# ---------------------------------------------------------------------------------------------
# Running one case


@dataclass
class TargetRun:
    """One `fxopt.compile` of a case for one target."""

    ok: bool
    error: str = ""
    torch_max_abs: float | None = None  # compiled graph vs original model
    onnx_max_abs: float | None = None  # ONNX Runtime vs compiled graph (from the report)
    timings_s: dict[str, float] = field(default_factory=dict)
    rolled_back: list[str] = field(default_factory=list)  # "pass: reason" for each rolled-back pass


@dataclass
class ZooResult:
    """What the zoo found for one model."""

    name: str
    kind: str
    params: int
    fx_ok: bool  # plain torch.fx.symbolic_trace traces it and the graph reproduces the model
    fx_reason: str
    trace: str  # "full" | "leaves" | "failed"
    leaves: list[str]
    trace_reason: str
    targets: dict[str, TargetRun]
    time_s: float
    staged: str = ""  # a staged compile: "backbone -> head" (the graph part; the rest runs eagerly)

    @property
    def passed(self) -> bool:
        """Traced (fully or with leaves) and compiled + verified for every target."""
        return self.trace != "failed" and bool(self.targets) and all(r.ok for r in self.targets.values())

    @property
    def rolled_back(self) -> list[str]:
        """Passes rolled back for any target (the model still compiles, less optimised)."""
        return sorted({f"{t}: {r}" for t, run in self.targets.items() for r in run.rolled_back})

    @property
    def reason(self) -> str:
        """The first thing that went wrong, or ''."""
        if self.trace == "failed":
            return self.trace_reason
        return next((f"{t}: {r.error}" for t, r in self.targets.items() if not r.ok), "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed, "reason": self.reason}


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:limit]


def plain_fx_trace(model: nn.Module, inputs: tuple[Any, ...], reference: Any) -> tuple[bool, str]:
    """Does plain `torch.fx.symbolic_trace` give a graph that runs and matches the model?"""
    try:
        gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return False, _short(exc)
    try:
        deviation = compare_outputs(run_model(gm, inputs), reference)
    except Exception as exc:  # noqa: BLE001
        return False, f"traced graph fails to run: {_short(exc)}"
    if not deviation.within(ATOL, RTOL):
        return False, f"traced graph differs: max abs {deviation.max_abs:.3g} {deviation.detail}"
    return True, ""


def _compile_one(model: nn.Module, inputs: tuple[Any, ...], reference: Any, target: str) -> tuple[TargetRun, Any]:
    try:
        compiled = fxopt.compile(model, target, example_inputs=inputs)
        deviation = compare_outputs(run_model(compiled, inputs), reference)
    except fxopt.FxoptError as exc:
        return TargetRun(False, _short(exc)), None
    except Exception as exc:  # noqa: BLE001 - anything but an FxoptError is an fxopt bug
        return TargetRun(False, f"internal error: {_short(exc)}"), None
    onnx_abs = (compiled.report.onnx or {}).get("max_abs_error_vs_torch")
    rolled_back = [f"{r.name}: {r.reason}"[:300] for r in compiled.report.passes if r.status == "rolled_back"]
    run = TargetRun(True, "", deviation.max_abs, onnx_abs, dict(compiled.report.timings_s), rolled_back)
    if not deviation.within(ATOL, RTOL):
        run.ok = False
        run.error = f"compiled graph differs from the model: max abs {deviation.max_abs:.3g} (scale {deviation.reference_scale:.3g})"
    return run, compiled


def _classify_trace(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[str, list[str], str]:
    """How `fxopt.compile` traces the model: whole, or (a detector) its graph part (`fxopt.frontend.stages`)."""
    try:
        split = split_stages(model, inputs, None)
        gm = fxopt.trace(model, inputs) if split is None else fxopt.trace(split.root, split.graph_inputs)
    except fxopt.FxoptError as exc:
        return "failed", [], _short(exc)
    except Exception as exc:  # noqa: BLE001
        return "failed", [], f"internal error: {_short(exc)}"
    leaves = [f"{leaf.path} ({leaf.module_type})" for leaf in fxopt.leaves_of(gm)]
    return ("leaves" if leaves else "full"), leaves, ""


def run_case(case: ZooCase, targets: Sequence[str] = TARGETS) -> ZooResult:
    """Build, trace (plain fx and fxopt), compile for each target and check parity."""
    start = time.perf_counter()
    model, inputs = case.build(), case.example_inputs()
    reference = run_model(model, inputs)
    params = sum(p.numel() for p in model.parameters())
    fx_ok, fx_reason = plain_fx_trace(model, inputs, reference)
    trace, leaves, trace_reason = _classify_trace(model, inputs)
    preset = preset_for(model)
    runs: dict[str, TargetRun] = {}
    if trace != "failed":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for target in targets:
                runs[target], _ = _compile_one(model, inputs, reference, target)
    return ZooResult(case.name, case.kind, params, fx_ok, fx_reason, trace, leaves, trace_reason, runs,
                     time.perf_counter() - start, " -> ".join(preset.graph) if preset else "")


# ---------------------------------------------------------------------------------------------
# Expected passes and the results table


def load_expected(path: Path = EXPECTED) -> dict[str, dict[str, Any]]:
    """Models that passed before: name -> {"trace": "full" | "leaves", "leaves": n, "rolled_back": n}."""
    return json.loads(path.read_text()) if path.exists() else {}


def expected_entry(result: ZooResult) -> dict[str, Any]:
    return {"trace": result.trace, "leaves": len(result.leaves), "rolled_back": len(result.rolled_back)}


def regressions(result: ZooResult, expected: dict[str, dict[str, Any]]) -> list[str]:
    """Why `result` is worse than what `expected` records for it (empty when it is not)."""
    before = expected.get(result.name)
    if before is None:
        return []
    if not result.passed:
        return [f"{result.name} passed before, now fails: {result.reason}"]
    worse = []
    if len(result.leaves) > before["leaves"]:
        worse.append(f"{result.name} needed {before['leaves']} leaves before, now {len(result.leaves)}: {result.leaves}")
    if len(result.rolled_back) > before.get("rolled_back", 0):
        worse.append(f"{result.name}: passes rolled back: {result.rolled_back}")
    return worse


def _rate(n: int, total: int) -> str:
    return f"{n}/{total} ({100 * n / total:.0f}%)" if total else "0/0"


def summary_rows(results: Iterable[ZooResult]) -> list[tuple[str, ...]]:
    """Per source: models, plain fx ok, fxopt traced / fully / with leaves, compiled+verified, rollbacks."""
    groups: dict[str, list[ZooResult]] = {}
    for r in results:
        groups.setdefault(r.name.split("/")[0], []).append(r)
        groups.setdefault("all", []).append(r)
    rows = []
    for source in sorted(groups, key=lambda s: (s == "all", s)):
        rs, n = groups[source], len(groups[source])
        traced = sum(r.trace != "failed" for r in rs)
        rows.append((
            source, str(n), _rate(sum(r.fx_ok for r in rs), n), _rate(traced, n),
            _rate(sum(r.trace == "full" for r in rs), n), _rate(sum(r.trace == "leaves" for r in rs), n),
            _rate(sum(r.passed for r in rs), n), str(sum(bool(r.rolled_back) for r in rs)),
        ))
    return rows


SUMMARY_HEADER = ("source", "models", "plain fx traces", "fxopt traces", "fxopt fully", "fxopt with leaves", "compiled + verified (cpu, xavier)", "models with a pass rolled back")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.1e}"


def model_rows(results: Iterable[ZooResult]) -> list[tuple[str, ...]]:
    rows = []
    for r in results:
        torch_err = [t.torch_max_abs for t in r.targets.values() if t.torch_max_abs is not None]
        onnx_err = [t.onnx_max_abs for t in r.targets.values() if t.onnx_max_abs is not None]
        trace = r.trace if r.trace != "leaves" else f"leaves ({len(r.leaves)})"
        trace += f", staged: {r.staged}" if r.staged and r.trace != "failed" else ""
        rows.append((
            r.name, r.kind, f"{r.params / 1e6:.1f}M", "ok" if r.fx_ok else "fail", trace,
            "pass" if r.passed else "FAIL", _fmt(max(torch_err, default=None)),
            _fmt(max(onnx_err, default=None)), f"{r.time_s:.1f}",
            "; ".join(filter(None, [r.reason, "; ".join(r.leaves), "; ".join(r.rolled_back)]))[:300],
        ))
    return rows


MODEL_HEADER = ("model", "kind", "params", "plain fx", "fxopt trace", "compile+verify", "torch err", "ORT err", "time s", "reason / leaves / rolled-back passes")


def render_markdown(results: Sequence[ZooResult], command: str) -> str:
    """bench/results/zoo.md: summary, the plain-fx failures, then one row per model."""
    lines = [
        "# Model-zoo conformance",
        "",
        f"Generated by `{command}` (torch {torch.__version__}, CPU, random weights, seeded inputs).",
        "Each model: plain `torch.fx.symbolic_trace` (must trace, run and match); `fxopt.trace`;",
        f"`fxopt.compile` with the default pipeline for {' and '.join(TARGETS)} including ONNX export",
        f"(opset 17) and ONNX Runtime parity; compiled graph vs the original within {ATOL:g} + {RTOL:g} x max|ref|.",
        "Errors are max abs errors over both targets (torch: compiled vs original; ORT: ONNX vs compiled).",
        "Detectors compile as stages (`fxopt.frontend.stages` presets): \"fxopt trace\" is their graph part (backbone, FPN,",
        "heads), the transform and post-processing run eagerly; torch err compares the final detections.",
        "",
        "## Summary",
        "",
        *_md_table(SUMMARY_HEADER, summary_rows(results)),
        "",
        f"Total sweep time: {sum(r.time_s for r in results) / 60:.1f} min.",
        "",
        "## Per model",
        "",
        *_md_table(MODEL_HEADER, model_rows(results)),
        "",
        "## Why plain torch.fx fails",
        "",
        *_md_table(("model", "plain fx reason"), [(r.name, r.fx_reason[:200]) for r in results if not r.fx_ok]),
        "",
    ]
    return "\n".join(lines)


def summary_text(results: Sequence[ZooResult]) -> str:
    """The summary table and failure reasons as plain text for the terminal."""
    rows = [SUMMARY_HEADER, *summary_rows(results)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(SUMMARY_HEADER))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    failed = [r for r in results if not r.passed]
    lines += ["", f"failed ({len(failed)}):"] + [f"  {r.name}: {r.reason}" for r in failed]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Drawing the timm sample (run once by `bench/zoo.py --resample`; the result is committed)

SAMPLE_SEED = 0
PARAM_CAP = 30_000_000
SIZES = (96, 128, 160, 224)
MAX_FORWARD_S = 1.0


def _meta_params(name: str) -> int:
    import timm

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())


def _runnable_variant(name: str) -> tuple[dict[str, Any], tuple[int, ...]] | None:
    """The smallest input size (and img_size kwarg where accepted) the model runs at, fast."""
    for size in SIZES:
        for kwargs in ({"img_size": size}, {}):
            case = ZooCase(f"timm/{name}", "timm", name, "classification", (1, 3, size, size), kwargs)
            try:
                model = case.build()
                start = time.perf_counter()
                run_model(model, case.example_inputs())
            except Exception:  # noqa: BLE001, S112 - try the next size / kwargs
                continue
            # the smallest size that runs decides: if that is too slow, larger ones are too
            return (kwargs, case.input_shape) if time.perf_counter() - start <= MAX_FORWARD_S else None
    return None


def sample_timm(k: int = 64, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One timm model per architecture module, modules and models in seeded random order.

    A model is taken when it has at most `PARAM_CAP` parameters and runs on a
    ``1x3xSxS`` input (S the smallest of `SIZES` that works) within `MAX_FORWARD_S`.
    """
    import timm

    rng = random.Random(SAMPLE_SEED)
    modules = sorted(timm.list_modules())
    rng.shuffle(modules)
    chosen, skipped = [], {}
    for module in modules:
        if len(chosen) >= k:
            break
        names = sorted(timm.list_models(module=module))
        rng.shuffle(names)
        pick = _pick(names)
        if pick is None:
            skipped[module] = f"no model under {PARAM_CAP / 1e6:.0f}M params runs on a plain image at {SIZES}"
            log(f"{module}: skipped")
            continue
        chosen.append(pick | {"module": module})
        log(f"{module}: {pick['name']} {pick['input_shape']} {pick['kwargs']}")
    rule = (f"random.Random({SAMPLE_SEED}) shuffles timm.list_modules() and each module's models; the "
            f"first model per module with <= {PARAM_CAP / 1e6:.0f}M params that runs at the smallest of "
            f"{SIZES} px within {MAX_FORWARD_S:g}s; {k} modules")
    return {"timm_version": timm.__version__, "rule": rule, "models": chosen, "skipped_modules": skipped}


def _pick(names: Sequence[str]) -> dict[str, Any] | None:
    for name in names:
        try:
            params = _meta_params(name)
        except Exception:  # noqa: BLE001, S112 - cannot even be built: not a candidate
            continue
        if params > PARAM_CAP:
            continue
        variant = _runnable_variant(name)
        if variant is not None:
            return {"name": name, "params": params, "kwargs": variant[0], "input_shape": list(variant[1])}
    return None
