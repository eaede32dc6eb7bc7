"""Zoo conformance (`make zoo`): each model traces, compiles for cpu and xavier, and matches in torch and ORT.

A model listed in expected_passes.json must keep passing (no new leaves, no new rolled-back passes);
the full run writes bench/results/zoo.md.
"""

from __future__ import annotations

import pytest
import zoo_cases as zc

CASES = zc.all_cases()
EXPECTED = zc.load_expected()
RESULTS: dict[str, zc.ZooResult] = {}


@pytest.fixture(scope="module", autouse=True)
def results_table():
    """Write the table once every case ran (a -k subset must not overwrite the full table)."""
    yield
    if len(RESULTS) == len(CASES):
        zc.RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
        zc.RESULTS_MD.write_text(zc.render_markdown([RESULTS[c.name] for c in CASES], "make zoo"))


def test_expected_passes_name_zoo_models():
    """A renamed or dropped model must not silently leave the regression list."""
    names = {c.name for c in CASES}
    assert set(EXPECTED) <= names, sorted(set(EXPECTED) - names)
    assert len(CASES) >= 20 + 60 and len(names) == len(CASES)


@pytest.mark.zoo
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_zoo_model(case: zc.ZooCase) -> None:
    result = zc.run_case(case)
    RESULTS[case.name] = result
    assert not zc.regressions(result, EXPECTED)
    # fxopt must trace whatever plain torch.fx traces
    assert result.trace != "failed" or not result.fx_ok, result.trace_reason
    # a model that does not compile must fail with a clear FxoptError, never crash inside fxopt
    assert "internal error" not in result.reason, result.reason
