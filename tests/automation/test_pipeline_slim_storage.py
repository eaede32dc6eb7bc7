"""The pipeline's slim searches on a storage every worker shares (`PipelineConfig.slim_storage`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_toy import toy_task

import fxopt
from fxopt.automation import PipelineConfigError
from fxopt.automation import nodes as pipeline_nodes
from fxopt.automation.config import PipelineConfig
from fxopt.automation.engine import plan_nodes


def test_a_storage_is_checked_before_any_work():
    with pytest.raises(PipelineConfigError, match="is in '/no/such/folder', which does not exist"):
        PipelineConfig(compress="slim", slim_storage="/no/such/folder/studies.journal")
    with pytest.raises(PipelineConfigError, match="slim_storage is for compress='slim'"):
        PipelineConfig(slim_storage="sqlite:///studies.db")


def test_the_storage_is_in_the_compress_nodes_configuration_only(tmp_path):
    plain = {s.name: s.config for s in plan_nodes(toy_task(), PipelineConfig(compress="slim", latency_ratios=(1.0, 0.6)))}
    shared = {s.name: s.config for s in plan_nodes(toy_task(), PipelineConfig(
        compress="slim", latency_ratios=(1.0, 0.6), slim_storage=str(tmp_path / "studies.journal")))}
    changed = sorted(n for n in plain if plain[n] != shared[n])
    assert changed == ["compress__r060_xavier", "compress__r100_xavier"]
    assert shared["compress__r060_xavier"]["slim_storage"] == str(tmp_path / "studies.journal")


def test_the_compress_node_gives_the_storage_to_slim(tmp_path, monkeypatch):
    made = []
    real = fxopt.create_pass

    def spy(name, **options):
        made.append((name, options))
        return real(name, **options)

    monkeypatch.setattr(pipeline_nodes.fxopt, "create_pass", spy)
    monkeypatch.setattr(pipeline_nodes.fxopt, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop after the pass is made")))
    monkeypatch.setattr(pipeline_nodes, "load_model", lambda path: None)
    monkeypatch.setattr(pipeline_nodes, "_load_data", lambda path: {"calib": []})
    storage = str(tmp_path / "studies.journal")
    cfg = {"latency_ratio": 0.6, "method": "slim", "slim_trials": 3, "seed": 0, "target": "xavier", "slim_storage": storage}
    with pytest.raises(RuntimeError, match="stop after"):
        pipeline_nodes.compress_step(toy_task(), cfg, {"train": Path("t"), "data": Path("d")}, tmp_path)
    assert made == [("slim", {"trials": 3, "seed": 0, "storage": storage})]
