"""Channel dependency groups: one hand-written Before/Expected case per coupling kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.dependency_groups import META_KEY, NodeChannels, analyze_dependencies
from fxopt.passes.prune import apply_plan


def _analyze(model: nn.Module, *inputs: torch.Tensor, **kwargs):
    gm = fxopt.trace(model, inputs)
    return gm, analyze_dependencies(gm, **kwargs)


def _groups(analysis) -> list[tuple[tuple[str, ...], int]]:
    """Expected form: (producer module paths, channels) per group."""
    return [(tuple(sorted(g.root_modules)), g.channels) for g in analysis.groups]


def _remove_first(analysis, group_index: int, count: int) -> np.ndarray:
    removed = np.zeros(analysis.num_atoms, dtype=bool)
    removed[list(analysis.groups[group_index].atoms[:count])] = True
    return removed


def _check_sliced(gm, analysis, removed, *inputs):
    """Slicing keeps output shapes and equals the masked original (the kept channels' function)."""
    sliced = apply_plan(gm, analysis, removed, "slice")
    masked = apply_plan(gm, analysis, removed, "mask")
    with torch.no_grad():
        out, ref, orig = sliced(*inputs), masked(*inputs), gm(*inputs)
    assert out.shape == orig.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    return sliced


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.inner = nn.Conv2d(8, 6, 1)
        self.back = nn.Conv2d(6, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.body(x)
        x = x + self.back(F.relu(self.inner(x)))
        return self.head(x)


def test_residual_add_couples_all_operands():
    gm, a = _analyze(Residual(), torch.randn(1, 3, 8, 8))
    # Before: stem, body, back feed the same adds; inner is its own group; head reaches the output
    assert sorted(_groups(a)) == [(("back", "body", "stem"), 8), (("inner",), 6)]
    sliced = _check_sliced(gm, a, _remove_first(a, 0, 3), torch.randn(1, 3, 8, 8))
    # Expected: every operand of the adds and the BN lose the same 3 channels
    assert [sliced.get_submodule(n).out_channels for n in ("stem", "body", "back")] == [5, 5, 5]
    assert sliced.get_submodule("bn").num_features == 5
    assert sliced.get_submodule("inner").in_channels == 5 and sliced.get_submodule("head").in_channels == 5


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.out = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))


def test_concat_maps_channel_offsets():
    gm, a = _analyze(Concat(), torch.randn(1, 3, 4, 4))
    assert _groups(a) == [(("a",), 4), (("b",), 6)]
    removed = np.zeros(a.num_atoms, dtype=bool)
    b_atoms = a.groups[1].atoms
    removed[[b_atoms[0], b_atoms[5]]] = True
    sliced = _check_sliced(gm, a, removed, torch.randn(1, 3, 4, 4))
    # Expected: b loses 2, the BN and the consumer lose the same 2 at offset 4 in the concat
    assert sliced.get_submodule("b").out_channels == 4 and sliced.get_submodule("a").out_channels == 4
    assert sliced.get_submodule("bn").num_features == 8 and sliced.get_submodule("out").in_channels == 8
    keep = a.kept_indices(next(k for k in a.spaces if k[0] == "bn" and k[2] == 1), removed)
    assert keep.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]


class Chunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.out(a * torch.sigmoid(b))


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 1)
        self.left = nn.Conv2d(4, 2, 1)
        self.right = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        a, b = torch.split(self.conv(x), [4, 6], dim=1)
        return self.left(a) + self.right(b)


def test_chunk_pieces_stay_equal():
    gm, a = _analyze(Chunk(), torch.randn(1, 3, 4, 4))
    # channel i of the first half goes with channel i of the second (the gate multiplies them)
    assert _groups(a) == [(("conv",), 8)]
    assert len(a.groups[0].atoms) == 4 and a.groups[0].atom_width == 2
    sliced = _check_sliced(gm, a, _remove_first(a, 0, 1), torch.randn(1, 3, 4, 4))
    assert sliced.get_submodule("conv").out_channels == 6 and sliced.get_submodule("out").in_channels == 3


def test_split_sections_are_rewritten():
    gm, a = _analyze(Split(), torch.randn(1, 3, 4, 4))
    # one group per piece: each keeps a channel, so no piece can be emptied
    assert _groups(a) == [(("conv",), 4), (("conv",), 6)]
    removed = np.zeros(a.num_atoms, dtype=bool)
    removed[[a.groups[0].atoms[0], a.groups[1].atoms[5]]] = True
    sliced = _check_sliced(gm, a, removed, torch.randn(1, 3, 4, 4))
    split = next(n for n in sliced.graph.nodes if n.target is torch.split)
    assert split.args[1] == [3, 5]
    assert sliced.get_submodule("left").in_channels == 3 and sliced.get_submodule("right").in_channels == 5


class Depthwise(nn.Module):
    def __init__(self, groups: int = 8):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.dw(F.relu(self.pw(x)))))


def test_depthwise_conv_couples_in_and_out():
    gm, a = _analyze(Depthwise(), torch.randn(1, 3, 6, 6))
    assert _groups(a) == [(("dw", "pw"), 8)]
    sliced = _check_sliced(gm, a, _remove_first(a, 0, 3), torch.randn(1, 3, 6, 6))
    dw = sliced.get_submodule("dw")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (5, 5, 5)


def test_grouped_conv_prunes_whole_groups():
    gm, a = _analyze(Depthwise(groups=2), torch.randn(1, 3, 6, 6))
    # two groups of 4 channels: each atom is a whole conv group
    [(roots, channels)] = _groups(a)
    assert roots == ("dw", "pw") and channels == 8 and a.groups[0].atom_width == 4
    sliced = _check_sliced(gm, a, _remove_first(a, 0, 1), torch.randn(1, 3, 6, 6))
    dw = sliced.get_submodule("dw")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (4, 4, 1)


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class ViewLinear(FlattenLinear):
    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).view(x.size(0), 24))


@pytest.mark.parametrize("model", [FlattenLinear(), ViewLinear()], ids=["flatten", "view-literal"])
def test_flatten_to_linear_maps_channel_blocks(model):
    gm, a = _analyze(model, torch.randn(2, 3, 4, 4))
    assert _groups(a) == [(("conv",), 6)]
    removed = np.zeros(a.num_atoms, dtype=bool)
    removed[a.groups[0].atoms[1]] = True
    sliced = _check_sliced(gm, a, removed, torch.randn(2, 3, 4, 4))
    # Expected: channel 1 owns features 4..7 of the linear input
    assert sliced.get_submodule("fc").in_features == 20
    torch.testing.assert_close(sliced.get_submodule("fc").weight[:, 4:], gm.get_submodule("fc").weight[:, 8:])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.shared = nn.Conv2d(6, 4, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(torch.cat([self.shared(self.a(x)), self.shared(self.b(x))], 1))


def test_tied_module_couples_its_calls():
    gm, a = _analyze(Tied(), torch.randn(1, 3, 4, 4))
    # the shared conv's inputs (a and b) must match, and both calls prune the same outputs
    assert sorted(_groups(a)) == [(("a", "b"), 6), (("shared",), 4)]
    removed = _remove_first(a, 1 if a.groups[1].root_modules == ("shared",) else 0, 2)
    sliced = _check_sliced(gm, a, removed, torch.randn(1, 3, 4, 4))
    assert sliced.get_submodule("shared").out_channels == 2 and sliced.get_submodule("out").in_channels == 4


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        x = self.proj(x)
        x = x + self.mha(x, x, x, need_weights=False)[0]
        return self.out(F.gelu(self.mlp(x)))


def test_multihead_attention_embed_dims_are_frozen():
    gm, a = _analyze(Attention(), torch.randn(2, 5, 4))
    # heads are not pruned: the embed dim through nn.MultiheadAttention stays; the MLP is free
    assert _groups(a) == [(("mlp",), 16)]
    reasons = a.frozen_reasons()
    assert any("MultiheadAttention" in r for r in reasons.values())


def test_graph_output_and_leaf_freeze_their_producers():
    class Leafy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    gm, a = _analyze(Leafy(), torch.randn(1, 3, 4, 4))
    assert sorted(_groups(a)) == [(("a",), 8), (("b",), 8)]  # c reaches the output
    gm = fxopt.trace(Leafy(), (torch.randn(1, 3, 4, 4),), leaf_modules=["b"])
    a = analyze_dependencies(gm)
    assert _groups(a) == []  # b is opaque: neither its input (a) nor its output may change
    assert any("leaf module 'b'" in r for r in a.frozen_reasons().values())


def test_ignore_keeps_a_producer():
    gm, a = _analyze(Residual(), torch.randn(1, 3, 8, 8), ignore=("inner",))
    assert _groups(a) == [(("back", "body", "stem"), 8)]
    gm, a = _analyze(Residual(), torch.randn(1, 3, 8, 8), ignore=(r"b.*",))
    assert _groups(a) == [(("inner",), 6)]


class HalvedSize(nn.Module):
    """A size read, halved and doubled again in reshape arguments."""

    def __init__(self, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        n = y.shape[-1] // 2 if not self.offset else y.shape[-1] - self.offset
        return self.b(y.reshape(y.shape[0], 2, n).reshape(y.shape[0], 2 * n))


def test_size_read_into_modelled_arithmetic_prunes_equal_halves():
    x = torch.randn(3, 4)
    gm, a = _analyze(HalvedSize(), x)
    [g] = a.groups
    assert g.root_modules == ("a",) and len(g.atoms) == 4 and g.atom_width == 2  # index j of both halves
    removed = _remove_first(a, 0, 1)
    assert a.kept_indices(("a", 0, 1), removed).tolist() == [1, 2, 3, 5, 6, 7]
    sliced = _check_sliced(gm, a, removed, x)
    assert sliced.get_submodule("a").out_features == 6 and sliced.get_submodule("b").in_features == 6


def test_size_read_into_unmodelled_arithmetic_freezes_the_dim():
    gm, a = _analyze(HalvedSize(offset=4), torch.randn(3, 4))  # c - 4 is not a product
    assert _groups(a) == []
    assert a.frozen_reasons()["a"] == "size of dim 1 used in arithmetic or control flow"


def test_analysis_writes_frozen_node_meta():
    gm, a = _analyze(Concat(), torch.randn(1, 3, 4, 4))
    bn = next(n for n in gm.graph.nodes if n.name == "bn")
    info = bn.meta["fxopt"][META_KEY]
    assert isinstance(info, NodeChannels)
    channel = info.outputs[0][1]
    assert channel.size == 10 and set(channel.groups) == {0, 1} and channel.frozen == ""
    with pytest.raises(AttributeError):
        channel.size = 3  # frozen dataclass
    out = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "out")
    assert out.meta["fxopt"][META_KEY].outputs[0][1].frozen == "reaches a graph output"


def test_space_graph_components_cover_couplings():
    gm, a = _analyze(Concat(), torch.randn(1, 3, 4, 4))
    g = a.space_graph
    assert g.has_edge(("a", 0, 1), ("cat", 0, 1)) and g.edges[("a", 0, 1), ("cat", 0, 1)]["kind"] == "concat"


class FunctionalNorms(nn.Module):
    """timm-style functional batch norm on its own tensors, and a layer-scale parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bias = nn.Parameter(torch.randn(8))
        self.register_buffer("mean", torch.randn(8))
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.scale = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.mean, self.var, self.weight, self.bias, False, 0.1, 1e-5)
        return self.out(y * self.scale)


def test_functional_norm_and_layer_scale_tensors_are_sliced():
    gm, a = _analyze(FunctionalNorms(), torch.randn(1, 3, 4, 4))
    assert _groups(a) == [(("conv",), 8)]
    sliced = _check_sliced(gm, a, _remove_first(a, 0, 3), torch.randn(1, 3, 4, 4))
    assert sliced.weight.shape == (5,) and sliced.var.shape == (5,) and sliced.scale.shape == (1, 5, 1, 1)
    assert isinstance(sliced.weight, nn.Parameter) and not isinstance(sliced.var, nn.Parameter)


def test_unknown_op_freezes_what_it_touches():
    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(torch.cumsum(self.b(self.a(x)), dim=1))

    gm, a = _analyze(Unknown(), torch.randn(1, 3, 4, 4))
    assert _groups(a) == [(("a",), 8)]  # b feeds cumsum (channels mix): frozen, never guessed
    assert any("unknown op cumsum" in r for r in a.frozen_reasons().values())


def test_pruning_needs_shapes():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    from fxopt.passes import PruneChannels

    with pytest.raises(fxopt.InputError, match="fxopt.trace"):
        PruneChannels(amount=0.5)(gm)


def test_token_mixing_linear_cannot_prune_spatial_positions():
    class TokenMixer(nn.Module):
        """MLP-Mixer pattern: a linear over the token (spatial) axis of a conv's output."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 2, stride=2)
            self.tokens = nn.Linear(4, 4)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            t = self.stem(x).flatten(2)  # (B, 8, 4): 4 tokens from the 2x2 map
            t = t + self.tokens(t)
            return self.out(t.mean(2))

    gm, a = _analyze(TokenMixer(), torch.randn(1, 3, 4, 4))
    # the token linear's outputs are tied to the conv's spatial grid, which keeps its size
    assert _groups(a) == [(("stem",), 8)]
    assert any("spatial dimension of a conv" in r for r in a.frozen_reasons().values())


class HeadAttention(nn.Module):
    """timm-style attention: fused qkv linear split into (3, heads, head_dim), then proj."""

    def __init__(self, dim: int = 12, heads: int = 3, head_dim: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.embed = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.out = nn.Linear(dim, 2)

    def forward(self, x):
        x = self.embed(x)
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        x = x + self.proj(y)
        return self.out(x).mean(1)


def test_attention_heads_are_pruned_whole():
    x = torch.randn(2, 6, 5)
    gm, a = _analyze(HeadAttention(), x)
    groups = {g.root_modules: g for g in a.groups}
    assert set(groups) == {("embed", "proj"), ("qkv",)}
    heads = groups[("qkv",)]
    assert len(heads.atoms) == 3 and heads.atom_width == 12  # one atom = a head's q, k and v rows
    removed = np.zeros(a.num_atoms, dtype=bool)
    removed[heads.atoms[1]] = True
    sliced = _check_sliced(gm, a, removed, x)
    assert sliced.get_submodule("qkv").out_features == 24 and sliced.get_submodule("proj").in_features == 8
    kept_rows = a.kept_indices(("qkv", 0, 2), removed).tolist()
    assert kept_rows == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25, 26, 27, 32, 33, 34, 35]
    reshapes = [n.args for n in sliced.graph.nodes if n.target == "reshape"]
    assert reshapes[0][3:] == (3, 2, 4) and reshapes[1][-1] == 8  # head count and width rewritten


def test_functional_group_norm_prunes_whole_groups():
    class FunctionalGroupNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.weight = nn.Parameter(torch.rand(8) + 0.5)
            self.bias = nn.Parameter(torch.randn(8))
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(F.group_norm(self.conv(x), 4, self.weight, self.bias))

    x = torch.randn(1, 3, 4, 4)
    gm, a = _analyze(FunctionalGroupNorm(), x)
    [group] = a.groups
    assert len(group.atoms) == 4 and group.atom_width == 2
    sliced = _check_sliced(gm, a, _remove_first(a, 0, 1), x)  # whole groups: statistics unchanged
    norm = next(n for n in sliced.graph.nodes if n.target is F.group_norm)
    assert norm.args[1] == 3 and sliced.weight.shape == (6,)


class BiasedHeadAttention(HeadAttention):
    """HeadAttention with a per-head additive mask (a learned relative-position bias table)."""

    def __init__(self, tokens: int = 6, frozen_bias: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, self.heads, tokens, tokens))
        self.frozen_bias = frozen_bias

    def forward(self, x):
        x = self.embed(x)
        b, n = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask = torch.cumsum(self.bias, 1) if self.frozen_bias else self.bias  # cumsum mixes heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.out(x + self.proj(y)).mean(1)


def test_attention_mask_heads_follow_the_pruned_heads():
    x = torch.randn(2, 6, 5)
    gm, a = _analyze(BiasedHeadAttention(), x)
    heads = next(g for g in a.groups if g.root_modules == ("qkv",))
    assert len(heads.atoms) == 3 and "bias" in heads.members  # Before: the mask's head dim is coupled
    removed = np.zeros(a.num_atoms, dtype=bool)
    removed[heads.atoms[1]] = True
    sliced = _check_sliced(gm, a, removed, x)
    # Expected: head 1 leaves q, k, v and the mask alike
    assert sliced.bias.shape == (1, 2, 6, 6)
    torch.testing.assert_close(sliced.bias, gm.bias[:, [0, 2]])
    # a mask the analysis cannot slice by head keeps every head
    gm, a = _analyze(BiasedHeadAttention(frozen_bias=True), x)
    assert all(g.root_modules != ("qkv",) for g in a.groups)


class StdConv2d(nn.Conv2d):
    """Weight-standardised conv (NF-Nets): F.batch_norm over each filter, then F.conv2d."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * 0.5).view(-1), training=True, momentum=0.0, eps=1e-5)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = StdConv2d(3, 8, 1)
        self.b = StdConv2d(8, 8, 3, padding=1, groups=4)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.b(F.relu(self.a(x)))))


def test_functional_conv_prunes_whole_groups_and_its_weight_chain():
    x = torch.randn(1, 3, 6, 6)
    gm, a = _analyze(StdConvNet(), x)
    # Before: a and b (grouped, 2 channels a group) are one group of 4 two-channel atoms
    [group] = a.groups
    assert (len(group.atoms), group.atom_width) == (4, 2) and set(group.root_names) == {"conv2d", "conv2d_1"}
    sliced = _check_sliced(gm, a, _remove_first(a, 0, 1), x)
    # Expected: a and b lose a group's 2 filters (and gains), b's groups literal goes 4 -> 3
    assert sliced.a.weight.shape == (6, 3, 1, 1) and sliced.a.gain.shape == (6, 1, 1, 1)
    assert sliced.b.weight.shape == (6, 2, 3, 3) and sliced.b.bias.shape == (6,)
    convs = [n for n in sliced.graph.nodes if n.target is F.conv2d]
    assert [n.args[6] for n in convs] == [1, 3] and sliced.get_submodule("out").in_channels == 6


# ---------------------------------------------------------------------------------------------
# shape arithmetic: sizes read at run time and recomputed into reshape arguments


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle, sizes read from the tensor (as torchvision writes it)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    """Branch convs concatenated, channel-shuffled, then a depthwise and a 1x1 conv."""

    def __init__(self, groups: int = 2, width: int = 8):
        super().__init__()
        self.groups = groups
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branches = nn.ModuleList(nn.Conv2d(16, width, 1) for _ in range(groups))
        c = groups * width
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(branch(x)) for branch in self.branches], 1)
        x = channel_shuffle(x, self.groups)
        x = F.relu(self.pw(self.bn(self.dw(x))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("groups", [2, 4])
def test_channel_shuffle_prunes_equal_counts_per_group(groups):
    x = torch.randn(2, 3, 8, 8)
    gm, a = _analyze(ShuffleBlock(groups), x)
    branches = tuple(f"branches.{i}" for i in range(groups))
    # Expected: channel j of every branch is one atom (was: frozen, "size ... used in arithmetic")
    assert _groups(a) == [(("stem",), 16), ((*branches, "dw"), 8), (("pw",), 32)]  # 8 in each branch
    shuffled = a.groups[1]
    assert len(shuffled.atoms) == 8 and shuffled.atom_width == 1
    removed = _remove_first(a, 1, 3)
    cat = next(n.name for n in gm.graph.nodes if n.target is torch.cat)
    kept = a.kept_indices((cat, 0, 1), removed).tolist()
    assert kept == [p * 8 + j for p in range(groups) for j in range(3, 8)]  # 5 in every group
    # after the shuffle the removed channels are whole runs of `groups` positions
    assert a.kept_indices(("dw", 0, 1), removed).tolist() == list(range(3 * groups, 8 * groups))
    sliced = _check_sliced(gm, a, removed, x)
    assert sliced.get_submodule("dw").groups == 5 * groups
    views = [n for n in sliced.graph.nodes if n.target == "view"]
    assert views[0].args[2] == groups  # the literal group count is kept, c // groups is recomputed


class SizeReadAttention(nn.Module):
    """Attention whose head split is computed from the embedding size read at run time.

    ``whole_heads=False``: ``reshape(b, n, 3, heads, d // heads)`` (equal head dims);
    ``whole_heads=True``: ``reshape(b, n, 3, d // head_dim, head_dim)`` (whole heads).
    """

    def __init__(self, dim: int = 32, heads: int = 4, whole_heads: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.whole_heads = heads, dim // heads, whole_heads
        self.embed = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        t = self.embed(x)
        b, n, d = t.shape
        if self.whole_heads:
            qkv = self.qkv(t).reshape(b, n, 3, d // self.head_dim, self.head_dim)
        else:
            qkv = self.qkv(t).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        t = t + self.proj(o)
        t = t + self.fc2(F.gelu(self.fc1(t)))
        return self.out(t).mean(1)


def test_attention_with_computed_head_dim_prunes_equal_head_dims():
    x = torch.randn(2, 6, 5)
    gm, a = _analyze(SizeReadAttention(), x)
    assert _groups(a) == [(("embed", "fc2", "proj", "qkv"), 32), (("fc1",), 64)]
    dims = a.groups[0]
    assert len(dims.atoms) == 8 and dims.atom_width == 4  # dim j of each of the 4 heads
    removed = _remove_first(a, 0, 2)
    assert a.kept_indices(("embed", 0, 2), removed).tolist() == [h * 8 + j for h in range(4) for j in range(2, 8)]
    kept_qkv = a.kept_indices(("qkv", 0, 2), removed).tolist()
    assert kept_qkv == [p * 8 + j for p in range(12) for j in range(2, 8)]  # q, k and v of every head
    sliced = _check_sliced(gm, a, removed, x)  # the softmax keeps the original 1/sqrt(head_dim)
    assert sliced.get_submodule("qkv").out_features == 72 and sliced.get_submodule("embed").out_features == 24


def test_attention_with_computed_head_count_prunes_whole_heads():
    x = torch.randn(2, 6, 5)
    gm, a = _analyze(SizeReadAttention(whole_heads=True), x)
    assert _groups(a) == [(("embed", "fc2", "proj", "qkv"), 32), (("fc1",), 64)]
    heads = a.groups[0]
    assert len(heads.atoms) == 4 and heads.atom_width == 8
    removed = _remove_first(a, 0, 1)
    assert a.kept_indices(("embed", 0, 2), removed).tolist() == list(range(8, 32))
    sliced = _check_sliced(gm, a, removed, x)
    assert sliced.get_submodule("proj").in_features == 24


def test_a_copied_size_the_atoms_keep_equal_adds_no_coupling():
    """The shuffle's ``reshape(b, c, h, w)`` copies c from before the shuffle: equal counts, no index tie."""
    gm, a = _analyze(ShuffleBlock(2), torch.randn(1, 3, 8, 8))
    assert not any(kind == "size" for _, _, kind in a.space_graph.edges(data="kind"))
    gm, a = _analyze(SizeReadAttention(), torch.randn(2, 6, 5))
    # reshape(b, n, d) after attention copies d from the residual stream: tied index by index
    assert sum(kind == "size" for _, _, kind in a.space_graph.edges(data="kind")) == 1


class RowScatter(nn.Module):
    """Pillar-style scatter: per-row features written into a canvas by 1-D row indices, then
    reshaped into an image (as `fxopt.models.pointpillars.PillarScatter`)."""

    def __init__(self, channel_slice: bool = False):
        super().__init__()
        self.pfn = nn.Conv1d(4, 8, 1)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)
        self.channel_slice = channel_slice

    def forward(self, feats, idx):
        rows = self.pfn(feats)[0].t()  # (P, C)
        zero = rows[:1, :1] if self.channel_slice else rows[:1]
        canvas = (zero * 0).expand(16, rows.shape[1]).index_put((idx,), rows)  # (16, C)
        return self.head(self.conv(canvas.t().reshape(1, rows.shape[1], 4, 4)))


def test_index_put_of_rows_keeps_channels_prunable():
    feats, idx = torch.randn(1, 4, 5), torch.tensor([3, 0, 9, 12, 7])
    gm, a = _analyze(RowScatter(), feats, idx)
    # Before: the pillar net's 8 channels reach the canvas through index_put; Expected: one group
    assert sorted(_groups(a)) == [(("conv",), 6), (("pfn",), 8)]
    pfn = next(i for i, g in enumerate(a.groups) if g.root_modules == ("pfn",))
    sliced = _check_sliced(gm, a, _remove_first(a, pfn, 3), feats, idx)
    assert sliced.get_submodule("pfn").out_channels == 5 and sliced.get_submodule("conv").in_channels == 5
    # a canvas made from channel 0's value ties the channels to that slice: frozen, never guessed
    _, frozen = _analyze(RowScatter(channel_slice=True), feats, idx)
    assert _groups(frozen) == [(("conv",), 6)]
    assert "sliced dimension" in frozen.blocking_reasons()


def test_index_put_of_other_forms_freezes_what_it_touches():
    class Broadcast(RowScatter):  # one value row broadcast to every indexed row: not a row scatter
        def forward(self, feats, idx):
            rows = self.pfn(feats)[0].t()
            canvas = (rows[:1] * 0).expand(16, rows.shape[1]).index_put((idx,), rows[0])
            return self.head(self.conv(canvas.t().reshape(1, rows.shape[1], 4, 4)))

    _, a = _analyze(Broadcast(), torch.randn(1, 4, 5), torch.tensor([3, 0, 9, 12, 7]))
    assert _groups(a) == [(("conv",), 6)]  # the pillar net's channels are frozen, never guessed
    assert "index_put other than rows of 1-D indices" in a.frozen_reasons().values()
