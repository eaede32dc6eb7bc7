"""Differential fuzzing: drawn models compiled end to end, their ONNX file compared with the
original torch model on fresh inputs that are not the example inputs (`make fuzz`; a short
derandomised run in the default tier)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import event, given, settings

import fxopt
import fxopt.testing as ft
from fxopt.verification.numerics import compare_outputs, flatten_outputs


def fresh_inputs(inputs: tuple, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(x.shape, generator=generator) * 3 - 0.5 if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        for x in inputs
    )


def check_on_fresh_inputs(model: torch.nn.Module, inputs: tuple) -> None:
    try:
        compiled = fxopt.compile(model, "cpu", example_inputs=inputs)
    except fxopt.ExportError as exc:
        # the documented refusal: a leaf's value branch that scripting cannot keep as an ONNX If
        # (e.g. beside nn.MultiheadAttention, whose scripted export fails) is never frozen silently
        assert "data-dependent control flow would be frozen" in str(exc) and "leaf '" in str(exc), exc
        event("refused: a leaf branch that cannot be scripted")
        return
    session = ort.InferenceSession(compiled.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for seed in range(3):
        x = fresh_inputs(inputs, seed)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, x)})
        with torch.no_grad():
            want = flatten_outputs(model.eval()(*x))
        deviation = compare_outputs([torch.from_numpy(np.asarray(o)) for o in got], want)
        assert deviation.within(1e-4, 1e-4), f"seed {seed}: {deviation}"


@settings(max_examples=6)
@given(ft.models())
def test_compiled_onnx_matches_torch_on_fresh_inputs(drawn):
    check_on_fresh_inputs(*drawn)


@pytest.mark.fuzz
@given(ft.models())
def test_compiled_onnx_matches_torch_on_fresh_inputs_deep(drawn):
    check_on_fresh_inputs(*drawn)
