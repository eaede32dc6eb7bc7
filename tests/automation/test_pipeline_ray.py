"""Variants fanned out on a local two-CPU Ray cluster give the artefacts (digests) of an in-process run."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")

import pipeline_toy  # noqa: E402
from pipeline_toy import OPTIONS, toy_task  # noqa: E402

from fxopt.automation import run  # noqa: E402
from fxopt.automation.engine import is_ray  # noqa: E402


def test_the_ray_module_is_told_from_a_dask_client():
    assert is_ray(ray)
    assert not is_ray(object()) and not is_ray(None)


@pytest.mark.slow  # a local Ray cluster and two worker processes importing torch: about a minute on 2 shared cores
def test_two_ray_workers_give_the_in_process_artefacts(tmp_path):
    local = run(toy_task(), tmp_path / "local", **OPTIONS)
    ray.cloudpickle.register_pickle_by_value(pipeline_toy)  # the workers do not have the tests folder on sys.path
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        fanned = run(toy_task(), tmp_path / "ray", client=ray, **OPTIONS)
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(pipeline_toy)
    assert sorted(fanned.ran) == sorted(local.ran)  # every node ran once, the branches on the workers
    for name, file in {"compress__r060_xavier": "model.pt", "lower__r100_xavier_int8": "deploy/model.onnx",
                       "lower__r060_xavier_int8": "deploy/model.onnx"}.items():
        here = sorted((tmp_path / "local" / "artefacts" / name).iterdir())
        there = sorted((tmp_path / "ray" / "artefacts" / name).iterdir())
        assert [p.name for p in here] == [p.name for p in there]  # the same fingerprints
        meta_here, meta_there = (json.loads((p[0] / ".artefact.json").read_text()) for p in (here, there))
        assert meta_here["files"][file] == meta_there["files"][file], name
    assert [r["metrics"] for r in fanned.rows] == [r["metrics"] for r in local.rows]
