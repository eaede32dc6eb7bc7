"""Size-dependent efficiency: which kernels it applies to, and how parallel and deep each kernel is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.costs.cost_model import estimate_costs


class Broadcast(nn.Module):
    def forward(self, x):
        one = torch.ones_like(x[:, :1, :1, :1])  # a 1-element head, then the chain widens to x's size
        return (one * 2 + x).relu()


class Plain(nn.Module):
    def forward(self, x):
        return (x * 2 + x).relu()


def test_a_chain_that_starts_on_one_element_costs_like_its_widest_tensor():
    x = (torch.randn(1, 32, 64, 64),)
    narrow_head = estimate_costs(fxopt.trace(Broadcast(), x), "xavier", "fp16").latency_s
    plain = estimate_costs(fxopt.trace(Plain(), x), "xavier", "fp16").latency_s
    # before, the kernel took the 1-element head's parallelism: ~1000x the plain chain's time
    assert narrow_head < 3 * plain


def test_a_global_pool_is_memory_bound_not_a_product_with_the_whole_map_as_its_window():
    # issue 26: AdaptiveAvgPool2d(1) on 1x64x128x128 was ~4.8 ms at fp16 (a product at 2e-5 of the peak),
    # where reading its 1M elements once takes ~15 us
    xavier = fxopt.get_target("xavier")
    x = (torch.randn(1, 64, 128, 128),)
    conv = estimate_costs(fxopt.trace(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), x), xavier, "fp16")
    for pool in (nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1), nn.AvgPool2d(128)):
        for precision in ("fp32", "fp16", "int8"):
            summary = estimate_costs(fxopt.trace(nn.Sequential(pool), x), xavier, precision)
            kernel = summary.per_node["_0"]
            memory_s = kernel.bytes / xavier.memory_bandwidth_bytes_per_s
            assert kernel.kind == "pool" and memory_s > 0
            # the memory roofline, the reachable bandwidth and one launch: a small factor, never 300x
            assert kernel.latency_s < 2 * memory_s / xavier.engine.bandwidth_efficiency + xavier.launch_overhead_s, (pool, precision)
            assert kernel.latency_s < 4 * kernel.roofline_s, (pool, precision)
        assert estimate_costs(fxopt.trace(nn.Sequential(pool), x), xavier, "fp16").latency_s < conv.latency_s


def test_every_memory_bound_kind_has_no_size_dependence_on_xavier():
    engine = fxopt.get_target("xavier").engine
    for kind in ("pool", "elementwise", "norm", "copy"):
        assert engine.size_factor(kind, 64, 1) == 1.0, kind
    assert engine.size_factor("conv", 64, 1) < 0.01  # products keep theirs


def test_a_functional_conv_reduces_over_its_weights_depth_like_the_module():
    # a traced bare Conv2d is a conv2d call on get_attr weights: its depth was taken as 1 (a ~40x slower conv)
    x = (torch.randn(1, 64, 128, 128),)
    bare = estimate_costs(fxopt.trace(nn.Conv2d(64, 64, 3, padding=1), x), "xavier", "fp16")
    wrapped = estimate_costs(fxopt.trace(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), x), "xavier", "fp16")
    assert any(n.op == "call_function" for n in fxopt.trace(nn.Conv2d(64, 64, 3, padding=1), x).graph.nodes)
    assert bare.latency_s == pytest.approx(wrapped.latency_s, rel=0.01)
