"""check_pass: correct passes pass; each way of breaking the pass contract is caught and explained."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given
from torch import nn
from torch.fx import GraphModule
from torch.fx.node import map_arg

import fxopt
from fxopt.passes import FoldBatchNorm
from fxopt.passes.canonicalize import Canonicalize
from fxopt.passinfra.pass_base import FxoptPass, PassResult
from fxopt.testing import PassCheck, check_pass, reproducer
from fxopt.testing.strategies import convnets, models


def small_model() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.1), nn.Conv2d(8, 4, 1))
    return model, (torch.randn(1, 3, 8, 8),)


def _map_outputs(gm: GraphModule, fn) -> None:
    """Replace every tensor the graph returns by ``fn(graph, node)``."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        out.args = (map_arg(out.args[0], lambda node: fn(gm.graph, node)),)


class PerturbOneWeight(FxoptPass):
    """Claims to keep the function, but scales one weight (the largest) by 1%."""

    name = "perturb_one_weight"
    lossy = False

    def call(self, gm):
        conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            flat = conv.weight.view(-1)
            flat[flat.abs().argmax()] *= 1.01
        return PassResult(gm, True)


class OffsetOutputs(FxoptPass):
    """Adds a constant to every output; `lossy` is set per test."""

    name = "offset_outputs"
    lossy = False

    def call(self, gm):
        _map_outputs(gm, lambda g, n: g.call_function(torch.add, (n, 0.05)))
        return PassResult(gm, True)


class LossyOffset(OffsetOutputs):
    name = "lossy_offset"
    lossy = True


class UnsqueezeOutputs(FxoptPass):
    """A lossy pass that adds a dimension to every output: shapes must still be kept."""

    name = "unsqueeze_outputs"
    lossy = True

    def call(self, gm):
        _map_outputs(gm, lambda g, n: g.call_method("unsqueeze", (n, 0)))
        return PassResult(gm, True)


class Raises(FxoptPass):
    name = "raises"

    def call(self, gm):
        raise RuntimeError("boom in the pass")


class ChangesGraphButSaysNo(FxoptPass):
    name = "claims_unchanged"

    def call(self, gm):
        Canonicalize()(gm)
        return PassResult(gm, False)


class NotExportable(FxoptPass):
    """Lossy, keeps shapes, but uses an op the ONNX exporter cannot convert."""

    name = "not_exportable"
    lossy = True

    def call(self, gm):
        _map_outputs(gm, lambda g, n: g.call_function(torch.frac, (n,)))
        return PassResult(gm, True)


class MutatesUserModel(FxoptPass):
    """Holds a reference to the user's model and writes to it: the user's model must stay intact."""

    name = "mutates_user_model"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def call(self, gm):
        with torch.no_grad():
            next(self.model.parameters()).add_(1.0)
        return PassResult(gm, False)


def test_correct_pass_passes_and_returns_the_record_and_graph():
    model, inputs = small_model()
    result = check_pass("canonicalize", model, inputs)
    assert isinstance(result, PassCheck) and result.modified
    assert result.record.name == "canonicalize" and result.record.status == "applied"
    assert not any(isinstance(m, nn.Dropout) for m in result.graph_module.modules())
    assert result.deviation.max_abs == 0.0
    assert result.onnx is not None and result.onnx.opset == 17 and result.onnx.max_abs_error <= 1e-4


def test_all_ways_to_name_a_pass_are_accepted():
    model, inputs = small_model()
    for form in ("fold_batchnorm", FoldBatchNorm, FoldBatchNorm(),
                 functools.partial(fxopt.create_pass, "fold_batchnorm"), lambda: fxopt.create_pass("fold_batchnorm")):
        result = check_pass(form, model, inputs, export=False)
        assert result.record.name == "fold_batchnorm" and result.modified


def test_non_lossy_pass_that_perturbs_one_weight_by_one_percent_is_caught():
    model, inputs = small_model()
    with pytest.raises(AssertionError) as caught:
        check_pass(PerturbOneWeight(), model, inputs)
    message = str(caught.value)
    assert "pass 'perturb_one_weight' broke the pass contract" in message
    assert "rolled it back" in message and "lossy=False" in message


def test_atol_bounds_a_non_lossy_pass_too():
    model, inputs = small_model()
    assert check_pass("fold_batchnorm", model, inputs, export=False).deviation.max_abs > 0.0  # float rounding
    with pytest.raises(AssertionError, match="non-lossy pass deviates by max abs .*, more than the allowed atol=0"):
        check_pass("fold_batchnorm", model, inputs, atol=0.0, export=False)


def test_output_shape_change_is_caught_even_for_a_lossy_pass():
    model, inputs = small_model()
    with pytest.raises(AssertionError, match=r"changed the outputs' shapes/dtypes: \[\(\(1, 4, 6, 6\)"):
        check_pass(UnsqueezeOutputs(), model, inputs)


def test_lossy_pass_reports_its_deviation_and_atol_bounds_it():
    model, inputs = small_model()
    result = check_pass(LossyOffset(), model, inputs)
    assert result.deviation.max_abs == pytest.approx(0.05, rel=1e-4)
    assert result.record.max_abs_error == pytest.approx(0.05, rel=1e-4)
    with pytest.raises(AssertionError, match="more than the allowed atol=0.01"):
        check_pass(LossyOffset(), model, inputs, atol=0.01)


@pytest.mark.parametrize(
    ("bad_pass", "expected"),
    [
        (Raises(), "RuntimeError: boom in the pass"),
        (ChangesGraphButSaysNo(), "returned modified=False but changed the graph"),
        (NotExportable(), "does not lower to ONNX .*the input graph lowers fine, so the pass broke it"),
    ],
)
def test_broken_contract_is_caught_with_its_reason(bad_pass, expected):
    model, inputs = small_model()
    with pytest.raises(AssertionError, match=expected):
        check_pass(bad_pass, model, inputs)


class ClaimsIdleButFolds(FoldBatchNorm):
    """Says it would change nothing, then folds the BatchNorm all the same."""

    name = "claims_idle_but_folds"

    def finds_work(self, gm):
        return False


def test_a_pass_whose_work_test_says_no_but_changes_the_graph_is_caught():
    model, inputs = small_model()
    with pytest.raises(AssertionError, match=r"finds_work\(\) said the pass would change nothing"):
        check_pass(ClaimsIdleButFolds, model, inputs)
    assert check_pass(FoldBatchNorm, model, inputs).modified  # the honest pass passes


def test_pass_that_writes_to_the_users_model_is_caught():
    model, inputs = small_model()
    with pytest.raises(AssertionError, match="the user's model: its state_dict changed"):
        check_pass(lambda: MutatesUserModel(model), model, inputs, export=False)


@given(convnets())
def test_non_lossy_output_change_is_caught_on_every_drawn_model(drawn):
    model, inputs = drawn
    with pytest.raises(AssertionError) as caught:
        check_pass(OffsetOutputs(), model, inputs, export=False)
    message = str(caught.value)
    assert "declares lossy=False but changed the outputs" in message
    # the failing model is shown as code a pass author can paste into a test
    assert reproducer(model) in message and "class Model(nn.Module):" in message


@given(models())
def test_shape_change_is_caught_on_every_drawn_model(drawn):
    model, inputs = drawn
    with pytest.raises(AssertionError, match="changed the outputs' shapes/dtypes"):
        check_pass(UnsqueezeOutputs(), model, inputs, export=False)


class NeedsCalibration(FxoptPass):
    """Reads calibration data from the compile context, as a quantizer would."""

    name = "needs_calibration"

    def call(self, gm):
        context = fxopt.current_context()
        if "calib_data" not in context.options:
            raise ValueError("no calib_data given")
        self.seen = (context.target.name, len(context.options["calib_data"]))
        return PassResult(gm, False)


def test_target_and_context_options_reach_the_pass():
    model, inputs = small_model()
    with pytest.raises(AssertionError, match="ValueError: no calib_data given"):
        check_pass(NeedsCalibration(), model, inputs, export=False)
    the_pass = NeedsCalibration()
    result = check_pass(the_pass, model, inputs, target="xavier", calib_data=[inputs, inputs])
    assert the_pass.seen == ("xavier", 2) and result.record.status == "unchanged"
    assert result.onnx.opset == fxopt.get_target("xavier").max_onnx_opset




class _UnscriptableGate(nn.Module):
    def forward(self, x):
        scale = float(np.float32(2.0))  # TorchScript cannot compile this, so the branch cannot become an If
        return x * scale if x.mean() > 0 else -x


def test_a_model_the_onnx_backend_refuses_is_not_blamed_on_the_pass():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _UnscriptableGate(), nn.Conv2d(4, 2, 1)).eval()
    result = check_pass("fold_batchnorm", model, (torch.randn(1, 3, 8, 8),))
    assert result.modified and result.onnx is None
    assert "refused by the ONNX backend too" in result.onnx_skipped and "data-dependent control flow" in result.onnx_skipped
