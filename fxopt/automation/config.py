"""The pipeline's options, validated once into a frozen `PipelineConfig`, and its variants."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import fxopt
import fxopt.distill
from fxopt.automation.errors import PipelineConfigError

__all__ = ["PipelineConfig", "Variant"]

COMPRESS_METHODS = ("prune", "slim")


@dataclass(frozen=True)
class Variant:
    """One branch of the DAG: a latency budget, a precision and a target."""

    latency_ratio: float
    precision: str
    target: str

    @property
    def compress_tag(self) -> str:
        """The tag of the nodes this variant shares with every precision (compress, fine-tune)."""
        return f"r{round(self.latency_ratio * 100):03d}_{self.target}"

    @property
    def tag(self) -> str:
        return f"{self.compress_tag}_{self.precision}"


@dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline runs.

    Attributes:
        latency_ratios: budgets as fractions of the trained model's estimated latency on each
            target; 1.0 keeps the architecture. One compress/fine-tune branch each.
        precisions: deployment precisions (``"int8"`` by post-training calibration, ``"fp16"``, ...).
        targets: fxopt targets (``"xavier"``, ``"orin"``, ``"cpu"``).
        data_seed: seeds data production and training.
        calib_batches: int8 calibration batches drawn by the data node.
        train_steps: training steps (None: the recipe's default; a user task's own setting).
        compress: ``"prune"`` (uniform structured pruning to the latency budget) or ``"slim"``
            (Optuna NAS over depth/width under the budget; `slim_trials` trials).
        slim_trials: trials of a slim search.
        slim_storage: an Optuna storage URL (``sqlite:///studies.db``, ``postgresql://...``) or a
            ``.journal`` file path that every worker reaches: slim searches of the same model, data,
            target and budget share one study there (a fan-out's workers, or reruns), each adding its
            trials; None: each search keeps its own study in memory.
        finetune_steps: fine-tune steps after compression with distillation from the trained
            model (0: none).
        finetune_lr: its learning rate (None: the recipe's, else a short range test).
        distill: what to distil (``"kd"``, ``"ickd"``, ``None`` for labels only); see
            `fxopt.distill.resolve`.
        finetune_seed: seeds the fine-tune (and QAT).
        qat_steps: int8 by quantisation-aware training: steps through the calibrated fake-quantised
            graph (`fxopt.compile`'s ``qat_steps``, the float model teaching with `distill`) before
            lowering; 0: post-training calibration only (PTQ).
        device: where training, the fine-tune and QAT run (``"cpu"``, ``"cuda"``, ``"cuda:1"``); None:
            CUDA when available, else the CPU. Compression, int8 calibration, lowering and the
            evaluation of the deployed file run on the CPU. The nodes that train fingerprint the
            device they ran on (and the GPU's name): a CPU and a GPU give slightly different floats.

    Example:
        >>> [v.tag for v in PipelineConfig(latency_ratios=(1.0, 0.7)).variants()]
        ['r100_xavier_int8', 'r070_xavier_int8']
    """

    latency_ratios: tuple[float, ...] = (1.0,)
    precisions: tuple[str, ...] = ("int8",)
    targets: tuple[str, ...] = ("xavier",)
    data_seed: int = 0
    calib_batches: int = 8
    train_steps: int | None = None
    compress: str = "prune"
    slim_trials: int = 20
    slim_storage: str | None = None
    finetune_steps: int = 100
    finetune_lr: float | None = None
    distill: str | None = "kd"
    finetune_seed: int = 0
    qat_steps: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("latency_ratios", "precisions", "targets"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(value) if isinstance(value, (list, tuple)) else (value,))
            if not getattr(self, name):
                raise PipelineConfigError(f"{name} is empty; give at least one")
        for ratio in self.latency_ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio <= 1:
                raise PipelineConfigError(f"latency ratio {ratio!r} must be a number in (0, 1], e.g. 0.5 for half the latency")
        for target in self.targets:
            try:
                profile = fxopt.get_target(target)
            except fxopt.FxoptError as error:
                raise PipelineConfigError(str(error)) from None
            for precision in self.precisions:
                if precision not in profile.precisions:
                    raise PipelineConfigError(f"precision '{precision}' is not one of target '{target}''s: "
                                              f"{', '.join(profile.precisions)}")
        if self.compress not in COMPRESS_METHODS:
            raise PipelineConfigError(f"compress='{self.compress}' is not one of {', '.join(COMPRESS_METHODS)}")
        for name in ("calib_batches", "slim_trials"):
            if getattr(self, name) < 1:
                raise PipelineConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("finetune_steps", "train_steps", "qat_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise PipelineConfigError(f"{name} must be >= 0, got {value}")
        self.training_device()  # a device this host does not have: refused before any work
        if self.slim_storage is not None:
            if self.compress != "slim":
                raise PipelineConfigError(f"slim_storage is for compress='slim' (got compress='{self.compress}')")
            try:
                fxopt.create_pass("slim", storage=self.slim_storage)  # the storage's form, driver and folder, checked now
            except fxopt.FxoptError as error:
                raise PipelineConfigError(str(error)) from None

    def training_device(self) -> dict[str, str]:
        """``{"device": name, "device_name": with the GPU's name}``: where the training nodes run,
        resolved (None: CUDA when available, else the CPU), as their configuration records it.

        Example:
            >>> PipelineConfig(device="cpu").training_device()
            {'device': 'cpu', 'device_name': 'cpu'}
        """
        try:
            device = fxopt.distill.training_device(self.device)
        except fxopt.InputError as error:
            raise PipelineConfigError(str(error)) from None
        return {"device": str(device), "device_name": fxopt.distill.describe_device(device)}

    @classmethod
    def from_options(cls, **options: Any) -> PipelineConfig:
        """A config from keyword options; an unknown one is a `PipelineConfigError` naming the known."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise PipelineConfigError(f"unknown pipeline option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)

    def variants(self) -> list[Variant]:
        """Every (latency ratio, precision, target) branch, in the order given."""
        return [Variant(float(r), p, t) for t in self.targets for r in self.latency_ratios for p in self.precisions]
