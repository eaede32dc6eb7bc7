"""NAS-slimming (`fxopt.passes.Slim`): search space found from the graph, exact depth removal,
width through the dependency groups, resolution changes, the latency constraint, seeded
reproducibility and a study shared by two worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from torch import nn

import fxopt
from fxopt.costs.cost_model import estimate_costs
from fxopt.errors import InputError
from fxopt.passes import Slim
from fxopt.passes.slim import (
    SlimCandidate,
    _Space,
    latency_range,
    output_divergence,
    recalibrate_batchnorm,
)
from fxopt.passes.slim_space import (
    find_removable_layers,
    find_residual_blocks,
    parse_resolutions,
    remove_blocks,
)
from fxopt.passinfra.pass_base import CompileContext, use_context
from fxopt.verification.numerics import flatten_outputs

optuna = pytest.importorskip("optuna")  # a dev dependency: the import error would name it


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetish(nn.Module):
    """Fully convolutional: stem, two stages of two residual blocks, a 1x1 head."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.stage1 = nn.Sequential(Block(c), Block(c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.stage2 = nn.Sequential(Block(2 * c), Block(2 * c))
        self.head = nn.Conv2d(2 * c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.down(self.stage1(self.stem(x)))))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        inner = y + self.b(y)  # a block inside the body of the outer one
        return x + inner


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = ResNetish()
    for mod in m.modules():  # non-trivial BatchNorm statistics, so re-estimating them matters
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


X = (torch.randn(1, 3, 32, 32),)
CALIB = [(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)),) for i in range(3)]


def _run(p: Slim, gm: torch.fx.GraphModule, target: str = "xavier", **options):
    ctx = CompileContext.create(target, X, calib_data=CALIB, **options)
    with use_context(ctx):
        return p(gm)


def test_blocks_found_on_a_residual_net_and_none_on_a_plain_chain():
    gm = fxopt.trace(_model(), X)
    blocks = find_residual_blocks(gm)
    assert [b.scope for b in blocks] == ["stage1.0", "stage1.1", "stage2.0", "stage2.1"]
    assert all(len(b.body) == 5 for b in blocks)  # conv1, bn1, relu, conv2, bn2
    chain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
    assert find_residual_blocks(fxopt.trace(chain, X)) == []


def test_an_add_of_two_branches_or_a_tapped_body_is_not_a_block():
    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    class Tapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            f = self.a(x)
            return x + self.b(f), f  # f is read outside the block

    assert find_residual_blocks(fxopt.trace(TwoBranches(), X)) == []
    assert find_residual_blocks(fxopt.trace(Tapped(), X)) == []


def test_removing_a_block_is_exact_where_the_block_is_zeroed():
    model = _model()
    with torch.no_grad():  # f(x) == 0 for stage2.0: bn2 outputs zeros
        model.stage2[0].bn2.weight.zero_()
        model.stage2[0].bn2.bias.zero_()
    gm = fxopt.trace(model, X)
    block = next(b for b in find_residual_blocks(gm) if b.scope == "stage2.0")
    before = gm(*X)
    remove_blocks(gm, [block])
    assert not any(n.name in block.body for n in gm.graph.nodes)
    assert "stage2.0.conv1" not in dict(gm.named_modules())  # its modules are gone too
    torch.testing.assert_close(gm(*X), before, rtol=0, atol=0)


def test_after_removal_an_inplace_activation_no_longer_writes_into_the_skip_input():
    class InplaceBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.conv, self.relu = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True)

        def forward(self, x):
            y = torch.relu(self.pre(x))
            return self.relu(y + self.conv(y)), y  # y is also an output: an in-place ReLU on it would corrupt it

    gm = fxopt.trace(InplaceBlock().train(), X)
    remove_blocks(gm, find_residual_blocks(gm))
    out, y = gm(*X)
    assert not gm.get_submodule("relu").inplace
    (out.sum() + y.sum()).backward()  # autograd still has the tensors it saved
    assert torch.equal(out, y)


def test_nested_blocks_any_subset_can_be_removed():
    x = (torch.randn(1, 8, 8, 8),)
    gm = fxopt.trace(Nested(), x)
    blocks = find_residual_blocks(gm)
    assert len(blocks) == 2
    for subset in ([blocks[0]], [blocks[1]], blocks, blocks[::-1]):
        g = fxopt.trace(Nested(), x)
        remove_blocks(g, subset)
        assert g(*x).shape == (1, 8, 8, 8)
    outer = next(b for b in blocks if b.skip == "x")
    g = fxopt.trace(Nested(), x)
    remove_blocks(g, [outer])
    torch.testing.assert_close(g(*x), x[0])


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PlainChain(nn.Module):
    """PointPillars-like: each stage a strided conv-BN-ReLU then same-width conv-BN-ReLU layers."""

    def __init__(self) -> None:
        super().__init__()
        self.s1 = nn.Sequential(_cbr(3, 16, 2), _cbr(16, 16), _cbr(16, 16))
        self.s2 = nn.Sequential(_cbr(16, 32, 2), _cbr(32, 32))
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.s2(self.s1(x)))


def _plain(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = PlainChain()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_removable_layers_of_a_plain_chain_and_none_taken_where_residual_blocks_exist():
    gm = fxopt.trace(_plain(), X)
    layers = find_removable_layers(gm)
    # stride-1 convs with as many output as input channels; the strided ones and the head are not layers
    assert [(b.scope, b.kind, len(b.body)) for b in layers] == [("s1.1.0", "layer", 2), ("s1.2.0", "layer", 2), ("s2.1.0", "layer", 2)]
    # removing consecutive layers (the second one's input is the first one's output) leaves the chain without both
    g = fxopt.trace(_plain(), X)
    remove_blocks(g, layers)
    model = _plain()
    with torch.no_grad():
        reference = model.head(model.s2[0](model.s1[0](X[0])))
    torch.testing.assert_close(g(*X), reference)
    assert not any(name.startswith(("s1.1", "s1.2", "s2.1")) for name, _ in g.named_modules())
    # a residual net searches its blocks; its conv1 layers (inside the blocks) are not offered
    assert not _Space(fxopt.trace(_plain(), X), X, ("depth", "width"), None, (0.5, 1.0), 8, 0.9).layers  # opt-in
    space = _Space(fxopt.trace(_model(), X), X, ("depth", "layers", "width"), None, (0.5, 1.0), 8, 0.9)
    assert not space.layers and {b.kind for b in space.blocks} == {"residual"} and len(space.blocks) == 4


def test_slim_removes_layers_of_a_plain_chain_under_a_budget_width_and_depth_together():
    gm = fxopt.trace(_plain(), X)
    floor_depth, base = latency_range(gm, X, "xavier", "fp16", space=("layers", "width"))
    floor_width, _ = latency_range(gm, X, "xavier", "fp16")  # the default space: nothing to remove in a plain chain
    assert floor_depth < floor_width < base  # removable layers take the floor further than width alone
    assert floor_depth / base < 0.85
    p = Slim(latency_ratio=0.85, trials=16, seed=0, space=("depth", "layers", "width"))
    out = _run(p, gm).graph_module
    assert estimate_costs(out, "xavier", "fp16").latency_s <= 0.85 * base + 1e-12
    assert out(*X).shape == gm(*X).shape
    chosen = out.meta["fxopt_tables"]["slim: chosen architecture"]
    assert {r["choice"].split(":")[0] for r in chosen if r["dimension"] == "depth"} == {"s1.1.0", "s1.2.0", "s2.1.0"}
    assert any(r["choice"].endswith("removed") for r in chosen if r["dimension"] == "depth")


def test_pointpillars_plain_backbone_gets_layer_depth():
    torch.manual_seed(0)
    model = fxopt.models.create("pointpillars").eval()
    inputs = fxopt.models.example_inputs("pointpillars")
    gm = fxopt.trace(model, inputs)
    assert [b.scope for b in find_removable_layers(gm)] == [
        "backbone.blocks.0.3", "backbone.blocks.1.3", "backbone.blocks.1.6", "backbone.blocks.2.3", "backbone.blocks.2.6"]
    floor, base = latency_range(gm, inputs, "xavier", "int8", space=("layers", "width"))
    floor_width, _ = latency_range(gm, inputs, "xavier", "int8")
    assert floor / base < floor_width / base - 0.03  # width alone stops at 0.88x of the estimate


def test_a_layer_is_removed_before_the_width_plan_so_any_subset_builds_at_any_width():
    class Tapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.layer, self.head = _cbr(3, 16), _cbr(16, 16), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = self.stem(x)
            return y, self.head(self.layer(y))  # y is a model output: its channels are never pruned

    torch.manual_seed(0)
    for model in (Tapped().eval(), _plain()):
        gm = fxopt.trace(model, X)
        space = _Space(gm, X, ("layers", "width"), None, (0.25, 0.5, 1.0), 8, 0.9)
        assert space.layers and space.blocks
        for k in range(len(space.blocks) + 1):
            for width in (0.25, 0.5):
                c = SlimCandidate(tuple(b.scope for b in space.blocks[:k]), tuple((st, width) for st in space.stages))
                built, inputs = space.build(c)
                shapes = [o.shape for o in flatten_outputs(built(*inputs))]
                assert shapes == [o.shape for o in flatten_outputs(gm(*X))]
                assert space.latency_s(c, "xavier", "fp16") > 0


def test_search_meets_the_budget_and_changes_depth_and_width():
    gm = fxopt.trace(_model(), X)
    base = estimate_costs(gm, "xavier", "fp16").latency_s
    p = Slim(latency_ratio=0.8, trials=12, seed=0)
    out = _run(p, gm).graph_module
    after = estimate_costs(out, "xavier", "fp16").latency_s
    assert after <= 0.8 * base + 1e-12
    trials = [t for t in p.study.trials if t.user_attrs.get("constraint", 1) <= 0]
    assert trials and all(t.user_attrs["latency_ms"] <= 0.8 * base * 1e3 + 1e-9 for t in trials)
    chosen = out.meta["fxopt_tables"]["slim: chosen architecture"]
    assert {r["dimension"] for r in chosen} >= {"latency", "proxy", "depth", "width"}
    assert out(*X).shape == gm(*X).shape
    # the chosen candidate's kept channels are multiples of Xavier's fp16 alignment (8) or whole
    for m in out.modules():
        if isinstance(m, nn.Conv2d) and m.out_channels not in (4, 16, 32):
            assert m.out_channels % 8 == 0


def test_width_goes_through_the_dependency_groups():
    gm = fxopt.trace(_model(), X)
    p = Slim(latency_ratio=0.99, trials=3, space=("width",), width_choices=(0.5,), seed=0)
    out = _run(p, gm).graph_module
    assert p.chosen.widths == (("32x32", 0.5), ("16x16", 0.5))
    # the residual adds couple each stage's convs: all of a stage's outputs shrink together
    mod = out.get_submodule
    assert mod("stem.0").out_channels == 8 and mod("stage1.0.conv2").out_channels == 8
    assert mod("down.0").out_channels == 16 and mod("stage2.1.conv2").out_channels == 16
    assert mod("head").out_channels == 4  # a model output is never pruned


def test_the_same_seed_gives_the_same_search():
    gm = fxopt.trace(_model(), X)
    runs = []
    for _ in range(2):
        p = Slim(latency_ratio=0.8, trials=8, seed=3)
        _run(p, gm)
        runs.append(([t.params for t in p.study.trials], p.chosen))
    assert runs[0] == runs[1]


def test_resolution_change_on_a_fully_convolutional_model_changes_the_compile_inputs(tmp_path):
    model = _model()
    compiled = fxopt.compile(
        model, "cpu", example_inputs=X, passes=[Slim(trials=4, space=("resolution",), seed=0, measure="estimate")],
        latency_ratio=0.5, resolutions=[(16, 16), (24, 24)], calib_data=CALIB,  # only 16x16 meets the budget
    )
    assert compiled.input_shapes == [[1, 3, 16, 16]]
    assert compiled.manifest["example_inputs"] == [[1, 3, 16, 16]]
    assert any("input shape" in n and "WARNING" in n for n in compiled.report.notes)
    onnx_shape = [d.dim_value for d in compiled.onnx_model.graph.input[0].type.tensor_type.shape.dim]
    assert onnx_shape == [1, 3, 16, 16]
    assert compiled(torch.randn(1, 3, 16, 16)).shape == (1, 4, 8, 8)
    saved = compiled.save(tmp_path / "out")
    assert {"trials.csv", "pareto.png", "study.db"} <= set(os.listdir(tmp_path / "out"))
    assert open(saved["pareto.png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_requests_are_clear_errors():
    gm = fxopt.trace(_model(), X)
    with pytest.raises(InputError, match="calib_data"):
        with use_context(CompileContext.create("xavier", X)):
            Slim(latency_ratio=0.5)(gm)
    with pytest.raises(InputError, match="latency budget"):
        _run(Slim(), gm)
    with pytest.raises(InputError, match="unreachable"):
        _run(Slim(latency_ratio=0.01, trials=2), gm)
    floor_s, base_s = latency_range(gm, X, "xavier", "fp16")
    assert 0 < floor_s < base_s == estimate_costs(gm, "xavier", "fp16").latency_s
    with pytest.raises(InputError, match="space"):
        Slim(space=("depth", "colour"))
    with pytest.raises(InputError, match="only the spatial dims"):
        parse_resolutions([(1, 4, 16, 16)], X)
    with pytest.raises(InputError, match="cannot take"):
        _run(Slim(latency_ratio=0.9, trials=2, space=("resolution",)), fxopt.trace(_Flat(), X), resolutions=[(16, 16)])


class _Flat(nn.Module):
    """Flattens into a linear layer: it takes one input size only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_proxy_pieces():
    ref = torch.randn(4, 10)
    assert output_divergence(ref, ref) == 0.0
    assert output_divergence(ref + 1.0, ref) == pytest.approx(0.0, abs=1e-12)  # softmax ignores a shift
    assert output_divergence(ref * 2, ref) > 0
    seg = torch.randn(1, 3, 8, 8)
    assert output_divergence(torch.zeros_like(seg), seg) == pytest.approx(1.0)
    small = torch.nn.functional.interpolate(seg, size=(4, 4), mode="bilinear", align_corners=False)
    assert 0 < output_divergence(small, seg) < 1  # compared after resizing back
    bn = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    batches = [(torch.randn(4, 3, 8, 8) * 3 + 5,)]
    assert recalibrate_batchnorm(bn, batches) == 1
    conv_out = bn[0](batches[0][0])
    torch.testing.assert_close(bn[1].running_mean, conv_out.mean((0, 2, 3)).detach(), rtol=1e-4, atol=1e-4)
    assert not bn[1].training and bn[1].momentum == 0.1


WORKER = textwrap.dedent("""
    import sys, torch, fxopt
    sys.path.insert(0, {tests!r})
    from test_slim import _model, _run, X
    from fxopt.passes import Slim
    p = Slim(latency_ratio=0.8, trials=4, seed=int(sys.argv[1]), storage={storage!r}, study_name="shared")
    _run(p, fxopt.trace(_model(), X))
    print("TRIALS", len(p.study.trials))
""")


def test_two_workers_share_one_study(tmp_path):
    storage = str(tmp_path / "study.journal")
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=os.path.dirname(__file__), storage=storage))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, str(script), str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env) for seed in (1, 2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-2000:] for o in outs]
    study = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 * 4  # both workers' trials are in the one study
    seen = sorted(int(o[0].split("TRIALS")[1]) for o in outs)
    assert seen[1] >= 2 * 4  # the worker that finished last saw the other's trials too


def test_one_call_slim_finetune_int8_pipeline_reports_each_step():
    model = _model()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(4)]
    with torch.no_grad():
        data = [((x,), model(x)) for x in xs]  # learn the original's outputs back

    def eval_fn(graph):
        return -float(sum(torch.mean((graph(x) - y) ** 2) for (x,), y in data) / len(data))

    # keep_faster=False: int8 stays whether or not it measures faster on this host (the steps are under test, not the speed)
    compiled = fxopt.compile(
        model, "cpu", example_inputs=X, passes=[Slim(trials=6, space=("depth", "width"), seed=0, measure="estimate"),
                                                fxopt.create_pass("quantize", keep_faster=False)],
        latency_ratio=0.6, calib_data=CALIB, precision="int8", train_data=data, loss=torch.nn.functional.mse_loss,
        finetune_steps=10, finetune_lr=1e-3, eval_fn=eval_fn,
    )
    rows = compiled.report.tables["summary: input model and after each step"]
    assert [r["stage"] for r in rows] == ["input model", "after slim", "after fine-tune", "after int8"]
    fp32 = "est. cpu latency ms (fp32)"
    assert rows[1][fp32] <= 0.6 * rows[0][fp32] + 1e-9
    assert rows[0]["metric"] == 0.0 and rows[1]["metric"] < 0
    assert rows[2]["metric"] >= rows[1]["metric"]  # a scalar eval_fn: the fine-tune keeps its best state
    names = [r.name for r in compiled.report.passes]
    assert names.index("slim") < names.index("fold_batchnorm") < names.index("quantize")
    assert "summary: input model and after each step" in compiled.report.to_markdown()


def test_on_cpu_the_constraint_is_measured_in_onnxruntime(monkeypatch):
    import fxopt.verification.ort_timing

    gm = fxopt.trace(_model(), X)
    # a budget every candidate meets: measured latencies of so small a model are mostly fixed
    # overheads, so a ratio of them is at the mercy of the host's load (0.9 once failed in CI)
    p = Slim(latency_ms=1000.0, trials=3, space=("width",), seed=0)
    res = _run(p, gm, target="cpu")
    assert not res.modified and "measured in ONNX Runtime" in p.unchanged_reason  # the input graph meets it as it is
    # the input graph's measurement stalls past the budget, so the search runs and measures each candidate
    timings: list[list[float]] = []
    measure = fxopt.verification.ort_timing.ort_latencies_ms

    def first_stalled(*args, **kwargs):
        timings.append(measure(*args, **kwargs))
        return [2e6] if len(timings) == 1 else timings[-1]

    monkeypatch.setattr(fxopt.verification.ort_timing, "ort_latencies_ms", first_stalled)
    p = Slim(latency_ms=1000.0, trials=3, space=("width",), seed=0)
    out = _run(p, gm, target="cpu").graph_module
    chosen = out.meta["fxopt_tables"]["slim: chosen architecture"][0]["choice"]
    assert "measured in ONNX Runtime" in chosen and "input graph 2e+06 ms" in chosen
    done = [t for t in p.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(timings) == 2 + 3  # the input graph, the smallest candidate, then each trial
    assert [t.user_attrs["latency_ms"] for t in done] == [pytest.approx(m[0]) for m in timings[2:]]
    best = min((t for t in done if t.user_attrs["constraint"] <= 0), key=lambda t: t.value)
    assert best.user_attrs["latency_ms"] <= best.user_attrs["latency_ms"] - best.user_attrs["constraint"]  # within budget


def test_finetune_top_reranks_the_best_few_by_a_short_distillation():
    gm = fxopt.trace(_model(), X)
    p = Slim(latency_ratio=0.8, trials=8, seed=0, finetune_top=2, finetune_steps=3)
    out = _run(p, gm).graph_module
    rows = out.meta["fxopt_tables"]["slim: search (every trial)"]
    tuned = {r["trial"]: r["proxy after fine-tune"] for r in rows if r["proxy after fine-tune"] is not None}
    by_proxy = sorted((t for t in p.study.trials if t.user_attrs["constraint"] <= 0), key=lambda t: (t.value, t.number))
    even = [t.number for t in by_proxy if all(v for k, v in t.params.items() if k.startswith("depth:"))
            and len({v for k, v in t.params.items() if k.startswith("width:")}) <= 1]
    removed = {t.number: sum(not v for k, v in t.params.items() if k.startswith("depth:")) for t in by_proxy}
    fewest = [t.number for t in by_proxy if removed[t.number] == min(removed.values())]
    # the best two by proxy, the best even cut (every block kept, one width) and the best of the
    # trials removing the fewest blocks, where not among them
    expected = {t.number for t in by_proxy[:2]} | set(even[:1]) | set(fewest[:1])
    assert set(tuned) == expected and 2 <= len(tuned) <= 4
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["trial"] == min(tuned, key=tuned.get) and chosen["feasible"]
    assert out(*X).shape == gm(*X).shape
    with pytest.raises(InputError, match="finetune_top"):
        Slim(finetune_top=-1)


def test_finetune_top_inside_a_fine_tuning_compile_reranks_with_compiles_own_fine_tune():
    model = _model()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(4)]
    with torch.no_grad():
        data = [((x,), model(x)) for x in xs]
    calls = []

    def eval_fn(graph):
        calls.append(1)
        return -float(sum(torch.mean((graph(x) - y) ** 2) for (x,), y in data) / len(data))

    p = Slim(trials=6, space=("depth", "width"), seed=0, measure="estimate", finetune_top=2, finetune_steps=2)
    compiled = fxopt.compile(model, "cpu", example_inputs=X, passes=[p], latency_ratio=0.7, calib_data=CALIB,
                             train_data=data, loss=torch.nn.functional.mse_loss, finetune_steps=3, finetune_lr=1e-3,
                             eval_fn=eval_fn, export=False)
    rows = compiled.report.tables["slim: search (every trial)"]
    tuned = {r["trial"]: r["metric after fine-tune"] for r in rows if r["metric after fine-tune"] is not None}
    assert len(tuned) >= 2 and all(v <= 0 for v in tuned.values())  # -MSE: compile's metric, not the proxy
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["trial"] == max(tuned, key=tuned.get) and chosen["feasible"]
    rerank = next(r["choice"] for r in compiled.report.tables["slim: chosen architecture"] if r["dimension"] == "re-rank")
    assert "compile's fine-tune" in rerank and f"best of {len(tuned)}" in rerank
    assert len(calls) >= len(tuned) + 3  # each tuned candidate, the summary's three rows, compile's fine-tune


def test_finetune_request_tunes_in_place_and_scores_on_its_metric():
    from fxopt.distill import FinetuneRequest

    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 2), nn.Linear(4, 2)
    x = torch.randn(32, 4)
    data = [((x,), teacher(x).detach())]

    def error(m):
        with torch.no_grad():
            return -float(torch.mean((m(x) - data[0][1]) ** 2))

    before = error(student)
    request = FinetuneRequest(data=data, loss=torch.nn.functional.mse_loss, eval_fn=error, lr=0.05)
    assert request.scores
    score = request.tune_and_score(student, teacher, (x,), steps=40)
    assert score == error(student) and score > before  # tuned in place, scored at its last state
    with pytest.raises(InputError, match="scalar eval_fn"):
        FinetuneRequest(data=data, loss=torch.nn.functional.mse_loss).tune_and_score(student, teacher, (x,), steps=1)


def test_a_model_with_index_inputs_and_calibration_batches_of_another_batch_size():
    class Scatterish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 4, 1)

        def forward(self, x, idx):  # idx: (B, K) integer input, like pointpillars' pillar indices
            y = self.b(torch.relu(self.a(x)))
            return y.flatten(2).gather(2, idx[:, None, :].expand(-1, 4, -1))

    x = (torch.randn(1, 3, 16, 16), torch.randint(0, 256, (1, 8)))
    calib = [(torch.randn(2, 3, 16, 16), torch.randint(0, 256, (2, 8)))]
    gm = fxopt.trace(Scatterish().eval(), x)
    with use_context(CompileContext.create("xavier", x, calib_data=calib)):
        out = Slim(latency_ms=1e6, trials=2, seed=0, space=("width",))(gm).graph_module
    assert out(*x).shape == gm(*x).shape


def test_candidates_share_no_tensor_with_the_input_graph_so_proxies_and_rerank_leave_it_intact():
    # a candidate is built by slicing the input graph; its unsliced tensors (BatchNorm statistics,
    # heads) used to be the input graph's own, so every proxy's BatchNorm re-estimation and every
    # re-rank fine-tune wrote into the graph the later candidates, the teacher and the final build
    # came from
    gm = fxopt.trace(_model(), X)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    p = Slim(latency_ratio=0.8, trials=6, seed=0, finetune_top=2, finetune_steps=3)
    out = _run(p, gm).graph_module
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    inputs = {t.data_ptr() for t in gm.state_dict().values()}
    assert not inputs & {t.data_ptr() for t in out.state_dict().values()}


def _spaces_built(monkeypatch) -> list[int]:
    """A list that grows by one each time slim builds a search space (its first work on the graph)."""
    built: list[int] = []
    init = _Space.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(_Space, "__init__", counting)
    return built


def test_a_budget_the_input_meets_returns_it_unchanged_and_says_so():
    # Before: latency_ratio=1.5 removed every block and cut every width (the uncut model was never a candidate)
    gm = fxopt.trace(_model(), X)
    before = str(gm.graph)
    p = Slim(latency_ratio=1.5, trials=12, seed=0)
    res = _run(p, gm)
    # Expected = Before
    assert res.modified is False and str(res.graph_module.graph) == before
    torch.testing.assert_close(res.graph_module(*X), gm(*X), rtol=0, atol=0)
    assert "already meets the latency budget" in p.unchanged_reason and "nothing was searched" in p.unchanged_reason
    assert p.study is None and p.chosen == SlimCandidate((), (("32x32", 1.0), ("16x16", 1.0)), 0)
    rows = res.graph_module.meta["fxopt_tables"]["slim: search (every trial)"]
    assert rows == [{"trial": "input", "state": "input graph", "est. latency ms": rows[0]["est. latency ms"], "feasible": True,
                     "proxy": 0.0, "removed blocks": 0, "widths": "32x32:1 16x16:1", "resolution": 0, "chosen": True}]


def test_compile_with_a_budget_the_input_meets_keeps_the_model_and_warns():
    model = _model()
    base_ms = estimate_costs(fxopt.trace(model, X), "xavier", "fp16").latency_s * 1e3
    compiled = fxopt.compile(model, "xavier", example_inputs=X, precision="fp16", passes=[Slim(trials=4, seed=0)],
                             latency_ms=base_ms * 6, calib_data=CALIB, export=False)  # like --latency-ms 2.5 on a 0.44 ms model
    record = next(r for r in compiled.report.passes if r.name == "slim")
    assert record.status == "unchanged" and "already meets the latency budget" in record.reason
    assert any(n.startswith("WARNING: requested pass 'slim' changed nothing") and "already meets" in n for n in compiled.report.notes)
    assert record.after.flops == record.before.flops
    assert [r["trial"] for r in compiled.report.tables["slim: search (every trial)"] if r["chosen"]] == ["input"]
    torch.testing.assert_close(compiled(*X), model(*X), rtol=1e-5, atol=1e-5)


def test_the_candidate_table_holds_the_input_graph_and_trials_csv_the_trials():
    gm = fxopt.trace(_model(), X)
    base_ms = estimate_costs(gm, "xavier", "fp16").latency_s * 1e3
    p = Slim(latency_ratio=0.97, trials=3, space=("width",), seed=0)  # the width-only floor is 0.94x
    out = _run(p, gm).graph_module
    rows = out.meta["fxopt_tables"]["slim: search (every trial)"]
    assert rows[0]["trial"] == "input" and rows[0]["proxy"] == 0.0 and rows[0]["feasible"] is False
    assert rows[0]["est. latency ms"] == pytest.approx(base_ms, abs=1e-4) and not rows[0]["chosen"]
    assert [r["trial"] for r in rows[1:]] == [t.number for t in p.study.trials]
    csv_rows = out.meta["fxopt_files"]["trials.csv"].strip().splitlines()
    assert len(csv_rows) == 1 + len(p.study.trials) and not any(r.startswith("input,") for r in csv_rows)


def test_a_trial_of_the_input_itself_that_meets_the_budget_returns_the_input_unchanged(monkeypatch):
    # a measured latency varies: the input graph's first measurement misses the budget, a trial of it meets it
    gm = fxopt.trace(_model(), X)
    base = estimate_costs(gm, "xavier", "fp16").latency_s
    measured: list[SlimCandidate] = []
    latency_s = _Space.latency_s

    def first_one_slow(self, c, target, precision):
        measured.append(c)
        return latency_s(self, c, target, precision) * (2 if len(measured) == 1 else 1)

    monkeypatch.setattr(_Space, "latency_s", first_one_slow)
    p = Slim(latency_ms=base * 1e3 * 1.2, trials=4, space=("width",), width_choices=(0.5, 1.0), seed=0)
    res = _run(p, gm)
    uncut = SlimCandidate((), (("32x32", 1.0), ("16x16", 1.0)), 0)
    assert res.modified is False and str(res.graph_module.graph) == str(gm.graph)
    assert p.chosen == uncut and "the input graph itself is the best candidate" in p.unchanged_reason
    rows = res.graph_module.meta["fxopt_tables"]["slim: search (every trial)"]
    chosen = next(r for r in rows if r["chosen"])
    assert chosen["trial"] != "input" and chosen["proxy"] == 0.0 and chosen["widths"] == "32x32:1 16x16:1"
    assert "trials.csv" in res.graph_module.meta["fxopt_files"]


def test_a_bad_storage_is_refused_when_the_pass_is_made(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="'nosuchdb'.*SQLAlchemy does not know"):
        Slim(storage="nosuchdb://host/study")
    with pytest.raises(InputError, match=r"'postgresql://user:\*\*\*@host:port/db' is not a database URL") as err:
        Slim(storage="postgresql://user:s@cret@host:port/db")
    assert "cret" not in str(err.value)
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # the driver is not installed
    with pytest.raises(InputError, match=r"'postgresql\+psycopg2://user:\*\*\*@host/db'.*'psycopg2'.*pip install psycopg2-binary") as err:
        Slim(storage="postgresql+psycopg2://user:secret@host/db")
    assert "secret" not in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        Slim(storage=str(tmp_path / "missing" / "study.journal"))
    with pytest.raises(InputError, match="storage URL"):
        Slim(storage="study.db")
    with pytest.raises(InputError, match="BaseStorage"):
        Slim(storage=42)


def test_a_storage_that_cannot_be_opened_and_a_missing_budget_fail_before_any_work(tmp_path, monkeypatch):
    built = _spaces_built(monkeypatch)
    gm = fxopt.trace(_model(), X)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    p = Slim(latency_ratio=0.8, trials=2, storage=f"sqlite:///{not_a_folder}/study.db")
    with pytest.raises(InputError, match=f"cannot open the Optuna storage 'sqlite:///{not_a_folder}/study.db'"):
        _run(p, gm)
    with pytest.raises(InputError, match="latency budget"):
        _run(Slim(trials=2), gm)
    with pytest.raises(InputError, match="latency_ratio must be a positive number"):
        _run(Slim(trials=2), gm, latency_ratio=-1)
    with pytest.raises(InputError, match="not both"):
        Slim(latency_ms=1.0, latency_ratio=0.5)
    assert built == [] and p.study is None


def test_a_budget_below_the_floor_names_the_floor_and_the_budget_in_one_line():
    model = _model()
    gm = fxopt.trace(model, X)
    floor_s, _ = latency_range(gm, X, "xavier", "fp16")
    with pytest.raises(InputError) as err:
        _run(Slim(latency_ms=0.001, trials=2), gm)
    message = str(err.value)
    assert "budget 0.001 ms" in message and f"floor, {floor_s * 1e3:.4g} ms" in message and "\n" not in message
    at_least = float(message.split("at least ")[1].split(" ms")[0])
    assert floor_s * 1e3 <= at_least <= floor_s * 1e3 * 1.001
    compiled = fxopt.compile(model, "xavier", example_inputs=X, precision="fp16", passes=[Slim(trials=2)],
                             latency_ms=0.001, calib_data=CALIB, export=False)
    record = next(r for r in compiled.report.passes if r.name == "slim")
    assert record.status == "rolled_back" and "below this search space's floor" in record.reason and "\n" not in record.reason


def _study_of(space: _Space, trials: list[tuple[dict[str, float], float, float]], budget_ms: float) -> Any:
    """An in-memory study holding `trials` (width params, proxy, latency in ms) as completed."""
    study = optuna.create_study(direction="minimize")
    dist = optuna.distributions.CategoricalDistribution(list(space.width_choices))
    for params, proxy, ms in trials:
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dist for k in params}, value=proxy,
                                                  user_attrs={"latency_ms": ms, "constraint": ms - budget_ms}))
    return study


class _FewestParameters:
    """Compile's fine-tune request as the re-rank sees it, scoring a candidate by how small it is."""

    scores = True

    def tune_and_score(self, gm, teacher, batch, steps, progress=False):
        return -float(sum(p.numel() for p in gm.parameters()))


def test_rerank_never_passes_over_a_less_compressed_better_proxy_trial_untried_and_says_why():
    from fxopt.passes.slim import _Search
    from fxopt.targets import get_target

    gm = fxopt.trace(_model(), X)
    space = _Space(gm, X, ("width",), None, (0.25, 0.5, 1.0), 1, 0.9)  # alignment 1: each width builds its own
    assert space.stages == ["32x32", "16x16"]
    study = _study_of(space, [({"width:32x32": 0.5, "width:16x16": 0.25}, 0.1, 0.3),    # 0: best proxy
                              ({"width:32x32": 0.25, "width:16x16": 0.25}, 0.3, 0.2),   # 1: the even cut, most compressed
                              ({"width:32x32": 0.25, "width:16x16": 0.5}, 0.2, 0.3),    # 2: neither top nor even
                              ({"width:32x32": 1.0, "width:16x16": 0.5}, 0.05, 0.6)], budget_ms=0.5)  # 3: over the budget
    base_s = space.latency_s(space.uncut(), get_target("xavier"), "fp16")
    search = _Search(space, list(CALIB[:1]), [gm(*CALIB[0])], get_target("xavier"), "fp16", 0.5e-3, base_s)
    assert search.best(study).number == 0 and search.passed_over(study, search.best(study)) == []  # the proxy alone
    best = search.rerank(study, top=1, steps=1, teacher=gm, request=_FewestParameters())
    assert best.number == 1 and set(search.tuned) == {0, 1, 2}  # trial 2 was tuned only because the choice passed it over
    rows = search.choice_rows(study, search.candidate_of(best.params), best, base_s, 0.5e-3, 0.0)
    passed = [r["choice"] for r in rows if r["dimension"] == "passed over"]
    assert len(passed) == 2 and passed[0].startswith("trial 0 ") and passed[1].startswith("trial 2 ")
    assert all("less compressed" in p and "after the same short fine-tune its metric is" in p for p in passed)


def test_options_are_one_validated_settings_record():
    from fxopt.passes.slim import SlimSettings

    by_keyword = Slim(latency_ratio=0.5, trials=3, width_choices=[0.75, 0.5])
    assert by_keyword.settings == SlimSettings(latency_ratio=0.5, trials=3, width_choices=(0.5, 0.75))
    assert Slim(SlimSettings(latency_ms=2.0)).options()["latency_ms"] == 2.0
    with pytest.raises(fxopt.InputError, match="unknown option"):
        Slim(latency_ratio=0.5, trails=3)
    with pytest.raises(fxopt.InputError, match="not both"):
        Slim(SlimSettings(latency_ms=2.0), trials=3)


def test_a_shared_storage_keeps_one_study_per_budget_and_refuses_a_named_study_of_another(tmp_path):
    storage = str(tmp_path / "studies.journal")
    runs = {}
    for ratio in (0.8, 0.8, 0.7):
        p = Slim(latency_ratio=ratio, trials=2, seed=0, storage=storage, measure="estimate")
        _run(p, fxopt.trace(_model(), X))
        runs.setdefault(ratio, []).append(p.study)
    assert runs[0.8][0].study_name == runs[0.8][1].study_name  # the same search: one study, its trials accumulate
    assert len(runs[0.8][1].trials) == 4
    assert runs[0.7][0].study_name != runs[0.8][0].study_name  # another budget: its constraint values are not this one's
    p = Slim(latency_ratio=0.7, trials=2, seed=0, storage=storage, study_name=runs[0.8][0].study_name, measure="estimate")
    with pytest.raises(fxopt.InputError, match="made for another search .*latency budget"):
        _run(p, fxopt.trace(_model(), X))
