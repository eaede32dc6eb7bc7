"""Fine-tune and quantisation-aware training as pipeline passes.

``finetune`` trains the graph the structural passes left (after slim, prune and BatchNorm folding,
before int8, so int8 calibrates the tuned weights), the model as it was traced teaching; ``qat``
trains the calibrated fake-quantised graph after ``quantize`` (straight-through estimator), its
float twin teaching. Both order themselves like any pass (`after` / `before`), judge their own
result (`fxopt.distill.step.tune_graph`) and leave their report lines in ``gm.meta``
(`NOTES_META`). `fxopt.compile` adds them when ``finetune_steps`` / ``qat_steps`` are set and
gives them its data, loss, recipe and summary table (``CompileContext.finetune``); built with
``data=`` / ``recipe=`` they run in any pipeline.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from torch import nn
from torch.fx import GraphModule

from fxopt.distill.resolve import FinetuneRequest
from fxopt.distill.step import tune_graph
from fxopt.errors import InputError
from fxopt.passes.distill import kept_channels
from fxopt.passes.quantize import float_graph
from fxopt.passinfra.pass_base import FxoptPass, PassResult, current_context, pass_name
from fxopt.passinfra.pass_manager import NOTES_META, PRECISION_META
from fxopt.passinfra.registry import register_pass

__all__ = ["Finetune", "QuantAwareTraining"]


@register_pass
class Finetune(FxoptPass):
    """Fine-tune the graph in place for `steps` optimiser steps, distilling from the traced model.

    Args:
        steps: optimiser steps.
        progress: a progress bar over the steps.
        **request: `FinetuneRequest` fields (``data``, ``loss``, ``recipe``, ``distill``,
            ``eval_fn``, ``lr``, ``seed``, ``teacher``, ``device``) for a pass run outside
            `fxopt.compile`; compile's own request (``CompileContext.finetune``) is used where none
            are given. The graph trains on ``device`` (None: CUDA when available, else the CPU) and
            comes back to the device it came on before the pass returns.

    Example:
        >>> import torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(16, 4)
        >>> data = [((x,), torch.randint(0, 2, (16,)))] * 4
        >>> tune = Finetune(steps=3, data=data, loss=torch.nn.CrossEntropyLoss(), lr=1e-3)
        >>> result = fxopt.PassManager([tune]).run(fxopt.trace(model, x), fxopt.CompileContext.create("cpu", (x,)))
        >>> result.records[0].status, result.graph_module.meta["fxopt_notes"][0].startswith("fine-tune: 3 steps")
        ('applied', True)
    """

    name = "finetune"
    lossy = True
    raises_input_errors = True  # a wrong loss or data stops the compile, as compile's own argument checks do
    stage: ClassVar[str] = "fine-tune"  # its row in compile's summary table: "after fine-tune"
    after = ("canonicalize", "slim", "prune", "fold_batchnorm", "distill")
    before = ("quantize", "strip_distill")

    def __init__(self, steps: int = 100, *, progress: bool = False, **request: Any) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"{self.name}: steps must be an integer >= 1, got {steps!r}")
        unknown = sorted(set(request) - set(FinetuneRequest.__dataclass_fields__))
        if unknown:
            raise InputError(f"{self.name}: unknown option(s) {', '.join(unknown)}; known: steps, progress, "
                             f"{', '.join(FinetuneRequest.__dataclass_fields__)}")
        self.steps, self.progress = steps, progress
        self.request = FinetuneRequest(**request) if request else None

    def options(self) -> dict[str, Any]:
        request = self.request  # read outside the run (no context): the pass's own request, compile's included
        return {"steps": self.steps, "lr": request.lr if request else None, "seed": request.seed if request else 0}

    def _request(self) -> FinetuneRequest | None:
        return self.request if self.request is not None else current_context().finetune

    def teacher(self, gm: GraphModule, request: FinetuneRequest) -> nn.Module:
        """compile's traced model, else (a frozen copy of) the graph as it comes to the pass."""
        return request.teacher if request.teacher is not None else copy.deepcopy(gm).eval()

    def call(self, gm: GraphModule) -> PassResult:
        request = self._request()
        if request is None or (request.data is None and request.recipe is None):
            raise InputError(f"{self.name}: nothing to train on: give compile train_data= (and loss=) or a recipe, "
                             f"or build the pass with data= / recipe=")
        why_not = self.why_not(gm)
        if why_not:
            self.unchanged_reason = why_not
            return PassResult(gm, False)
        teacher = self.teacher(gm, request)
        prunes = [p for p in request.passes if pass_name(p) == "prune" and getattr(p, "plan", None) is not None]
        notes = tune_graph(gm, teacher, request, steps=self.steps, example_inputs=current_context().example_inputs,
                           label=self.stage, stages=request.stages, kept=kept_channels(prunes[0]) if prunes else None,
                           progress=self.progress)
        gm.eval()
        gm.meta[NOTES_META] = [*gm.meta.get(NOTES_META, ()), *notes]
        return PassResult(gm, True)

    def why_not(self, gm: GraphModule) -> str:
        """Why there is nothing to train ("" when there is)."""
        if not any(p.requires_grad for p in gm.parameters()):
            return "the graph has no trainable parameters"
        return ""


@register_pass
class QuantAwareTraining(Finetune):
    """Quantisation-aware training: fine-tune the calibrated fake-quantised graph (straight-through
    estimator), its float twin (the same graph without fake quantisation) teaching. Options as
    `Finetune`'s."""

    name = "qat"
    stage = "QAT"
    after = ("quantize",)
    before = ()

    def teacher(self, gm: GraphModule, request: FinetuneRequest) -> nn.Module:
        return float_graph(gm).eval()  # a copy: the weights this pass trains are not the teacher's

    def why_not(self, gm: GraphModule) -> str:
        if gm.meta.get(PRECISION_META) != "int8":
            return "the graph holds no int8 fake quantisation (the quantize pass kept the float graph): nothing to train through"
        return super().why_not(gm)
