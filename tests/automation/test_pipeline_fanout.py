"""Variants fanned out on a local two-worker Dask cluster give the artefacts (digests) of an in-process run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("dask.distributed")

import cloudpickle  # noqa: E402 - comes with dask
import pipeline_toy  # noqa: E402
from pipeline_toy import OPTIONS, toy_task  # noqa: E402

from fxopt.automation import run  # noqa: E402


def _digests(result) -> dict[str, str]:
    report = json.loads((result.out / "report.json").read_text())
    return {row["variant"]: row["deployed"] for row in report["variants"]}


@pytest.mark.slow  # two worker processes importing torch: about a minute on 2 shared cores
def test_two_workers_give_the_in_process_artefacts(tmp_path):
    from dask.distributed import Client, LocalCluster

    local = run(toy_task(), tmp_path / "local", **OPTIONS)
    cloudpickle.register_pickle_by_value(pipeline_toy)  # the workers do not have the tests folder on sys.path
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            fanned = run(toy_task(), tmp_path / "dask", client=client, **OPTIONS)
    finally:
        cloudpickle.unregister_pickle_by_value(pipeline_toy)
    assert sorted(fanned.ran) == sorted(local.ran)  # every node ran once, the branches on the workers
    # a model artefact is its file; a lowering's deployed file is model.onnx (its report.md records timings)
    files = {"data": "data.pt", "train": "model.pt", "compress__r060_xavier": "model.pt",
             "finetune__r060_xavier": "model.pt", "lower__r100_xavier_int8": "deploy/model.onnx",
             "lower__r060_xavier_int8": "deploy/model.onnx"}
    for name, file in files.items():
        here = sorted((tmp_path / "local" / "artefacts" / name).iterdir())
        there = sorted((tmp_path / "dask" / "artefacts" / name).iterdir())
        assert [p.name for p in here] == [p.name for p in there]  # the same fingerprints
        meta_here, meta_there = (json.loads((p[0] / ".artefact.json").read_text()) for p in (here, there))
        assert meta_here["files"][file] == meta_there["files"][file], name
    assert [r["metrics"] for r in fanned.rows] == [r["metrics"] for r in local.rows]
