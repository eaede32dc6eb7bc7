"""The DAG on apache-hamilton: one node per step and variant, hamilton's content-addressed cache
in front, digest checks behind it.

Hamilton keys each node's cached result on the node function's code and the data versions of
its inputs; every node's inputs include its configuration as a JSON string (with fxopt's version
and a digest of the node implementations), and its upstream records carry their artefacts'
SHA-256. So a rerun with nothing changed executes nothing, a changed compile option reaches
compress and what follows, and a changed data seed reaches everything. Before a result is
trusted its artefact folder is checked against the record's digest; a corrupted one is
recomputed (hamilton's ``recompute=``), and what depends on it reruns only if its digest changed.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fxopt
from fxopt.automation import nodes as nodes_module
from fxopt.automation.artefacts import ArtefactStore, fingerprint
from fxopt.automation.config import PipelineConfig, Variant
from fxopt.automation.errors import CorruptArtefactError, PipelineError, PipelineInterrupted
from fxopt.automation.tasks import Task, source_digest

__all__ = ["NodeEvent", "NodeSpec", "RunLog", "execute", "plan_nodes", "run_branch"]

# dependency names each kind of node reads (the hamilton parameters of its function)
DEPENDS = {
    "data": (),
    "train": ("data",),
    "compress": ("data", "train"),
    "finetune": ("data", "train", "compress"),
    "lower": ("data", "finetune"),
    "evaluate": ("data", "lower"),
}
MAX_REPAIRS = 4
_MODULE_IDS = itertools.count()  # hamilton wants a fresh module name per driver


@dataclass(frozen=True)
class NodeSpec:
    """One node of the planned DAG: its name, kind, upstream node per dependency, configuration."""

    name: str
    kind: str
    deps: dict[str, str]
    config: dict[str, Any]


@dataclass
class NodeEvent:
    """What happened to one node in a run: ``ran``, ``cache`` (hamilton's), ``stored`` (an intact
    artefact of the same fingerprint on disk), with the seconds it took and why it ran."""

    node: str
    status: str
    seconds: float = 0.0
    reason: str = ""


@dataclass
class RunLog:
    """The run's node events, in the order they happened."""

    events: dict[str, NodeEvent] = field(default_factory=dict)

    def add(self, event: NodeEvent) -> None:
        self.events[event.node] = event


def _code_digest() -> str:
    # a change to what a node does invalidates its artefacts, as a new fxopt version does
    from fxopt.automation import tasks

    return source_digest(nodes_module) + source_digest(tasks)


def plan_nodes(task: Task, config: PipelineConfig) -> list[NodeSpec]:
    """The DAG's nodes, shared where variants agree (data and train always; compress and
    fine-tune per latency ratio and target; lower and evaluate per variant).

    Example:
        >>> from fxopt.automation.tasks import RecipeTask
        >>> specs = plan_nodes(RecipeTask("motionnet"), PipelineConfig(latency_ratios=(1.0, 0.7), precisions=("int8", "fp16")))
        >>> len(specs), specs[2].name
        (14, 'compress__r100_xavier')
    """
    base = {"fxopt": fxopt.__version__, "code": _code_digest(), "task": task.identity()}
    device = config.training_device()  # in the configuration of each node that trains: a GPU's floats are not the CPU's
    specs = [
        NodeSpec("data", "data", {}, {**base, "seed": config.data_seed, "calib_batches": config.calib_batches}),
        NodeSpec("train", "train", {"data": "data"}, {**base, "steps": config.train_steps, "seed": config.data_seed, **device}),
    ]
    seen: set[str] = set()
    for variant in config.variants():
        compress, finetune = f"compress__{variant.compress_tag}", f"finetune__{variant.compress_tag}"
        if compress not in seen:
            seen.add(compress)
            steps = config.finetune_steps if variant.latency_ratio < 1 else 0
            specs.append(NodeSpec(compress, "compress", {"data": "data", "train": "train"}, {
                **base, "method": config.compress, "latency_ratio": variant.latency_ratio, "target": variant.target,
                "slim_trials": config.slim_trials, "seed": config.finetune_seed,
                **({"slim_storage": config.slim_storage} if config.slim_storage is not None else {})}))
            specs.append(NodeSpec(finetune, "finetune", {"data": "data", "train": "train", "compress": compress}, {
                **base, "steps": steps, "lr": config.finetune_lr, "distill": config.distill, "seed": config.finetune_seed,
                **(device if steps else {})}))
        lower, evaluate = f"lower__{variant.tag}", f"evaluate__{variant.tag}"
        specs.append(NodeSpec(lower, "lower", {"data": "data", "finetune": finetune},
                              {**base, "precision": variant.precision, "target": variant.target,
                               **({"qat_steps": config.qat_steps, "distill": config.distill, "lr": config.finetune_lr,
                                   "seed": config.finetune_seed, **device} if variant.precision == "int8" and config.qat_steps else {})}))
        specs.append(NodeSpec(evaluate, "evaluate", {"data": "data", "lower": lower}, {**base, "lower_node": lower}))
    return specs


def variant_nodes(variant: Variant) -> dict[str, str]:
    """The node names a variant's row reads."""
    return {"compress": f"compress__{variant.compress_tag}", "finetune": f"finetune__{variant.compress_tag}",
            "lower": f"lower__{variant.tag}", "evaluate": f"evaluate__{variant.tag}"}


class _Runner:
    """Runs one node's step into the artefact store and logs what happened."""

    def __init__(self, task: Task, store: ArtefactStore, log: RunLog, reasons: dict[str, str], bar: Any) -> None:
        self.task, self.store, self.log, self.reasons, self.bar = task, store, log, reasons, bar

    def __call__(self, kind: str, config_json: str, deps: dict[str, dict[str, Any]]) -> dict[str, Any]:
        cfg = json.loads(config_json)
        node = cfg["node"]
        for record in deps.values():
            self.store.check(record)  # a corrupted input is recomputed, never read
        fp = fingerprint({"config": cfg, "inputs": {k: r["sha256"] for k, r in sorted(deps.items())}})
        found = self.store.existing(node, fp) if node not in self.reasons else None
        if found is not None:
            self.log.add(NodeEvent(node, "stored", 0.0, "an intact artefact with this fingerprint was on disk"))
            return found
        if self.bar is not None:
            self.bar.set_postfix_str(node)
        start = time.perf_counter()
        step = nodes_module.STEPS[kind]
        paths = {k: self.store.folder(r) for k, r in deps.items()}
        try:
            record = self.store.produce(node, fp, lambda out: step(self.task, cfg, paths, out))
        except KeyboardInterrupt:
            raise PipelineInterrupted(f"interrupted in node '{node}'; run again to resume from it") from None
        self.log.add(NodeEvent(node, "ran", time.perf_counter() - start, self.reasons.get(node, "not in the cache")))
        if self.bar is not None:
            self.bar.update(1)
        return record


def _hamilton_module(specs: list[NodeSpec], runner: Callable[..., dict[str, Any]]) -> Any:
    from hamilton import ad_hoc_utils
    from hamilton.function_modifiers import parameterize, source

    by_kind: dict[str, list[NodeSpec]] = {}
    for spec in specs:
        by_kind.setdefault(spec.kind, []).append(spec)

    def params(kind: str) -> dict[str, dict[str, Any]]:
        return {s.name: {**{d: source(s.deps[d]) for d in DEPENDS[kind]}, "config": source(f"{s.name}__config")}
                for s in by_kind.get(kind, [])}

    # one function per kind of node, parameterised into one node per variant
    def data_node(config: str) -> dict:
        return runner("data", config, {})

    def train_node(data: dict, config: str) -> dict:
        return runner("train", config, {"data": data})

    def compress_node(data: dict, train: dict, config: str) -> dict:
        return runner("compress", config, {"data": data, "train": train})

    def finetune_node(data: dict, train: dict, compress: dict, config: str) -> dict:
        return runner("finetune", config, {"data": data, "train": train, "compress": compress})

    def lower_node(data: dict, finetune: dict, config: str) -> dict:
        return runner("lower", config, {"data": data, "finetune": finetune})

    def evaluate_node(data: dict, lower: dict, config: str) -> dict:
        return runner("evaluate", config, {"data": data, "lower": lower})

    functions = {"data": data_node, "train": train_node, "compress": compress_node, "finetune": finetune_node,
                 "lower": lower_node, "evaluate": evaluate_node}
    decorated = [parameterize(**params(kind))(fn) for kind, fn in functions.items() if by_kind.get(kind)]
    return ad_hoc_utils.create_temporary_module(*decorated, module_name=f"fxopt_pipeline_dag_{next(_MODULE_IDS)}")


def _result_store(path: Path) -> Any:
    from hamilton.caching.stores.base import ResultRetrievalError
    from hamilton.caching.stores.file import FileResultStore

    class CheckedResultStore(FileResultStore):
        """Hamilton's file store, but an unreadable entry is a miss (recomputed), not a crash."""

        def get(self, data_version: str) -> Any:
            try:
                return super().get(data_version)
            except Exception as error:  # noqa: BLE001 - any unpickling failure means a corrupt entry
                raise ResultRetrievalError(f"unreadable cache entry {data_version}: {error}") from error

    return CheckedResultStore(path=str(path))


def execute(task: Task, config: PipelineConfig, out: Path, *, progress: bool = False,
            client: Any = None) -> tuple[list[NodeSpec], dict[str, Any], RunLog]:
    """Run the DAG into ``out`` (``out/artefacts``, hamilton's cache in ``out/.cache``).

    With a `client` (a ``dask.distributed.Client``, or the ``ray`` module after ``ray.init()``), the
    shared nodes (data, train) run here, then each compression branch (its fine-tune, lowerings,
    evaluations) runs as one task on the cluster's workers, all on the one cache and artefact folder
    (a file system the workers share); a last pass here, all cache hits, collects the records.

    Returns:
        The node specs, each node's artefact record, and the run's `RunLog`.

    Raises:
        PipelineError: a corrupted entry could not be repaired in `MAX_REPAIRS` attempts.
    """
    specs = plan_nodes(task, config)
    log = RunLog()
    if client is not None:
        _execute_nodes(task, specs, out, ["data", "train"], log, progress)
        branches: dict[str, list[str]] = {}
        for spec in specs:
            if spec.kind not in ("data", "train"):
                branches.setdefault(_branch(spec, specs), []).append(spec.name)
        for events in _fan_out(client, [(task, specs, str(out), names) for names in branches.values()]):
            for event in events:
                log.add(NodeEvent(**event))
    records = _execute_nodes(task, specs, out, [s.name for s in specs], log, progress)
    return specs, records, log


def _fan_out(client: Any, jobs: list[tuple[Any, ...]]) -> list[list[dict[str, Any]]]:
    """`run_branch` of each job on the cluster's workers, in job order: Dask (``submit`` / ``gather``)
    or Ray (``remote`` / ``get``)."""
    if is_ray(client):
        remote = client.remote(num_cpus=1)(run_branch)
        return client.get([remote.remote(*job) for job in jobs])
    return client.gather([client.submit(run_branch, *job, pure=False) for job in jobs])


def is_ray(client: Any) -> bool:
    """Whether `client` is the ``ray`` module (Ray's executor) rather than a Dask client."""
    return getattr(client, "__name__", "") == "ray" and callable(getattr(client, "remote", None))


def _branch(spec: NodeSpec, specs: list[NodeSpec]) -> str:
    # the compress node a node descends from: one fan-out task per compression branch
    by_name = {s.name: s for s in specs}
    while spec.kind != "compress":
        spec = by_name[spec.deps[{"finetune": "compress", "lower": "finetune", "evaluate": "lower"}[spec.kind]]]
    return spec.name


def run_branch(task: Task, specs: list[NodeSpec], out: str, names: list[str]) -> list[dict[str, Any]]:
    """A fan-out worker's job: run these nodes (and, from the cache, what they need); their events."""
    log = RunLog()
    _execute_nodes(task, specs, Path(out), names, log, progress=False)
    return [vars(e) for e in log.events.values() if e.status != "cache"]


def _execute_nodes(task: Task, specs: list[NodeSpec], out: Path, final: list[str], log: RunLog,
                   progress: bool) -> dict[str, Any]:
    os.environ.setdefault("HAMILTON_TELEMETRY_ENABLED", "false")  # older hamilton releases phoned home
    from hamilton import driver

    for name in ("hamilton.driver", "hamilton.execution.graph_functions"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its help banners; our errors say what failed
    store = ArtefactStore(out / "artefacts")
    inputs = {f"{s.name}__config": json.dumps({**s.config, "node": s.name}, sort_keys=True, default=str) for s in specs}
    reasons: dict[str, str] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(final), desc="fxopt pipeline", unit="node", leave=False)
    try:
        for _ in range(MAX_REPAIRS):
            runner = _Runner(task, store, log, reasons, bar)
            dr = (driver.Builder().with_modules(_hamilton_module(specs, runner))
                  .with_cache(path=str(out / ".cache"), result_store=_result_store(out / ".cache" / "results"),
                              recompute=sorted(reasons) or None)
                  .build())
            try:
                records = dr.execute(final, inputs=inputs)
            except CorruptArtefactError as error:
                reasons = {error.node: f"its cache entry was corrupt: {error}"}
                continue
            except PipelineInterrupted as error:
                raise KeyboardInterrupt(str(error)) from error
            bad = {name: str(_problem(store, record)) for name, record in records.items() if not store.intact(record)}
            if not bad:
                log.events = {s.name: log.events.get(s.name, NodeEvent(s.name, "cache", 0.0, "hamilton cache hit"))
                              for s in specs if s.name in final or s.name in log.events}
                return records
            reasons = {name: f"its cache entry was corrupt: {why}" for name, why in bad.items()}
        raise PipelineError(f"corrupted cache entries kept coming back after {MAX_REPAIRS} repairs: {', '.join(reasons)}; "
                            f"delete {out} and run again")
    finally:
        if bar is not None:
            bar.close()


def _problem(store: ArtefactStore, record: dict[str, Any]) -> str:
    try:
        store.check(record)
    except CorruptArtefactError as error:
        return str(error)
    return ""
