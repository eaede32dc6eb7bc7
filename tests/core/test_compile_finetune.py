"""`fxopt.compile(..., train_data=, loss=, finetune_steps=, distill=)`: fine-tuning after the lossy
passes, before lowering, with the traced original as teacher."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import fxopt
from fxopt.distill import LR_CANDIDATES, Distill, LogitKD, TensorBatches
from fxopt.passes import PruneChannels


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


X = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    Y = net()(X).argmax(dim=1)  # labels the net can learn back after pruning: its own predictions


def compile_pruned(**kw):
    return fxopt.compile(net(), "cpu", example_inputs=(X[:1],), passes=[PruneChannels(amount=0.5, by="flops", round_to=1)], **kw)


def test_finetune_with_distillation_trains_the_pruned_graph_before_lowering():
    plain = compile_pruned()
    tuned = compile_pruned(train_data=TensorBatches(X, Y, batch_size=16), loss=nn.CrossEntropyLoss(),
                           finetune_steps=15, finetune_lr=1e-2, distill=Distill(logits=LogitKD(2.0)))
    line = next(n for n in tuned.report.notes if n.startswith("fine-tune: 15 steps"))
    first, last = (float(v) for v in line.rsplit("loss ", 1)[1].split(" -> "))
    assert last < first
    changed = [not torch.equal(a, b) for a, b in zip(plain.graph_module.state_dict().values(), tuned.graph_module.state_dict().values())]
    assert any(changed)
    assert tuned.report.onnx["max_abs_error_vs_torch"] < 1e-4  # the ONNX file is the tuned graph
    assert "finetune" not in {n.name for n in tuned.onnx_model.graph.node}


def test_finetune_requests_are_checked_before_work():
    with pytest.raises(fxopt.InputError, match="finetune_steps needs train_data="):
        compile_pruned(finetune_steps=5)
    with pytest.raises(fxopt.InputError, match="finetune_steps needs train_data="):
        compile_pruned(finetune_steps=5, train_data=TensorBatches(X, Y, batch_size=16))


def test_distill_by_name_picks_the_output_kd_form():
    tuned = compile_pruned(train_data=TensorBatches(X, Y, batch_size=16), loss=nn.CrossEntropyLoss(),
                           finetune_steps=5, finetune_lr=1e-2, distill="kd", export=False)
    assert "fine-tune: output KD: LogitKD(T=4) on the class logits" in tuned.report.notes
    with pytest.raises(fxopt.InputError, match="distill must name"):
        compile_pruned(train_data=TensorBatches(X, Y, batch_size=16), loss=nn.CrossEntropyLoss(),
                       finetune_steps=5, distill="kdd", export=False)


def test_finetune_seed_repeats_a_fine_tune_exactly_and_another_seed_draws_other_batches():
    spec = fxopt.models.spec("safety_supervisor")
    model = fxopt.models.create("safety_supervisor").eval()
    inputs = fxopt.models.example_inputs("safety_supervisor")

    def tuned(seed):
        compiled = fxopt.compile(model, "cpu", example_inputs=inputs, passes=[], recipe=spec.recipe, finetune_steps=4,
                                 finetune_lr=1e-2, finetune_seed=seed, export=False, safety="off")
        line = next(n for n in compiled.report.notes if n.startswith("fine-tune: 4 steps"))
        return line.rsplit("loss ", 1)[1]  # first and last training loss: which batches were drawn

    first, again, other = tuned(0), tuned(0), tuned(1)
    assert first == again and first != other


def test_the_default_rate_is_a_range_test_and_a_recipe_gives_its_own():
    assert inspect.signature(fxopt.compile).parameters["finetune_lr"].default is None
    tuned = compile_pruned(train_data=TensorBatches(X, Y, batch_size=16), loss=nn.CrossEntropyLoss(), finetune_steps=10, export=False)
    line = next(n for n in tuned.report.notes if n.startswith("fine-tune: lr "))
    assert "chosen by a range test (5 steps per rate" in line and all(f"{lr:g}: " in line for lr in LR_CANDIDATES)

    spec = fxopt.models.spec("safety_supervisor")
    recipe = dataclasses.replace(spec.recipe, finetune_lr=2e-3)
    compiled = fxopt.compile(fxopt.models.create("safety_supervisor").eval(), "cpu", example_inputs=fxopt.models.example_inputs("safety_supervisor"),
                             passes=[], recipe=recipe, finetune_steps=2, export=False, safety="off")
    assert "fine-tune: lr 0.002 (the recipe's)" in compiled.report.notes


def test_every_fine_tune_is_judged_on_held_back_batches_without_eval_data():
    tuned = compile_pruned(train_data=TensorBatches(X, Y, batch_size=16), loss=nn.CrossEntropyLoss(), finetune_steps=10,
                           finetune_lr=1e-2, export=False)
    assert "fine-tune: trained without 1 held-back batch (6 samples), kept to judge it (give eval_fn= to train on all)" in tuned.report.notes
    line = next(n for n in tuned.report.notes if n.startswith("fine-tune judged on top-1 agreement"))
    stages = line.split(": ", 1)[1]
    assert stages.startswith("input model 100.0%, after prune ") and ", after fine-tune " in stages


def test_a_fine_tune_left_far_below_the_input_model_warns_and_says_what_to_try():
    def eval_fn(gm):  # the input model scores 0.99, any pruned graph 0.5: 49 points down whatever the fine-tune does
        return 0.99 if sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in net().parameters()) else 0.5

    with pytest.warns(fxopt.FxoptWarning, match="49.0 points below the input model"):
        tuned = compile_pruned(train_data=TensorBatches(X, Y, batch_size=16), loss=nn.CrossEntropyLoss(), finetune_steps=3,
                               finetune_lr=1e-3, eval_fn=eval_fn, export=False)
    assert ("fine-tune judged on metric: input model 0.9900, after prune 0.5000, after fine-tune 0.5000 "
            "(-49.0 points vs the input model)") in tuned.report.notes
    warning = next(n for n in tuned.report.notes if n.startswith("WARNING: after fine-tune, metric"))
    assert "more finetune_steps (ran 3)" in warning and "a higher finetune_lr (ran 0.001, given)" in warning
    assert "distill='kd'" in warning and "milder compression budget" in warning
    # with eval data nothing is held back: the fine-tune trains on every batch
    assert not any("held-back" in n for n in tuned.report.notes)


def test_a_fine_tune_rolled_back_after_measuring_itself_leaves_no_row():
    from fxopt.compiler import _Summary
    from fxopt.passes import Finetune

    class FailsAfterTuning(Finetune):
        def call(self, gm):
            super().call(gm)
            raise RuntimeError("a check after the fine-tune failed")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(16, 8)
    data = [((x,), torch.randint(0, 4, (16,)))] * 4
    summary = _Summary(fxopt.get_target("cpu"), "fp32", lambda m: 0.5)
    gm = fxopt.trace(model, (x,))
    summary.add("input model", gm)
    tune = FailsAfterTuning(steps=2, data=data, loss=nn.CrossEntropyLoss(), lr=1e-3, stages=summary, teacher=gm)
    good = Finetune(steps=2, data=data, loss=nn.CrossEntropyLoss(), lr=1e-3, stages=summary, teacher=gm)
    ctx = fxopt.CompileContext.create("cpu", (x,))
    result = fxopt.PassManager([tune], on_applied=summary.after_pass).run(gm, ctx)
    assert result.records[0].status == "rolled_back"
    assert [r["stage"] for r in summary.rows] == ["input model"]
    fxopt.PassManager([good], on_applied=summary.after_pass).run(gm, ctx)
    assert [r["stage"] for r in summary.rows] == ["input model", "after fine-tune"]
