"""One fine-tune of a compiled graph, judged: what the ``finetune`` and ``qat`` pipeline passes run.

The graph is trained in place with `finetune`, its teacher teaching; the learning rate is the
request's, the recipe's or a range test's (`choose_lr`); the result is judged on compile's
summary metrics where there are any, else on batches held back from training (`HeldOutJudge`).
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from fxopt.distill.device import training_device
from fxopt.distill.judge import HeldOutJudge, advice, hold_back, judge_metrics
from fxopt.distill.loop import finetune
from fxopt.distill.lr_range import choose_lr
from fxopt.distill.resolve import FinetuneRequest, resolve
from fxopt.passinfra.pass_manager import SUMMARY_ROW_META

__all__ = ["tune_graph"]


def tune_graph(student: nn.Module, teacher: nn.Module, request: FinetuneRequest, *, steps: int, example_inputs: tuple[Any, ...],
               label: str = "fine-tune", stages: Any = None, kept: dict[str, tuple[int, ...]] | None = None,
               progress: bool = False) -> list[str]:
    """Fine-tune `student` in place for `steps` steps, `teacher` teaching; its report lines.

    Args:
        request: what to train on and how (`FinetuneRequest`: distill, recipe, data, loss, eval_fn,
            lr, seed, device). The graph trains on the request's device and comes back to its own
            (the CPU in compile: ONNX export and verification run there); the judge runs it there.
        label: the step's name in the report (``"fine-tune"``, ``"QAT"``).
        stages: compile's summary table (``rows``, ``eval_fn``, ``metrics``, ``measure(stage, gm)``),
            or None. With an eval_fn it judges the result on the metric of every stage; the step's
            own row ("after <label>") is left in ``student.meta`` for the table, which takes it when
            the step is applied.
        kept: ``{student node: kept teacher channels}`` of a prune run, for feature distillation.
    """
    device = training_device(request.device)
    by_metric = stages is not None and stages.eval_fn is not None
    scalar = by_metric and getattr(stages, "scalar", False)
    setup = resolve(request.distill, teacher=teacher, example_inputs=example_inputs, recipe=request.recipe, data=request.data,
                    loss=request.loss, eval_fn=request.eval_fn if scalar else None, kept=kept, seed=request.seed)
    split = None if by_metric else hold_back(setup.data, request.seed)  # judged on held-back batches: never train on them
    judge = None if split is None else HeldOutJudge(teacher, split, setup.loss)
    if judge is not None:
        before = stages.rows[-1]["stage"] if stages is not None and len(stages.rows) > 1 else "after the passes"
        judge.measure(before, student)
    start = time.perf_counter()
    distilled = setup.distill is not None
    chosen = choose_lr(request.lr, recipe=request.recipe, student=student, data=setup.data, loss=setup.loss,
                       teacher=teacher if distilled else None, distill=setup.distill, steps=steps, seed=request.seed, split=split,
                       device=device)
    kwargs = setup.kwargs() | ({} if split is None else {"data": split.train})
    tuned = finetune(student, **kwargs, teacher=teacher if distilled else None, steps=steps, lr=chosen.lr, progress=progress,
                     seed=request.seed, device=device)
    first, last = (tuned.history[0]["loss"], tuned.history[-1]["loss"]) if tuned.history else (float("nan"),) * 2
    notes = [f"{label}: {tuned.steps_run} steps in {time.perf_counter() - start:.1f} s on {tuned.device}, {tuned.stopped_reason}; "
             f"loss {first:.4g} -> {last:.4g}", f"{label}: {chosen.note()}",
             *[f"{label}: {n}" for n in (*setup.notes, *tuned.notes)]]
    if split is not None and not split.overlaps:
        notes.append(f"{label}: trained without {split.describe()}, kept to judge it (give eval_fn= to train on all)")
    stage_metrics: list[Any] = []
    if stages is not None:  # the row goes into the table when the pass manager applies this step
        row, values = stages.measure(f"after {label}", student)
        student.meta[SUMMARY_ROW_META] = (row, values)
        stage_metrics = [*stages.metrics, *([(row["stage"], values)] if values is not None else [])]
    what_to_try = advice(steps, chosen.lr, chosen.how, distilled, getattr(request.recipe, "finetune_steps", None))
    if judge is None:
        return notes + judge_metrics(stage_metrics, what_to_try)
    judge.measure(f"after {label}", student)
    return notes + judge.lines(what_to_try)
