"""The pipeline's HTML report rendered in headless Chromium: not blank, and the plots are drawn."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from fxopt.automation import PipelineConfig
from fxopt.automation.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Task:
    name = "demo"


def _rows() -> list[dict]:
    layers = [{"node": f"conv{i}", "latency_ms": 0.01 * (i + 1)} for i in range(6)]
    return [
        {"variant": tag, "latency_ratio": ratio, "target": "xavier", "precision": "int8", "latency_ms": latency,
         "achieved_ratio": ratio, "onnx_bytes": 4096, "metrics": {"miou": miou, "motion_error": 0.3},
         "layers": layers, "deployed": "/nowhere"}
        for tag, ratio, latency, miou in [("r100_xavier_int8", 1.0, 1.0, 0.9), ("r070_xavier_int8", 0.7, 0.7, 0.88),
                                          ("r050_xavier_int8", 0.5, 0.5, 0.8)]
    ]


def _near(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    return int((np.abs(image[..., :3].astype(int) - np.array(rgb)).max(-1) <= tolerance).sum())


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser-tools)")
def test_report_renders_with_its_plots_in_headless_chromium(tmp_path):
    from matplotlib import image as mpimg

    events = {"data": {"status": "cache", "seconds": 0.0, "reason": "hamilton cache hit"},
              "train": {"status": "ran", "seconds": 3.2, "reason": "not in the cache"}}
    _, page = write_report(tmp_path, _Task(), PipelineConfig(), _rows(), events)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--hide-scrollbars", "--window-size=1400,2600", f"--screenshot={shot}", page.as_uri()],
        check=True, timeout=120, capture_output=True)
    image = (mpimg.imread(shot) * 255).astype(np.uint8)
    assert image.shape[0] >= 2000 and image.shape[1] >= 1000
    assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 50  # not a blank page
    # the Pareto front is drawn in tab:red, the per-layer bars in tab:green, the variants in tab:blue
    assert _near(image, (214, 39, 40)) > 100
    assert _near(image, (44, 160, 44)) > 1000
    assert _near(image, (31, 119, 180)) > 20  # the legend and the points the front does not cover
