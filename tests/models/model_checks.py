"""Checks the bundled-model tests share: ONNX Runtime on fresh inputs, and a short training run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch


def assert_onnx_matches_torch(compiled: Any, model: torch.nn.Module, fresh_input: torch.Tensor, output_names: Sequence[str]) -> None:
    """Run the compiled model's ONNX file in ONNX Runtime on an input it was not verified on."""
    session = ort.InferenceSession(compiled.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: fresh_input.numpy()})
    with torch.no_grad():
        want = model(fresh_input)
    for name, value in zip(output_names, got, strict=True):
        np.testing.assert_allclose(value, want[name].numpy(), atol=1e-4, rtol=1e-3)


def training_losses(model: torch.nn.Module, loss: Callable[[Any], torch.Tensor], inputs: tuple[Any, ...], lr: float, steps: int) -> list[float]:
    """Losses of `steps` Adam steps on one batch; `loss` maps the model's outputs to a scalar."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        value = loss(model(*inputs))
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        losses.append(value.item())
    return losses
