"""Module rules: how each ``call_module`` kind (conv, linear, norms, pooling, elementwise)
couples its input and output channels and which parameter dims follow them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.fx import Node

from fxopt.passes.dependency_groups.couplings import _broadcast, _reshape
from fxopt.passes.dependency_groups.model import SpaceKey, _Builder, _first_tensor, _shape


def _conv_rule(b: _Builder, node: Node, mod: nn.Module) -> None:
    src = _first_tensor(node)
    out = _shape(node)
    if src is None or out is None or len(out) < 2 or len(_shape(src) or ()) != len(out):
        b.freeze_all(node, "conv on an unbatched input")
        return
    path = str(node.target)
    b.couple(b.space(src, 0), b.space(node, 0))
    b.freeze_dims(src, range(2, len(out)), "spatial dimension of a conv")
    b.freeze_dims(node, range(2, len(out)), "spatial dimension of a conv")
    transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
    in_key, out_key = b.space(src, 1), b.space(node, 1)
    if mod.groups > 1:
        if transposed:
            b.freeze_all(node, "grouped transposed conv")
            return
        # whole groups: group k's inputs and outputs go together
        b.couple(in_key, out_key, a_block=mod.in_channels // mod.groups,
                 b_block=mod.out_channels // mod.groups, kind="groups")
    b.root(out_key)
    w_out, w_in = (1, 0) if transposed else (0, 1)
    b.param(path, "weight", w_out, out_key, "out")
    if mod.groups == 1:
        b.param(path, "weight", w_in, in_key, "in")
    if mod.bias is not None:
        b.param(path, "bias", 0, out_key, "out")


def _linear_rule(b: _Builder, node: Node, mod: nn.Module) -> None:
    src, out = _first_tensor(node), _shape(node)
    if src is None or out is None:
        b.freeze_all(node, "linear without tensor shapes")
        return
    rank = len(out)
    b.couple_same(src, node, [(d, d) for d in range(rank - 1)])
    path = str(node.target)
    in_key, out_key = b.space(src, rank - 1), b.space(node, rank - 1)
    b.root(out_key)
    b.param(path, "weight", 0, out_key, "out")
    b.param(path, "weight", 1, in_key, "in")
    if mod.bias is not None:
        b.param(path, "bias", 0, out_key, "out")


def _norm_params(b: _Builder, path: str, mod: nn.Module, key: SpaceKey | None, stats: bool) -> None:
    for name in ("weight", "bias"):
        if getattr(mod, name, None) is not None:
            b.param(path, name, 0, key, "affine")
    if stats:
        for name in ("running_mean", "running_var"):
            if getattr(mod, name, None) is not None:
                b.param(path, name, 0, key, "stat")


def _batchnorm_rule(b: _Builder, node: Node, mod: nn.Module) -> None:
    src = _first_tensor(node)
    if src is None or len(_shape(src) or ()) < 2:
        b.freeze_all(node, "norm on an unbatched input")
        return
    b.couple_same(src, node)
    _norm_params(b, str(node.target), mod, b.space(node, 1), stats=True)


def _groupnorm_rule(b: _Builder, node: Node, mod: nn.GroupNorm) -> None:
    src = _first_tensor(node)
    if src is None or len(_shape(src) or ()) < 2:
        b.freeze_all(node, "norm on an unbatched input")
        return
    b.couple_same(src, node)
    key = b.space(node, 1)
    per_group = mod.num_channels // mod.num_groups
    if per_group > 1:  # whole groups: a group's statistics then stay those of the original
        b.couple(key, key, a_block=per_group, b_block=per_group, kind="groups")
    _norm_params(b, str(node.target), mod, key, stats=False)


def _layernorm_rule(b: _Builder, node: Node, mod: nn.LayerNorm) -> None:
    src, out = _first_tensor(node), _shape(node)
    if src is None or out is None:
        b.freeze_all(node, "layer norm without shapes")
        return
    b.couple_same(src, node)
    k = len(mod.normalized_shape)
    if k != 1:
        for d in range(len(out) - k, len(out)):
            b.freeze(b.space(node, d), "LayerNorm over several dimensions")
        return
    _norm_params(b, str(node.target), mod, b.space(node, len(out) - 1), stats=False)


def _passthrough_rule(b: _Builder, node: Node, mod: nn.Module | None = None) -> None:
    src = _first_tensor(node)
    if src is None:
        b.freeze_all(node, "op without a tensor input")
        return
    _broadcast(b, node, [src])


def _channel_keeping_rule(b: _Builder, node: Node, mod: nn.Module | None = None) -> None:
    """Pooling / resizing: batch and channel dims pass through, spatial dims change."""
    src = _first_tensor(node)
    if src is None or len(_shape(src) or ()) != len(_shape(node) or ()):
        b.freeze_all(node, "pooling on an unbatched input")
        return
    b.couple_same(src, node, [(0, 0), (1, 1)])
    rank = len(_shape(node) or ())
    b.freeze_dims(src, range(2, rank), "spatial dimension of a pooling/resize")
    b.freeze_dims(node, range(2, rank), "spatial dimension of a pooling/resize")


def _flatten_module_rule(b: _Builder, node: Node, mod: nn.Module) -> None:
    src = _first_tensor(node)
    if src is None:
        b.freeze_all(node, "flatten without a tensor input")
        return
    _reshape(b, src, node)


MODULE_RULES: dict[type[nn.Module], Callable[..., None]] = {
    nn.modules.conv._ConvNd: _conv_rule,
    nn.Linear: _linear_rule,
    nn.modules.batchnorm._BatchNorm: _batchnorm_rule,
    nn.modules.instancenorm._InstanceNorm: _batchnorm_rule,
    nn.GroupNorm: _groupnorm_rule,
    nn.LayerNorm: _layernorm_rule,
    nn.Flatten: _flatten_module_rule,
    nn.MultiheadAttention: lambda b, n, m: b.freeze_all(n, "nn.MultiheadAttention: heads and embed dims are not pruned"),
    nn.modules.pooling._MaxPoolNd: _channel_keeping_rule,
    nn.modules.pooling._AvgPoolNd: _channel_keeping_rule,
    nn.modules.pooling._AdaptiveAvgPoolNd: _channel_keeping_rule,
    nn.modules.pooling._AdaptiveMaxPoolNd: _channel_keeping_rule,
    nn.Upsample: _channel_keeping_rule,
    nn.PixelShuffle: lambda b, n, m: b.freeze_all(n, "pixel shuffle mixes channels and space"),
}

# Parameter-free modules that act elementwise (channels pass through unchanged).
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.modules.dropout._DropoutNd, nn.Softmax, nn.LogSoftmax,
)


def _module_rule(mod: nn.Module) -> Callable[..., None] | None:
    if isinstance(mod, ELEMENTWISE_MODULES):
        if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
            return None
        return _passthrough_rule
    for cls in type(mod).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return None
