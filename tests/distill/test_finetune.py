"""fxopt.finetune: trains pruned and fake-quantised graphs, distils, keeps the best state, stops on NaN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.distill import ICKD, Distill, FeatureMSE, LogitKD, TensorBatches, finetune
from fxopt.models.digits import DigitsCNN, accuracy, fit, load_digits_split
from fxopt.passes import PruneChannels, QuantizeInt8
from fxopt.passes.distill import kept_channels

SPLIT = load_digits_split(seed=0)
X = SPLIT.x_train[:8]


@pytest.fixture(scope="module")
def teacher():
    model = DigitsCNN(width=8)
    fit(model, SPLIT.x_train, SPLIT.y_train, epochs=3, seed=0)
    return model


def _pruned(teacher, prune=None):
    prune = prune or PruneChannels(amount=0.6, by="flops", round_to=1)
    return fxopt.compile(teacher, "cpu", example_inputs=(X,), export=False, passes=[prune]).graph_module


def _data(seed=0):
    return TensorBatches(SPLIT.x_train, SPLIT.y_train, batch_size=64, seed=seed)


def test_fxopt_finetune_is_the_lazy_attribute():
    assert fxopt.finetune is finetune


def test_pruned_graph_learns_and_runs_repeat_exactly(teacher):
    student = _pruned(teacher)
    code = student.code
    before = accuracy(student, SPLIT.x_test, SPLIT.y_test)
    r = finetune(student, _data(), loss=nn.CrossEntropyLoss(), steps=40, lr=3e-3, progress=False)
    again = _pruned(teacher)
    r2 = finetune(again, _data(), loss=nn.CrossEntropyLoss(), steps=40, lr=3e-3, progress=False)
    assert r.stopped_reason == "completed" and r.steps_run == 40
    assert [h["loss"] for h in r.history] == [h["loss"] for h in r2.history]
    assert sum(h["loss"] for h in r.history[-5:]) < sum(h["loss"] for h in r.history[:5])
    assert accuracy(student, SPLIT.x_test, SPLIT.y_test) > before
    assert student.code == code and not student.training


def test_fake_quantised_graph_trains_through_the_straight_through_estimator(teacher):
    calib = [(SPLIT.x_train[i:i + 8],) for i in range(0, 32, 8)]
    gm = fxopt.compile(teacher, "xavier", example_inputs=(X,), precision="int8", calib_data=calib, export=False,
                       passes=[QuantizeInt8(keep_faster=False)]).graph_module
    from fxopt.passes.quant_observers import WEIGHT_FAKE_QUANT, FakeQuantize

    assert any(isinstance(m, FakeQuantize) for m in gm.modules())
    assert any(isinstance(m, WEIGHT_FAKE_QUANT) for m in gm.modules())
    # start from a damaged copy so there is something to win back
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.abs().mean())
    r = finetune(gm, _data(), loss=nn.CrossEntropyLoss(), steps=40, lr=2e-3, progress=False)
    losses = [h["loss"] for h in r.history]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert any(isinstance(m, FakeQuantize) for m in gm.modules())  # still the fake-quantised graph


def test_logit_and_feature_distillation_with_adapters_and_kept_indices(teacher):
    student = _pruned(teacher)
    code, names = student.code, set(student.state_dict())
    d = Distill(logits=LogitKD(4.0), features="stages", feature_loss=ICKD((1, 2)), feature_weight=2.0)
    r = finetune(student, _data(), loss=nn.CrossEntropyLoss(), teacher=teacher, distill=d, steps=10, lr=1e-3, progress=False)
    assert {"task", "logits", "features"} <= set(r.history[0])
    assert r.history[0]["features"] > 0
    assert student.code == code and set(student.state_dict()) == names  # no adapter, no hook left behind

    prune = PruneChannels(amount=0.6, by="flops", round_to=1)
    student = _pruned(teacher, prune)
    kept = kept_channels(prune)
    d = Distill(features=["features_0_2", "features_1_2"], feature_loss=FeatureMSE(), kept=kept)
    t_graph = fxopt.compile(teacher, "cpu", example_inputs=(X,), export=False).graph_module
    r = finetune(student, _data(), loss=None, teacher=t_graph, distill=d, steps=30, lr=3e-3, progress=False)
    feats = [h["features"] for h in r.history]
    assert set(r.history[0]) == {"step", "loss", "features"}
    assert sum(feats[-5:]) < sum(feats[:5])


def test_best_state_is_restored_and_said(teacher):
    student = _pruned(teacher)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    calls = iter(range(100))
    r = finetune(student, _data(), loss=nn.CrossEntropyLoss(), steps=6, lr=1e-2, eval_every=2,
                 eval_fn=lambda m: -float(next(calls)), progress=False)  # every evaluation is worse
    assert r.evals == [(0, -0.0), (2, -1.0), (4, -2.0), (6, -3.0)]
    assert (r.best_step, r.best_metric) == (0, 0.0)
    assert "restored the state of step 0" in r.notes[0]
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, start[k])


def test_non_finite_loss_stops_and_restores(teacher):
    student = _pruned(teacher)
    ce = nn.CrossEntropyLoss()
    seen = []

    def loss(out, y):
        seen.append(1)
        return ce(out, y) * (float("nan") if len(seen) == 5 else 1.0)

    with pytest.warns(fxopt.FxoptWarning, match="non-finite loss"):
        r = finetune(student, _data(), loss=loss, steps=10, lr=1e-3, eval_every=2, progress=False)
    assert r.stopped_reason == "non-finite loss (nan) at step 5"
    assert r.steps_run == 4 and r.best_step == 4
    assert "restored the last finite checkpoint (step 4)" in r.summary()
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_bad_requests_are_input_errors(teacher):
    student = _pruned(teacher)
    with pytest.raises(fxopt.InputError, match="needs a teacher"):
        finetune(student, _data(), loss=None, distill=Distill(logits=LogitKD()), steps=1, lr=1e-3)
    with pytest.raises(fxopt.InputError, match="exhausted"):
        finetune(student, iter([(X, SPLIT.y_train[:8])]), loss=nn.CrossEntropyLoss(), steps=3, lr=1e-3, progress=False)
    with pytest.raises(fxopt.InputError, match="nothing to train"):
        finetune(student, _data(), loss=None, steps=1, lr=1e-3)
    with pytest.raises(fxopt.InputError, match="GraphModule"):
        finetune(DigitsCNN(width=8), _data(), loss=None, teacher=teacher,
                 distill=Distill(features="stages", feature_loss=ICKD()), steps=1, lr=1e-3)


def test_a_bundled_recipe_stands_in_for_data_loss_and_eval():
    recipe = fxopt.models.spec("safety_supervisor").recipe
    torch.manual_seed(0)
    model = fxopt.models.spec("safety_supervisor").build()
    before = recipe.evaluate(model.eval())["accuracy"]
    r = finetune(model, recipe=recipe, steps=20, lr=3e-3, eval_every=10, progress=False)
    assert [step for step, _ in r.evals] == [0, 10, 20]
    assert r.evals[0][1] == pytest.approx(before)  # the recipe's first metric, accuracy
    assert r.best_metric == max(m for _, m in r.evals)
    assert sum(h["task"] for h in r.history[-5:]) < sum(h["task"] for h in r.history[:5])  # the recipe's loss
    with pytest.raises(fxopt.InputError, match="data= .* or recipe="):
        finetune(model, loss=nn.MSELoss(), steps=1, lr=1e-3)


def test_recipe_batches_repeat_from_the_seed_and_metrics_must_be_higher_better():
    from fxopt.distill import RecipeBatches, recipe_metric

    recipe = fxopt.models.spec("safety_supervisor").recipe
    first = [b[1] for _, b in zip(range(2), RecipeBatches(recipe, seed=3))]
    again = [b[1] for _, b in zip(range(2), RecipeBatches(recipe, seed=3))]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], first[1])
    with pytest.raises(fxopt.InputError, match="TrainingRecipe"):
        RecipeBatches(object())
    fake = type("R", (), {"evaluate": staticmethod(lambda m: {"motion_error": 0.3, "miou": 0.5})})()
    assert recipe_metric(fake, "miou")(None) == 0.5
    with pytest.raises(fxopt.InputError, match="lower-better"):
        recipe_metric(fake)(None)


def test_a_recipe_metric_selects_on_the_validation_set_not_the_reported_one():
    from fxopt.distill import recipe_metric

    fake = type("R", (), {"evaluate": staticmethod(lambda m: {"acc": 0.25}), "validate": staticmethod(lambda m: {"acc": 0.75})})()
    assert recipe_metric(fake)(None) == 0.75  # chosen on validation; the held-out 0.25 is only reported
    plain = type("R", (), {"evaluate": staticmethod(lambda m: {"acc": 0.25}), "validate": None})()
    assert recipe_metric(plain)(None) == 0.25


@pytest.mark.parametrize("name", ["camera_multitask", "motionnet", "pointpillars", "safety_supervisor"])
def test_every_bundled_recipe_validates_on_other_data_than_it_reports_on(name):
    recipe = fxopt.models.recipe(name)
    assert recipe.validate is not None
    torch.manual_seed(0)
    model = fxopt.models.create(name).eval()
    with torch.no_grad():
        reported, validated = recipe.evaluate(model), recipe.validate(model)
    assert reported.keys() == validated.keys()
    if name == "pointpillars":  # an untrained detector scores 0 everywhere: compare the scenes themselves
        from fxopt.models import pointpillars as pp

        cfg = pp.make_config()
        held, val = pp._held_out(cfg, 2), pp._held_out(cfg, 2, pp.VALIDATION_SEED)
        assert not any(torch.equal(a.points, b.points) for a in held for b in val)
    else:
        assert reported != validated  # another draw of scenes: the same untrained model scores differently on it
