"""Distillation losses against numpy references; zero at student == teacher; gradients reach the student only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxopt
import fxopt.distill.losses as losses_module
from fxopt.distill import ICKD, FeatureMSE, LogitKD, OutputKD, SigmoidKD

RNG = np.random.default_rng(0)


def _np_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _np_logit_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    p, q = _np_softmax(t / temp), _np_softmax(s / temp)
    return float(temp**2 * (p * (np.log(p) - np.log(q))).sum(axis=1).mean())


def _np_sigmoid_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    p, q = 1 / (1 + np.exp(-t / temp)), 1 / (1 + np.exp(-s / temp))
    return float(temp**2 * (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).mean())


def _np_corr(x: np.ndarray) -> np.ndarray:
    f = x.reshape(x.shape[0], x.shape[1], -1)
    f = f / np.linalg.norm(f, axis=2, keepdims=True)
    return f @ f.transpose(0, 2, 1)


def _np_ickd(s: np.ndarray, t: np.ndarray, grids: tuple[int, ...]) -> float:
    c = s.shape[1]
    per_grid = []
    for g in grids:
        h, w = s.shape[2:]
        rows, cols = np.array_split(np.arange(h), g), np.array_split(np.arange(w), g)
        cells = [((s[:, :, r][:, :, :, cc]), (t[:, :, r][:, :, :, cc])) for r in rows for cc in cols]
        per_grid.append(np.mean([((_np_corr(a) - _np_corr(b)) ** 2).sum(axis=(1, 2)).mean() / c**2 for a, b in cells]))
    return float(np.mean(per_grid))


def _pair(*shape: int) -> tuple[np.ndarray, np.ndarray]:
    return RNG.normal(size=shape), RNG.normal(size=shape)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_logit_kd_matches_numpy(temp):
    s, t = _pair(8, 10)
    got = LogitKD(temp)(torch.tensor(s), torch.tensor(t))
    assert float(got) == pytest.approx(_np_logit_kd(s, t, temp), rel=1e-9)


def test_logit_kd_dense_maps_average_over_positions():
    s, t = _pair(2, 5, 3, 3)
    ref = _np_logit_kd(s.transpose(0, 2, 3, 1).reshape(-1, 5), t.transpose(0, 2, 3, 1).reshape(-1, 5), 2.0)
    assert float(LogitKD(2.0)(torch.tensor(s), torch.tensor(t))) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_sigmoid_kd_matches_numpy(temp):
    s, t = _pair(2, 3, 4, 4)
    assert float(SigmoidKD(temp)(torch.tensor(s), torch.tensor(t))) == pytest.approx(_np_sigmoid_kd(s, t, temp), rel=1e-9)


def test_feature_mse_matches_numpy():
    s, t = _pair(2, 3, 4, 4)
    assert float(FeatureMSE()(torch.tensor(s), torch.tensor(t))) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-12)


@pytest.mark.parametrize("grids", [(1,), (2,), (1, 2), (3,)])
def test_ickd_matches_numpy(grids):
    s, t = _pair(3, 4, 6, 7)
    assert float(ICKD(grids)(torch.tensor(s), torch.tensor(t))) == pytest.approx(_np_ickd(s, t, grids), rel=1e-9)


def test_ickd_is_scale_free():
    s, t = _pair(2, 4, 5, 5)
    a = ICKD((1, 2))(torch.tensor(s), torch.tensor(t))
    b = ICKD((1, 2))(torch.tensor(s) * 7.0, torch.tensor(t) * 0.1)
    assert float(a) == pytest.approx(float(b), rel=1e-9) and float(a) > 0


LOSSES = [LogitKD(4.0), SigmoidKD(2.0), FeatureMSE(), ICKD((1, 2))]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda m: type(m).__name__)
def test_zero_when_student_equals_teacher(loss):
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    assert float(loss(x.clone(), x.clone())) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda m: type(m).__name__)
def test_gradients_reach_the_student_only(loss):
    s = torch.randn(4, 6, 5, 5, requires_grad=True)
    t = torch.randn(4, 6, 5, 5, requires_grad=True)
    value = loss(s, t)
    value.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    assert t.grad is None


@pytest.mark.parametrize("loss", LOSSES, ids=lambda m: type(m).__name__)
def test_shape_mismatch_is_an_input_error(loss):
    with pytest.raises(fxopt.InputError, match="differ"):
        loss(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3))


def test_bad_settings_are_refused():
    with pytest.raises(fxopt.InputError):
        LogitKD(0.0)
    with pytest.raises(fxopt.InputError):
        ICKD(grids=(0,))


def test_output_kd_sums_weighted_per_head_losses():
    s = {"heatmap": torch.randn(2, 3, 4, 4), "seg": torch.randn(2, 5, 4, 4), "box": torch.randn(2, 4, 4, 4)}
    t = {k: torch.randn_like(v) for k, v in s.items()}
    kd = OutputKD({"heatmap": SigmoidKD(), "seg": LogitKD(2.0)}, weights={"seg": 0.5})
    expected = _np_sigmoid_kd(s["heatmap"].numpy(), t["heatmap"].numpy(), 1.0) + 0.5 * _np_logit_kd(
        s["seg"].numpy(), t["seg"].numpy(), 2.0)
    assert float(kd(s, t)) == pytest.approx(expected, rel=1e-5)
    by_position = OutputKD({1: FeatureMSE()})
    assert float(by_position((s["seg"], s["box"]), (s["seg"], t["box"]))) == pytest.approx(
        float(((s["box"] - t["box"]) ** 2).mean()), rel=1e-6)


def test_output_kd_refuses_missing_heads_and_stray_weights():
    with pytest.raises(fxopt.InputError, match="no output 'seg'"):
        OutputKD({"seg": LogitKD()})({"heatmap": torch.zeros(1, 2)}, {"heatmap": torch.zeros(1, 2)})
    with pytest.raises(fxopt.InputError, match="without a loss"):
        OutputKD({"seg": LogitKD()}, weights={"box": 1.0})
    with pytest.raises(fxopt.InputError, match="at least one"):
        OutputKD({})


def test_ickd_even_cells_in_one_batch_equal_the_cell_loop():
    s, t = torch.randn(3, 6, 8, 12), torch.randn(3, 6, 8, 12)
    looped = torch.stack([
        torch.stack([(losses_module.channel_correlation(a) - losses_module.channel_correlation(b)).pow(2).sum((1, 2)).mean() / 36
                     for a, b in zip(losses_module._cells(s, g), losses_module._cells(t, g))]).mean()
        for g in (1, 2, 4)]).mean()
    torch.testing.assert_close(ICKD((1, 2, 4))(s, t), looped)
    assert float(ICKD((3,))(torch.randn(1, 2, 7, 5), torch.randn(1, 2, 7, 5))) > 0  # uneven cells: the loop
