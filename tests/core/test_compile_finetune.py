"""`fxopt.compile(..., train_data=, loss=, finetune_steps=, distill=)`: fine-tuning after the lossy
passes, before lowering, with the traced original as teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.distill import Distill, LogitKD, TensorBatches
from fxopt.passes import PruneChannels


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


X, Y = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))


def compile_pruned(**kw):
    return fxopt.compile(net(), "cpu", example_inputs=(X[:1],), passes=[PruneChannels(amount=0.5, by="flops", round_to=1)], **kw)


def test_finetune_with_distillation_trains_the_pruned_graph_before_lowering():
    plain = compile_pruned()
    tuned = compile_pruned(train_data=TensorBatches(X, Y, batch_size=16), loss=nn.CrossEntropyLoss(),
                           finetune_steps=15, finetune_lr=1e-2, distill=Distill(logits=LogitKD(2.0)))
    line = next(n for n in tuned.report.notes if n.startswith("fine-tune: 15 steps"))
    first, last = (float(v) for v in line.rsplit("loss ", 1)[1].split(" -> "))
    assert last < first
    changed = [not torch.equal(a, b) for a, b in zip(plain.graph_module.state_dict().values(), tuned.graph_module.state_dict().values())]
    assert any(changed)
    assert tuned.report.onnx["max_abs_error_vs_torch"] < 1e-4  # the ONNX file is the tuned graph
    assert "finetune" not in {n.name for n in tuned.onnx_model.graph.node}


def test_finetune_requests_are_checked_before_work():
    with pytest.raises(fxopt.InputError, match="finetune_steps needs train_data="):
        compile_pruned(finetune_steps=5)
    with pytest.raises(fxopt.InputError, match="finetune_steps needs train_data="):
        compile_pruned(finetune_steps=5, train_data=TensorBatches(X, Y, batch_size=16))


def test_distill_by_name_picks_the_output_kd_form():
    tuned = compile_pruned(train_data=TensorBatches(X, Y, batch_size=16), loss=nn.CrossEntropyLoss(),
                           finetune_steps=5, finetune_lr=1e-2, distill="kd", export=False)
    assert "fine-tune: output KD: LogitKD(T=4) on the class logits" in tuned.report.notes
    with pytest.raises(fxopt.InputError, match="distill must name"):
        compile_pruned(train_data=TensorBatches(X, Y, batch_size=16), loss=nn.CrossEntropyLoss(),
                       finetune_steps=5, distill="kdd", export=False)


def test_finetune_seed_repeats_a_fine_tune_exactly_and_another_seed_draws_other_batches():
    spec = fxopt.models.spec("safety_supervisor")
    model = fxopt.models.create("safety_supervisor").eval()
    inputs = fxopt.models.example_inputs("safety_supervisor")

    def tuned(seed):
        compiled = fxopt.compile(model, "cpu", example_inputs=inputs, passes=[], recipe=spec.recipe, finetune_steps=4,
                                 finetune_lr=1e-2, finetune_seed=seed, export=False, safety="off")
        line = next(n for n in compiled.report.notes if n.startswith("fine-tune: 4 steps"))
        return line.rsplit("loss ", 1)[1]  # first and last training loss: which batches were drawn

    first, again, other = tuned(0), tuned(0), tuned(1)
    assert first == again and first != other
