"""bench/gpu_pipeline.py: it refuses without a GPU, and its report says what each device took (the
GPU run itself needs a device CI does not have)."""

from __future__ import annotations

import torch
from bench_loader import load_bench


def test_without_a_gpu_it_says_so_and_writes_nothing(monkeypatch, capsys, tmp_path):
    bench = load_bench("gpu_pipeline")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path / "x.md")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "x.md").exists()


def test_the_report_gives_each_devices_seconds_and_the_speed_up():
    bench = load_bench("gpu_pipeline")
    seconds = dict.fromkeys(bench.KINDS, 1.0)
    cpu = bench.DeviceRun("cpu", 100.0, {**seconds, "train": 60.0, "finetune": 30.0}, {"r070_xavier_int8": {"miou": 0.5}})
    gpu = bench.DeviceRun("cuda", 25.0, {**seconds, "train": 6.0, "finetune": 5.0}, {"r070_xavier_int8": {"miou": 0.49}})
    text = "\n".join(bench.report_lines(cpu, gpu, command="python bench/gpu_pipeline.py", options={}, gpu_name="Example GPU"))
    assert "| whole run (wall) | 100.0 | 25.0 | 4.00x |" in text
    assert "| train | 60.0 | 6.0 | 10.00x |" in text and "| finetune | 30.0 | 5.0 | 6.00x |" in text
    assert "| r070_xavier_int8 | 0.5000 / 0.4900 |" in text and "GPU: Example GPU" in text
