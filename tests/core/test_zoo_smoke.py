"""Default-tier smoke version of the zoo: a handful of small models through the zoo runner (< 30 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "zoo"))

import zoo_cases as zc  # noqa: E402

SMOKE = ("tv/squeezenet1_1", "tv/mobilenet_v3_small", "tv/lraspp_mobilenet_v3_large", "timm/mobilevit_xxs", "timm/efficientvit_m0")
CASES = {c.name: c for c in zc.all_cases()}
EXPECTED = zc.load_expected()


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_model_compiles_and_matches(name: str) -> None:
    result = zc.run_case(CASES[name])
    assert result.passed, result.reason
    assert name in EXPECTED and not zc.regressions(result, EXPECTED)
    for target in zc.TARGETS:
        run = result.targets[target]
        assert run.torch_max_abs is not None and run.onnx_max_abs is not None
        assert set(run.timings_s) >= {"trace", "passes", "export", "total"}


def _result(name: str, *, trace: str = "full", ok: bool = True, leaves: int = 0, rolled: int = 0) -> zc.ZooResult:
    run = zc.TargetRun(ok, "" if ok else "ExportError: boom", 0.0, 0.0, {}, ["fold_batchnorm: x"] * rolled)
    return zc.ZooResult(name, "classification", 10, trace != "failed", "", trace,
                        [f"m{i} (M)" for i in range(leaves)], "TraceError: t" if trace == "failed" else "",
                        {} if trace == "failed" else {"cpu": run, "xavier": run}, 1.0)


@pytest.mark.parametrize(
    ("result", "regressed"),
    [
        (_result("a"), False),
        (_result("a", ok=False), True),
        (_result("a", trace="failed"), True),
        (_result("a", trace="leaves", leaves=1), True),
        (_result("a", rolled=1), True),
        (_result("unknown", ok=False), False),  # never passed: no regression
    ],
)
def test_regressions_against_expected(result: zc.ZooResult, regressed: bool) -> None:
    expected = {"a": {"trace": "full", "leaves": 0, "rolled_back": 0}}
    assert bool(zc.regressions(result, expected)) is regressed


def test_markdown_table_counts_and_reasons() -> None:
    results = [_result("tv/a"), _result("timm/b", trace="leaves", leaves=2), _result("timm/c", trace="failed")]
    text = zc.render_markdown(results, "pytest")
    assert "| all | 3 | 2/3 (67%) | 2/3 (67%) | 1/3 (33%) | 1/3 (33%) | 2/3 (67%) | 0 |" in text
    assert "| timm/c |" in text and "TraceError: t" in text
