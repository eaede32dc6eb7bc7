"""The bundled perception models through the whole pipeline (tiny step counts: a smoke test each)."""

from __future__ import annotations

import pytest

from fxopt.automation import run


@pytest.mark.slow
@pytest.mark.parametrize("name, headline", [("pointpillars", "mAP"), ("camera_multitask", "seg_miou"),
                                            ("motionnet", "category_miou")])
def test_bundled_model_runs_end_to_end_and_reruns_from_the_cache(name, headline, tmp_path):
    options = {"latency_ratios": (1.0, 0.8), "precisions": ("int8",), "train_steps": 2, "finetune_steps": 2,
               "calib_batches": 2}
    first = run(name, tmp_path, **options)
    assert len(first.ran) == 10
    for row in first.rows:
        assert row["precision"] == "int8" and row["onnx_bytes"] > 0 and row["latency_ms"] > 0
        assert any(key.startswith(headline) for key in row["metrics"]), row["metrics"]
    assert first.rows[1]["achieved_ratio"] < 1.0
    assert run(name, tmp_path, **options).ran == []
