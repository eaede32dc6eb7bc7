"""The pipeline's ``device``: checked with the config, resolved once, and part of the configuration
(so the fingerprint) of exactly the nodes that train: a CPU run and a GPU run never share them."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_toy import toy_task

from fxopt.automation import PipelineConfig, PipelineConfigError
from fxopt.automation.artefacts import fingerprint
from fxopt.automation.engine import plan_nodes

TRAINING = {"train", "finetune__r060_xavier", "lower__r100_xavier_int8", "lower__r060_xavier_int8"}  # QAT trains in int8 lowering


def _configs(**options) -> dict[str, dict]:
    config = PipelineConfig(latency_ratios=(1.0, 0.6), precisions=("int8", "fp16"), qat_steps=2, **options)
    return {spec.name: spec.config for spec in plan_nodes(toy_task(), config)}


@pytest.mark.parametrize("device, message", [
    ("cuda:5", "device='cuda:5'"),
    ("tpu", "device='tpu' is not a device name"),
])
def test_a_device_this_host_lacks_is_a_config_error(device, message):
    with pytest.raises(PipelineConfigError, match=message) as error:
        PipelineConfig.from_options(device=device)
    assert "training runs on one of: cpu" in str(error.value)


def test_device_is_in_the_configuration_of_the_training_nodes_only():
    configs = _configs(device="cpu")
    with_device = {name for name, cfg in configs.items() if "device" in cfg}
    assert with_device == TRAINING  # not data, compress, the untuned 1.0 branch's fine-tune, fp16 lowering, evaluate
    assert all(configs[name]["device"] == "cpu" and configs[name]["device_name"] == "cpu" for name in TRAINING)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default is CUDA on this host")
def test_the_default_device_fingerprints_as_the_cpu_here():
    assert _configs() == _configs(device="cpu")


def test_a_gpu_run_fingerprints_apart_from_a_cpu_run(monkeypatch):
    cpu = _configs(device="cpu")
    # a host that says it has a GPU (nothing runs on it: only the plan is made)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Example GPU")
    gpu = _configs()
    assert gpu["train"]["device"] == "cuda:0" and gpu["train"]["device_name"] == "cuda:0 (Example GPU)"

    def key(cfg: dict) -> str:
        return fingerprint({"config": json.loads(json.dumps(cfg, sort_keys=True, default=str))})

    differ = {name for name in cpu if key(cpu[name]) != key(gpu[name])}
    assert differ == TRAINING
