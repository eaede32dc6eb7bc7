"""The work of each DAG node: data -> train -> compress -> fine-tune -> lower (int8 or float) ->
evaluate, on public APIs only (`fxopt.models`, `fxopt.compile`, `fxopt.finetune`, the saved folder).

Every step reads its inputs from artefact folders and writes its own into ``out``; what it returns
is the artefact's summary (metrics, estimates), kept in the folder's metadata for the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import fxopt
from fxopt.automation.errors import CorruptArtefactError
from fxopt.automation.tasks import Task

__all__ = ["STEPS", "OnnxRunner", "load_model"]

MODEL_FILE = "model.pt"
DATA_FILE = "data.pt"
DEPLOY = "deploy"  # the saved compile folder inside a lower artefact


def _save_model(model: nn.Module, out: Path) -> None:
    module = model
    if isinstance(model, torch.fx.GraphModule):
        # fxopt's tracer class is not picklable as a graph's tracer; the plain one re-traces the code
        module = torch.fx.GraphModule(model, model.graph)
        module._tracer_cls = None
        module._tracer_extras = {}
    torch.save(module, out / MODEL_FILE)


def load_model(folder: Path) -> nn.Module:
    """The module a train, compress or fine-tune artefact holds (in eval mode)."""
    return torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=False).eval()


def _load_data(folder: Path) -> dict[str, Any]:
    return torch.load(folder / DATA_FILE, map_location="cpu", weights_only=False)


def data_step(task: Task, cfg: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    data = task.make_data(cfg["seed"], cfg["calib_batches"])
    torch.save(data, out / DATA_FILE)
    return {"calibration batches": len(data["calib"]),
            "train batches": len(data["train"]) if data["train"] is not None else "recipe stream",
            "eval batches": len(data["eval"]) if data["eval"] is not None else "recipe held-out set"}


def train_step(task: Task, cfg: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    model, metrics = task.train(_load_data(inputs["data"]), cfg["steps"], cfg["seed"], device=cfg["device"])
    _save_model(model, out)
    return {"metrics (torch)": metrics, "device": cfg["device_name"]}


def _latency_ms(compiled: Any) -> float:
    return float(compiled.report.cost_after.latency_s * 1e3)


def compress_step(task: Task, cfg: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    model = load_model(inputs["train"])
    data = _load_data(inputs["data"])
    ratio, options = cfg["latency_ratio"], {}
    if ratio >= 1.0:
        passes: list[Any] = []
    elif cfg["method"] == "prune":
        passes = [fxopt.create_pass("prune", amount=round(1.0 - ratio, 6), by="latency")]
    else:
        passes = [fxopt.create_pass("slim", trials=cfg["slim_trials"], seed=cfg["seed"], storage=cfg.get("slim_storage"))]
        options = {"latency_ratio": ratio, "calib_data": data["calib"]}
    compiled = fxopt.compile(model, cfg["target"], example_inputs=task.example_inputs(), passes=passes,
                             export=False, **options)
    _save_model(compiled.graph_module, out)
    before = fxopt.compile(model, cfg["target"], example_inputs=task.example_inputs(), passes=[], export=False)
    return {"latency ms (est.)": _latency_ms(compiled), "input latency ms (est.)": _latency_ms(before),
            "achieved ratio": _latency_ms(compiled) / max(_latency_ms(before), 1e-12)}


def finetune_step(task: Task, cfg: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    from fxopt.distill import choose_lr, resolve

    student = load_model(inputs["compress"])
    if cfg["steps"] <= 0:
        _save_model(student, out)
        return {"steps": 0}
    teacher = load_model(inputs["train"])
    data = _load_data(inputs["data"])
    setup = resolve(cfg["distill"], teacher=teacher, example_inputs=task.example_inputs(), seed=cfg["seed"],
                    **task.finetune_source(data))
    lr = choose_lr(cfg["lr"] if cfg["lr"] is not None else task.finetune_lr(), recipe=None, student=student,
                   data=setup.data, loss=setup.loss, teacher=teacher if setup.distill else None,
                   distill=setup.distill, steps=cfg["steps"], seed=cfg["seed"], device=cfg["device"])
    result = fxopt.finetune(student, **setup.kwargs(), teacher=teacher if setup.distill else None,
                            steps=cfg["steps"], lr=lr.lr, seed=cfg["seed"], progress=False, device=cfg["device"])
    _save_model(student, out)
    return {"steps": cfg["steps"], "lr": lr.lr, "lr chosen by": lr.how, "distill": list(setup.notes),
            "summary": result.summary(), "device": cfg["device_name"]}


def lower_step(task: Task, cfg: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    model = load_model(inputs["finetune"])
    data = _load_data(inputs["data"])
    options: dict[str, Any] = {"calib_data": data["calib"]} if cfg["precision"] == "int8" else {}
    if cfg.get("qat_steps"):  # int8 by QAT: compile trains through the fake-quantised graph
        source = task.finetune_source(data)
        options.update(qat_steps=cfg["qat_steps"], distill=cfg["distill"], finetune_seed=cfg["seed"], device=cfg["device"],
                       finetune_lr=cfg["lr"] if cfg["lr"] is not None else task.finetune_lr(),
                       **({"recipe": source["recipe"]} if "recipe" in source else
                          {"train_data": source["data"], "loss": source["loss"]}))
    compiled = fxopt.compile(model, cfg["target"], example_inputs=task.example_inputs(), precision=cfg["precision"],
                             **options)
    compiled.save(out / DEPLOY)
    with torch.no_grad():
        outputs = model(*task.example_inputs())
    structure = {"dict": list(outputs)} if isinstance(outputs, dict) else {
        "tuple": len(outputs)} if isinstance(outputs, (tuple, list)) else {"tensor": 1}
    (out / "outputs.json").write_text(json.dumps(structure))
    return {"precision": compiled.manifest["precision"], "qat steps": cfg.get("qat_steps", 0),
            "latency ms (est.)": _latency_ms(compiled),
            "onnx bytes": (out / DEPLOY / "model.onnx").stat().st_size}


class OnnxRunner(nn.Module):
    """A saved model.onnx in ONNX Runtime, called like the torch model (tensors in, its outputs out).

    A batch larger than the file's static batch is run in slices of that size and concatenated,
    so a recipe's evaluation over its held-out set runs unchanged.
    """

    def __init__(self, onnx_path: Path, structure: dict[str, Any]) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        dims = self.session.get_inputs()[0].shape
        self.batch = dims[0] if dims and isinstance(dims[0], int) else None
        self.structure = structure

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.names, arrays)))

    def forward(self, *inputs: torch.Tensor) -> Any:
        arrays = [t.detach().cpu().numpy() for t in inputs]
        total = arrays[0].shape[0] if arrays[0].ndim else 1
        step = self.batch or total
        parts = [self._run([a[i:i + step] for a in arrays]) for i in range(0, total, step)]
        outs = [torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in range(len(parts[0]))]
        if "dict" in self.structure:
            return dict(zip(self.structure["dict"], outs))
        if "tuple" in self.structure:
            return tuple(outs)
        return outs[0]


def evaluate_step(task: Task, cfg: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    from fxopt.output.output_folder import verify_output_folder

    folder = inputs["lower"] / DEPLOY
    problems = verify_output_folder(str(folder))
    if problems:
        raise CorruptArtefactError(cfg["lower_node"], f"saved folder {folder} fails its manifest: {'; '.join(problems)}")
    runner = OnnxRunner(folder / "model.onnx", json.loads((inputs["lower"] / "outputs.json").read_text()))
    start = time.perf_counter()
    metrics = task.evaluate(runner, _load_data(inputs["data"]))
    elapsed = time.perf_counter() - start
    report = json.loads((folder / "report.json").read_text())
    layers = [{"node": r["node"], "latency_ms": float(r.get("latency_ms") or 0.0)} for r in report.get("layers", [])]
    result = {"metrics (onnx)": metrics, "eval seconds (onnxruntime)": elapsed, "layers": layers,
              "latency ms (est.)": float(report["cost_after"]["latency_ms"]), "precision": report["precision"],
              "onnx bytes": (folder / "model.onnx").stat().st_size}
    (out / "metrics.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    return {"metrics (onnx)": metrics}


STEPS: dict[str, Callable[[Task, dict[str, Any], dict[str, Path], Path], dict[str, Any]]] = {
    "data": data_step,
    "train": train_step,
    "compress": compress_step,
    "finetune": finetune_step,
    "lower": lower_step,
    "evaluate": evaluate_step,
}
