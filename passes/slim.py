"""NAS-slimming: search depth x width x input size under a latency budget, with Optuna.

`Slim` finds its search space in the graph (`fxopt.passes.slim_space`): residual blocks it may
remove (depth; in a net without any, same-shape conv layers when ``"layers"`` is in the space),
a keep ratio per stage over the pruning dependency groups (width; a stage is the groups whose
producers output one spatial size) and the input shapes the user allows (resolution). Each Optuna trial builds one candidate and measures

- its **latency**: the target's estimate (`fxopt.costs.cost_model`) at the compile precision, costed
  on a shape-only build, which is the constraint ``latency <= budget``;
- its **accuracy proxy**: BatchNorm statistics re-estimated on ``calib_data``, then the
  divergence of its outputs from the original model's on those batches (KL at temperature 1
  for 2-D logits, squared error relative to the reference's power for every other float
  output), which is the objective.

The input graph (after the passes before slim) is a candidate too, at divergence 0 from itself:
when it meets the budget it is returned unchanged, and nothing is searched. Otherwise the sampler
is Optuna's TPE with the latency constraint (seeded, so a search is reproducible); any Optuna
storage URL (or a ``.journal`` file path) lets several workers share one study. The pass returns
the feasible trial with the lowest proxy, its BatchNorm statistics re-estimated; a re-rank by
fine-tuning (``finetune_top``) may choose another, and the report then names each less
compressed trial the proxy ranked higher and its score after the same fine-tune.
A study's trials, its Pareto plot and the study itself are written by `CompiledModel.save`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

from fxopt.costs.cost_model import estimate_costs
from fxopt.errors import InputError, PassError
from fxopt.frontend.inputs import describe_shapes, resize_inputs, resize_spatial
from fxopt.frontend.tracing import propagate_shapes
from fxopt.passes.channel_importance import atom_scores
from fxopt.passes.dependency_groups import analyze_dependencies
from fxopt.passes.prune import apply_plan, plan_keep_ratios, shape_only
from fxopt.passes.slim_space import (
    ResidualBlock,
    find_removable_layers,
    find_residual_blocks,
    parse_resolutions,
    remove_blocks,
    stage_of_groups,
)
from fxopt.passinfra.pass_base import FxoptPass, PassResult, current_context
from fxopt.passinfra.pass_manager import FILES_META, INPUT_SHAPES_META
from fxopt.passinfra.registry import register_pass
from fxopt.verification.numerics import (
    flatten_outputs,
    recalibrate_batchnorm,
    run_model,
    update_digest,
)

__all__ = ["OutputMatch", "Slim", "SlimCandidate", "SlimSettings", "latency_range", "output_divergence", "recalibrate_batchnorm"]

DIMENSIONS = ("depth", "width", "resolution")
# searched only when asked for: removing plain layers is not exact, and on the trained pointpillars
# the proxy chose layer removals that a 200-step fine-tune did not recover (bench/results/slim.md)
OPT_IN_DIMENSIONS = ("layers",)
WIDTH_CHOICES = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
SEARCH_TABLE = "slim: search (every trial)"
CHOICE_TABLE = "slim: chosen architecture"
PROXY_BATCHES = 8
MEASURES = ("estimate", "onnxruntime")
ORT_RUNS = 15


def _float_pairs(outputs: Any, reference: Any) -> Any:
    """``(output, reference)`` for each float reference tensor, the output resized to the
    reference's spatial size where only that differs (a candidate at a smaller input).

    Raises:
        ValueError: an output that is not a resize of its reference.
    """
    for o, r in zip(flatten_outputs(outputs), flatten_outputs(reference)):
        if not r.is_floating_point():
            continue
        if o.shape != r.shape:
            if o.dim() != r.dim() or o.dim() < 3 or o.shape[:2] != r.shape[:2] or not o.is_floating_point():
                raise ValueError(f"output of shape {tuple(o.shape)} cannot be compared with the reference's {tuple(r.shape)}")
            o = resize_spatial(o, r.shape[2:])
        yield o, r


def output_divergence(outputs: Any, reference: Any) -> float:
    """How far `outputs` are from `reference`, averaged over their float tensors.

    For 2-D ``(batch, classes)`` logits: ``KL(softmax(reference) || softmax(outputs))`` per
    sample; for every other float tensor: ``mean((o - r)^2) / mean(r^2)``. An output at
    another spatial size (a candidate at a smaller input) is resized to the reference's first.

    Raises:
        ValueError: the outputs cannot be compared (another structure, or shapes that are not
            a resize of the reference's).
    """
    outs, refs = flatten_outputs(outputs), flatten_outputs(reference)
    if len(outs) != len(refs):
        raise ValueError(f"{len(outs)} output tensors vs {len(refs)} in the reference")
    total, n = 0.0, 0
    for o, r in _float_pairs(outs, refs):
        o64, r64 = o.double(), r.double()
        if r64.dim() == 2 and r64.shape[1] > 1:
            total += float(F.kl_div(F.log_softmax(o64, 1), F.log_softmax(r64, 1), log_target=True, reduction="batchmean"))
        else:
            total += float(((o64 - r64) ** 2).mean() / r64.pow(2).mean().clamp_min(1e-12))
        n += 1
    return total / max(n, 1)


class OutputMatch(nn.Module):
    """A differentiable `output_divergence` for distilling any output structure:
    ``mean over float outputs of mean((s - t)^2) / mean(t^2)`` (the student's output resized to
    the teacher's size first where only the spatial dims differ)."""

    def forward(self, student: Any, teacher: Any) -> torch.Tensor:
        try:
            terms = [((s - t) ** 2).mean() / t.pow(2).mean().clamp_min(1e-12) for s, t in _float_pairs(student, teacher)]
        except ValueError as exc:
            raise InputError(f"OutputMatch: {exc}") from None
        return torch.stack(terms).mean()


@dataclass(frozen=True)
class SlimCandidate:
    """One point of the search space.

    Attributes:
        removed_blocks: scopes of the residual blocks removed.
        widths: keep ratio per stage name.
        resolution: index into the allowed input shapes (0: the example inputs' own).
    """

    removed_blocks: tuple[str, ...] = ()
    widths: tuple[tuple[str, float], ...] = ()
    resolution: int = 0

    def describe(self) -> dict[str, Any]:
        return {"removed blocks": len(self.removed_blocks), "widths": " ".join(f"{s}:{r:g}" for s, r in self.widths),
                "resolution": self.resolution}


@dataclass
class _Variant:
    """The graph at one input resolution, with what width plans need."""

    gm: GraphModule
    inputs: tuple[Any, ...]
    shapes: tuple[Any, ...]
    analysis: Any = None
    scores: np.ndarray | None = None
    group_stage: dict[int, str] = field(default_factory=dict)


class _Space:
    """The search space of one graph and the builders of its candidates."""

    def __init__(self, gm: GraphModule, example: tuple[Any, ...], dims: Sequence[str], resolutions: Any,
                 width_choices: Sequence[float], alignment: int, max_ratio: float, measure: str = "estimate") -> None:
        self.gm, self.example, self.dims, self.measure = gm, example, tuple(dims), measure
        self.width_choices, self.alignment, self.max_ratio = tuple(width_choices), alignment, max_ratio
        self.blocks: list[ResidualBlock] = find_residual_blocks(gm) if "depth" in dims else []
        if len({b.scope for b in self.blocks}) != len(self.blocks):  # two blocks in one module: name them by add
            self.blocks = [ResidualBlock(b.add, b.skip, b.body, f"{b.scope}/{b.add}") for b in self.blocks]
        # "layers": a net without residual blocks searches its removable layers instead (see
        # slim_space). A layer's input and output channels are separate prune groups, so its removal
        # comes before the width plan, made on the graph without it (a residual add ties its groups).
        layers = find_removable_layers(gm) if "layers" in dims and not self.blocks else []
        self.layers = bool(layers)
        if self.layers:
            self.blocks = layers
        shapes = [tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in example)]
        if "resolution" in dims and resolutions is not None:
            shapes += [s for s in parse_resolutions(resolutions, example) if s != shapes[0]]
        self.resolutions = shapes
        self._variants: dict[Any, _Variant] = {}
        self.stages: list[str] = []
        if "width" in dims:
            base = self.variant(0)
            self.stages = sorted(set(base.group_stage.values()), key=lambda s: self._stage_order(s))

    @staticmethod
    def _stage_order(stage: str) -> tuple[int, str]:
        return (-math.prod(int(v) for v in stage.split("x")) if stage != "flat" else 0, stage)

    def variant(self, index: int, removed_layers: tuple[str, ...] = ()) -> _Variant:
        """The graph at input shape `index`, without `removed_layers` (layer depth only)."""
        key = (index, removed_layers)
        if key not in self._variants:
            if removed_layers:
                full = self.variant(index)
                gm = copy.deepcopy(full.gm)
                remove_blocks(gm, [b for b in self.blocks if b.scope in set(removed_layers)])
                inputs = full.inputs
            else:
                gm = self.gm if index == 0 else copy.deepcopy(self.gm)
                inputs = self.example if index == 0 else resize_inputs(self.example, self.resolutions[index])
            if index and not removed_layers:
                try:
                    propagate_shapes(gm, inputs)
                except RuntimeError as exc:
                    raise InputError(
                        f"slim: the model cannot take the input shape(s) {describe_shapes(self.resolutions[index])} "
                        f"from resolutions=: {exc}"
                    ) from None
            v = _Variant(gm, inputs, self.resolutions[index])
            if "width" in self.dims:
                v.analysis = analyze_dependencies(gm)
                v.scores = atom_scores(gm, v.analysis, "l1")
                by_root = stage_of_groups(self.gm if key == (0, ()) else gm, v.analysis)
                if key != (0, ()):  # name stages by the example resolution's sizes, matched through producer names
                    base = self.variant(0)
                    stage_by_name = {g.root_names[0]: base.group_stage[g.index] for g in base.analysis.groups}
                    by_root = {g.index: stage_by_name.get(g.root_names[0], by_root[g.index]) for g in v.analysis.groups}
                v.group_stage = by_root
            self._variants[key] = v
        return self._variants[key]

    def _variant_of(self, c: SlimCandidate) -> _Variant:
        return self.variant(c.resolution, tuple(sorted(c.removed_blocks)) if self.layers else ())

    def fingerprint(self) -> str:
        data = {"blocks": [b.scope for b in self.blocks], "stages": self.stages, "measure": self.measure, "widths": self.width_choices,
                "resolutions": [describe_shapes(s) for s in self.resolutions], "nodes": len(self.gm.graph.nodes)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def _pixels(self, index: int) -> int:
        return math.prod(s for x in self.resolutions[index] if x for s in x)

    def smallest(self) -> SlimCandidate:
        res = min(range(len(self.resolutions)), key=self._pixels)
        return SlimCandidate(tuple(b.scope for b in self.blocks), tuple((s, self.width_choices[0]) for s in self.stages), res)

    def uncut(self) -> SlimCandidate:
        """The input graph as a candidate: every block kept, every stage whole, the example's input size."""
        return SlimCandidate((), tuple((s, 1.0) for s in self.stages), 0)

    @staticmethod
    def is_uncut(c: SlimCandidate) -> bool:
        return not c.removed_blocks and all(r >= 1.0 for _, r in c.widths) and c.resolution == 0

    def less_compressed(self, a: SlimCandidate, b: SlimCandidate) -> bool:
        """`a` is another candidate that keeps at least what `b` keeps in every dimension: the blocks
        `b` keeps, each stage's width, and an input at least as large."""
        wa, wb = dict(a.widths), dict(b.widths)
        return (a != b and set(a.removed_blocks) <= set(b.removed_blocks) and self._pixels(a.resolution) >= self._pixels(b.resolution)
                and all(wa.get(s, 1.0) >= wb.get(s, 1.0) for s in self.stages))

    def describe(self, c: SlimCandidate) -> str:
        kind = "layers" if self.layers else "residual blocks"
        parts = [f"{len(c.removed_blocks)} of {len(self.blocks)} {kind} removed"] if {"depth", "layers"} & set(self.dims) else []
        parts += [f"stage widths {' '.join(f'{s}:{r:g}' for s, r in c.widths)}"] if c.widths else []
        return ", ".join(parts + [f"input {describe_shapes(self.resolutions[c.resolution])}"])

    def _plan(self, v: _Variant, c: SlimCandidate) -> np.ndarray | None:
        widths = dict(c.widths)
        if not v.analysis or all(r >= 1.0 for r in widths.values()):
            return None
        ratios = {g.index: widths.get(v.group_stage[g.index], 1.0) for g in v.analysis.groups}
        removed, _ = plan_keep_ratios(v.analysis, v.scores, ratios, alignment=self.alignment, max_ratio=self.max_ratio)
        return removed if removed.any() else None

    def _blocks(self, c: SlimCandidate) -> list[ResidualBlock]:
        """The residual blocks to remove after the width plan (layers are gone from the variant already)."""
        chosen = set(c.removed_blocks)
        return [] if self.layers else [b for b in self.blocks if b.scope in chosen]

    def latency_s(self, c: SlimCandidate, target: Any, precision: str) -> float:
        """The candidate's latency: estimated on a shape-only build, or measured in ONNX Runtime."""
        if self.measure == "onnxruntime":
            from fxopt.backends.onnx import export_onnx
            from fxopt.verification.ort_timing import ort_latencies_ms

            gm, inputs = self.build(c)
            exported = export_onnx(gm, inputs)  # held while timed: a large model's weights stay in its store
            return ort_latencies_ms([exported.model], inputs, runs=ORT_RUNS)[0] / 1e3
        v = self._variant_of(c)
        removed = self._plan(v, c)
        blocks = self._blocks(c)
        if removed is None and not blocks:
            return estimate_costs(v.gm, target, precision).latency_s
        module: Any = shape_only(v.gm, v.analysis, removed if removed is not None else np.zeros(v.analysis.num_atoms, bool)) \
            if v.analysis is not None else _graph_copy(v.gm)
        remove_blocks(module, blocks)
        return estimate_costs(module, target, precision).latency_s

    def build(self, c: SlimCandidate) -> tuple[GraphModule, tuple[Any, ...]]:
        """The candidate with real weights and its inputs. It shares no tensor with the original
        graph: `apply_plan` keeps the tensors it does not slice, so it slices a copy. (Sharing let
        each candidate's BatchNorm re-estimation and re-rank fine-tune write into the graph that
        the later candidates, the teacher and the final build came from.)"""
        v = self._variant_of(c)
        removed = self._plan(v, c)
        gm = apply_plan(copy.deepcopy(v.gm), v.analysis, removed, mode="slice") if removed is not None else copy.deepcopy(v.gm)
        remove_blocks(gm, self._blocks(c))
        return gm, v.inputs


def latency_range(gm: GraphModule, example_inputs: tuple[Any, ...], target: Any, precision: str, *,
                  space: Sequence[str] = DIMENSIONS, resolutions: Any = None, width_choices: Sequence[float] = WIDTH_CHOICES,
                  max_ratio: float = 0.9, measure: str = "estimate") -> tuple[float, float]:
    """``(smallest candidate, input graph)`` latency in seconds for a shape-propagated graph: the
    budgets `Slim` can meet lie between the two."""
    from fxopt.targets import get_target

    profile = get_target(target)
    s = _Space(gm, tuple(example_inputs), space, resolutions, tuple(sorted(width_choices)), profile.alignment(precision),
               max_ratio, measure)
    return s.latency_s(s.smallest(), profile, precision), s.latency_s(SlimCandidate(), profile, precision)


def _input_row(space: _Space, base_s: float, budget_s: float, chosen: bool, extra: Sequence[str] = ()) -> dict[str, Any]:
    """The search table's row for the input graph: a candidate too (divergence 0 from itself), never a trial."""
    return {"trial": "input", "state": "input graph", "est. latency ms": round(base_s * 1e3, 4), "feasible": base_s <= budget_s,
            "proxy": 0.0, **dict.fromkeys(extra), **space.uncut().describe(), "chosen": chosen}


def _ceil_digits(value: float, digits: int) -> float:
    """`value` rounded up to `digits` significant digits (a figure to quote as "at least")."""
    if value <= 0:
        return value
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale - 1e-9) / scale


def _graph_copy(gm: GraphModule) -> Any:
    """A shape-carrying copy of `gm` whose graph can be edited for costing (weights shared)."""
    return GraphModule(gm, copy.deepcopy(gm.graph), type(gm).__name__)


# the pip package of a SQLAlchemy driver whose name differs from its module's
_DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "mysqldb": "mysqlclient", "pymysql": "PyMySQL"}
_STORAGE_FORMS = "an Optuna storage URL (sqlite:///study.db, postgresql://...) or a .journal file path"


def _check_storage(storage: Any) -> None:
    """Refuse, before any work, a storage slim could not open: a path in a missing folder, a URL
    SQLAlchemy cannot parse, an unknown database or a driver that is not installed. Opens nothing.

    Raises:
        InputError: naming the storage (its password hidden) and what to install or fix.
    """
    if storage is None:
        return
    if not isinstance(storage, (str, os.PathLike)):
        try:
            from optuna.storages import BaseStorage
        except ImportError:
            raise InputError("the slim pass searches with Optuna: pip install 'fxopt[slim]' (optuna, matplotlib)") from None
        if not isinstance(storage, BaseStorage):
            raise InputError(f"Slim: storage must be {_STORAGE_FORMS} or an optuna.storages.BaseStorage, got {type(storage).__name__}")
        return
    text = os.fspath(storage)
    if "://" not in text:
        if not text.endswith((".journal", ".log")):
            raise InputError(f"Slim: storage must be {_STORAGE_FORMS}, got {text!r}")
        folder = os.path.dirname(os.path.abspath(text))
        if not os.path.isdir(folder):
            raise InputError(f"Slim: the journal file {text!r} is in {folder!r}, which does not exist: create the folder or give another path")
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(text)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise InputError(f"Slim: storage {_without_password(text)!r} is not a database URL SQLAlchemy can parse ({exc}); give {_STORAGE_FORMS}") from None
    shown = url.render_as_string(hide_password=True)
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise InputError(f"Slim: storage {shown!r} names the database '{url.drivername}', which SQLAlchemy does not know; "
                         f"give {_STORAGE_FORMS}") from None
    try:
        dialect.import_dbapi()
    except ImportError:
        package = _DRIVER_PACKAGES.get(dialect.driver, dialect.driver)
        raise InputError(f"Slim: storage {shown!r} needs the database driver '{dialect.driver}', which is not installed: "
                         f"pip install {package} (or name an installed driver in the URL, e.g. {url.get_backend_name()}+<driver>://)") from None


def _without_password(url: str) -> str:
    """`url` with the password of its ``user:password@`` part shown as ``***`` (for messages)."""
    return re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", url)


def _open_storage(storage: Any) -> Any:
    """The Optuna storage `storage` names (checked by `_check_storage`), opened; ``None`` stays
    ``None`` (a study in memory).

    Raises:
        InputError: the database or journal file cannot be opened (naming it, its password hidden).
    """
    if storage is None or not isinstance(storage, (str, os.PathLike)):
        return storage
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    text = os.fspath(storage)
    try:
        if "://" not in text:
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(text))
        return optuna.storages.RDBStorage(text)
    except (ImportError, OSError, SQLAlchemyError) as exc:
        cause = str(exc).splitlines()[0]
        raise InputError(f"slim: cannot open the Optuna storage {_without_password(text)!r}: {cause}; check that the database is reachable "
                         "and writable (or the journal file's folder), or give another storage") from None


@dataclass(frozen=True)
class SlimSettings:
    """Validated options of `Slim` (each is described in its docstring).

    Example:
        >>> SlimSettings(latency_ratio=0.5, space=["depth", "width"]).space
        ('depth', 'width')
        >>> SlimSettings(trials=0)
        Traceback (most recent call last):
        ...
        fxopt.errors.InputError: Slim: trials must be a positive int, got 0
    """

    latency_ms: float | None = None
    latency_ratio: float | None = None
    trials: int = 40
    space: Sequence[str] = DIMENSIONS
    resolutions: Sequence[Any] | None = None
    seed: int = 0
    storage: Any = None
    study_name: str | None = None
    width_choices: Sequence[float] = WIDTH_CHOICES
    max_ratio: float = 0.9
    measure: str | None = None
    finetune_top: int = 0
    finetune_steps: int = 30
    progress: bool = False

    def __post_init__(self) -> None:
        if self.measure not in (None, *MEASURES):
            raise InputError(f"Slim: measure must be one of {MEASURES} or None (the target's way), got {self.measure!r}")
        space = self.space
        if isinstance(space, str) or not space or any(d not in DIMENSIONS + OPT_IN_DIMENSIONS for d in space):
            raise InputError(f"Slim: space must be a list drawn from {DIMENSIONS + OPT_IN_DIMENSIONS}, got {space!r}")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise InputError(f"Slim: trials must be a positive int, got {self.trials!r}")
        if not self.width_choices or any(not 0 < float(r) <= 1 for r in self.width_choices):
            raise InputError(f"Slim: width_choices must be ratios in (0, 1], got {self.width_choices!r}")
        for key, value in (("latency_ms", self.latency_ms), ("latency_ratio", self.latency_ratio)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise InputError(f"Slim: {key} must be a positive number, got {value!r}")
        if self.latency_ms is not None and self.latency_ratio is not None:
            raise InputError("Slim: give latency_ms= or latency_ratio=, not both")
        _check_storage(self.storage)
        top, steps = self.finetune_top, self.finetune_steps
        if isinstance(top, bool) or not isinstance(top, int) or top < 0 or steps < 1:
            raise InputError(f"Slim: finetune_top must be an int >= 0 and finetune_steps >= 1, got {top!r}, {steps!r}")
        object.__setattr__(self, "space", tuple(space))
        object.__setattr__(self, "width_choices", tuple(sorted(float(r) for r in self.width_choices)))


@register_pass
class Slim(FxoptPass):
    """Search depth x width x input size for the candidate closest to the original model
    under a latency budget (see the module docstring for how candidates are measured).

    Options are given as keywords (``Slim(latency_ratio=0.5, trials=20)``) or as one
    `SlimSettings` (``Slim(SlimSettings(...))``), validated once when the pass is made.

    Args:
        latency_ms: the budget in milliseconds of the target's estimate at the compile precision.
        latency_ratio: the budget as a fraction of the input graph's estimate (e.g. 0.5);
            one of the two is needed (either also as a compile option). An input graph that
            meets the budget is returned unchanged, with the reason in the report.
        trials: Optuna trials this worker runs (the study may hold more, from other workers).
        space: the dimensions searched: any of ``"depth"``, ``"width"``, ``"resolution"``, and
            ``"layers"`` (opt-in): in a net without residual blocks, remove same-shape conv layers
            (see `fxopt.passes.slim_space`; not exact, so the fine-tune must recover them).
        resolutions: input shapes allowed besides the example's (``[(1, 3, 64, 96), ...]``, or
            the spatial part ``[(64, 96)]``); the compile's inputs change to the chosen one.
            Also a compile option.
        seed: seeds the sampler.
        storage: an Optuna storage URL or a ``.journal`` file path, to share one study between
            workers; ``None`` keeps the study in memory (`save` writes it as ``study.db``). Its
            scheme, driver (installed?) and folder are checked here, and it is opened before any
            other work of `call`.
        study_name: the study's name in `storage`.
        width_choices: the keep ratios a stage may take.
        max_ratio: the largest fraction of any group's channels that may go.
        measure: how the constraint's latency is taken: ``"estimate"`` (the target's cost model)
            or ``"onnxruntime"`` (each candidate exported and timed in ONNX Runtime on this CPU,
            median of repeats, one thread); ``None``: measured on an ONNX Runtime target (`cpu`),
            estimated on a TensorRT target.
        finetune_top: re-rank the best few feasible trials (by proxy) after a short fine-tune
            each. Inside a compile that fine-tunes (``finetune_steps=`` with ``recipe=`` or a
            scalar ``eval_fn=``), each is fine-tuned as compile will fine-tune the result (its
            data, loss, distillation and learning rate) for `finetune_steps` steps and scored on
            compile's metric; otherwise `fxopt.finetune` distils the original's outputs on the
            calibration batches (no labels; the last quarter held out) and the proxy on the
            held-out batches decides. The best feasible even cut (every block kept, one width for
            all stages) and the best of the trials removing the fewest blocks or layers are always
            fine-tuned with them: a candidate that narrows one stage hard, or removes layers, can
            lead the proxy and then recover less (bench/results/slim.md,
            bench/results/slim_pointpillars_md.md). 0: the search's proxy alone decides.
        finetune_steps: steps of that fine-tune.
        progress: show a progress bar over trials.
    """

    name = "slim"
    lossy = True
    after = ("canonicalize",)
    before = ("prune", "fold_batchnorm", "quantize", "distill")
    reads_options = ("calib_data", "latency_ms", "latency_ratio", "resolutions")

    def __init__(self, settings: SlimSettings | None = None, **options: Any) -> None:
        super().__init__()
        if settings is not None and options:
            raise InputError(f"Slim: give a SlimSettings or options ({', '.join(options)}), not both")
        if settings is None:
            known = {f.name for f in dataclasses.fields(SlimSettings)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise InputError(f"Slim: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
            settings = SlimSettings(**options)
        self.settings = settings
        self.study: Any = None
        self.chosen: SlimCandidate | None = None

    def options(self) -> dict[str, Any]:
        return {"latency_ms": self.settings.latency_ms, "latency_ratio": self.settings.latency_ratio, "trials": self.settings.trials,
                "space": list(self.settings.space), "resolutions": self.settings.resolutions, "seed": self.settings.seed,
                "storage": None if self.settings.storage is None else str(self.settings.storage), "study_name": self.settings.study_name,
                "measure": self.settings.measure, "finetune_top": self.settings.finetune_top, "finetune_steps": self.settings.finetune_steps}

    # ------------------------------------------------------------------------------------
    def check_options(self, options: Mapping[str, Any], target: Any = None) -> None:
        """Refuse, before any work, a slim these compile options cannot run: no latency budget or
        two, a budget that is not a positive number, no ``calib_data``. `compile` calls it before
        tracing; `call` checks it first too (a pass run on its own).

        Args:
            options: the compile options (`CompileContext.options`).
            target: the compile's `TargetProfile`; these checks hold on every target.

        Raises:
            InputError: naming what is missing or wrong and how to give it.

        Example:
            >>> Slim(latency_ratio=0.5).check_options({"calib_data": [(torch.zeros(1, 3, 8, 8),)]})
            >>> Slim().check_options({"calib_data": [(torch.zeros(1, 3, 8, 8),)]})
            Traceback (most recent call last):
            ...
            fxopt.errors.InputError: slim needs a latency budget: latency_ms= or latency_ratio= (as a Slim option or a compile option)
        """
        self._budget_request(options)
        if not options.get("calib_data"):
            raise InputError("slim needs calib_data=[(x,), ...] for its accuracy proxy (BatchNorm re-estimation and "
                             "the divergence from the original model's outputs on those batches)")

    def _budget_request(self, options: Mapping[str, Any]) -> tuple[float | None, float | None]:
        """``(latency_ms, latency_ratio)``, exactly one given: the pass's own, else the compile option."""
        latency_ms = self.settings.latency_ms if self.settings.latency_ms is not None else options.get("latency_ms")
        ratio = self.settings.latency_ratio if self.settings.latency_ratio is not None else options.get("latency_ratio")
        if latency_ms is None and ratio is None:
            raise InputError("slim needs a latency budget: latency_ms= or latency_ratio= (as a Slim option or a compile option)")
        if latency_ms is not None and ratio is not None:
            raise InputError("slim: give latency_ms= or latency_ratio=, not both")
        for key, value in (("latency_ms", latency_ms), ("latency_ratio", ratio)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise InputError(f"slim: {key} must be a positive number, got {value!r}")
        return latency_ms, ratio

    def _budget_s(self, base_s: float) -> float:
        latency_ms, ratio = self._budget_request(current_context().options)
        return float(latency_ms) / 1e3 if latency_ms is not None else float(ratio) * base_s

    def call(self, graph_module: GraphModule) -> PassResult:
        if importlib.util.find_spec("optuna") is None:
            raise InputError("the slim pass searches with Optuna: pip install 'fxopt[slim]' (optuna, matplotlib)")
        ctx = current_context()
        self.check_options(ctx.options, ctx.target)  # before any work, as is opening the storage: not after the space is built
        storage = _open_storage(self.settings.storage)
        self.study, self.chosen = None, None
        if not any("tensor_meta" in n.meta for n in graph_module.graph.nodes):
            raise InputError("Slim needs shapes on the graph: trace with fxopt.trace(model, example_inputs) or use fxopt.compile")
        resolutions = self.settings.resolutions if self.settings.resolutions is not None else ctx.options.get("resolutions")
        if resolutions is not None and "resolution" not in self.settings.space:
            raise InputError("slim: resolutions= was given but 'resolution' is not in space=")
        target, precision = ctx.target, ctx.precision
        measure = self.settings.measure or ("onnxruntime" if target.backend == "onnxruntime" else "estimate")
        space = _Space(graph_module, ctx.example_inputs, self.settings.space, resolutions, self.settings.width_choices,
                       target.alignment(precision), self.settings.max_ratio, measure)
        base_s = space.latency_s(space.uncut(), target, precision)
        budget_s = self._budget_s(base_s)
        how = "measured in ONNX Runtime" if measure == "onnxruntime" else "estimated"
        if base_s <= budget_s:  # the input is a candidate too, and none is closer to itself
            self.chosen = space.uncut()
            return self._keep_input(graph_module, (
                f"slim: the input graph already meets the latency budget ({how} at {base_s * 1e3:.4g} ms <= budget "
                f"{budget_s * 1e3:.4g} ms on {target.name}, {precision}), so it is returned unchanged; nothing was searched"),
                {SEARCH_TABLE: [_input_row(space, base_s, budget_s, chosen=True)],
                 CHOICE_TABLE: [{"dimension": "latency", "choice": f"the input graph, {base_s * 1e3:.4g} ms {how} (budget "
                                 f"{budget_s * 1e3:.4g} ms, {target.name} {precision}): it meets the budget as it is"}]})
        if not space.blocks and not space.stages and len(space.resolutions) == 1:
            self.unchanged_reason = ("slim found nothing to search: no removable residual block or layer, no prunable channel "
                                     "group and no other input size (resolutions=)")
            return PassResult(graph_module, False)
        floor = space.smallest()
        floor_s = space.latency_s(floor, target, precision)
        if floor_s > budget_s:
            raise InputError(
                f"slim: the latency budget {budget_s * 1e3:.4g} ms on {target.name} ({precision}) is unreachable: it is below "
                f"this search space's floor, {floor_s * 1e3:.4g} ms {how} for its smallest candidate ({space.describe(floor)}; "
                f"the input graph: {base_s * 1e3:.4g} ms); give a budget of at least {_ceil_digits(floor_s * 1e3, 4):g} ms, "
                "or widen space=, width_choices= or resolutions="
            )
        return self._search(graph_module, space, storage, floor, base_s, budget_s)

    def _search(self, graph_module: GraphModule, space: _Space, storage: Any, floor: SlimCandidate, base_s: float,
                budget_s: float) -> PassResult:
        """Run the study and build its choice (the input graph itself where that is the choice)."""
        import optuna

        ctx = current_context()
        batches = [tuple(b) for b in ctx.options["calib_data"][:PROXY_BATCHES]]
        references = [run_model(graph_module, b) for b in batches]
        search = _Search(space, batches, references, ctx.target, ctx.precision, budget_s, base_s)
        latency_ms, ratio = self._budget_request(ctx.options)
        search.budget_asked = f"latency_ms={latency_ms}" if latency_ms is not None else f"latency_ratio={ratio}"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self._study(space, search, storage)
        if not study.trials:  # a new study starts from the smallest candidate and a few uniform widths
            seeds = [floor] + [SlimCandidate((), tuple((s, r) for s in space.stages), 0)
                               for r in self.settings.width_choices[len(self.settings.width_choices) // 2: -1] if space.stages]
            for c in seeds[: self.settings.trials]:
                study.enqueue_trial(search.params_of(c))
        start = time.perf_counter()
        study.optimize(search.objective, n_trials=self.settings.trials, callbacks=search.callbacks(self.settings.progress or False, self.settings.trials))
        search.close()
        self.study = study
        best = search.best(study)
        if best is None:
            raise PassError(self.name, f"no trial met the budget of {budget_s * 1e3:.3g} ms in {len(study.trials)} trials")
        if self.settings.finetune_top:
            best = search.rerank(study, self.settings.finetune_top, self.settings.finetune_steps, graph_module, progress=self.settings.progress,
                                 request=ctx.finetune)
        self.chosen = search.candidate_of(best.params)
        tables = {SEARCH_TABLE: search.rows(study, best),
                  CHOICE_TABLE: search.choice_rows(study, self.chosen, best, base_s, budget_s, time.perf_counter() - start)}
        files = search.files(study, best, self.settings.storage is None)
        if space.is_uncut(self.chosen):  # a trial of the input itself met the budget (a measured latency varies)
            return self._keep_input(graph_module, (
                f"slim: the input graph itself is the best candidate under the latency budget of {budget_s * 1e3:.4g} ms "
                f"(trial {best.number}: {best.user_attrs['latency_ms']:.4g} ms), so it is returned unchanged"), tables, files)
        slim, _ = space.build(self.chosen)
        recalibrate_batchnorm(slim, [resize_inputs(b, space.resolutions[self.chosen.resolution]) for b in batches])
        slim.meta.update({k: v for k, v in graph_module.meta.items() if k not in slim.meta})
        slim.meta["fxopt_tables"] = {**slim.meta.get("fxopt_tables", {}), **tables}  # a new dict: the input's stays its own
        slim.meta[FILES_META] = {**slim.meta.get(FILES_META, {}), **files}
        if self.chosen.resolution:
            slim.meta[INPUT_SHAPES_META] = space.resolutions[self.chosen.resolution]
        return PassResult(slim, True)

    def _keep_input(self, graph_module: GraphModule, reason: str, tables: dict[str, Any],
                    files: Mapping[str, Any] | None = None) -> PassResult:
        """The input graph, unchanged, with `reason` for the report and slim's tables (and files) in its meta."""
        self.unchanged_reason = reason
        graph_module.meta["fxopt_tables"] = {**graph_module.meta.get("fxopt_tables", {}), **tables}
        if files:
            graph_module.meta[FILES_META] = {**graph_module.meta.get(FILES_META, {}), **files}
        return PassResult(graph_module, False)

    def _study(self, space: _Space, search: _Search, storage: Any) -> Any:
        import optuna

        # Optuna 5 reads constraints the objective sets on the trial; older releases take a function
        constraints = {} if hasattr(optuna.trial.Trial, "set_constraint") else {"constraints_func": search.constraints}
        sampler = optuna.samplers.TPESampler(seed=self.settings.seed, n_startup_trials=min(10, max(2, self.settings.trials // 3)), **constraints)
        fingerprint = search.fingerprint()
        name = self.settings.study_name or f"fxopt-slim-{fingerprint}"
        study = optuna.create_study(storage=storage, sampler=sampler, study_name=name,
                                    direction="minimize", load_if_exists=True)
        known = study.user_attrs.get("fxopt_search")
        if known is None:
            study.set_user_attr("fxopt_search", fingerprint)
        elif known != fingerprint:
            raise InputError(f"slim: study '{name}' in {self.settings.storage} was made for another search (model, weights, "
                             "calibration data, target, precision, latency budget or options differ); use another study_name")
        return study


class _Search:
    """The Optuna objective, constraint and outputs of one slim search."""

    def __init__(self, space: _Space, batches: list[tuple[Any, ...]], references: list[Any], target: Any,
                 precision: str, budget_s: float, base_s: float) -> None:
        self.space, self.batches, self.references = space, batches, references
        self.target, self.precision, self.budget_s, self.base_s = target, precision, budget_s, base_s
        self._bar: Any = None
        self.tuned: dict[int, float] = {}  # trial number -> proxy (or -metric) after the short fine-tune
        self.tuned_by = "proxy"  # or "metric": compile's fine-tune scored the re-rank
        self.budget_asked = f"{budget_s * 1e3:.6g} ms"  # the budget as the user gave it (a ratio of a measured latency moves)

    def fingerprint(self) -> str:
        """What a trial's value and constraint depend on: the search space, the weights and calibration
        batches (the proxy), the target, the precision and the latency budget as asked
        (``latency_ratio=0.8``: workers that each measure their base latency, a little differently,
        still share a study; another budget gets its own). Workers sharing a storage share a study only
        where all of these agree."""
        digest = hashlib.sha256(f"{self.space.fingerprint()}|{self.target.name}|{self.precision}|{self.budget_asked}".encode())
        for t in [*self.space.gm.state_dict().values(), *(x for b in self.batches for x in b)]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                update_digest(digest, t)
        return digest.hexdigest()[:16]

    # the search space as Optuna parameters
    def params_of(self, c: SlimCandidate) -> dict[str, Any]:
        removed = set(c.removed_blocks)
        params: dict[str, Any] = {f"depth:{b.scope}": b.scope not in removed for b in self.space.blocks}
        params.update({f"width:{s}": r for s, r in c.widths})
        if len(self.space.resolutions) > 1:
            params["resolution"] = c.resolution
        return params

    @staticmethod
    def is_even(c: SlimCandidate) -> bool:
        """Every block kept and every stage at the same width: a uniform cut."""
        return not c.removed_blocks and len({r for _, r in c.widths}) <= 1

    def candidate_of(self, params: Mapping[str, Any]) -> SlimCandidate:
        removed = tuple(b.scope for b in self.space.blocks if not params.get(f"depth:{b.scope}", True))
        widths = tuple((s, float(params.get(f"width:{s}", 1.0))) for s in self.space.stages)
        return SlimCandidate(removed, widths, int(params.get("resolution", 0)))

    def _suggest(self, trial: Any) -> SlimCandidate:
        params = {f"depth:{b.scope}": trial.suggest_categorical(f"depth:{b.scope}", [True, False]) for b in self.space.blocks}
        params.update({f"width:{s}": trial.suggest_categorical(f"width:{s}", list(self.space.width_choices)) for s in self.space.stages})
        if len(self.space.resolutions) > 1:
            params["resolution"] = trial.suggest_categorical("resolution", list(range(len(self.space.resolutions))))
        return self.candidate_of(params)

    def objective(self, trial: Any) -> float:
        c = self._suggest(trial)
        latency_s = self.space.latency_s(c, self.target, self.precision)
        trial.set_user_attr("latency_ms", latency_s * 1e3)
        trial.set_user_attr("constraint", (latency_s - self.budget_s) * 1e3)
        if hasattr(trial, "set_constraint"):
            trial.set_constraint("latency", (latency_s - self.budget_s) * 1e3)
        return self.proxy(c)

    def proxy(self, c: SlimCandidate) -> float:
        if self.space.is_uncut(c):  # the input graph as it is: re-estimating its BatchNorm would only move it from itself
            return 0.0
        gm, _ = self.space.build(c)
        shapes = self.space.resolutions[c.resolution]
        batches = [resize_inputs(b, shapes) for b in self.batches]
        recalibrate_batchnorm(gm, batches)
        try:
            return float(np.mean([output_divergence(run_model(gm, b), ref) for b, ref in zip(batches, self.references)]))
        except ValueError as exc:
            raise InputError(f"slim: at input {describe_shapes(shapes)} the outputs are not a resize of the original's ({exc}); "
                             "leave that size out of resolutions=") from None

    def shortlist(self, study: Any, top: int) -> list[Any]:
        """The feasible trials the re-rank fine-tunes: the `top` best by proxy, then the best even cut
        and the best of those that remove the fewest blocks or layers, where not among them."""
        ranked = sorted(self.feasible(study), key=lambda t: (t.value, t.number))
        chosen = ranked[:top]
        # an even cut, and the least depth the budget allows: a cut the proxy cannot judge (a
        # removed layer ranks well before fine-tuning and may never recover) always meets one it can
        extra = [next((t for t in ranked if self.is_even(self.candidate_of(t.params))), None)]
        if self.space.blocks and ranked:
            fewest = min(len(self.candidate_of(t.params).removed_blocks) for t in ranked)
            extra.append(next(t for t in ranked if len(self.candidate_of(t.params).removed_blocks) == fewest))
        for t in extra:
            if t is not None and t not in chosen:
                chosen.append(t)
        return chosen

    def rerank(self, study: Any, top: int, steps: int, teacher: GraphModule, progress: bool = False,
               request: Any = None) -> Any:
        """The best of the shortlisted trials after a short fine-tune each: compile's own fine-tune
        (`request`, a `fxopt.distill.FinetuneRequest` with a metric) scored on its metric, else a
        distillation of the original's outputs on the calibration batches scored by the proxy on
        held-out ones. A feasible trial less compressed than the leader that the proxy ranks above
        it is fine-tuned too, until none is left untried (the report names each one passed over)."""
        for t in self.shortlist(study, top):
            self._tune(t, steps, teacher, progress, request)
        if not self.tuned:
            return self.best(study)
        while True:  # a less compressed trial the proxy ranks higher is never passed over untried
            number = min(self.tuned, key=lambda n: (self.tuned[n], n))
            best = next(t for t in study.trials if t.number == number)
            untried = [t for t in self.passed_over(study, best) if t.number not in self.tuned]
            if not untried:
                return best
            self._tune(min(untried, key=lambda t: (t.value, t.number)), steps, teacher, progress, request)

    def _tune(self, t: Any, steps: int, teacher: GraphModule, progress: bool, request: Any) -> None:
        """Fine-tune trial `t`'s candidate briefly and record its score in `tuned` (lower is better)."""
        from fxopt.distill import Distill, finetune

        c = self.candidate_of(t.params)
        gm, _ = self.space.build(c)
        shapes = self.space.resolutions[c.resolution]
        batches = [resize_inputs(b, shapes) for b in self.batches]
        recalibrate_batchnorm(gm, batches)
        if request is not None and request.scores:
            self.tuned[t.number] = -request.tune_and_score(gm, teacher, batches[0], steps, progress=progress)
            self.tuned_by = "metric"
            return
        held = max(1, len(batches) // 4) if len(batches) > 1 else 0
        train, score = (batches[:-held], list(range(len(batches) - held, len(batches)))) if held else (batches, [0])
        finetune(gm, [(b, None) for b in train], loss=None, teacher=teacher, distill=Distill(logits=OutputMatch()),
                 steps=steps, lr=1e-3, progress=progress, device=None if request is None else request.device)
        self.tuned[t.number] = float(np.mean([output_divergence(run_model(gm, batches[i]), self.references[i]) for i in score]))

    def passed_over(self, study: Any, best: Any) -> list[Any]:
        """The feasible trials less compressed than `best` that the proxy ranks above it."""
        chosen = self.candidate_of(best.params)
        return [t for t in self.feasible(study) if t.value < best.value
                and self.space.less_compressed(self.candidate_of(t.params), chosen)]

    @staticmethod
    def constraints(trial: Any) -> tuple[float]:
        return (float(trial.user_attrs.get("constraint", 0.0)),)

    @staticmethod
    def feasible(study: Any) -> list[Any]:
        """The completed trials that met the latency budget."""
        import optuna

        return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("constraint", 1.0) <= 0]

    def best(self, study: Any) -> Any:
        feasible = self.feasible(study)
        return min(feasible, key=lambda t: (t.value, t.number)) if feasible else None

    # progress
    def callbacks(self, show: bool, total: int) -> list[Any]:
        if not show:
            return []
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc="slim", unit="trial", leave=False)

        def tick(study: Any, trial: Any) -> None:
            best = self.best(study)
            if best is not None:
                self._bar.set_postfix_str(f"best proxy {best.value:.4g} at {best.user_attrs['latency_ms']:.3g} ms")
            self._bar.update(1)

        return [tick]

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    # outputs
    def _trial_row(self, t: Any, best: Any) -> dict[str, Any]:
        c = self.candidate_of(t.params)
        tuned = self.tuned.get(t.number)
        return {"trial": t.number, "state": t.state.name.lower(), "est. latency ms": round(t.user_attrs.get("latency_ms", float("nan")), 4),
                "feasible": t.user_attrs.get("constraint", 1.0) <= 0, "proxy": None if t.value is None else round(t.value, 6),
                **({f"{self.tuned_by} after fine-tune": None if tuned is None else round(self._shown(tuned), 6)} if self.tuned else {}),
                **c.describe(), "chosen": t.number == best.number}

    def _shown(self, tuned: float) -> float:
        return -tuned if self.tuned_by == "metric" else tuned

    def rows(self, study: Any, best: Any, with_input: bool = True) -> list[dict[str, Any]]:
        """A row per trial, after the input graph's (a candidate that is never a trial) unless `with_input` is false."""
        tuned = [f"{self.tuned_by} after fine-tune"] if self.tuned else []
        first = [_input_row(self.space, self.base_s, self.budget_s, chosen=False, extra=tuned)] if with_input else []
        return first + [self._trial_row(t, best) for t in study.trials if t.state.name != "WAITING"]

    def choice_rows(self, study: Any, c: SlimCandidate, best: Any, base_s: float, budget_s: float,
                    search_s: float) -> list[dict[str, Any]]:
        how = "measured in ONNX Runtime" if self.space.measure == "onnxruntime" else "estimated"
        rows = [{"dimension": "latency", "choice": f"{best.user_attrs['latency_ms']:.4g} ms {how} (budget {budget_s * 1e3:.4g} ms, "
                 f"input graph {base_s * 1e3:.4g} ms, {self.target.name} {self.precision})"},
                {"dimension": "proxy", "choice": f"{best.value:.4g} (trial {best.number}; search {search_s:.1f} s over "
                 f"{len(study.trials)} trial(s) of the study)"}]
        if best.number in self.tuned:
            how = "compile's fine-tune, its metric" if self.tuned_by == "metric" else "output distillation, proxy on held-out batches"
            rows.append({"dimension": "re-rank", "choice": f"{self.tuned_by} {self._shown(self.tuned[best.number]):.4g} after a short "
                         f"fine-tune ({how}); best of {len(self.tuned)} trial(s)"})
        rows += [self._passed_over_row(t, best) for t in self.passed_over(study, best)]
        removed = set(c.removed_blocks)
        rows += [{"dimension": "depth", "choice": f"{b.scope}: {'removed' if b.scope in removed else 'kept'}"} for b in self.space.blocks]
        rows += [{"dimension": "width", "choice": f"stage {s}: keep {r:g}"} for s, r in c.widths]
        if len(self.space.resolutions) > 1:
            rows.append({"dimension": "resolution", "choice": describe_shapes(self.space.resolutions[c.resolution])})
        return rows

    def _passed_over_row(self, t: Any, best: Any) -> dict[str, Any]:
        """Why the choice is not trial `t`, which is less compressed and ranked above it by the proxy."""
        what = f"trial {t.number} ({self.space.describe(self.candidate_of(t.params))}) is less compressed and its proxy is lower, {t.value:.4g}"
        if t.number not in self.tuned or best.number not in self.tuned:  # `rerank` tunes every one; only it can pass one over
            return {"dimension": "passed over", "choice": f"{what}; no fine-tune score sets it apart (a fault: please report it)"}
        return {"dimension": "passed over", "choice": f"{what}, but after the same short fine-tune its {self.tuned_by} is "
                f"{self._shown(self.tuned[t.number]):.4g} against the chosen's {self._shown(self.tuned[best.number]):.4g}"}

    def files(self, study: Any, best: Any, in_memory: bool) -> dict[str, Any]:
        rows = self.rows(study, best, with_input=False)  # the study's trials, as another worker's copy of the study holds them
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        files: dict[str, Any] = {"trials.csv": text.getvalue(), "pareto.png": _pareto_png(study, best, self.base_s * 1e3)}
        if in_memory:
            files["study.db"] = _study_bytes(study)
        return files


def _pareto_front(points: list[tuple[float, float]]) -> list[int]:
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_proxy = [], math.inf
    for i in order:
        if points[i][1] < best_proxy:
            front.append(i)
            best_proxy = points[i][1]
    return front


def _pareto_png(study: Any, best: Any, input_ms: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    trials = [t for t in study.trials if t.value is not None and "latency_ms" in t.user_attrs]
    points = [(t.user_attrs["latency_ms"], t.value) for t in trials]
    front = _pareto_front(points)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, c="#999999", label="trials")
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "o-", c="#1f77b4", ms=4, label="Pareto front")
    ax.scatter([best.user_attrs["latency_ms"]], [best.value], s=90, marker="*", c="#d62728", zorder=3, label="chosen")
    ax.scatter([input_ms], [0.0], s=40, marker="s", c="#2ca02c", zorder=3, label="input graph")
    budget = best.user_attrs["latency_ms"] - best.user_attrs["constraint"]
    ax.axvline(budget, ls="--", c="#d62728", lw=1, label="budget")
    ax.set_xlabel("estimated latency (ms)")
    ax.set_ylabel("accuracy proxy (divergence, lower is better)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", metadata={"Software": None})
    plt.close(fig)
    return out.getvalue()


def _study_bytes(study: Any) -> bytes:
    import optuna

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "study.db")
        optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage, to_storage=f"sqlite:///{path}")
        with open(path, "rb") as f:
            return f.read()
