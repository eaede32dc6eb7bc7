"""Bad input gets one clear `fxopt.FxoptError` line (before any work where it can be known), and a
pass the user asked for that is rolled back is an `FxoptWarning`, not only a report line.

One regression test per case of README's "What bad input gets" table that issue 23 added.
"""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from torch import nn

import fxopt
import fxopt.compiler
from fxopt.cli import main as cli_main
from fxopt.costs.cost_model import estimate_costs

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """A backbone with named blocks and a head, so paths like 'backbone.block' exist."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential()
        self.backbone.add_module("block", nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
        self.backbone.add_module("pool", nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _compile(model: nn.Module | None = None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxopt.FxoptWarning)
        return fxopt.compile(Net() if model is None else model, "cpu", **{"example_inputs": (X,), **kwargs})


@pytest.fixture()
def no_work(monkeypatch):
    """Makes tracing fail loudly: an error raised with this fixture active came before any work."""
    def trace(*args, **kwargs):
        raise AssertionError("compile started work (tracing) before refusing the request")

    monkeypatch.setattr(fxopt.compiler, "trace_with_outputs", trace)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# --- item 5: problems that only the report mentioned ------------------------------------------

class Raising(fxopt.FxoptPass):
    """A user pass that raises: the pass manager rolls it back."""

    name = "raising_for_test"

    def call(self, gm):
        raise RuntimeError("the rewrite hit a case it cannot handle")


def test_requested_pass_rolled_back_is_a_warning_naming_pass_and_reason():
    with pytest.warns(fxopt.FxoptWarning, match=r"requested pass 'raising_for_test' was rolled back: .*cannot handle") as caught:
        compiled = fxopt.compile(Net(), "cpu", example_inputs=(X,), passes=[Raising()])
    assert [r.status for r in compiled.report.passes if r.name == "raising_for_test"] == ["rolled_back"]
    assert any("raising_for_test" in n and n.startswith("WARNING") for n in compiled.report.notes)  # the report still says it
    assert any(w.filename == __file__ for w in caught if issubclass(w.category, fxopt.FxoptWarning))  # points at the caller


def test_unrequested_passes_that_change_nothing_are_not_warned_about():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxopt.compile(nn.Sequential(nn.ReLU()), "cpu", example_inputs=(X,))  # canonicalize, fold_batchnorm: nothing to do
    assert not [w for w in caught if "requested pass" in str(w.message)]


def test_taylor_importance_without_calib_data_is_refused_before_work(no_work):
    with pytest.raises(fxopt.InputError, match=r"importance='taylor' needs calib_data") as exc:
        fxopt.compile(Net(), "cpu", example_inputs=(X,), passes=[fxopt.create_pass("prune", importance="taylor")])
    _one_line(exc)


def test_taylor_importance_with_calib_data_passes_the_request_check():
    calib = [(torch.randn(1, 3, 16, 16),) for _ in range(2)]
    compiled = _compile(passes=[fxopt.create_pass("prune", importance="taylor", amount=0.5, round_to=1)], calib_data=calib)
    assert {r.name: r.status for r in compiled.report.passes}["prune"] == "applied"


def test_leaf_modules_as_one_string_is_one_path_not_its_characters():
    compiled = _compile(leaf_modules="backbone.block")
    assert [(leaf.path, leaf.reason) for leaf in compiled.report.leaves] == [("backbone.block", "requested by the user")]
    gm = fxopt.trace(Net(), (X,), leaf_modules="backbone.block")  # the tracer itself too
    assert [leaf.path for leaf in fxopt.leaves_of(gm)] == ["backbone.block"]


def test_leaf_module_that_does_not_exist_lists_close_names(no_work):
    with pytest.raises(fxopt.InputError, match=r"Net has no submodule 'backbone.blok'; did you mean 'backbone.block'") as exc:
        fxopt.compile(Net(), "cpu", example_inputs=(X,), leaf_modules=["backbone.blok"])
    _one_line(exc)
    with pytest.raises(fxopt.InputError, match=r"no submodule 'does.not.exist'; its top-level submodules: backbone, head"):
        fxopt.compile(Net(), "cpu", example_inputs=(X,), leaf_modules=["does.not.exist"])
    with pytest.raises(fxopt.InputError, match=r"leaf_modules entries must be submodule paths"):
        fxopt.compile(Net(), "cpu", example_inputs=(X,), leaf_modules=[3])


def test_cli_leaf_that_does_not_exist_is_one_error_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad_input_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def net():
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    """))
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["compile", "bad_input_models:net", "--target", "cpu", "--input-shape", "1x3x16x16",
                   "--leaf", "backbone.nothing", "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "fxopt: error: leaf_modules: Sequential has no submodule 'backbone.nothing'; its top-level submodules: 0, 1" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# --- item 6: raw errors ---------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "what"), [(None, "NoneType"), (lambda x: x, "function")])
def test_compile_of_a_non_module_is_an_input_error(no_work, model, what):
    with pytest.raises(fxopt.InputError, match=rf"model must be a torch.nn.Module, got {what}") as exc:
        fxopt.compile(model, "cpu", example_inputs=(X,))
    _one_line(exc)


@pytest.fixture(scope="module")
def compiled():
    return _compile()


def test_save_to_none_is_an_input_error(compiled):
    with pytest.raises(fxopt.InputError, match=r"save\(\) needs a folder path .* got NoneType") as exc:
        compiled.save(None)
    _one_line(exc)


def test_save_to_an_unwritable_place_is_refused_before_work(no_work):
    with pytest.raises(fxopt.InputError, match=r"cannot save into '/proc/x': '/proc' cannot be written") as exc:
        fxopt.compile(Net(), "cpu", example_inputs=(X,), save_to="/proc/x")
    _one_line(exc)


def test_save_of_a_compiled_model_to_an_unwritable_place_is_an_input_error(compiled):
    with pytest.raises(fxopt.InputError, match=r"cannot save into '/proc/x/out'"):
        compiled.save("/proc/x/out")


def test_cli_output_folder_that_cannot_be_written_is_one_line_before_work(tmp_path, capsys):
    rc = cli_main(["compile", "torch.nn:ReLU", "--target", "cpu", "--input-shape", "1x4", "-o", "/proc/fxo", "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == ["fxopt: error: cannot save into '/proc/fxo': '/proc' cannot be written "
                                        "(No such file or directory); choose a writable folder"]


def test_estimate_costs_at_a_precision_the_target_lacks_is_an_input_error(compiled):
    with pytest.raises(fxopt.InputError, match=r"target 'cpu' has no precision 'fp8'; it has \('fp32', 'int8'\)") as exc:
        estimate_costs(compiled.graph_module, "cpu", "fp8")
    _one_line(exc)


def _train_batch(batch: int = 2, targets: int | None = None):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 4, (targets or batch,), generator=g))]


def test_loss_returning_a_non_scalar_is_refused_before_the_passes(monkeypatch):
    def run(*args, **kwargs):
        raise AssertionError("the passes ran before the loss was checked")

    monkeypatch.setattr(fxopt.compiler.PassManager, "run", run)
    per_sample = lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    with pytest.raises(fxopt.InputError, match=r"must return a scalar tensor .* got a tensor of shape \(2,\)") as exc:
        _compile(passes=["prune"], train_data=_train_batch(), loss=per_sample, finetune_steps=2)
    _one_line(exc)


def test_loss_returning_a_non_scalar_on_batches_compile_does_not_draw_early():
    # a shuffling TensorBatches is not drawn from before the fine-tune (that would change its batches):
    # the fine-tune loop itself says what is wrong, in one line
    g = torch.Generator().manual_seed(2)
    data = fxopt.distill.TensorBatches(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g), batch_size=4)
    per_sample = lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    with pytest.raises(fxopt.InputError, match=r"must return a scalar tensor, got shape \(4,\)") as exc:
        _compile(passes=["prune"], train_data=data, loss=per_sample, finetune_steps=2, finetune_lr=1e-3)
    _one_line(exc)


def test_train_targets_of_another_batch_size_are_refused_before_work(no_work):
    with pytest.raises(fxopt.InputError, match=r"train_data\[0\]: the target has batch size 3 .* the inputs 2") as exc:
        fxopt.compile(Net(), "cpu", example_inputs=(X,), passes=["prune"], train_data=_train_batch(2, 3),
                      loss=nn.CrossEntropyLoss(), finetune_steps=2)
    _one_line(exc)


def test_train_batches_of_the_right_batch_size_fine_tune():
    compiled = _compile(passes=["prune"], train_data=_train_batch(2), loss=nn.CrossEntropyLoss(), finetune_steps=2)
    assert any(n.startswith("fine-tune: 2 steps") for n in compiled.report.notes)


def test_calling_the_compiled_model_with_too_many_inputs(compiled):
    with pytest.raises(fxopt.InputError, match=r"takes 1 input\(s\) \(shapes \[\[1, 3, 16, 16\]\]\), this call gives 2") as exc:
        compiled(X, X)
    _one_line(exc)


def test_calling_the_compiled_model_with_a_numpy_array(compiled):
    with pytest.raises(fxopt.InputError, match=r"input 0 of the compiled model is numpy.ndarray, not a torch.Tensor \(torch.from_numpy") as exc:
        compiled(X.numpy())
    _one_line(exc)


class ReturnsNone(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        x.relu()


class ReturnsLabel(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return x.relu(), "label"


@pytest.mark.parametrize(("model", "said"), [(ReturnsNone(), r"output is None"), (ReturnsLabel(), r"output\[1\] is str 'label'")])
def test_outputs_onnx_cannot_carry_are_refused_before_the_passes(monkeypatch, model, said):
    def run(*args, **kwargs):
        raise AssertionError("the passes ran before the outputs were checked")

    monkeypatch.setattr(fxopt.compiler.PassManager, "run", run)
    with pytest.raises(fxopt.InputError, match=rf"the model's {said}, not a tensor: an ONNX file carries tensors only") as exc:
        fxopt.compile(model, "cpu", example_inputs=(X,))
    _one_line(exc)


def test_outputs_onnx_cannot_carry_compile_without_export():
    compiled = _compile(ReturnsLabel(), export=False)
    assert compiled(X)[1] == "label"


def test_export_onnx_refuses_a_string_output():
    from fxopt.backends.onnx import export_onnx

    with pytest.raises(fxopt.ExportError, match=r"output\[1\] is str 'label'"):
        export_onnx(ReturnsLabel(), (X,))


def test_calling_the_compiled_model_at_another_shape(compiled):
    assert compiled(X).shape == (1, 4)  # the compiled shape runs
    with pytest.raises(fxopt.InputError, match=r"input 0 of the compiled model was compiled for shape \[1, 3, 16, 16\], "
                                               r"this call gives \[2, 3, 16, 16\]") as exc:
        compiled(torch.randn(2, 3, 16, 16))
    _one_line(exc)
    with pytest.raises(fxopt.InputError, match=r"compiled for shape \[1, 3, 16, 16\], this call gives \[1, 3, 24, 24\]"):
        compiled(torch.randn(1, 3, 24, 24))
    with pytest.raises(fxopt.InputError, match=r"input 0 of the compiled model is torch.float64, it was compiled for torch.float32"):
        compiled(X.double())


def test_dynamic_batch_accepts_its_range_and_refuses_outside_it():
    model = Net()
    compiled = _compile(model, example_inputs=(torch.randn(2, 3, 16, 16),), dynamic_batch=(1, 2, 4))
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(compiled(x), model.eval()(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(fxopt.InputError, match=r"compiled for shape \[2, 3, 16, 16\], batch 1 to 4, this call gives \[5, 3, 16, 16\]"):
        compiled(torch.randn(5, 3, 16, 16))

