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

    monkeypatch.setattr(fxopt.compiler, "trace", trace)


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
