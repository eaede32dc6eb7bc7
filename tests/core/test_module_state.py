"""Module state written in forward: refused where it reaches an output, left out with a warning
where it cannot, and never baked in from fxopt's own runs (issue 23, item 2)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.frontend.module_state import StateSnapshot, find_state_writes, state_writes_of
from fxopt.frontend.stages import split_stages


class Counter(nn.Module):
    """The issue's example: a call counter that scales the output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.lin(x) * self.calls


class Ema(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x):
        y = self.lin(x)
        self.ema.mul_(0.5).add_(y.mean(0) * 0.5)
        return y - self.ema


class Reassigned(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls = self.calls + 1
        return self.lin(x) * self.calls


class WarmUp(nn.Module):
    """Reads the written buffer only in a Python condition."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x) if self.calls < 2 else -self.lin(x)


class ClampsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        self.lin.weight.data.clamp_(-0.1, 0.1)
        return self.lin(x)


class BatchStats(nn.Module):
    """Batch statistics always, running statistics written by the kernel (no in-place op in Python)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))

    def forward(self, x):
        return F.batch_norm(x, self.rm, self.rv, training=True, momentum=0.5)


class WithBatchStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = BatchStats()

    def forward(self, x):
        return self.norm(self.lin(x))


class Monitor(nn.Module):
    """Bookkeeping no output reads: a call counter and a running mean of the features."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("feature_mean", torch.zeros(8))

    def forward(self, x):
        self.calls.add_(1)
        y = self.lin(x)
        self.feature_mean.mul_(0.9).add_(y.mean(0) * 0.1)
        return torch.relu(y)


class InPlaceOnActivations(nn.Module):
    """In-place ops on the input copy and on activations, BatchNorm in eval: nothing to refuse."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x.mul_(2)
        y = self.bn(self.conv(x)).relu_()
        y += 1
        return y


class DataDependentCounter(nn.Module):
    """Untraceable (becomes an automatic leaf) and writes a buffer that reaches its output."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        if x.mean() > 0:
            return x * self.count
        return x - self.count


class WithLeafCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.gate = DataDependentCounter()

    def forward(self, x):
        return self.gate(self.lin(x))


def _fresh(model: nn.Module) -> nn.Module:
    """A model of the same class with the same state, never run."""
    twin = type(model)().eval()
    twin.load_state_dict(model.state_dict())
    return twin


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_counter_from_the_issue_is_refused_naming_the_buffer_and_the_line():
    model = Counter().eval()
    before = _state(model)
    with pytest.raises(fxopt.StateWriteError) as info:
        fxopt.compile(model, "xavier", example_inputs=(torch.randn(2, 8),))
    message = str(info.value)
    assert info.value.names == ("calls",)
    assert "buffer 'calls'" in message and "add_" in message
    assert "test_module_state.py" in message and "self.calls.add_(1)" in message
    assert isinstance(info.value, fxopt.FxoptError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # fxopt's runs left no trace


@pytest.mark.parametrize(
    ("model", "name", "how", "line"),
    [
        (Ema(), "ema", "written in place (mul_)", "self.ema.mul_(0.5).add_(y.mean(0) * 0.5)"),
        (Reassigned(), "calls", "re-assigned", "self.calls = self.calls + 1"),
        (WarmUp(), "calls", "written in place (add_)", "self.calls += 1"),
        (ClampsWeight(), "lin.weight", "written in place (clamp_)", "self.lin.weight.data.clamp_(-0.1, 0.1)"),
        (WithBatchStats(), "norm.rm", "written in place (native_batch_norm)", "F.batch_norm(x, self.rm, self.rv"),
        (WithLeafCounter(), "gate.count", "written in place (add_)", "self.count.add_(1)"),
    ],
    ids=["ema", "reassigned", "python-condition", "parameter-via-data", "kernel-write", "inside-a-leaf"],
)
def test_writes_reaching_an_output_are_refused_with_buffer_and_line(model, name, how, line):
    # the EMA used to fail ONNX verification with no hint; the others compiled to a wrong model
    with pytest.raises(fxopt.StateWriteError) as info:
        fxopt.trace(model.eval(), torch.randn(2, 8))
    message = str(info.value)
    assert name in info.value.names
    assert f"'{name}' is {how}" in message
    assert line in message and "test_module_state.py" in message
    assert info.value.module_path == name.rpartition(".")[0]


def test_writes_no_output_reads_are_left_out_with_a_warning():
    model = Monitor().eval()
    before = _state(model)
    x = torch.randn(2, 8)
    with pytest.warns(fxopt.FxoptWarning) as record:
        compiled = fxopt.compile(model, "cpu", example_inputs=(x,))
    texts = [str(w.message) for w in record if "never reaches an output" in str(w.message)]
    assert len(texts) == 2
    assert "buffer 'calls'" in texts[0] and "self.calls.add_(1)" in texts[0]
    assert "buffer 'feature_mean'" in texts[1] and "test_module_state.py" in texts[1]
    written = [n for n in compiled.graph_module.graph.nodes if str(n.target).endswith("_")]
    assert written == []  # the graph writes no state
    reference = _fresh(model)
    for _ in range(3):  # the eager model's state moves, its outputs do not: the compiled one matches each call
        torch.testing.assert_close(compiled(x), reference(x.clone()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_traced_graph_keeps_the_models_state_not_fxopts_runs():
    model = Monitor().eval()
    with pytest.warns(fxopt.FxoptWarning):
        gm = fxopt.trace(model, torch.randn(2, 8))
    assert {w.name for w in state_writes_of(gm)} == {"calls", "feature_mean"}
    assert all(not w.reaches_output for w in state_writes_of(gm))
    # fxopt ran the forward several times (check run, tracing, shape propagation): none of it shows
    assert torch.equal(gm.get_buffer("feature_mean"), torch.zeros(8))
    for _ in range(2):
        gm(torch.randn(2, 8))
    assert torch.equal(gm.get_buffer("feature_mean"), torch.zeros(8))


class KeepsLastFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("last", torch.zeros(2, 8))

    def forward(self, x):
        y = self.lin(x)
        torch.mul(y, 2, out=self.last)
        return y.relu()


def test_an_out_write_no_output_reads_leaves_the_graph():
    with pytest.warns(fxopt.FxoptWarning, match=r"buffer 'last' is written in place \(mul\)"):
        gm = fxopt.trace(KeepsLastFeatures().eval(), torch.randn(2, 8))
    assert [n for n in gm.graph.nodes if "out" in n.kwargs] == []
    gm(torch.randn(2, 8))
    assert torch.equal(gm.get_buffer("last"), torch.zeros(2, 8))


def test_in_place_ops_on_activations_and_eval_batchnorm_are_not_state_writes():
    model = InPlaceOnActivations().eval()
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxopt.FxoptWarning)
        compiled = fxopt.compile(model, "cpu", example_inputs=(x,))
    assert state_writes_of(compiled.graph_module) == ()
    assert "mul_" in compiled.graph_module.code  # the write into the input copy is kept
    torch.testing.assert_close(compiled(x.clone()), model(x.clone()))


def test_batchnorm_model_in_train_mode_compiles_without_a_state_write():
    # compile works on an eval copy: running statistics are read, not written
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    assert find_state_writes(model.eval(), lambda: model(torch.randn(2, 3, 8, 8))) == []
    model.train()
    compiled = fxopt.compile(model, "cpu", example_inputs=(torch.randn(2, 3, 8, 8),))
    assert state_writes_of(compiled.graph_module) == ()
    assert int(model[1].num_batches_tracked) == 0


def test_find_state_writes_names_submodule_state_and_puts_it_back():
    model = WithBatchStats().eval()
    x = torch.randn(4, 8)
    writes = find_state_writes(model, lambda: model(x))
    assert [(w.name, w.kind) for w in writes] == [("norm.rm", "buffer"), ("norm.rv", "buffer")]
    assert torch.equal(model.norm.rm, torch.zeros(8)) and torch.equal(model.norm.rv, torch.ones(8))


def test_snapshot_puts_back_a_reassigned_buffer_and_values_written_in_place():
    model = Reassigned()
    original = model.calls
    snapshot = StateSnapshot(model)
    model(torch.randn(2, 8))
    with torch.no_grad():
        model.lin.weight.mul_(3)
    assert snapshot.changed(model) == {"lin.weight": "written in place", "calls": "re-assigned"}
    snapshot.restore(model)
    assert model.calls is original and float(model.calls) == 0.0
    assert snapshot.changed(model) == {}


def test_snapshot_of_a_copy_keeps_the_originals_tensors_not_clones():
    import copy

    model = Reassigned()
    twin = copy.deepcopy(model)
    snapshot = StateSnapshot(twin, original=model)
    assert snapshot.saved["lin.weight"][2].data_ptr() == model.lin.weight.data_ptr()  # the original's storage, not a clone
    twin(torch.randn(2, 8))
    with torch.no_grad():
        twin.lin.weight.mul_(3)
    snapshot.restore(twin)
    assert torch.equal(twin.lin.weight, model.lin.weight) and float(twin.calls) == 0.0
    assert snapshot.changed(twin) == {}
    assert float(model.calls) == 0.0  # the original is only read


def test_lazy_module_not_yet_run_is_an_input_error():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU())
    with pytest.raises(fxopt.InputError, match=r"not initialised yet .* run the model once"):
        fxopt.trace(model, torch.randn(2, 8))


class EagerCounterDetector(nn.Module):
    """A staged model: the eager root forward counts calls and scales the graph part's output."""

    def __init__(self):
        super().__init__()
        self.backbone = Monitor()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.backbone(x) * self.calls


def test_staged_compile_starts_from_the_models_state():
    model = EagerCounterDetector().eval()
    x = torch.randn(2, 8)
    calib = [(torch.randn(2, 8),) for _ in range(3)]
    split = split_stages(model, (x,), "backbone")
    assert torch.equal(split.root.backbone.feature_mean, torch.zeros(8))  # the capture run left no trace
    with pytest.warns(fxopt.FxoptWarning, match="feature_mean"):
        compiled = fxopt.compile(model, "cpu", example_inputs=(x,), stages="backbone", calib_data=calib)
    reference = _fresh(model)
    for _ in range(2):  # the eager counter starts at the model's 0, not at the calibration runs' count
        torch.testing.assert_close(compiled(x.clone()), reference(x.clone()))
    assert float(model.calls) == 0.0


class _ManyTensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(40)])
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("halves", torch.randn(3, 4).half())
        self.register_buffer("steps", torch.tensor(7))
        self.register_buffer("odd", torch.randn(4, 6).t())  # not contiguous
        self.register_buffer("nan", torch.tensor([float("nan"), 1.0]))
        self.register_buffer("empty", torch.zeros(0, 3))
        self.register_buffer("sparse", torch.eye(3).to_sparse())


@pytest.mark.parametrize("chunk_bytes", [16 << 20, 4096, 64, 1])  # one comparison, several chunks, (almost) one tensor per chunk
def test_the_snapshot_finds_writes_that_bump_no_version_among_many_tensors(monkeypatch, chunk_bytes: int) -> None:
    import fxopt.frontend.module_state as module_state

    monkeypatch.setattr(module_state, "_COMPARE_CHUNK_BYTES", chunk_bytes)
    joined: list[int] = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda ts, *a, **k: (joined.append(sum(t.numel() * t.element_size() for t in ts)), real_cat(ts, *a, **k))[1])
    model = _ManyTensors()
    snapshot = StateSnapshot(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert snapshot.changed(model) == {}  # NaN equals itself bit for bit
    model.layers[17].weight.data[3, 2] += 1.0  # through .data: no version bump
    model.odd.data[1, 1] = 5.0
    model.mask.data[1] = True
    model.halves.data.zero_()
    expected = ["layers.17.weight", "mask", "halves", "odd"]
    assert snapshot.changed(model) == dict.fromkeys(expected, "changed")
    snapshot.restore(model)
    assert snapshot.changed(model) == {}
    assert max(joined, default=0) <= chunk_bytes  # no copy beyond a chunk: a large tensor is compared in place
    assert (len(joined) > 0) == (chunk_bytes > 1)  # small tensors share a comparison wherever two fit in a chunk
    after = model.state_dict()
    assert all(torch.equal(before[k].to_dense() if before[k].is_sparse else before[k], after[k].to_dense() if after[k].is_sparse else after[k])
               or k == "nan" for k in before)
