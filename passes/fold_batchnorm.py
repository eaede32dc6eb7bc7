"""Fold eval-mode BatchNorm into the conv / linear / transposed conv that feeds it.

Runs after pruning and slimming (they read BatchNorm scales) and before quantisation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxopt.frontend.copying import copy_module
from fxopt.frontend.inputs import submodule
from fxopt.passinfra.pass_base import FxoptPass, PassResult
from fxopt.passinfra.registry import register_pass

__all__ = ["FoldBatchNorm", "fold_bn_into"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def fold_bn_into(producer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of `producer` whose output equals ``bn(producer(x))`` in eval mode.

    Args:
        producer: a conv, transposed conv (groups=1) or linear module.
        bn: an eval-mode BatchNorm with running statistics.

    Returns:
        The folded module (the inputs are not modified).
    """
    # the copy shares the weight and bias it is about to replace: they are not copied first
    fused = copy_module(producer, {id(t): t for t in (producer.weight, producer.bias) if t is not None})
    with torch.no_grad():
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        weight = producer.weight.double()
        # output channels are dim 0 for conv/linear, dim 1 for transposed conv
        out_dim = 1 if isinstance(producer, nn.modules.conv._ConvTransposeNd) else 0
        shape = [1] * weight.dim()
        shape[out_dim] = -1
        bias = producer.bias.double() if producer.bias is not None else torch.zeros_like(mean)
        fused.weight = nn.Parameter((weight * scale.reshape(shape)).to(producer.weight.dtype))
        fused.bias = nn.Parameter(((bias - mean) * scale + beta).to(producer.weight.dtype))
    return fused


def _foldable(gm: GraphModule, bn_node: Node, calls: dict[str, int]) -> Node | None:
    if bn_node.op != "call_module":
        return None
    bn = submodule(gm, str(bn_node.target))
    if not isinstance(bn, _BN) or bn.training or not bn.track_running_stats or bn.running_var is None:
        return None
    src = bn_node.args[0] if bn_node.args else None
    if not isinstance(src, Node) or src.op != "call_module" or len(src.users) != 1:
        return None
    producer = submodule(gm, str(src.target))
    if not isinstance(producer, _PRODUCERS) or calls[str(src.target)] != 1:
        return None  # a module called twice (tied weights) would change at its other call too
    if isinstance(producer, nn.modules.conv._ConvTransposeNd) and producer.groups != 1:
        return None
    if isinstance(producer, nn.Linear):
        meta = src.meta.get("tensor_meta")
        if meta is None or len(meta.shape) != 2:
            return None  # BatchNorm1d normalises dim 1, which is a linear's features only in 2-D
    return src


@register_pass
class FoldBatchNorm(FxoptPass):
    """Fold ``BatchNorm(conv(x))`` into one conv (likewise linear and transposed conv).

    Example:
        >>> import torch, fxopt
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
        >>> gm = fxopt.trace(m, torch.randn(1, 3, 8, 8))
        >>> FoldBatchNorm()(gm).modified, [n.op for n in gm.graph.nodes]
        (True, ['placeholder', 'call_module', 'output'])
    """

    name = "fold_batchnorm"
    lossy = False
    shares_weights = True  # replaces what it changes, never writes into a weight
    shares_buffers = True  # nor into a buffer, and runs no module
    after = ("prune", "slim", "canonicalize")
    before = ("quantize",)

    def call(self, graph_module: GraphModule) -> PassResult:
        calls: dict[str, int] = {}
        for n in graph_module.graph.nodes:
            if n.op == "call_module":
                calls[str(n.target)] = calls.get(str(n.target), 0) + 1
        folded = 0
        for bn_node in list(graph_module.graph.nodes):
            src = _foldable(graph_module, bn_node, calls)
            if src is None:
                continue
            bn = submodule(graph_module, str(bn_node.target))
            producer = submodule(graph_module, str(src.target))
            _set_submodule(graph_module, str(src.target), fold_bn_into(producer, bn))
            bn_node.replace_all_uses_with(src)
            graph_module.graph.erase_node(bn_node)
            folded += 1
        if folded:
            graph_module.delete_all_unused_submodules()
        return PassResult(graph_module, folded > 0)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
