"""The model registry and `fxopt.models.train`: names, errors, lazy chance, config-aware recipes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.models import registry
from fxopt.models.registry import ModelSpec, TrainingRecipe


def test_bundled_models_are_listed_with_inputs_that_run():
    assert {"pointpillars", "camera_multitask", "motionnet", "safety_supervisor"} <= set(fxopt.models.names())
    torch.manual_seed(0)
    model = fxopt.models.create("safety_supervisor").eval()
    with torch.no_grad():
        out = model(*fxopt.models.example_inputs("safety_supervisor"))
    assert set(out) >= {"command", "risk"}
    assert fxopt.models.spec("safety_supervisor").precision == "fp32"


def test_unknown_model_names_the_known_ones():
    with pytest.raises(fxopt.InputError, match="unknown model 'nope'.*pointpillars"):
        fxopt.models.create("nope")


def _tiny_recipe(calls: list[str], features: int = 2) -> TrainingRecipe:
    def batch(step, generator):
        x = torch.randn(16, features, generator=generator)
        return (x,), x.sum(1, keepdim=True)

    def chance():
        calls.append("chance")
        return {"mse": 1.0}

    return TrainingRecipe(
        batch=batch,
        loss=lambda out, y: nn.functional.mse_loss(out, y),
        evaluate=lambda m: {"mse": float(nn.functional.mse_loss(m(torch.ones(1, features)), torch.full((1, 1), float(features))))},
        chance=chance,
        steps=5,
        lr=0.05,
    )


@pytest.fixture()
def tiny_models(monkeypatch):
    specs = dict(registry._SPECS)
    monkeypatch.setattr(registry, "_SPECS", specs)
    calls: list[str] = []
    registry.register_model(ModelSpec("tiny_fixed", lambda: nn.Linear(2, 1), lambda: (torch.ones(1, 2),), recipe=_tiny_recipe(calls)))
    registry.register_model(ModelSpec(
        "tiny_configurable", lambda features=2: nn.Linear(features, 1), lambda features=2: (torch.ones(1, features),),
        recipe=lambda features=2: _tiny_recipe(calls, features),
    ))
    return calls


def test_chance_is_computed_by_train_not_at_registration(tiny_models):
    assert tiny_models == []
    result = fxopt.models.train("tiny_fixed", steps=20, progress=False)
    assert tiny_models == ["chance"] and result.chance == {"mse": 1.0}
    assert len(result.losses) == 20 and result.losses[-1] < result.losses[0]
    assert not result.model.training


def test_fixed_recipe_refuses_a_config_it_cannot_feed(tiny_models):
    with pytest.raises(fxopt.InputError, match="trains its default config only"):
        fxopt.models.train("tiny_fixed", steps=1, features=3)


def test_config_aware_recipe_trains_the_configured_model(tiny_models):
    result = fxopt.models.train("tiny_configurable", steps=3, progress=False, features=3)
    assert result.model.in_features == 3


def test_negative_steps_are_an_input_error(tiny_models):
    with pytest.raises(fxopt.InputError, match="steps must be >= 0"):
        fxopt.models.train("tiny_fixed", steps=-1)


def test_bn_batches_reestimates_batchnorm_at_the_final_weights(monkeypatch):
    """With ``bn_batches`` the running statistics are the plain average over fresh batches after
    the last step, not the slow running average of training (momentum 0.01)."""
    from dataclasses import replace

    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))

    def build():
        return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, momentum=0.01), nn.Linear(3, 1))

    plain = _tiny_recipe([])
    for name, recipe in (("tiny_bn_plain", plain), ("tiny_bn_precise", replace(plain, bn_batches=4))):
        registry.register_model(ModelSpec(name, build, lambda: (torch.ones(1, 2),), recipe=recipe))
    before = fxopt.models.train("tiny_bn_plain", steps=5, progress=False).model
    after = fxopt.models.train("tiny_bn_precise", steps=5, progress=False).model
    # the same training (same seed and batches), so the weights agree; only the statistics differ
    torch.testing.assert_close(before[0].weight, after[0].weight)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        plain.batch(step, g)  # the training batches; re-estimation draws the next four
    with torch.no_grad():
        hidden = torch.cat([after[0](plain.batch(5 + i, g)[0][0]) for i in range(4)])
    torch.testing.assert_close(after[1].running_mean, hidden.mean(0))
    assert not torch.allclose(before[1].running_mean, hidden.mean(0), atol=1e-2)
    assert after[1].momentum == 0.01 and not after.training
