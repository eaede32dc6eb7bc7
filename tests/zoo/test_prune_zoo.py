"""Pruning zoo (`make zoo`): torchvision/timm models pruned to half their FLOPs by `fxopt.compile`.

Each model must prune (the pass applied, not rolled back), keep its output shapes, export to ONNX
at opset 17 and match in ONNX Runtime (compile verifies it), and land within 5 points of the
requested FLOPs ratio, both as the pass measures it and as deployed (BatchNorm folded, against
the unpruned model compiled the same way).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import zoo_cases as zc
from fxopt.passes import PruneChannels

import fxopt
from fxopt.numerics import output_signature, run_model

AMOUNT = 0.5
TOLERANCE = 0.05
TARGET = "xavier"  # the deployment target: fp16, channel counts rounded to multiples of 8

_ZOO = {c.name: c for c in zc.all_cases()}
NAMES = (
    "tv/resnet18", "tv/resnet50", "tv/resnext50_32x4d", "tv/mobilenet_v2", "tv/mobilenet_v3_small",
    "tv/mobilenet_v3_large", "tv/efficientnet_b0", "tv/regnet_x_400mf", "tv/regnet_y_400mf",
    "tv/densenet121", "tv/convnext_tiny", "tv/vit_b_16", "tv/swin_t", "tv/shufflenet_v2_x0_5",
    "tv/mnasnet0_5", "tv/googlenet", "tv/squeezenet1_1",
)
CASES: tuple[zc.ZooCase, ...] = tuple(_ZOO[n] for n in NAMES) + (
    zc.ZooCase("timm/vit_tiny_patch16_224", "timm", "vit_tiny_patch16_224", "classification", (1, 3, 64, 64),
               {"img_size": 64}),
    zc.ZooCase("timm/resnet26d", "timm", "resnet26d", "classification", (1, 3, 64, 64)),
)


@dataclass(frozen=True)
class PruneCheck:
    """What pruning one model with `fxopt.compile` gave."""

    status: str  # the prune pass record's status
    reason: str
    pass_ratio: float  # FLOPs after / before, as the pass measured them (BatchNorm still there)
    deployed_ratio: float  # final FLOPs / the unpruned model's after the default pipeline
    shapes_kept: bool
    onnx_opset: int | None
    onnx_max_abs: float | None


def prune_and_check(case: zc.ZooCase, amount: float = AMOUNT, target: str = TARGET) -> PruneCheck:
    """Compile `case` with `PruneChannels(amount, by="flops")`, ONNX export and ORT parity included."""
    model, inputs = case.build(), case.example_inputs()
    reference = run_model(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = fxopt.compile(model, target, example_inputs=inputs, export=False)
        compiled = fxopt.compile(model, target, example_inputs=inputs, passes=[PruneChannels(amount=amount, by="flops")])
    record = next(r for r in compiled.report.passes if r.name == "prune")
    pass_ratio = record.after.flops / record.before.flops if record.after and record.before else 1.0
    shapes_kept = output_signature(run_model(compiled, inputs)) == output_signature(reference)
    onnx = compiled.report.onnx or {}
    return PruneCheck(
        record.status, record.reason, pass_ratio,
        compiled.report.cost_after.flops / plain.report.cost_after.flops, shapes_kept,
        onnx.get("opset"), onnx.get("max_abs_error_vs_torch"),
    )


def assert_pruned_to_budget(check: PruneCheck, amount: float = AMOUNT) -> None:
    """The assertions every pruning-zoo model must pass."""
    assert check.status == "applied", f"prune {check.status}: {check.reason}"
    assert check.shapes_kept
    assert check.onnx_opset == 17 and check.onnx_max_abs is not None
    assert abs(check.pass_ratio - (1 - amount)) <= TOLERANCE, f"pass FLOPs ratio {check.pass_ratio:.3f}"
    assert abs(check.deployed_ratio - (1 - amount)) <= TOLERANCE, f"deployed FLOPs ratio {check.deployed_ratio:.3f}"


def test_prune_zoo_covers_the_families() -> None:
    """The families the pruning issue names stay in the sweep."""
    names = " ".join(c.name for c in CASES)
    assert len(CASES) >= 15
    for family in ("resnet", "mobilenet_v3", "efficientnet", "regnet", "densenet", "convnext", "vit"):
        assert family in names, family


@pytest.mark.zoo
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_prune_zoo_model(case: zc.ZooCase) -> None:
    torch.manual_seed(0)
    assert_pruned_to_budget(prune_and_check(case))
