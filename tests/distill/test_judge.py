"""fxopt.distill.judge: every fine-tune is judged against the input model; far below is a warning naming what to try."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt.distill import (
    HeldOutJudge,
    RecipeBatches,
    TensorBatches,
    agreement,
    hold_back,
    judge_metrics,
)
from fxopt.distill.judge import MAX_DROP_POINTS, points


def test_hold_back_never_trains_on_what_it_judges_on():
    x, y = torch.randn(100, 3), torch.arange(100)
    split = hold_back(TensorBatches(x, y, batch_size=8, seed=3))
    assert isinstance(split.train, TensorBatches) and split.train.seed == 3 and len(split.train.y) == 90
    held = torch.cat([b[1] for b in split.held])
    assert held.tolist() == list(range(90, 100)) and not split.overlaps
    assert set(torch.cat([b[1] for b in split.train]).tolist()).isdisjoint(held.tolist())

    batches = [(torch.full((2, 3), float(i)), torch.zeros(2)) for i in range(40)]
    split = hold_back(batches)
    assert len(split.train) == 36 and [float(b[0][0, 0]) for b in split.held] == [36.0, 37.0, 38.0, 39.0]  # at most 4
    assert split.describe() == "4 held-back batches (8 samples)"

    one_pass = hold_back(iter(batches))  # an iterable of unknown length lends its first batches and says so
    assert one_pass.overlaps and len(one_pass.held) == 2 and "also trained on" in one_pass.describe()
    with pytest.raises(fxopt.InputError, match="no batches"):
        hold_back(iter([]))


def test_a_recipes_held_back_batches_are_other_draws():
    recipe = fxopt.models.spec("safety_supervisor").recipe
    data = RecipeBatches(recipe, seed=0)
    split = hold_back(data)
    assert split.train is data and len(split.held) == 2 and not split.overlaps
    trained_on = next(iter(data))
    assert not torch.equal(split.held[0][0][0], trained_on[0][0])


def test_points_and_the_metric_threshold():
    assert points(0.99, 0.94) == pytest.approx(-5.0) and points(99.0, 94.0) == pytest.approx(-5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # just inside the threshold: no warning
        lines = judge_metrics([("input model", {"acc": 0.90, "motion_error": 0.1}), ("after fine-tune", {"acc": 0.851, "motion_error": 0.9})],
                              "try x")
    assert lines == ["fine-tune judged on acc: input model 0.9000, after fine-tune 0.8510 (-4.9 points vs the input model)",
                     "fine-tune judged on motion_error: input model 0.1000, after fine-tune 0.9000 (+80.0 points vs the input model; "
                     "lower is better, not judged)"]
    with pytest.warns(fxopt.FxoptWarning, match=r"acc is 5.1 points below the input model \(0.9000 -> 0.8490; more than 5\): try x"):
        lines = judge_metrics([("input model", {"acc": 0.90}), ("after fine-tune", {"acc": 0.849})], "try x")
    assert lines[-1].startswith("WARNING: after fine-tune, acc is 5.1 points below") and MAX_DROP_POINTS == 5.0


def test_agreement_needs_class_scores():
    torch.manual_seed(0)
    teacher, other = nn.Linear(4, 5), nn.Linear(4, 5)
    batches = [(torch.randn(64, 4), None)]
    assert agreement(teacher, teacher, batches) == 1.0
    assert agreement(other, teacher, batches) < 0.5
    assert agreement(nn.Linear(4, 1), nn.Linear(4, 1), batches) is None  # one output: nothing to agree on


def test_the_held_out_judge_warns_below_90_percent_agreement_and_falls_back_to_the_task_loss():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 5), nn.Linear(4, 5)
    split = hold_back([(torch.randn(16, 4), torch.randint(0, 5, (16,))) for _ in range(10)])
    judge = HeldOutJudge(teacher, split, nn.CrossEntropyLoss())
    judge.measure("after prune", student)
    judge.measure("after fine-tune", student)
    with pytest.warns(fxopt.FxoptWarning, match="below 90%"):
        lines = judge.lines("try y")
    assert lines[0].startswith("fine-tune judged on top-1 agreement with the input model on 1 held-back batch (16 samples): "
                               "input model 100.0%, after prune ")
    assert lines[1].startswith("WARNING: after fine-tune, the model agrees with the input model on ") and lines[1].endswith("try y")

    regression = HeldOutJudge(nn.Linear(4, 1), hold_back([(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(10)]), nn.MSELoss())
    assert not regression.by_agreement
    regression.measure("after prune", nn.Linear(4, 1))
    regression.measure("after fine-tune", regression.teacher)  # back to the input model's loss: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert regression.lines("try z")[0].startswith("fine-tune judged on the task loss on 1 held-back batch (8 samples): input model ")
