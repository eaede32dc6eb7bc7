"""A fused pointwise kernel is as parallel as the widest tensor it writes, not its first node."""

from __future__ import annotations

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
