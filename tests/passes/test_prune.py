"""PruneChannels: properties on random models, budgets, options, report, end-to-end compiles.

Tests about grouping and budgets pass ``round_to=1``: the cpu target aligns kept channels to 16
(bench/results/cpu_alignment.md), which leaves these small nets only a few coarse steps.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxopt
import fxopt.testing as ft
from fxopt.passes import PruneChannels
from fxopt.passes import prune as prune_module
from fxopt.passes.dependency_groups import analyze_dependencies, output_shapes
from fxopt.passes.prune import BUDGET_TABLE, TABLE, PrunePlan, apply_plan, empty_tensors, shape_only
from fxopt.passinfra.pass_base import use_context


def _leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------------------------------------
# properties on random models (fxopt.testing strategies)

_SOFTMAX = {F.softmax, torch.softmax, F.log_softmax}
_REDUCE = {torch.mean, torch.sum, torch.amax}


def _normalised_dims(gm, node) -> list[tuple[str, int]]:
    """(input node, dim) pairs a node normalises or averages over (cross-channel ops)."""
    src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    shape = output_shapes(src)[0] if src is not None and output_shapes(src) else None
    if shape is None:
        return []
    rank = len(shape)
    mod = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(mod, nn.LayerNorm) or node.target is F.layer_norm:
        k = len(mod.normalized_shape) if mod is not None else len(node.args[1])
        return [(src.name, d) for d in range(rank - k, rank)]
    if node.target is F.normalize:
        d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 1)
        return [(src.name, d % rank)]
    if node.target is F.scaled_dot_product_attention:
        return [(src.name, rank - 1)]  # the softmax scale reads the head dim
    dims = None
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        dims = [mod.dim]
    elif node.target in _SOFTMAX or node.target in ("softmax", "log_softmax"):
        dims = [node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")]
    elif node.target in _REDUCE or node.target in ("mean", "sum", "amax"):
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = list(range(rank)) if d is None else ([d] if isinstance(d, int) else list(d))
    return [(src.name, x % rank) for x in dims or () if isinstance(x, int)]


def _free_atoms(gm, analysis) -> np.ndarray:
    """Prunable atoms that never enter a cross-channel normalisation (where masking != removing)."""
    ok = np.zeros(analysis.num_atoms, dtype=bool)
    ok[[a for g in analysis.groups for a in g.atoms]] = True
    for node in gm.graph.nodes:
        for name, dim in _normalised_dims(gm, node):
            ok[analysis.elements((name, 0, dim))] = False
    return ok


@given(ft.models(), st.integers(0, 2**32 - 1))
def test_sliced_model_equals_masked_original(drawn, seed):
    """Property 1: removing channels == forcing them to zero in the original, at every node."""
    model, inputs = drawn
    gm = fxopt.trace(model, inputs)
    analysis = analyze_dependencies(gm)
    free = _free_atoms(gm, analysis)
    rng = np.random.default_rng(seed)
    removed = np.zeros(analysis.num_atoms, dtype=bool)
    for g in analysis.groups:
        candidates = [a for a in g.atoms if free[a]]
        if len(candidates) == len(g.atoms):
            candidates = candidates[1:]  # a group keeps at least one channel
        if candidates:
            removed[rng.choice(candidates, size=rng.integers(0, len(candidates) + 1), replace=False)] = True
    sliced = apply_plan(gm, analysis, removed, "slice")
    masked = apply_plan(gm, analysis, removed, "mask")
    with torch.no_grad():
        out, ref, orig = _leaves(sliced(*inputs)), _leaves(masked(*inputs)), _leaves(gm(*inputs))
    assert [t.shape for t in out] == [t.shape for t in orig]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@given(
    ft.models(),
    st.sampled_from([0.3, 0.6]),
    st.sampled_from(["channels", "params", "flops"]),
    st.sampled_from(["uniform", "global"]),
)
def test_pruning_keeps_output_shapes(drawn, amount, by, allocation):
    """Property 2: through the pass manager (which rolls back on a shape change) and ONNX."""
    model, inputs = drawn
    factory = functools.partial(PruneChannels, amount=amount, by=by, allocation=allocation)
    check = ft.check_pass(factory, model, inputs, export=False)
    assert check.record.status in ("applied", "unchanged")
    with torch.no_grad():
        assert [t.shape for t in _leaves(check.graph_module(*inputs))] == [t.shape for t in _leaves(model(*inputs))]


@given(ft.models())
def test_amount_zero_is_the_identity(drawn):
    """Property 3: amount=0 changes nothing and says so."""
    model, inputs = drawn
    check = ft.check_pass(functools.partial(PruneChannels, amount=0.0), model, inputs, export=False)
    assert check.record.status == "unchanged" and not check.modified
    with torch.no_grad():
        for a, b in zip(_leaves(check.graph_module(*inputs)), _leaves(model(*inputs))):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# hand-written models


class SmallResNet(nn.Module):
    """Stem, two residual stages with a downsample, flatten -> linear head."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w))
        self.b2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                                nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w))
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w))
        self.fc = nn.Linear(2 * w * 4 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = F.relu(self.down(x) + self.b2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 4), 1))


X = torch.randn(2, 3, 16, 16)


def _run(p: PruneChannels, model: nn.Module = None, target: str = "xavier", **options):
    model = model if model is not None else SmallResNet().eval()
    gm = fxopt.trace(model, (X,))
    with use_context(fxopt.CompileContext.create(target, (X,), **options)):
        result = p(gm)
    return gm, result


def _ratio(gm, pruned, by: str, target: str = "xavier") -> float:
    from fxopt.frontend.tracing import propagate_shapes

    propagate_shapes(pruned, (X,))
    a, b = fxopt.estimate_costs(gm, target), fxopt.estimate_costs(pruned, target)
    unit = {"params": "params", "flops": "flops", "latency": "latency_s"}[by]
    return getattr(b, unit) / getattr(a, unit)


@pytest.mark.parametrize("by", ["params", "flops", "latency"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_budget_is_met_within_five_points(by, allocation):
    # round_to=1: the budget search itself, without the cpu target's 16-channel alignment, which
    # leaves this small net only a few coarse steps
    p = PruneChannels(amount=0.5, by=by, allocation=allocation, round_to=1)
    gm, result = _run(p, target="cpu")
    assert result.modified
    ratio = _ratio(gm, result.graph_module, by, "cpu")
    assert abs(ratio - 0.5) <= 0.05, ratio
    assert abs(p.plan.achieved - (1 - ratio)) < 1e-6  # the shape-only estimate is the real figure


class FullResGate(nn.Module):
    """Data-dependent control flow around a full-resolution 3x3 conv: fxopt keeps it as a leaf."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return x


class GatedNet(nn.Module):
    """Issue 10's example: the leaf holds about a seventh of the FLOPs and cannot be pruned."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
        self.gate = FullResGate(32)
        self.body = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.body(self.gate(self.stem(x))))


def _measured_flops(model, x) -> int:
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_flops_budget_with_a_leaf_matches_the_flop_counter():
    """The budget counts the leaf's conv: what fxopt reports removed is what FlopCounterMode measures.

    (Before leaves were costed the leaf counted 0 FLOPs; the pass then reported about half the
    FLOPs removed while the real modules lost far less.)
    """
    torch.manual_seed(0)
    model, x = GatedNet().eval(), torch.randn(1, 3, 32, 32)
    gm = fxopt.trace(model, (x,))
    assert fxopt.estimate_costs(gm, "cpu").per_node["gate"].matmul_flops == 2 * 32 * 32 * 32 * 32 * 9
    with use_context(fxopt.CompileContext.create("cpu", (x,))):
        result = PruneChannels(amount=0.5, by="flops", round_to=1)(gm)
    [budget] = result.graph_module.meta["fxopt_tables"][BUDGET_TABLE]
    measured = 1 - _measured_flops(result.graph_module, x) / _measured_flops(model, x)
    assert abs(budget["achieved"] - 0.5) <= 0.05 and budget["uncosted"] == "none"
    assert abs(budget["achieved"] - measured) <= 0.01  # fxopt adds bias and elementwise FLOPs


class NeedsCalibratedInput(nn.Module):
    """Refuses every input but all-ones: no fake or probe run can cost it."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if not bool((x == 1).all()):
            raise ValueError("needs calibrated input")
        return self.conv(x)


def test_a_budget_that_depends_on_an_uncosted_node_says_so():
    model = nn.Sequential(NeedsCalibratedInput(3), nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    x = torch.ones(1, 3, 12, 12)
    gm = fxopt.trace(model, (x,))
    with use_context(fxopt.CompileContext.create("cpu", (x,))):
        flops = PruneChannels(amount=0.5, by="flops", round_to=1)(gm).graph_module.meta["fxopt_tables"][BUDGET_TABLE][0]
        params = PruneChannels(amount=0.5, by="params", round_to=1)(gm).graph_module.meta["fxopt_tables"][BUDGET_TABLE][0]
    assert "uncosted" in flops["uncosted"] and "_0: " in flops["uncosted"] and "needs calibrated input" in flops["uncosted"]
    assert params["uncosted"] == "none"  # parameters are counted without running anything


def test_channel_budget_and_alignment_on_xavier_fp16():
    p = PruneChannels(amount=0.5, by="channels")
    gm, result = _run(p, target="xavier")
    convs = [m for m in result.graph_module.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 16, 32, 32, 32]
    assert all(c.out_channels % 8 == 0 for c in convs)  # fp16 tensor cores want multiples of 8
    assert result.graph_module.get_submodule("fc").in_features == 32 * 16


def test_cpu_keeps_channels_in_multiples_of_16():
    # the host's fp32 alignment, chosen by bench/cpu_alignment.py (AVX-512: 16 fp32 lanes)
    assert fxopt.get_target("cpu").alignment("fp32") == 16
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 1)).eval()
    compiled = fxopt.compile(model, "cpu", example_inputs=(X,), export=False, passes=[PruneChannels(amount=0.5, by="channels")])
    kept = [m.out_channels for m in compiled.graph_module.modules() if isinstance(m, nn.Conv2d)][:2]
    assert kept == [32, 32]


def test_round_to_overrides_the_target_alignment():
    p = PruneChannels(amount=0.3, by="channels", round_to=1)
    _, result = _run(p, target="xavier")
    assert result.graph_module.get_submodule("stem.0").out_channels == 22  # round(0.7 * 32)


def test_max_ratio_caps_every_group_and_never_empties_one():
    p = PruneChannels(amount=0.99, by="flops", max_ratio=1.0, round_to=1)
    _, result = _run(p, target="cpu")
    convs = [m for m in result.graph_module.modules() if isinstance(m, nn.Conv2d)]
    assert min(c.out_channels for c in convs) >= 1
    p = PruneChannels(amount=0.9, by="channels", max_ratio=0.25, round_to=1)
    _, result = _run(p, target="cpu")
    assert result.graph_module.get_submodule("stem.0").out_channels == 24


def test_overrides_and_ignore_pick_groups_by_module_name():
    p = PruneChannels(amount=0.5, by="channels", overrides={r"b1\.0": 0.75}, ignore=("b2.0",), round_to=1)
    gm, result = _run(p, target="cpu")
    pruned = result.graph_module
    assert pruned.get_submodule("b1.0").out_channels == 8  # override: 75 % of 32 removed
    assert pruned.get_submodule("b2.0").out_channels == 64  # ignored
    # the other groups share the rest of the budget: half of all prunable channels go
    assert pruned.get_submodule("stem.0").out_channels < 32 and abs(p.plan.achieved - 0.5) <= 0.02


def test_the_input_graph_module_is_not_modified():
    p = PruneChannels(amount=0.5, by="flops", round_to=1)
    gm, result = _run(p)
    assert result.graph_module is not gm
    assert gm.get_submodule("stem.0").weight.shape == (32, 3, 3, 3)
    assert gm.get_submodule("fc").in_features == 64 * 16
    with torch.no_grad():
        gm(X)  # still runs with its own weights


def test_bn_scale_removes_the_smallest_gammas():
    model = SmallResNet().eval()
    with torch.no_grad():
        gamma = model.b2[1].weight
        gamma.copy_(torch.linspace(1.0, 2.0, 64))
        gamma[[5, 9, 40]] = 1e-3
    p = PruneChannels(amount=3 / 64, by="channels", importance="bn_scale", round_to=1,
                      overrides={"b2.0": 3 / 64}, ignore=("stem.0", "b1.3", "b2.3"))
    gm, result = _run(p, model)
    kept = p.analysis.kept_indices(("b2_1", 0, 1), p.plan.removed)
    assert sorted(set(range(64)) - set(kept.tolist())) == [5, 9, 40]


def test_taylor_needs_calibration_data():
    with pytest.raises(fxopt.InputError, match="calib_data"):
        _run(PruneChannels(amount=0.5, importance="taylor"))
    p = PruneChannels(amount=0.5, importance="taylor")
    gm, result = _run(p, calib_data=[(torch.randn(2, 3, 16, 16),) for _ in range(2)])
    assert result.modified


def test_user_criterion_is_called_per_group():
    seen = []

    def by_index(group, graph_module):
        seen.append(group.index)
        return -torch.arange(len(group.atoms), dtype=torch.float32)  # keep the first channels

    p = PruneChannels(amount=0.5, by="channels", importance=by_index, round_to=1)
    gm, result = _run(p)
    assert sorted(seen) == [g.index for g in p.analysis.groups]
    assert p.analysis.kept_indices(("stem_0", 0, 1), p.plan.removed).tolist() == list(range(16))
    assert p.options()["importance"] == "by_index"


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"amount": 1.0}, "amount"), ({"amount": -0.1}, "amount"), ({"amount": "half"}, "amount"),
        ({"by": "bytes"}, "by"), ({"allocation": "greedy"}, "allocation"), ({"max_ratio": 2}, "max_ratio"),
        ({"round_to": 0}, "round_to"), ({"importance": "l3"}, "importance"),
        ({"overrides": {"stem": 1.5}}, "overrides"), ({"overrides": [("stem", 0.5)]}, "overrides"),
        ({"ignore": ["("]}, "ignore"),
    ],
)
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(fxopt.InputError, match=option):
        PruneChannels(**kwargs)


def test_registered_and_ordered():
    assert "prune" in fxopt.pass_names()
    p = fxopt.create_pass("prune", amount=0.25, by="flops")
    assert isinstance(p, PruneChannels) and p.lossy
    assert p.options()["amount"] == 0.25 and p.options()["by"] == "flops"
    order = fxopt.PassManager(["fold_batchnorm", PruneChannels(), "canonicalize"]).names
    assert order == ["canonicalize", "prune", "fold_batchnorm"]


def test_report_tables_reach_report_md():
    compiled = fxopt.compile(SmallResNet(), "xavier", example_inputs=(X,),
                             passes=[PruneChannels(amount=0.5, by="flops", round_to=1)])
    assert [r.status for r in compiled.report.passes if r.name == "prune"] == ["applied"]
    rows = compiled.report.tables[TABLE]
    assert len(rows) == 4 and all(r["channels after"] <= r["channels before"] for r in rows)
    assert sum(r["FLOPs change (producers)"] for r in rows) < 0
    budget = compiled.report.tables[BUDGET_TABLE][0]
    assert budget["by"] == "flops" and abs(budget["achieved"] - 0.5) <= 0.05 and budget["note"] == ""
    markdown = compiled.report.to_markdown()
    assert f"## {TABLE}" in markdown and "channels before" in markdown


# ---------------------------------------------------------------------------------------------
# architecture patterns and end-to-end compiles


class DenseNetLike(nn.Module):
    """Two dense blocks (each layer concatenates its output) with a transition and classifier."""

    def __init__(self, growth: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.layers = nn.ModuleList()
        c = 32
        for i in range(4):
            if i == 2:
                self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1), nn.AvgPool2d(2))
                c //= 2
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
            c += growth
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for i, layer in enumerate(self.layers):
            if i == 2:
                x = self.transition(x)
            x = torch.cat([x, layer(x)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1), 1))


class SqueezeExcite(nn.Module):
    """MobileNet/EfficientNet-style block: expand, depthwise, SE gate (mean -> conv -> conv -> mul)."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.se1 = nn.Conv2d(32, 8, 1)
        self.se2 = nn.Conv2d(8, 32, 1)
        self.project = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.hardswish(self.dw(F.relu(self.expand(x))))
        gate = torch.sigmoid(self.se2(F.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        x = self.project(x * gate)
        return self.head(x.mean((2, 3)))


class ChannelsLastBlock(nn.Module):
    """ConvNeXt pattern: depthwise conv, permute, LayerNorm, MLP, layer-scale gamma, residual."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("model", [DenseNetLike(), SqueezeExcite(), ChannelsLastBlock()],
                         ids=["densenet-like", "squeeze-excite", "channels-last"])
def test_architecture_patterns_prune_and_match_the_mask(model):
    gm = fxopt.trace(model.eval(), (X,))
    p = PruneChannels(amount=0.5, by="flops", round_to=1)
    with use_context(fxopt.CompileContext.create("cpu", (X,))):
        result = p(gm)
    assert result.modified and abs(p.plan.achieved - 0.5) <= 0.05
    masked = apply_plan(gm, p.analysis, p.plan.removed, "mask")
    with torch.no_grad():
        out = result.graph_module(X)
        assert out.shape == gm(X).shape
        if not isinstance(model, ChannelsLastBlock):  # its LayerNorm averages over pruned channels
            torch.testing.assert_close(out, masked(X), atol=1e-5, rtol=1e-4)


def test_squeeze_excite_gate_is_coupled_to_the_block_width():
    gm = fxopt.trace(SqueezeExcite(), (X,))
    a = analyze_dependencies(gm)
    groups = sorted(tuple(sorted(g.root_modules)) for g in a.groups)
    assert groups == [("dw", "expand", "se2"), ("project",), ("se1",)]


def _compile_and_check(model, inputs, amount=0.5):
    compiled = fxopt.compile(model, "xavier", example_inputs=inputs, passes=[PruneChannels(amount=amount, by="flops")])
    [record] = [r for r in compiled.report.passes if r.name == "prune"]
    assert record.status == "applied", record.reason
    assert compiled.report.onnx is not None and compiled.report.onnx["max_abs_error_vs_torch"] < 1e-3
    ratio = record.after.flops / record.before.flops
    assert abs(ratio - (1 - amount)) <= 0.05, ratio
    return compiled


def test_compile_resnet18_end_to_end():
    _compile_and_check(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))


def test_compile_densenet_like_end_to_end():
    _compile_and_check(DenseNetLike(), (X,))


@pytest.mark.slow
def test_compile_mobilenet_v3_small_end_to_end():
    _compile_and_check(torchvision.models.mobilenet_v3_small(), (torch.randn(1, 3, 64, 64),))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["efficientnet_b0", "regnet_y_400mf", "densenet121", "convnext_tiny", "timm:deit_tiny_patch16_224",
     "timm:mixer_s16_224", "timm:efficientnet_b0"],
)
def test_model_families_prune_to_half_the_flops(name):
    import timm

    model = timm.create_model(name[5:]) if name.startswith("timm:") else getattr(torchvision.models, name)()
    x = torch.randn(1, 3, 224, 224) if name.startswith("timm:") else torch.randn(1, 3, 64, 64)
    gm = fxopt.trace(model.eval(), (x,))
    p = PruneChannels(amount=0.5, by="flops", round_to=1)
    with use_context(fxopt.CompileContext.create("xavier", (x,))):
        result = p(gm)
    assert result.modified and abs(p.plan.achieved - 0.5) <= 0.05
    with torch.no_grad():
        out = result.graph_module(x)
        assert out.shape == gm(x).shape
        if "convnext" not in name and "deit" not in name and "mixer" not in name:  # no LayerNorm
            masked = apply_plan(gm, p.analysis, p.plan.removed, "mask")(x)
            torch.testing.assert_close(out, masked, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# regressions: no piece of a split is ever emptied


class SplitConvCat(nn.Module):
    """An uneven split, a conv on the small piece, the pieces concatenated back, a consumer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.inner = nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a, b = torch.split(self.stem(x), [4, 12], dim=1)
        return self.out(torch.cat([b, self.inner(a)], dim=1))


class FusedQKV(nn.Module):
    """SHViT-style single-head attention: one conv makes q, k (4 channels each) and v (8)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Conv2d(3, 16, 1)
        self.proj = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = self.qkv(x).split([4, 4, 8], dim=1)
        attn = (q.flatten(2).transpose(-2, -1) @ k.flatten(2)).softmax(dim=-1)
        return self.proj((v.flatten(2) @ attn.transpose(-2, -1)).view(b, 8, h, w))


def _split_sizes(gm) -> list[list[int]]:
    return [list(n.args[1]) for n in gm.graph.nodes if n.target in (torch.split, "split")]


def test_each_split_piece_is_its_own_group():
    gm = fxopt.trace(SplitConvCat().eval(), (X,))
    a = analyze_dependencies(gm)
    # Before: one producer (stem) whose channels go to two pieces; Expected: a group per piece
    assert sorted((g.root_modules, g.channels) for g in a.groups) == [(("inner",), 4), (("stem",), 4), (("stem",), 12)]
    gm = fxopt.trace(FusedQKV().eval(), (X,))
    a = analyze_dependencies(gm)
    # q and k are one contraction (channel i of q goes with channel i of k); v is apart
    assert sorted((len(g.atoms), g.atom_width) for g in a.groups) == [(4, 2), (8, 1)]


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("model", [SplitConvCat(), FusedQKV()], ids=["split-conv-cat", "fused-qkv"])
def test_pruning_never_empties_a_split_piece(model, allocation):
    model = model.eval()
    with torch.no_grad():  # make the small pieces the least important, so a search would take them first
        for t in (model.stem.weight if isinstance(model, SplitConvCat) else model.qkv.weight,):
            t[:8].mul_(1e-3)
    gm = fxopt.trace(model, (X,))
    p = PruneChannels(amount=0.99, by="flops", allocation=allocation, max_ratio=1.0, round_to=1)
    with use_context(fxopt.CompileContext.create("cpu", (X,))):
        result = p(gm)
    assert result.modified
    before, after = _split_sizes(gm), _split_sizes(result.graph_module)
    assert len(after) == len(before) and all(0 < n <= m for s, t in zip(after, before) for n, m in zip(s, t))
    masked = apply_plan(gm, p.analysis, p.plan.removed, "mask")
    with torch.no_grad():
        out = result.graph_module(X)
        assert out.shape == gm(X).shape
        if isinstance(model, SplitConvCat):  # FusedQKV's softmax reads the removed channels too
            torch.testing.assert_close(out, masked(X), atol=1e-5, rtol=1e-4)


def test_a_plan_leaving_an_empty_tensor_is_refused(monkeypatch):
    gm = fxopt.trace(SplitConvCat().eval(), (X,))
    a = analyze_dependencies(gm)
    removed = np.zeros(a.num_atoms, dtype=bool)
    small = next(g for g in a.groups if g.root_modules == ("stem",) and g.channels == 4)
    removed[list(small.atoms)] = True  # the whole first piece: what the selector must never do
    assert "getitem" in empty_tensors(gm, shape_only(gm, a, removed))
    assert empty_tensors(gm, shape_only(gm, a, np.zeros(a.num_atoms, dtype=bool))) == []

    def emptying_plan(gm, analysis, scores, settings, **kwargs):
        keep = {g.index: len(g.atoms) for g in analysis.groups}
        gone = np.zeros(analysis.num_atoms, dtype=bool)
        gone[list(analysis.groups[small.index].atoms)] = True
        return PrunePlan(gone, keep, 0.5, 1)

    monkeypatch.setattr(prune_module, "plan_pruning", emptying_plan)
    with use_context(fxopt.CompileContext.create("cpu", (X,))), pytest.raises(fxopt.PassError, match="zero-size"):
        PruneChannels(amount=0.5)(gm)
    with pytest.raises(AssertionError, match="rolled it back: PassError: .*zero-size tensors at split"):
        ft.check_pass(functools.partial(PruneChannels, amount=0.5), SplitConvCat().eval(), (X,), export=False)


class MostlyFrozen(nn.Module):
    """Nearly all FLOPs sit in a conv whose channels feed cumsum (an op that mixes them)."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(3, 64, 3, padding=1)
        self.small = nn.Conv2d(64, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.small(torch.cumsum(self.big(x), 1))))


def test_a_missed_budget_is_reported_with_what_blocked_it():
    compiled = fxopt.compile(MostlyFrozen(), "cpu", example_inputs=(X,), export=False,
                             passes=[PruneChannels(amount=0.5, by="flops", round_to=1)])
    [record] = [r for r in compiled.report.passes if r.name == "prune"]
    [budget] = compiled.report.tables[BUDGET_TABLE]
    assert record.status == "applied" and budget["achieved"] < 0.5 - 0.05
    assert budget["note"].startswith("budget missed: ") and "unknown op cumsum (64 channels)" in budget["note"]
    assert budget["note"] in compiled.report.to_markdown()


# ---------------------------------------------------------------------------------------------
# shape arithmetic: sizes read at run time (channel shuffle, attention heads) no longer freeze


def _shape_arithmetic_cases():
    from test_dependency_groups import ShuffleBlock, SizeReadAttention  # the analysis tests' models

    image, tokens = (torch.randn(1, 3, 16, 16),), (torch.randn(2, 16, 5),)
    return [
        pytest.param(ShuffleBlock(2), image, ("branches.0",), id="shuffle-2-groups"),
        pytest.param(ShuffleBlock(4), image, ("branches.0",), id="shuffle-4-groups"),
        pytest.param(SizeReadAttention(64, heads=4), tokens, ("qkv",), id="attention-d//heads"),
        pytest.param(SizeReadAttention(64, heads=16, whole_heads=True), tokens, ("qkv",), id="attention-d//head_dim"),
    ]


@pytest.mark.parametrize("model, inputs, coupled", _shape_arithmetic_cases())
def test_shape_arithmetic_patterns_prune_to_half_the_flops(model, inputs, coupled):
    gm = fxopt.trace(model.eval(), inputs)
    p = PruneChannels(amount=0.5, by="flops", round_to=1)
    with use_context(fxopt.CompileContext.create("cpu", inputs)):
        result = p(gm)
    assert result.modified and abs(p.plan.achieved - 0.5) <= 0.05
    [group] = [g for g in p.analysis.groups if set(coupled) <= set(g.root_modules)]
    assert 0 < p.plan.keep[group.index] < len(group.atoms)  # the shuffled / attention channels are pruned
    masked = apply_plan(gm, p.analysis, p.plan.removed, "mask")
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs), masked(*inputs), atol=1e-5, rtol=1e-4)
    compiled = fxopt.compile(model, "cpu", example_inputs=inputs, passes=[PruneChannels(amount=0.5, by="flops", round_to=1)])
    [record] = [r for r in compiled.report.passes if r.name == "prune"]
    assert record.status == "applied", record.reason
    assert compiled.report.onnx is not None and compiled.report.onnx["max_abs_error_vs_torch"] < 1e-4
    assert abs(record.after.flops / record.before.flops - 0.5) <= 0.05
