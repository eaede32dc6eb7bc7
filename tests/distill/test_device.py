"""``device=``: where training, the fine-tune, QAT and slim's trial fine-tunes run. The default is
CUDA when present, else the CPU; on the CPU every result is the one the default gives, bit for bit;
a device this host does not have is an `InputError` naming it and what there is, before any work.
The CUDA tests run where a GPU is (skipped on a CPU-only host)."""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

import fxopt
from fxopt.distill import (
    Distill,
    FinetuneRequest,
    LogitKD,
    TensorBatches,
    finetune,
    training_device,
)
from fxopt.distill.device import available_devices, to_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
Y = (X.sum(1) > 0).long()


def _net(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 2))


def _accuracy(model: nn.Module) -> float:
    assert next(model.parameters()).device.type == "cpu"  # eval_fn sees the student at home
    return float((model(X).argmax(1) == Y).float().mean())


def _tune(**kw):
    student = _net()
    result = finetune(student, TensorBatches(X, Y, batch_size=16, seed=1), loss=nn.CrossEntropyLoss(), teacher=_net(32).eval(),
                      distill=Distill(logits=LogitKD(4.0)), steps=12, lr=3e-3, eval_fn=_accuracy, eval_every=5, seed=3,
                      progress=False, **kw)
    return student, result


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- resolution -------------------------------------------------------------------------------

@pytest.mark.skipif(CUDA, reason="the default is CUDA on this host")
def test_the_default_is_the_cpu_without_cuda():
    assert training_device() == torch.device("cpu")
    assert training_device(None) == training_device("cpu") == training_device(torch.device("cpu"))
    assert available_devices() == ["cpu"]


def test_the_default_is_the_current_cuda_device_where_there_is_one(monkeypatch):
    # the resolution's logic on a host that says it has two GPUs (nothing runs on them here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert training_device() == torch.device("cuda:1")
    assert training_device("cuda") == torch.device("cuda:1")
    assert training_device("cuda:0") == torch.device("cuda:0")
    assert training_device("cpu") == torch.device("cpu")
    with pytest.raises(fxopt.InputError, match=r"device='cuda:2' is not available here; training runs on one of: cpu, cuda:0, cuda:1"):
        training_device("cuda:2")


@pytest.mark.parametrize("device, message", [
    ("gpu", r"device='gpu' is not a device name"),
    ("cuda:x", r"device='cuda:x' is not a device name"),
    ("cuda:3", r"device='cuda:3'"),
    ("cpu:1", r"device='cpu:1' is not available here"),
    ("meta", r"device='meta' is not available here"),
    (0, r"device must be a name such as 'cpu', 'cuda' or 'cuda:1'"),
    (True, r"device must be a name"),
])
def test_a_device_this_host_lacks_is_refused_naming_it_and_what_there_is(device, message):
    with pytest.raises(fxopt.InputError, match=message) as error:
        training_device(device)
    assert "training runs on one of: cpu" in str(error.value)


@pytest.mark.skipif(CUDA, reason="this host has CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(fxopt.InputError, match=r"device='cuda': CUDA is not available on this host .*training runs on one of: cpu$"):
        training_device("cuda")


# --- batches ----------------------------------------------------------------------------------

@dataclasses.dataclass
class _Target:
    labels: torch.Tensor
    boxes: list[torch.Tensor]
    name: str = "scene"


Pair = namedtuple("Pair", "a b")


def test_to_device_moves_every_tensor_and_keeps_the_structure():
    meta = torch.device("meta")  # a device every host has: tensors without storage
    batch = ((torch.zeros(2, 3), 4), OrderedDict(target=_Target(torch.ones(2), [torch.zeros(1, 4)]), pair=Pair(torch.ones(1), "x")))
    moved = to_device(batch, meta)
    (x, four), rest = moved
    assert x.device == meta and x.shape == (2, 3) and four == 4
    assert type(rest) is OrderedDict and list(rest) == ["target", "pair"]
    target, pair = rest["target"], rest["pair"]
    assert type(target) is _Target and target.name == "scene"
    assert target.labels.device == meta and target.boxes[0].device == meta
    assert type(pair) is Pair and pair.a.device == meta and pair.b == "x"
    assert batch[0][0].device.type == "cpu"  # the original batch is not changed
    assert to_device(batch, torch.device("cpu")) is batch  # nothing to move: the same object


# --- CPU results are the default's, bit for bit -----------------------------------------------

def test_finetune_on_the_cpu_is_the_default_bit_for_bit():
    default, r_default = _tune()
    on_cpu, r_cpu = _tune(device="cpu")
    assert _same_state(default, on_cpu)
    assert r_default.history == r_cpu.history and r_default.evals == r_cpu.evals
    assert r_cpu.device == "cpu" and r_cpu.steps_run == 12
    assert next(on_cpu.parameters()).device.type == "cpu"


def test_a_refused_device_stops_finetune_before_any_work():
    class Counting(list):
        iterated = 0

        def __iter__(self):
            type(self).iterated += 1
            return super().__iter__()

    student = _net()
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(fxopt.InputError, match="device='cuda:7'"):
        finetune(student, Counting([(X, Y)]), loss=nn.CrossEntropyLoss(), steps=3, lr=1e-3, device="cuda:7", progress=False)
    assert Counting.iterated == 0
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_train_on_the_cpu_is_the_default_bit_for_bit():
    default = fxopt.models.train("safety_supervisor", 3, seed=1, progress=False)
    on_cpu = fxopt.models.train("safety_supervisor", 3, seed=1, progress=False, device="cpu")
    assert _same_state(default.model, on_cpu.model)
    assert default.losses == on_cpu.losses and default.metrics == on_cpu.metrics


def test_train_refuses_a_device_before_building_the_model(monkeypatch):
    from fxopt.models import training

    built, real = [], training.spec

    class Watched:
        def __init__(self, found):
            self.found = found

        def __getattr__(self, name):
            return getattr(self.found, name)

        def build(self, **cfg):
            built.append(cfg)
            return self.found.build(**cfg)

    monkeypatch.setattr(training, "spec", lambda name: Watched(real(name)))
    assert len(fxopt.models.train("safety_supervisor", 0, progress=False, device="cpu").losses) == 0
    assert built == [{}]  # the watch sees a build
    built.clear()
    with pytest.raises(fxopt.InputError, match="device='gpu'"):
        fxopt.models.train("safety_supervisor", 3, device="gpu", progress=False)
    assert built == []


def _compile(**kw):
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)).eval()
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    return fxopt.compile(model, "cpu", example_inputs=(X[:1],), passes=[fxopt.passes.PruneChannels(amount=0.5, round_to=1)],
                         train_data=TensorBatches(X, Y, batch_size=16), loss=nn.CrossEntropyLoss(), finetune_steps=6,
                         finetune_lr=1e-2, distill="kd", export=False, **kw)


def test_compile_finetune_on_the_cpu_is_the_default_bit_for_bit():
    default, on_cpu = _compile(), _compile(device="cpu")
    assert _same_state(default.graph_module, on_cpu.graph_module)
    line = next(n for n in on_cpu.report.notes if n.startswith("fine-tune: 6 steps"))
    assert " on cpu, completed" in line


def test_compile_refuses_a_device_before_tracing():
    calls = []

    class Watched(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x * 2

    with pytest.raises(fxopt.InputError, match=r"device='cuda:3'.*training runs on one of: cpu"):
        fxopt.compile(Watched(), "cpu", example_inputs=(X[:1],), train_data=[((X,), Y)], loss=nn.MSELoss(), finetune_steps=2,
                      device="cuda:3", export=False)
    assert calls == []


def test_the_pass_and_the_request_refuse_a_device_when_built():
    with pytest.raises(fxopt.InputError, match="device='gpu'"):
        FinetuneRequest(device="gpu")
    with pytest.raises(fxopt.InputError, match="device='cuda:9'"):
        fxopt.create_pass("finetune", steps=2, data=[(X, Y)], loss=nn.CrossEntropyLoss(), device="cuda:9")
    assert FinetuneRequest(device="cpu").device == "cpu"


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


@pytest.mark.parametrize("scored", [False, True], ids=["proxy re-rank", "metric re-rank"])
def test_compiles_device_reaches_every_training_run_slims_trial_fine_tunes_too(scored, monkeypatch):
    pytest.importorskip("optuna")
    from fxopt.distill import loop

    asked, real = [], loop.training_device
    monkeypatch.setattr(loop, "training_device", lambda device=None: asked.append(device) or real(device))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _Block(8), _Block(8), nn.Conv2d(8, 4, 1)).eval()
    xs = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        data = [((x,), model(x)) for x in xs]
    slim = fxopt.passes.Slim(trials=4, space=("depth", "width"), seed=0, measure="estimate", finetune_top=2, finetune_steps=2)
    eval_fn = (lambda graph: -float(sum(torch.mean((graph(x) - y) ** 2) for (x,), y in data))) if scored else None
    compiled = fxopt.compile(model, "cpu", example_inputs=(xs[0][:1],), passes=[slim], latency_ratio=0.7,
                             calib_data=[(x[:1],) for x in xs], train_data=data, loss=nn.functional.mse_loss, finetune_steps=2,
                             finetune_lr=1e-3, eval_fn=eval_fn, device="cpu", export=False)
    column = "metric after fine-tune" if scored else "proxy after fine-tune"
    tuned = [r for r in compiled.report.tables["slim: search (every trial)"] if r[column] is not None]
    assert tuned and len(asked) >= len(tuned) + 1  # each re-ranked candidate and compile's fine-tune
    assert {str(d) for d in asked} == {"cpu"}  # none fell back to the default


# --- on a GPU ---------------------------------------------------------------------------------

@needs_cuda
def test_finetune_on_cuda_trains_there_and_brings_the_student_home():
    teacher = _net(32).eval()
    teacher_state = copy.deepcopy(teacher.state_dict())
    on_cpu, r_cpu = _tune(device="cpu")
    student = _net()
    r = finetune(student, TensorBatches(X, Y, batch_size=16, seed=1), loss=nn.CrossEntropyLoss(), teacher=teacher,
                 distill=Distill(logits=LogitKD(4.0)), steps=12, lr=3e-3, eval_fn=_accuracy, eval_every=5, seed=3,
                 progress=False, device="cuda")
    assert r.device.startswith("cuda:") and r.steps_run == 12
    assert {p.device.type for p in student.parameters()} == {"cpu"}
    assert {p.device.type for p in teacher.parameters()} == {"cpu"}  # the teacher ran as a copy
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    for a, b in zip(r.history, r_cpu.history):  # the same run, up to the GPU's rounding
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-4)


@needs_cuda
def test_compile_finetune_on_cuda_leaves_the_graph_on_the_cpu_and_exports_it():
    compiled = fxopt.compile(_net().eval(), "cpu", example_inputs=(X[:1],), train_data=TensorBatches(X, Y, batch_size=16),
                             loss=nn.CrossEntropyLoss(), finetune_steps=4, finetune_lr=1e-2, device="cuda")
    assert {t.device.type for t in compiled.graph_module.state_dict().values()} == {"cpu"}
    assert any(" on cuda:" in n for n in compiled.report.notes)
    assert compiled.report.onnx["max_abs_error_vs_torch"] < 1e-4


@needs_cuda
def test_train_on_cuda_returns_a_cpu_model_that_evaluates():
    result = fxopt.models.train("safety_supervisor", 3, seed=1, progress=False, device="cuda")
    assert {t.device.type for t in result.model.state_dict().values()} == {"cpu"}
    assert len(result.losses) == 3 and result.metrics
