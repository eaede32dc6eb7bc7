"""Channel importance: each criterion checked against a hand computation on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxopt
from fxopt.passes.channel_importance import atom_scores
from fxopt.passes.dependency_groups import analyze_dependencies


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _setup():
    torch.manual_seed(0)
    model = TwoLinear().eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        model.bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    gm = fxopt.trace(model, torch.randn(5, 4))
    analysis = analyze_dependencies(gm)
    [group] = analysis.groups
    return model, gm, analysis, list(group.atoms)


def test_l1_and_l2_sum_every_coupled_weight():
    model, gm, analysis, atoms = _setup()
    w1, b1, w2 = model.fc1.weight, model.fc1.bias, model.fc2.weight
    gamma, beta = model.bn.weight, model.bn.bias
    l1 = w1.abs().sum(1) + b1.abs() + w2.abs().sum(0) + gamma.abs() + beta.abs()
    l2 = w1.pow(2).sum(1) + b1.pow(2) + w2.pow(2).sum(0) + gamma.pow(2) + beta.pow(2)
    np.testing.assert_allclose(atom_scores(gm, analysis, "l1")[atoms], l1.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(atom_scores(gm, analysis, "l2")[atoms], l2.detach().numpy(), rtol=1e-5)


def test_bn_scale_is_the_absolute_gamma():
    _, gm, analysis, atoms = _setup()
    np.testing.assert_allclose(atom_scores(gm, analysis, "bn_scale")[atoms], [0.5, 2.0, 1.0])


def test_bn_scale_falls_back_to_magnitude_without_norms():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    gm = fxopt.trace(model, torch.randn(2, 4))
    analysis = analyze_dependencies(gm)
    atoms = list(analysis.groups[0].atoms)
    np.testing.assert_allclose(atom_scores(gm, analysis, "bn_scale")[atoms], atom_scores(gm, analysis, "l2")[atoms])


def test_taylor_is_first_order_change_of_the_loss():
    model, gm, analysis, atoms = _setup()
    batches = [(torch.randn(5, 4),), (torch.randn(5, 4),)]
    scores = atom_scores(gm, analysis, "taylor", calib_data=batches)
    expected = torch.zeros(3)
    params = [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.bn.weight, model.bn.bias]
    for (x,) in batches:
        loss = model(x).pow(2).mean()
        grads = torch.autograd.grad(loss, params)
        terms = [(p * g).abs() for p, g in zip(params, grads)]
        expected += terms[0].sum(1) + terms[1] + terms[2].sum(0) + terms[3] + terms[4]
    np.testing.assert_allclose(scores[atoms], expected.detach().numpy(), rtol=1e-4)
    # the graph module's own parameters are untouched and have no gradients left behind
    assert all(p.grad is None for p in gm.parameters())
    assert gm.get_submodule("fc1").weight is not None and isinstance(gm.get_submodule("fc1").weight, nn.Parameter)


def test_taylor_with_labels_uses_cross_entropy():
    model, gm, analysis, atoms = _setup()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    scores = atom_scores(gm, analysis, "taylor", calib_data=[(x,)], labels=[y])
    loss = nn.functional.cross_entropy(model(x), y)
    g = torch.autograd.grad(loss, model.bn.weight)[0]
    assert scores[atoms].shape == (3,) and np.all(scores[atoms] >= (model.bn.weight * g).abs().detach().numpy() - 1e-7)


def test_taylor_without_data_is_a_clear_error():
    _, gm, analysis, _ = _setup()
    with pytest.raises(fxopt.InputError, match="calib_data"):
        atom_scores(gm, analysis, "taylor")


def test_user_callable_scores_and_length_check():
    _, gm, analysis, atoms = _setup()
    scores = atom_scores(gm, analysis, lambda group, graph_module: torch.tensor([3.0, 1.0, 2.0]))
    np.testing.assert_allclose(scores[atoms], [3.0, 1.0, 2.0])
    with pytest.raises(fxopt.InputError, match="3 channels"):
        atom_scores(gm, analysis, lambda group, graph_module: torch.ones(5))


def test_unknown_criterion_is_an_input_error():
    _, gm, analysis, _ = _setup()
    with pytest.raises(fxopt.InputError, match="importance"):
        atom_scores(gm, analysis, "random")
