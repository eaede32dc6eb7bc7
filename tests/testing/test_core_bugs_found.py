"""Bugs the fxopt.testing strategies found, kept as minimal reproducers.

A test is marked ``xfail(strict=True)`` while its bug is open: when the bug is fixed the test
passes, strict mode turns that into a failure, and whoever fixed it removes the marker. The models
are the reproducers `fxopt.testing` printed, pasted as they were.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import fxopt
from fxopt.testing import check_pass


class SplitCatTwice(nn.Module):
    """Shrunk from a drawn convnet: two split -> conv -> cat blocks in a row."""

    def __init__(self):
        super().__init__()
        self.b0_conv = nn.Conv2d(3, 4, 1, stride=1, padding=0, groups=1, bias=True)
        self.b0_bn = nn.BatchNorm2d(4)
        self.b0_act = nn.ReLU()
        self.b1_inner = nn.Conv2d(2, 2, 3, padding=1)
        self.b2_inner = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        x = self.b0_conv(x)
        x = self.b0_bn(x)
        x = self.b0_act(x)
        a, b = torch.split(x, [2, 2], dim=1)
        a = self.b1_inner(a)
        x = torch.cat([b, a], dim=1)
        a, b = torch.split(x, [2, 2], dim=1)
        a = self.b2_inner(a)
        x = torch.cat([b, a], dim=1)
        return x


def split_cat_twice() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = SplitCatTwice().eval()
    with torch.no_grad():
        model.b0_bn.running_mean.uniform_(-0.5, 0.5)
        model.b0_bn.running_var.uniform_(0.5, 2.0)
        model.b0_bn.weight.uniform_(0.5, 1.5)
    return model, (torch.randn(1, 3, 6, 6),)


def test_prune_keeps_output_channels_through_chained_split_cat():
    model, inputs = split_cat_twice()
    result = check_pass(functools.partial(fxopt.create_pass, "prune", amount=0.5, round_to=1), model, inputs)
    assert result.graph_module(*inputs).shape == (1, 4, 6, 6)


class UnevenSplitCat(nn.Module):
    """Shrunk from a drawn convnet: an uneven split [1, 3], a conv on the 1-channel part, cat, conv."""

    def __init__(self):
        super().__init__()
        self.b0_conv = nn.Conv2d(1, 4, 1, stride=1, padding=0, groups=1, bias=False)
        self.b1_inner = nn.Conv2d(1, 1, 3, padding=1)
        self.b2_conv = nn.Conv2d(4, 2, 3, stride=1, padding=1, groups=1, bias=False)

    def forward(self, x):
        x = self.b0_conv(x)
        a, b = torch.split(x, [1, 3], dim=1)
        a = self.b1_inner(a)
        x = torch.cat([b, a], dim=1)
        x = self.b2_conv(x)
        return x


def test_prune_handles_an_uneven_split_feeding_a_cat():
    torch.manual_seed(0)
    model, inputs = UnevenSplitCat().eval(), (torch.randn(1, 1, 6, 6),)
    result = check_pass(functools.partial(fxopt.create_pass, "prune", amount=0.5, round_to=1), model, inputs)
    assert result.record.status == "applied"
