"""The pipeline's cache: what a rerun recomputes for each kind of change, corruption, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pipeline_toy import OPTIONS, toy_task

import fxopt
from fxopt.automation import PipelineConfigError, run
from fxopt.automation import nodes as pipeline_nodes

ALL = ["data", "train", "compress__r100_xavier", "finetune__r100_xavier", "lower__r100_xavier_int8",
       "evaluate__r100_xavier_int8", "compress__r060_xavier", "finetune__r060_xavier", "lower__r060_xavier_int8",
       "evaluate__r060_xavier_int8"]


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("cold") / "run"
    return out, run(toy_task(), out, **OPTIONS)


@pytest.fixture
def copy(cold: tuple[Path, object], tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(cold[0], out)
    return out


def test_cold_run_runs_every_node_and_evaluates_the_deployed_onnx(cold):
    out, result = cold
    assert sorted(result.ran) == sorted(ALL)
    assert [r["variant"] for r in result.rows] == ["r100_xavier_int8", "r060_xavier_int8"]
    for row in result.rows:
        assert row["precision"] == "int8" and row["onnx_bytes"] > 0
        assert 0.5 <= row["metrics"]["accuracy"] <= 1.0  # trained on a linearly separable rule
        assert (Path(row["deployed"]) / "model.onnx").is_file()
        assert fxopt.output.output_folder.verify_output_folder(row["deployed"]) == []
    # both variants read the one trained model: data and train ran once
    assert all(result.events[n]["seconds"] > 0 for n in ALL)


def test_rerun_with_nothing_changed_does_no_work(copy, cold):
    result = run(toy_task(), copy, **OPTIONS)
    assert result.ran == []
    assert {e["status"] for e in result.events.values()} == {"cache"}
    assert "0 ran, 10 from the cache" in result.report_md.read_text()
    # the report still says what each node cost when it was computed
    for name, event in result.events.items():
        assert event["computed_seconds"] == pytest.approx(cold[1].events[name]["computed_seconds"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default device is CUDA on this host")
def test_device_cpu_is_the_default_here_and_reruns_nothing(copy, cold):
    result = run(toy_task(), copy, **OPTIONS, device="cpu")
    assert result.ran == []  # the same fingerprints: the CPU is what trained the cached artefacts


def test_fine_tune_option_reruns_that_branch_from_fine_tune_on(copy):
    result = run(toy_task(), copy, **{**OPTIONS, "finetune_steps": 4})
    # the 1.0 branch is not fine-tuned (0 steps whatever the option), so it stays cached
    assert sorted(result.ran) == ["evaluate__r060_xavier_int8", "finetune__r060_xavier", "lower__r060_xavier_int8"]


def test_precision_reruns_only_lowering_and_evaluation(copy):
    result = run(toy_task(), copy, **{**OPTIONS, "precisions": ("fp16",)})
    assert sorted(result.ran) == ["evaluate__r060_xavier_fp16", "evaluate__r100_xavier_fp16",
                                  "lower__r060_xavier_fp16", "lower__r100_xavier_fp16"]
    assert {r["precision"] for r in result.rows} == {"fp16"}


def test_qat_reruns_only_the_int8_lowering_and_evaluation(copy):
    result = run(toy_task(), copy, **{**OPTIONS, "qat_steps": 3})
    assert sorted(result.ran) == ["evaluate__r060_xavier_int8", "evaluate__r100_xavier_int8",
                                  "lower__r060_xavier_int8", "lower__r100_xavier_int8"]
    assert {r["precision"] for r in result.rows} == {"int8"}
    report = (Path(result.rows[0]["deployed"]) / "report.md").read_text()
    assert "QAT: 3 steps" in report and "after QAT" in report


def test_data_seed_reruns_from_data(copy):
    result = run(toy_task(), copy, **{**OPTIONS, "data_seed": 1})
    assert sorted(result.ran) == sorted(ALL)


def _other_data(seed: int) -> dict:
    from pipeline_toy import data

    return data(seed + 100)


def test_changed_data_factory_reruns_from_data(copy):
    result = run(toy_task(data=_other_data), copy, **OPTIONS)
    assert sorted(result.ran) == sorted(ALL)


def test_new_fxopt_version_reruns_everything(copy, monkeypatch):
    monkeypatch.setattr(fxopt, "__version__", fxopt.__version__ + ".post1")
    result = run(toy_task(), copy, **OPTIONS)
    assert sorted(result.ran) == sorted(ALL)


def test_changed_checkpoint_file_reruns_from_data(tmp_path):
    from pipeline_toy import build

    checkpoint = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(build().state_dict(), checkpoint)
    options = {**OPTIONS, "latency_ratios": (1.0,)}
    first = run(toy_task(checkpoint=checkpoint), tmp_path / "run", **options)
    assert run(toy_task(checkpoint=checkpoint), tmp_path / "run", **options).ran == []
    torch.manual_seed(1)
    torch.save(build().state_dict(), checkpoint)
    again = run(toy_task(checkpoint=checkpoint), tmp_path / "run", **options)
    assert sorted(again.ran) == sorted(first.ran) and len(again.ran) == 6


def _artefact(out: Path, node: str) -> Path:
    (folder,) = (out / "artefacts" / node).iterdir()
    return folder


def test_corrupted_artefact_is_detected_and_recomputed(copy):
    model_file = _artefact(copy, "train") / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    result = run(toy_task(), copy, **OPTIONS)
    assert "train" in result.ran and "corrupt" in result.events["train"]["reason"]
    # training is deterministic: the same digest again, so nothing downstream reruns
    assert result.ran == ["train"]
    assert model_file.read_bytes() != bytes(data)


def test_corrupted_deployed_file_is_recomputed(copy):
    onnx_file = _artefact(copy, "lower__r060_xavier_int8") / "deploy" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    result = run(toy_task(), copy, **OPTIONS)
    assert "lower__r060_xavier_int8" in result.ran
    assert fxopt.output.output_folder.verify_output_folder(str(onnx_file.parent)) == []


def test_corrupted_engine_cache_entry_is_a_miss_not_a_crash(copy):
    for entry in (copy / ".cache" / "results").iterdir():
        if entry.is_file():
            entry.write_bytes(b"not a pickle")
    result = run(toy_task(), copy, **OPTIONS)
    # every node's record is gone; the artefacts on disk are intact and are taken by fingerprint
    assert result.ran == [] and {e["status"] for e in result.events.values()} <= {"stored", "cache"}
    assert len(result.rows) == 2


def test_interrupted_run_resumes_from_the_last_finished_node(copy, monkeypatch):
    original = pipeline_nodes.STEPS["lower"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline_nodes.STEPS, "lower", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(toy_task(), copy, **{**OPTIONS, "data_seed": 3})
    monkeypatch.setitem(pipeline_nodes.STEPS, "lower", original)
    result = run(toy_task(), copy, **{**OPTIONS, "data_seed": 3})
    # hamilton goes depth first: data, train and the 1.0 branch up to its fine-tune had finished
    finished = {"data", "train", "compress__r100_xavier", "finetune__r100_xavier"}
    assert not finished & set(result.ran), result.ran
    assert "lower__r100_xavier_int8" in result.ran and len(result.rows) == 2


def test_report_gives_variants_plots_and_node_timings(cold):
    _, result = cold
    md = result.report_md.read_text()
    assert "| r060_xavier_int8 | int8 |" in md and "| train | ran |" in md
    assert "The trained model before compression (torch, fp32, the same metrics): accuracy" in md
    # a tiny MLP's estimate is fixed costs: pruning cannot reach 0.6x, and the report says so
    assert "WARNING: r060_xavier_int8 asked for 0.60x" in md and "WARNING: r100" not in md
    page = result.report_html.read_text()
    assert page.count("data:image/png;base64,") == 3  # Pareto + one per-layer chart per variant
    report = json.loads((result.out / "report.json").read_text())
    assert set(report["nodes"]) == set(ALL)


@pytest.mark.parametrize("options, match", [
    ({"latency_ratios": (1.5,)}, "must be a number in"),
    ({"precisions": ("int4",)}, "precision 'int4'"),
    ({"targets": ("nowhere",)}, "nowhere"),
    ({"compress": "magic"}, "compress='magic'"),
    ({"finetune_steps": -1}, "finetune_steps"),
    ({"latency_ratio": 0.5}, "unknown pipeline option"),
])
def test_bad_options_are_config_errors(tmp_path, options, match):
    with pytest.raises(PipelineConfigError, match=match):
        run(toy_task(), tmp_path, **options)


def test_bad_task_inputs_are_config_errors(tmp_path):
    with pytest.raises(PipelineConfigError, match="unknown model"):
        run("no_such_model", tmp_path)
    with pytest.raises(PipelineConfigError, match="is not a file"):
        toy_task(checkpoint=tmp_path / "missing.pt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PipelineConfigError, match="is a file"):
        run(toy_task(), tmp_path / "file", **OPTIONS)


def test_recipe_identity_reaches_every_fingerprint():
    from fxopt.automation import PipelineConfig, RecipeTask
    from fxopt.automation.engine import plan_nodes

    small, md = (plan_nodes(RecipeTask("camera_multitask", cfg), PipelineConfig()) for cfg in ((), (("preset", "md"),)))
    assert all(a.config != b.config for a, b in zip(small, md))  # another recipe config: every node reruns
    assert RecipeTask("motionnet").identity()["recipe"]["batch"] != RecipeTask("camera_multitask").identity()["recipe"]["batch"]
