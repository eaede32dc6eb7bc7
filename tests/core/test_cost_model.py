"""The cost model against hand-computed FLOPs, parameters and roofline behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from torch import nn

import fxopt
import fxopt.testing
from fxopt.costs.cost_model import estimate_costs
from fxopt.costs.engine_cost import kernel_latency_s
from fxopt.costs.leaf_cost import flop_counter
from fxopt.output.report import layer_rows


def costs_by_kind(model, *inputs, target="xavier", precision=None):
    # a lone conv/linear root is traced through its forward, so wrap it to keep the module call
    model = nn.Sequential(model) if type(model) in (nn.Conv2d, nn.Linear) else model
    gm = fxopt.trace(model, inputs)
    summary = estimate_costs(gm, target, precision)
    return summary, [c for c in summary.per_node.values() if c.kind != "view"]


def test_conv_flops_and_params():
    summary, [conv] = costs_by_kind(nn.Conv2d(3, 8, 3, padding=1), torch.randn(1, 3, 16, 16))
    macs = 8 * 16 * 16 * 3 * 9
    assert conv.kind == "conv"
    assert conv.flops == 2 * macs + 8 * 16 * 16
    assert conv.params == summary.params == 8 * 3 * 9 + 8


def test_depthwise_and_grouped_conv():
    _, [dw] = costs_by_kind(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), torch.randn(1, 8, 8, 8))
    assert dw.kind == "conv_depthwise" and dw.flops == 2 * 8 * 8 * 8 * 9
    _, [grouped] = costs_by_kind(nn.Conv2d(8, 16, 1, groups=4, bias=False), torch.randn(1, 8, 4, 4))
    assert grouped.kind == "conv" and grouped.flops == 2 * 16 * 4 * 4 * 2


def test_linear_matmul_and_attention():
    _, [lin] = costs_by_kind(nn.Linear(8, 4), torch.randn(2, 8))
    assert lin.flops == 2 * 2 * 4 * 8 + 2 * 4

    class MatMul(nn.Module):
        def forward(self, a, b):
            return a @ b

    _, [mm] = costs_by_kind(MatMul(), torch.randn(2, 3, 5), torch.randn(2, 5, 7))
    assert mm.kind == "matmul" and mm.flops == 2 * 2 * 3 * 7 * 5

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    _, nodes = costs_by_kind(Attn(), torch.randn(1, 10, 16))
    mha = [c for c in nodes if c.kind == "matmul"][0]
    # projections 4 * L * E^2 plus scores and weighted sum 2 * L^2 * E, as MACs
    assert mha.flops == 2 * (4 * 10 * 16 * 16 + 2 * 10 * 10 * 16)


def test_pooling_norm_elementwise():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))
    _, (bn, relu, pool, gap) = costs_by_kind(model.eval(), torch.randn(1, 4, 8, 8))
    assert (bn.kind, bn.flops) == ("norm", 2 * 256)
    assert (relu.kind, relu.flops) == ("elementwise", 256)
    assert (pool.kind, pool.flops) == ("pool", 64 * 4)
    assert (gap.kind, gap.flops) == ("pool", 64)


def test_roofline_lower_precision_is_not_slower_and_moves_fewer_bytes():
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
    x = torch.randn(1, 16, 32, 32)
    fp32, _ = costs_by_kind(model, x, precision="fp32")
    fp16, _ = costs_by_kind(model, x, precision="fp16")
    int8, _ = costs_by_kind(model, x, precision="int8")
    assert fp32.bytes == 2 * fp16.bytes == 4 * int8.bytes
    assert fp32.latency_s > fp16.latency_s >= int8.latency_s > 0
    assert fp32.flops == fp16.flops


class Gated(nn.Module):
    """Data-dependent control flow: fxopt keeps it as a leaf."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.inner = nn.Linear(c, c)

    def forward(self, x):
        return self.inner(x) if x.sum() > 0 else x


def test_a_leaf_is_costed_by_running_it_worst_branch_without_example_inputs():
    model = nn.Sequential(nn.Linear(4, 4), Gated())
    x = -torch.ones(1, 4)  # the first layer is zero-initialised below, so the leaf sees 0 -> cheap branch
    nn.init.zeros_(model[0].weight), nn.init.zeros_(model[0].bias)
    summary, _ = costs_by_kind(model, x)
    leaf = summary.per_node["_1"]
    assert (leaf.kind, leaf.params, leaf.uncosted) == ("leaf", 20, "")
    assert leaf.matmul_flops == 2 * 4 * 4  # the Linear branch, the costlier of the probes
    assert summary.complete and summary.unknown_nodes == ()
    gm = fxopt.trace(model, (x,))
    on_example = estimate_costs(gm, "cpu", example_inputs=(x,)).per_node["_1"]
    assert on_example.matmul_flops == 0  # the branch the example takes: no product at all


class NeedsCalibratedInput(nn.Module):
    """Refuses every input but all-threes: no fake or probe run can cost it."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        if not bool((x == 3).all()):
            raise ValueError("needs calibrated input")
        return self.inner(x)


def test_what_cannot_be_costed_is_uncosted_with_the_reason_never_zero():
    model = nn.Sequential(NeedsCalibratedInput(), nn.ReLU())
    x = torch.full((1, 4), 3.0)
    gm = fxopt.trace(model, (x,))
    summary = estimate_costs(gm, "cpu")
    assert not summary.complete and set(summary.uncosted) == {"_0"}
    assert "needs calibrated input" in summary.uncosted["_0"] and summary.per_node["_0"].kind == "unknown"
    assert "1 node(s) uncosted" in summary.uncosted_note() and "_0" in summary.uncosted_note()
    [row] = [r for r in layer_rows(gm, summary) if r.node == "_0"]
    assert row.flops_text().startswith("uncosted (") and "needs calibrated input" in row.flops_text()
    assert summary.to_dict()["uncosted"] == summary.uncosted
    costed = estimate_costs(gm, "cpu", example_inputs=(x,))  # on its own example it runs
    assert costed.complete and costed.per_node["_0"].matmul_flops == 2 * 4 * 4


def flop_counter_total(model, inputs):
    # FlopCounterMode plus a formula for CPU flash attention, which it leaves uncounted here
    with torch.no_grad(), flop_counter() as counter:
        model(*inputs)
    return counter.get_total_flops()


@given(fxopt.testing.models())
def test_flops_agree_with_torch_flop_counter_on_drawn_models(drawn):
    """fxopt's 2 x MAC FLOPs match FlopCounterMode's within 1%, leaves included.

    FlopCounterMode counts only products (conv, mm/addmm/bmm, attention), 2 x MACs without
    bias adds; fxopt's `flops` add bias adds, elementwise ops, norms and pools, so the
    comparison is on `matmul_flops`, the part both count. Stock FlopCounterMode misses the
    attention products of F.scaled_dot_product_attention and nn.MultiheadAttention on CPU (no
    formula for the CPU flash kernel nor the fused MHA inference op), so the reference is
    `fxopt.costs.leaf_cost.flop_counter`: FlopCounterMode with those two formulas added.
    """
    model, inputs = drawn
    model.eval()
    reference = flop_counter_total(model, inputs)
    gm = fxopt.trace(model, inputs)
    on_example = estimate_costs(gm, "cpu", example_inputs=inputs)
    assert on_example.complete, on_example.uncosted
    assert abs(on_example.matmul_flops - reference) <= 0.01 * reference
    leaves = {leaf.path for leaf in fxopt.leaves_of(gm)}
    leaf_nodes = [n.name for n in gm.graph.nodes if n.op == "call_module" and n.target in leaves]
    assert all(on_example.per_node[n].kind == "leaf" for n in leaf_nodes)
    # from shapes alone a leaf counts its costliest probed branch: never below the example's
    from_shapes = estimate_costs(gm, "cpu")
    assert from_shapes.complete and from_shapes.matmul_flops >= on_example.matmul_flops


def test_attention_flops_agree_with_the_flop_counter():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            y = self.mha(x, x, x, need_weights=False)[0]
            return torch.nn.functional.scaled_dot_product_attention(y, x, x)

    model, inputs = Attn().eval(), (torch.randn(2, 5, 8),)
    # four projections of 2x5 tokens, then q @ k^T and attn @ v twice (MHA and SDPA)
    summary = estimate_costs(fxopt.trace(model, inputs), "cpu")
    assert summary.matmul_flops == flop_counter_total(model, inputs) == 2 * (4 * 2 * 5 * 8 * 8 + 4 * 2 * 5 * 5 * 8)


def test_functional_linear_counts_its_bias():
    gm = fxopt.trace(nn.Linear(8, 4), (torch.randn(2, 8),))  # traced through F.linear
    assert estimate_costs(gm, "cpu").flops == 2 * 2 * 4 * 8 + 2 * 4


# --- the TensorRT engine model (xavier): fusion, copies, overhead, size-dependent efficiency ---


def engine_costs(model, *inputs, target="xavier", precision="fp16"):
    gm = fxopt.trace(model.eval(), inputs)
    return estimate_costs(gm, target, precision)


def test_engine_latency_is_monotonic_in_flops_and_bytes():
    xavier = fxopt.get_target("xavier")
    flops = np.geomspace(1e5, 1e11, 25)
    by_flops = kernel_latency_s(xavier, "fp16", np.array(["conv"] * 25), flops, np.full(25, 1e6), np.full(25, 1e5), np.full(25, 576))
    assert np.all(np.diff(by_flops) >= 0) and by_flops[-1] > by_flops[0]
    nbytes = np.geomspace(1e3, 1e9, 25)
    by_bytes = kernel_latency_s(xavier, "fp16", np.array(["elementwise"] * 25), np.zeros(25), nbytes, np.full(25, 1e5), np.ones(25))
    assert np.all(np.diff(by_bytes) >= 0) and by_bytes[-1] > by_bytes[0]
    # and whole graphs: more output channels, more FLOPs and bytes, more time
    times = [engine_costs(nn.Sequential(nn.Conv2d(32, c, 3, padding=1)), torch.randn(1, 32, 56, 56)).latency_s for c in (32, 64, 128, 256)]
    assert times == sorted(times) and times[0] < times[-1]


def test_conv_relu_and_residual_add_run_as_one_kernel():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)) + x)

    x = torch.randn(1, 32, 28, 28)
    fused = engine_costs(Block(), x)
    costs = fused.per_node
    assert (costs["bn"].fused_into, costs["add"].fused_into, costs["relu"].fused_into) == ("conv", "conv", "conv")
    assert costs["bn"].latency_s == costs["add"].latency_s == costs["relu"].latency_s == 0
    xavier = fxopt.get_target("xavier")
    apart = engine_costs(Block(), x, target=xavier.replace(engine=xavier.engine.replace(fuse_epilogues=False)))
    assert all(apart.per_node[n].latency_s > 0 for n in ("bn", "add", "relu"))
    assert fused.latency_s < apart.latency_s
    conv_alone = engine_costs(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1)), x).latency_s
    relu_alone = engine_costs(nn.Sequential(nn.ReLU()), x).latency_s - xavier.engine.inference_overhead_s
    conv_relu = engine_costs(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()), x).latency_s
    assert conv_relu < conv_alone + relu_alone
    # the CPU target keeps one kernel per node (ONNX Runtime, measured separately)
    assert estimate_costs(fxopt.trace(Block().eval(), (x,)), "cpu").per_node["relu"].latency_s > 0


def test_a_batchnorm_before_a_conv_is_its_own_kernel():
    x = torch.randn(1, 16, 32, 32)
    after = engine_costs(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)), x).per_node
    before = engine_costs(nn.Sequential(nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3, padding=1)), x).per_node
    assert after["_1"].fused_into == "_0" and after["_1"].latency_s == 0
    assert before["_0"].fused_into == "" and before["_0"].kind == "norm" and before["_0"].latency_s > 0


def test_transposes_slices_and_concat_are_copy_kernels_but_reshapes_are_free():
    class Shuffle(nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=1)
            y = torch.cat([b, a], dim=1).view(1, 2, 8, 16, 16).transpose(1, 2).contiguous()
            return y.flatten(1, 2)

    summary = engine_costs(Shuffle(), torch.randn(1, 16, 16, 16))
    kinds = {name: (c.kind, c.latency_s > 0) for name, c in summary.per_node.items() if name != "x" and name != "output"}
    assert kinds["chunk"] == ("copy", True) and kinds["cat"] == ("copy", True) and kinds["transpose"] == ("copy", True)
    assert kinds["view"][1] is False and kinds["flatten"][1] is False and kinds["contiguous"][1] is False
    # on the per-node model a transpose was a free view
    assert estimate_costs(fxopt.trace(Shuffle(), (torch.randn(1, 16, 16, 16),)), "cpu").per_node["transpose"].latency_s == 0


def test_each_inference_pays_a_fixed_overhead_and_the_roofline_stays_below():
    xavier = fxopt.get_target("xavier")
    assert xavier.engine.inference_overhead_s > 0
    summary = engine_costs(nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()), torch.randn(1, 8, 16, 16))
    assert summary.overhead_s == xavier.engine.inference_overhead_s
    assert summary.latency_s == pytest.approx(sum(c.latency_s for c in summary.per_node.values()) + summary.overhead_s)
    assert summary.latency_s > summary.overhead_s
    assert 0 < summary.roofline_s < summary.latency_s
    assert all(c.roofline_s <= c.latency_s for c in summary.per_node.values())
    as_dict = summary.to_dict()
    assert as_dict["roofline_ms"] == pytest.approx(summary.roofline_s * 1e3)
    assert as_dict["overhead_ms"] == pytest.approx(summary.overhead_s * 1e3)


def test_the_estimate_is_engine_time_and_a_host_call_is_beside_it():
    xavier = fxopt.get_target("xavier")
    assert xavier.engine.host_overhead_s > 0
    x = torch.randn(1, 8, 16, 16)
    summary = engine_costs(nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()), x)
    # the host term is not in the engine time, only beside it
    assert summary.host_overhead_s == xavier.engine.host_overhead_s
    assert summary.latency_s == pytest.approx(sum(c.latency_s for c in summary.per_node.values()) + summary.overhead_s)
    assert summary.host_latency_s == pytest.approx(summary.latency_s + xavier.engine.host_overhead_s)
    as_dict = summary.to_dict()
    assert as_dict["host_overhead_ms"] == pytest.approx(xavier.engine.host_overhead_s * 1e3)
    assert as_dict["latency_is"].startswith("engine time")
    # a target whose host call costs more reports the same engine time
    slow_host = xavier.replace(name="xavier_slow_host", engine=xavier.engine.replace(host_overhead_s=1e-3))
    gm = fxopt.trace(nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()), (x,))
    other = estimate_costs(gm, slow_host, "fp16")
    assert other.latency_s == pytest.approx(summary.latency_s) and other.host_overhead_s == 1e-3
    # the per-node model (cpu) has no host term
    assert estimate_costs(gm, "cpu").host_overhead_s == 0.0


def test_small_layers_reach_less_of_the_peak_and_misaligned_channels_cost_padding():
    xavier = fxopt.get_target("xavier")
    big = kernel_latency_s(xavier, "fp16", "conv", 4e9, 0, 4e6, 1152) - xavier.launch_overhead_s
    small = kernel_latency_s(xavier, "fp16", "conv", 4e6, 0, 4e3, 1152) - xavier.launch_overhead_s
    assert small / 4e6 > 2 * big / 4e9  # seconds per FLOP: far worse for the small layer
    x = torch.randn(1, 64, 28, 28)
    aligned = engine_costs(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), x).per_node["_0"]
    ragged = engine_costs(nn.Sequential(nn.Conv2d(64, 57, 3, padding=1)), x).per_node["_0"]
    assert ragged.flops < aligned.flops and ragged.latency_s >= aligned.latency_s  # 57 channels run as 64
