"""`fxopt.pipeline`: data -> train -> compress -> fine-tune with distillation -> int8 -> lower ->
online evaluation of the deployed file -> report, as one cached DAG on apache-hamilton.

    result = fxopt.pipeline.run("motionnet", "runs/motionnet", latency_ratios=(1.0, 0.7, 0.5))
    result.report_html      # runs/motionnet/report.html (report.md beside it)

Nodes exchange artefact folders with SHA-256 digests (`fxopt.automation.artefacts`), never live
modules; variants (latency budgets, precisions, targets) share their common nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxopt.automation.config import PipelineConfig, Variant
from fxopt.automation.errors import CorruptArtefactError, PipelineConfigError, PipelineError
from fxopt.automation.tasks import RecipeTask, Task, UserTask

__all__ = [
    "CorruptArtefactError", "PipelineConfig", "PipelineConfigError", "PipelineError", "PipelineResult", "RecipeTask",
    "Task", "UserTask", "Variant", "run",
]


@dataclass
class PipelineResult:
    """What a pipeline run produced.

    Attributes:
        out: the run folder.
        rows: one dict per variant (estimated latency, size, the deployed file's metrics, folder).
        events: per node, ``{"status": "ran" | "cache" | "stored", "seconds": s (this run),
            "computed_seconds": s (when its artefact was made), "reason": why}``.
        report_md, report_html: the report files.
    """

    out: Path
    rows: list[dict[str, Any]]
    events: dict[str, dict[str, Any]]
    report_md: Path
    report_html: Path

    @property
    def ran(self) -> list[str]:
        """Nodes that did work in this run."""
        return [name for name, e in self.events.items() if e["status"] == "ran"]


def run(task: str | Task, out: str | os.PathLike[str], config: PipelineConfig | None = None, *,
        progress: bool = False, client: Any = None, **options: Any) -> PipelineResult:
    """Run (or resume, or re-use) the pipeline for `task` into the folder `out`.

    Args:
        task: a bundled model's name (``"motionnet"``) or a `UserTask` / `RecipeTask`.
        out: the run folder: artefacts, hamilton's cache, report.md and report.html. Running again
            into it recomputes only what a change reaches.
        config: a `PipelineConfig`; or give its fields as keyword `options`.
        progress: a progress bar over the nodes on stderr.
        client: a ``dask.distributed.Client`` (``pip install 'fxopt[dask]'``), or the ``ray`` module
            after ``ray.init()`` (``pip install 'fxopt[ray]'``): data and training run here, then each
            compression branch runs on a worker (``out`` must be on a file system the workers share);
            the artefacts are the same as in-process.

    Returns:
        A `PipelineResult`.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> def data(seed):
        ...     g = torch.Generator().manual_seed(seed)
        ...     x = torch.randn(64, 4, generator=g)
        ...     batches = [((x[i:i + 8],), (x[i:i + 8].sum(1) > 0).long()) for i in range(0, 64, 8)]
        ...     return {"train": batches[:6], "eval": batches[6:]}
        >>> def accuracy(model, batches):
        ...     return {"acc": sum(float((model(*x).argmax(1) == y).float().mean()) for x, y in batches) / len(batches)}
        >>> task = UserTask("toy", build=lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)),
        ...                 data=data, loss=nn.functional.cross_entropy, metrics=accuracy,
        ...                 example_inputs=(torch.zeros(1, 4),), train_steps=30)
        >>> out = tempfile.mkdtemp()
        >>> first = run(task, out, precisions=("fp16",), finetune_steps=0)
        >>> again = run(task, out, precisions=("fp16",), finetune_steps=0)
        >>> again.ran
        []
    """
    from fxopt.automation.artefacts import ArtefactStore
    from fxopt.automation.engine import execute, variant_nodes
    from fxopt.automation.report import variant_rows, write_report

    if config is not None and options:
        raise PipelineConfigError("give either config= or keyword options, not both")
    config = config if config is not None else PipelineConfig.from_options(**options)
    if isinstance(task, str):
        task = RecipeTask(task)
    if not isinstance(task, Task):
        raise PipelineConfigError(f"task must be a bundled model's name or a UserTask, got {type(task).__name__}")
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise PipelineConfigError(f"cannot run into '{out}': it is a file; give a folder")
    out_path.mkdir(parents=True, exist_ok=True)
    specs, records, log = execute(task, config, out_path, progress=progress, client=client)
    store = ArtefactStore(out_path / "artefacts")
    rows = variant_rows(store, records, config, variant_nodes)
    events = {name: {"status": e.status, "seconds": e.seconds, "reason": e.reason,
                     "computed_seconds": store.check(records[name]).get("seconds", 0.0)} for name, e in log.events.items()}
    trained = store.check(records["train"])["summary"].get("metrics (torch)", {})
    md, html = write_report(out_path, task, config, rows, events, trained=trained)
    return PipelineResult(out_path, rows, events, md, html)
