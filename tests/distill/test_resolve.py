"""fxopt.distill.resolve: compile's distill="kd" | "ickd" | [...] and recipe= become finetune arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.distill import (
    ICKD,
    Distill,
    FeatureMSE,
    LogitKD,
    OutputKD,
    SigmoidKD,
    TensorBatches,
    finetune,
    resolve,
)
from fxopt.models.digits import DigitsCNN, fit, load_digits_split
from fxopt.passes import PruneChannels
from fxopt.passes.distill import kept_channels

SPLIT = load_digits_split(seed=0)
X = SPLIT.x_train[:8]


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(3, 8, 3, padding=1)
        self.heatmap, self.box, self.seg = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = torch.relu(self.trunk(x))
        return {"heatmap": self.heatmap(f), "box": self.box(f), "seg": self.seg(f)}


def test_kd_and_ickd_on_a_pruned_classifier_train_end_to_end():
    teacher = DigitsCNN(width=8)
    fit(teacher, SPLIT.x_train, SPLIT.y_train, epochs=2, seed=0)
    prune = PruneChannels(amount=0.5, by="flops", round_to=1)
    student = fxopt.compile(teacher, "cpu", example_inputs=(X,), export=False, passes=[prune]).graph_module
    data = TensorBatches(SPLIT.x_train, SPLIT.y_train, batch_size=32)
    setup = resolve(["kd", "ickd"], teacher=teacher, example_inputs=(X,), data=data, loss=nn.CrossEntropyLoss(),
                    kept=kept_channels(prune))
    d = setup.distill
    assert isinstance(d.logits, LogitKD) and d.logits.temperature == 4.0
    assert isinstance(d.feature_loss, ICKD) and d.features == "stages" and d.feature_weight == 100.0
    assert d.kept == kept_channels(prune) and len(setup.notes) == 2
    r = finetune(student, **setup.kwargs(), teacher=teacher, steps=5, lr=1e-3, progress=False)
    assert {"task", "logits", "features"} <= set(r.history[0]) and r.stopped_reason == "completed"


def test_kd_on_a_multi_head_model_picks_a_loss_per_named_head():
    heads = _Heads().eval()
    setup = resolve("kd", teacher=heads, example_inputs=(torch.randn(1, 3, 8, 8),), data=[], loss=None)
    kd = setup.distill.logits
    assert isinstance(kd, OutputKD) and kd.keys == ("heatmap", "seg")
    assert isinstance(kd.losses[0], SigmoidKD) and isinstance(kd.losses[1], LogitKD)
    assert kd.weights == (500.0, 1.0)
    assert setup.notes == ("output KD: heatmap: SigmoidKD x 500, seg: LogitKD x 1; not distilled: box",)
    assert not heads.training  # the teacher's mode is left as it was


def test_a_recipe_supplies_data_loss_and_eval_and_given_ones_win():
    recipe = fxopt.models.spec("camera_multitask").recipe
    setup = resolve(None, teacher=nn.Identity(), example_inputs=(), recipe=recipe)
    assert setup.loss is recipe.loss and setup.distill is None and callable(setup.eval_fn)
    inputs, target = next(iter(setup.data))
    assert inputs[0].shape[1:] == (3, 96, 160)
    mine = nn.MSELoss()
    assert resolve(None, teacher=nn.Identity(), example_inputs=(), recipe=recipe, loss=mine).loss is mine


def test_mse_alone_regresses_the_trunk_stages_without_output_kd():
    setup = resolve("mse", teacher=nn.Identity(), example_inputs=(), data=[], loss=nn.CrossEntropyLoss())
    d = setup.distill
    assert d.logits is None and isinstance(d.feature_loss, FeatureMSE) and d.features == "stages"
    assert setup.notes == ("features: FitNets MSE, weight 1, on the trunk stages",)


def test_a_distill_is_used_as_given_with_kept_filled_in():
    given = Distill(logits=LogitKD(2.0))
    setup = resolve(given, teacher=nn.Identity(), example_inputs=(), data=[], kept={"a": (0,)})
    assert setup.distill.logits is given.logits and setup.distill.kept == {"a": (0,)}


def test_bad_requests_are_input_errors():
    kw = {"teacher": nn.Linear(2, 2), "example_inputs": (torch.randn(1, 2),), "data": []}
    with pytest.raises(fxopt.InputError, match="some of"):
        resolve("crd", **kw)
    with pytest.raises(fxopt.InputError, match="name one"):
        resolve(["ickd", "mse"], **kw)
    with pytest.raises(fxopt.InputError, match="train_data"):
        resolve("kd", teacher=nn.Linear(2, 2), example_inputs=(torch.randn(1, 2),))
    with pytest.raises(fxopt.InputError, match="loss="):
        resolve(None, **kw)
    with pytest.raises(fxopt.InputError, match="no output named"):
        resolve("kd", teacher=nn.Identity(), example_inputs=({"risk": torch.zeros(1)},), data=[])


def test_kd_with_a_recipe_uses_the_recipes_own_output_kd():
    # what bench/slim.py needed to meet its goal (SigmoidKD heatmap, LogitKD(2) seg, FeatureMSE box) is what distill="kd" gives
    for recipe in (fxopt.models.recipe("camera_multitask"), fxopt.models.recipe("camera_multitask", preset="md")):
        setup = resolve("kd", teacher=_Heads().eval(), example_inputs=(torch.randn(1, 3, 8, 8),), recipe=recipe)
        kd = setup.distill.logits
        assert kd is recipe.distill.logits and kd.keys == ("heatmap", "seg", "box")
        assert setup.notes == ("output KD: the recipe's OutputKD(heatmap: SigmoidKD x 1, seg: LogitKD x 1, box: FeatureMSE x 1)",)
        assert (recipe.finetune_lr, recipe.finetune_steps) == (5e-4, 400)
    pp = fxopt.models.recipe("pointpillars", preset="md")
    assert pp.distill.logits.keys == (0, 1) and pp.finetune_lr == 5e-4 and pp.bn_batches > 0
    # without a recipe (or with one that carries none) the form still follows the outputs' names
    plain = resolve("kd", teacher=_Heads().eval(), example_inputs=(torch.randn(1, 3, 8, 8),), data=[], loss=None)
    assert plain.distill.logits.keys == ("heatmap", "seg")
