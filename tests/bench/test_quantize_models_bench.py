"""bench/quantize_models.py: the bundled perception models in int8 for xavier, scored in ONNX Runtime
on the Q/DQ file (slow: training with the recipe), and its pieces on tiny models (fast)."""

from __future__ import annotations

import pytest
import torch
from bench_loader import load_bench
from torch import nn

import fxopt


def _bench_module():
    return load_bench('quantize_models')


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 1, 1)

    def forward(self, x):
        y = self.body(x).relu()
        return {"a": self.a(y), "b": self.b(y)}


def test_onnx_runtime_module_runs_the_file_frame_by_frame_behind_the_model_signature():
    bench = _bench_module()
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(1, 3, 8, 8)
    compiled = fxopt.compile(model, "xavier", example_inputs=(x,), precision="fp32")
    runner = bench.OnnxRuntimeModule(compiled.onnx_model, model, (x,))
    batch = torch.randn(3, 3, 8, 8)  # the file takes batch 1: three runs, outputs concatenated
    got, want = runner(batch), model(batch)
    assert set(got) == {"a", "b"} and got["a"].shape == (3, 2, 8, 8)
    for key in want:
        torch.testing.assert_close(got[key], want[key].detach(), atol=1e-5, rtol=1e-4)


def test_calibration_frames_are_batch_one_and_come_from_another_seed_than_training():
    bench = _bench_module()
    frames = bench.calibration_frames("camera_multitask", frames=5)
    assert len(frames) == 5 and all(f[0].shape[0] == 1 for f in frames)
    assert not torch.equal(frames[0][0], bench.calibration_frames("camera_multitask", frames=1, seed=0)[0][0])


def test_render_marks_the_bound_and_names_the_cause():
    bench = _bench_module()
    miss = bench.Attempt("int8 (entropy)", {"mAP": 0.40}, 10, [], 1.0, cause=["conv1 (input clipped at 0.7 of observed 12)"])
    hit = bench.Attempt("int8 (mse)", {"mAP": 0.462}, 10, [], 1.0)
    result = bench.ModelResult("pointpillars", 0.0, {"mAP": 0.467}, [miss, hit])
    assert not result.within(miss) and result.within(hit)
    text = bench.render([result], "python bench/quantize_models.py", 1.0)
    assert "| pointpillars | mAP | mAP 0.467 | int8 (entropy) | mAP 0.400 | -6.70 | 10 | no |" in text
    assert "| int8 (mse) | mAP 0.462 | -0.50 | 10 | yes |" in text
    assert "- pointpillars, int8 (entropy): conv1 (input clipped at 0.7 of observed 12)" in text


@pytest.mark.slow
def test_camera_multitask_int8_is_within_one_point_of_fp32_in_onnx_runtime(one_thread):
    bench = _bench_module()
    result = bench.run_model("camera_multitask", None, None, lambda line: None)
    first = result.attempts[0]  # the default calibration, every layer in int8, meets the bound
    assert [a.label for a in result.attempts] == ["int8, mse (default)", "int8, entropy (TensorRT's calibrator)"]
    assert first.qdq > 10 and first.kept_fp16 == []
    for metric in ("seg_miou", "det_map50"):
        assert result.fp32[metric] - first.metrics[metric] <= 0.01, (metric, result.fp32, first.metrics)
    assert result.fp32["seg_miou"] > 0.6 and result.fp32["det_map50"] > 0.6  # a trained model, not chance
