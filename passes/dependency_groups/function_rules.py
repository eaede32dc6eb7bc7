"""Function and method rules: the ``call_function`` / ``call_method`` tables (reshapes,
concat/split, indexing, reductions, matmul and attention, functional layers)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

from fxopt.passes.dependency_groups.couplings import _broadcast, _reshape
from fxopt.passes.dependency_groups.model import (
    _arg,
    _Builder,
    _dims_arg,
    _first_tensor,
    _norm_dim,
    _shape,
    is_tuple_output,
    output_shapes,
)
from fxopt.passes.dependency_groups.module_rules import _channel_keeping_rule, _passthrough_rule
from fxopt.passes.dependency_groups.shape_arithmetic import _couple_size_args, _size_read_rule


def _permute_rule(b: _Builder, node: Node) -> None:
    src = _first_tensor(node)
    dims = _dims_arg(node, 1, "dims")
    rank = len(_shape(node) or ())
    if src is None or len(dims) != rank or not all(isinstance(d, int) for d in dims):
        b.freeze_all(node, "permute with unknown dims")
        return
    b.couple_same(src, node, [(_norm_dim(d, rank), j) for j, d in enumerate(dims)])


def _transpose_rule(b: _Builder, node: Node) -> None:
    src, out = _first_tensor(node), _shape(node)
    if src is None or out is None:
        b.freeze_all(node, "transpose without shapes")
        return
    rank = len(out)
    if node.target in ("t",) or (len(node.args) < 3 and rank == 2):
        d0, d1 = 0, 1
    else:
        d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
    if not isinstance(d0, int) or not isinstance(d1, int):
        b.freeze_all(node, "transpose with unknown dims")
        return
    perm = list(range(rank))
    a, c = _norm_dim(d0, rank), _norm_dim(d1, rank)
    perm[a], perm[c] = perm[c], perm[a]
    b.couple_same(src, node, [(perm[j], j) for j in range(rank)])


def _reshape_fn_rule(b: _Builder, node: Node) -> None:
    src = _first_tensor(node)
    if src is None:
        b.freeze_all(node, "reshape without a tensor input")
        return
    _reshape(b, src, node)
    _couple_size_args(b, node)


def _getattr_rule(b: _Builder, node: Node) -> None:
    if node.args[1] == "shape":
        _size_read_rule(b, node)
    elif output_shapes(node) is not None:
        b.freeze_all(node, f"tensor attribute .{node.args[1]}")


def _expand_rule(b: _Builder, node: Node) -> None:
    src = _first_tensor(node)
    if src is None:
        b.freeze_all(node, "expand without a tensor input")
        return
    _broadcast(b, node, [src])
    _couple_size_args(b, node)


def _numel_rule(b: _Builder, node: Node) -> None:
    t = node.args[0] if node.args else None
    if isinstance(t, Node):
        b.freeze_node_outputs(t, "numel read")


def _cat_rule(b: _Builder, node: Node) -> None:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    out = _shape(node)
    if out is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        b.freeze_all(node, "concat with unknown arguments")
        return
    dim = _norm_dim(dim, len(out))
    offset = 0
    for t in tensors:
        shape = _shape(t)
        if shape is None or len(shape) != len(out):
            b.freeze_all(node, "concat of unknown tensors")
            return
        b.couple_same(t, node, [(d, d) for d in range(len(out)) if d != dim])
        b.couple(b.space(t, dim), b.space(node, dim), b_offset=offset, kind="concat")
        offset += shape[dim]


def _split_rule(b: _Builder, node: Node) -> None:
    src, shapes = _first_tensor(node), output_shapes(node)
    name = "dim"
    dim = _arg(node, 2, name, 0)
    if src is None or shapes is None or not is_tuple_output(node) or not isinstance(dim, int):
        b.freeze_all(node, "split with unknown arguments")
        return
    rank = len(_shape(src) or ())
    dim = _norm_dim(dim, rank)
    equal = node.target in ("chunk", torch.chunk) or isinstance(_arg(node, 1, "split_size_or_sections"), int)
    if equal and len({s[dim] for s in shapes}) != 1:
        b.freeze_all(node, "split into unequal pieces")  # no safe way to shrink a remainder
        return
    offset = 0
    for item, shape in enumerate(shapes):
        for d in range(rank):
            if d == dim:
                b.couple(b.space(node, d, item), b.space(src, d), a_offset=0, b_offset=offset, count=shape[d], kind="split")
            elif shape[d] > 1:
                b.couple(b.space(src, d), b.space(node, d, item))
        if equal and item > 0:  # equal pieces stay equal: index i goes in every piece
            b.couple(b.space(node, dim, 0), b.space(node, dim, item), kind="chunk")
        offset += shape[dim]


def _unbind_rule(b: _Builder, node: Node) -> None:
    src, shapes = _first_tensor(node), output_shapes(node)
    dim = _arg(node, 1, "dim", 0)
    if src is None or shapes is None or not isinstance(dim, int):
        b.freeze_all(node, "unbind with unknown arguments")
        return
    rank = len(_shape(src) or ())
    dim = _norm_dim(dim, rank)
    b.freeze(b.space(src, dim), "unbind dimension")
    for item in range(len(shapes)):
        for d in range(rank - 1):
            b.couple(b.space(src, d if d < dim else d + 1), b.space(node, d, item))


def _getitem_rule(b: _Builder, node: Node) -> None:
    src, index = node.args[0], node.args[1]
    if not isinstance(src, Node):
        return
    if is_tuple_output(src):
        shapes = output_shapes(src)
        if isinstance(index, int) and shapes is not None and _shape(node) is not None:
            item = index if index >= 0 else index + len(shapes)
            for d in range(len(shapes[item])):
                b.couple(b.space(src, d, item), b.space(node, d))
        else:
            b.freeze_all(node, "tuple index")
        return
    if _shape(src) is None:
        return  # indexing a shape or a python value
    _tensor_index_rule(b, src, node, index)


def _tensor_index_rule(b: _Builder, src: Node, node: Node, index: Any) -> None:
    ins, out = _shape(src), _shape(node)
    items = list(index) if isinstance(index, tuple) else [index]
    if out is None or ins is None or any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items):
        b.freeze_all(node, "advanced indexing")
        return
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = len(ins) - sum(1 for i in items if isinstance(i, (int, slice)))
        items = items[:at] + [slice(None)] * fill + items[at + 1:]
    items += [slice(None)] * (len(ins) - sum(1 for i in items if isinstance(i, (int, slice))))
    d_in = d_out = 0
    for item in items:
        if item is None:
            d_out += 1
        elif isinstance(item, int):
            b.freeze(b.space(src, d_in), "integer index")
            d_in += 1
        else:
            whole = _is_whole_slice(item, ins[d_in])
            if whole:
                b.couple(b.space(src, d_in), b.space(node, d_out))
            else:
                b.freeze(b.space(src, d_in), "sliced dimension")
                b.freeze(b.space(node, d_out), "sliced dimension")
            d_in += 1
            d_out += 1


def _index_put_rule(b: _Builder, node: Node) -> None:
    """``self.index_put((idx_0, .., idx_k-1), values)`` with 1-D index tensors of one length L
    (a scatter of rows, e.g. pillars onto a bird's-eye-view canvas): the output is `self`'s shape;
    the first k dims are addressed by the indices (frozen); values is ``(L, *self.shape[k:])`` and
    its trailing dims go with `self`'s and the output's (channels stay channels)."""
    src, out = _first_tensor(node), _shape(node)
    indices, values = _arg(node, 1, "indices"), _arg(node, 2, "values")
    ins = _shape(src) if src is not None else None
    index_shapes = [_shape(i) if isinstance(i, Node) else None for i in indices] if isinstance(indices, (tuple, list)) else [None]
    vals = _shape(values) if isinstance(values, Node) else None
    k = len(index_shapes)
    if (ins is None or out is None or vals is None or any(s is None or len(s) != 1 for s in index_shapes)
            or len({s[0] for s in index_shapes}) != 1 or tuple(vals) != (index_shapes[0][0], *ins[k:])):
        b.freeze_all(node, "index_put other than rows of 1-D indices")
        return
    b.couple_same(src, node)
    for d in range(k):
        b.freeze(b.space(src, d), "indexed dimension")
        b.freeze(b.space(node, d), "indexed dimension")
    b.freeze(b.space(values, 0), "indexed dimension")
    for d in range(k, len(ins)):
        b.couple(b.space(values, d - k + 1), b.space(node, d))


def _is_whole_slice(item: slice, size: int) -> bool:
    ints = all(v is None or type(v) is int for v in (item.start, item.stop, item.step))
    return ints and item.start in (None, 0) and item.step in (None, 1) and (item.stop is None or item.stop >= size)


def _reduce_rule(b: _Builder, node: Node) -> None:
    src, out = _first_tensor(node), _shape(node)
    if src is None or out is None:
        b.freeze_all(node, "reduction without shapes")
        return
    rank = len(_shape(src) or ())
    dims = _arg(node, 1, "dim")
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if dims is None:
        return  # reduces everything to a scalar
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        b.freeze_all(node, "reduction over unknown dims")
        return
    reduced = {_norm_dim(d, rank) for d in dims}
    kept = [d for d in range(rank) if d not in reduced]
    if keepdim:
        b.couple_same(src, node, [(d, d) for d in kept])
    else:
        b.couple_same(src, node, [(d, j) for j, d in enumerate(kept)])


def _matmul_rule(b: _Builder, node: Node) -> None:
    a, c, out = _shape(node.args[0]), _shape(node.args[1]), _shape(node)
    if a is None or c is None or out is None or len(a) < 2 or len(c) < 2:
        b.freeze_all(node, "matmul on vectors")
        return
    x, y = node.args[0], node.args[1]
    b.couple(b.space(x, len(a) - 1), b.space(y, len(c) - 2), kind="contract")
    b.couple_same(x, node, [(len(a) - 2, len(out) - 2)])
    b.couple_same(y, node, [(len(c) - 1, len(out) - 1)])
    for t, shape in ((x, a), (y, c)):
        lead = len(out) - len(shape)
        b.couple_same(t, node, [(d, d + lead) for d in range(len(shape) - 2) if shape[d] == out[d + lead]])


def _sdpa_rule(b: _Builder, node: Node) -> None:
    q, k, v = (node.args + (None, None, None))[:3]
    sq, sk, sv, out = _shape(q), _shape(k), _shape(v), _shape(node)
    if None in (sq, sk, sv, out) or len({len(sq), len(sk), len(sv), len(out)}) != 1:
        b.freeze_all(node, "attention with unusual shapes")
        return
    rank = len(out)
    b.couple(b.space(q, rank - 1), b.space(k, rank - 1), kind="contract")
    b.couple(b.space(k, rank - 2), b.space(v, rank - 2), kind="contract")
    b.couple_same(q, node, [(rank - 2, rank - 2)])
    b.couple_same(v, node, [(rank - 1, rank - 1)])
    for t in (q, k, v):
        b.couple_same(t, node, [(d, d) for d in range(rank - 2)])
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, Node):
        _couple_attention_mask(b, node, mask, q, k)


def _couple_attention_mask(b: _Builder, node: Node, mask: Node, q: Node, k: Node) -> None:
    """The mask broadcasts to the scores (..., heads, Lq, Lk): a per-head mask loses pruned heads too."""
    shape, out = _shape(mask), _shape(node)
    assert out is not None
    rank = len(out)
    if shape is None or len(shape) > rank:
        b.freeze_all(node, "attention mask of unknown shape")
        return
    # the scores' dims, each as (a space of the same size, that size)
    scores = [(b.space(node, d), out[d]) for d in range(rank - 2)]
    scores += [(b.space(q, rank - 2), out[rank - 2]), (b.space(k, rank - 2), (_shape(k) or out)[rank - 2])]
    lead = rank - len(shape)
    for d, size in enumerate(shape):
        target, target_size = scores[lead + d]
        if size == target_size and size > 1:
            b.couple(b.space(mask, d), target)
        elif size != 1:
            b.freeze_all(node, "attention mask with an unexpected broadcast")
            return


def _linear_fn_rule(b: _Builder, node: Node) -> None:
    x, w, bias = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias")
    out = _shape(node)
    if out is None or _shape(x) is None or not isinstance(w, Node) or len(_shape(w) or ()) != 2:
        b.freeze_all(node, "functional linear with unknown weight")
        return
    rank = len(out)
    b.couple_same(x, node, [(d, d) for d in range(rank - 1)])
    b.couple(b.space(w, 0), b.space(node, rank - 1))
    b.couple(b.space(w, 1), b.space(x, rank - 1))
    if isinstance(bias, Node):
        b.couple(b.space(bias, 0), b.space(node, rank - 1))


def _conv_fn_rule(b: _Builder, node: Node) -> None:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` (weight-standardised convs)."""
    x, w, bias, groups = node.args[0], _arg(node, 1, "weight"), _arg(node, 2, "bias"), _arg(node, 6, "groups", 1)
    out, sx, sw = _shape(node), _shape(x), _shape(w)
    if out is None or sx is None or sw is None or not len(sx) == len(sw) == len(out) or not isinstance(groups, int):
        b.freeze_all(node, "functional conv with unknown arguments")
        return
    b.couple(b.space(x, 0), b.space(node, 0))
    b.freeze_dims(x, range(2, len(out)), "spatial dimension of a conv")
    b.freeze_dims(node, range(2, len(out)), "spatial dimension of a conv")
    in_key, out_key = b.space(x, 1), b.space(node, 1)
    b.couple(b.space(w, 0), out_key)
    if groups > 1:  # whole groups, as for nn.Conv2d; the weight's per-group input dim keeps its size
        b.couple(in_key, out_key, a_block=sx[1] // groups, b_block=out[1] // groups, kind="groups")
    else:
        b.couple(b.space(w, 1), in_key)
    if isinstance(bias, Node):
        b.couple(b.space(bias, 0), out_key)
    b.root(out_key)


def _layer_norm_fn_rule(b: _Builder, node: Node) -> None:
    x, shape, out = node.args[0], _arg(node, 1, "normalized_shape"), _shape(node)
    if out is None or _shape(x) is None or not isinstance(shape, (list, tuple)):
        b.freeze_all(node, "functional layer norm with unknown shape")
        return
    b.couple_same(x, node)
    last = len(out) - 1
    if len(shape) != 1:
        for d in range(len(out) - len(shape), len(out)):
            b.freeze(b.space(node, d), "layer norm over several dimensions")
    for index, name in ((2, "weight"), (3, "bias")):
        param = _arg(node, index, name)
        if isinstance(param, Node):
            b.couple_same(param, node, [(len(_shape(param) or ()) - 1, last)])


def _batch_norm_fn_rule(b: _Builder, node: Node) -> None:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, ...)``: per-channel tensors."""
    x, out = node.args[0], _shape(node)
    if out is None or _shape(x) is None or len(out) < 2:
        b.freeze_all(node, "functional batch norm on an unbatched input")
        return
    b.couple_same(x, node)
    for index, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        param = _arg(node, index, name)
        if isinstance(param, Node):
            b.couple_same(param, node, [(0, 1)])


def _group_norm_fn_rule(b: _Builder, node: Node) -> None:
    """``F.group_norm(x, num_groups, weight, bias, eps)``: whole groups, per-channel tensors."""
    x, groups, out = node.args[0], _arg(node, 1, "num_groups"), _shape(node)
    if out is None or _shape(x) is None or len(out) < 2 or not isinstance(groups, int):
        b.freeze_all(node, "functional group norm with unknown groups")
        return
    b.couple_same(x, node)
    key, per_group = b.space(node, 1), out[1] // groups
    if per_group > 1:
        b.couple(key, key, a_block=per_group, b_block=per_group, kind="groups")
    for index, name in ((2, "weight"), (3, "bias")):
        param = _arg(node, index, name)
        if isinstance(param, Node):
            b.couple_same(param, node, [(0, 1)])


def _reshape_as_rule(b: _Builder, node: Node) -> None:
    src, other = node.args[0], node.args[1] if len(node.args) > 1 else None
    if _shape(src) is None or _shape(other) is None:
        b.freeze_all(node, "reshape_as without shapes")
        return
    _reshape(b, src, node)
    b.couple_same(other, node)


def _pad_rule(b: _Builder, node: Node) -> None:
    src, out, pad = _first_tensor(node), _shape(node), _arg(node, 1, "pad")
    if src is None or out is None or not isinstance(pad, (list, tuple)):
        b.freeze_all(node, "pad with unknown arguments")
        return
    padded = {len(out) - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    b.couple_same(src, node, [(d, d) for d in range(len(out)) if d not in padded])
    b.freeze_dims(src, padded, "padded dimension")
    b.freeze_dims(node, padded, "padded dimension")


def _roll_rule(b: _Builder, node: Node) -> None:
    src, out = _first_tensor(node), _shape(node)
    dims = _arg(node, 2, "dims")
    if src is None or out is None or dims is None:
        b.freeze_all(node, "roll over all dims")
        return
    dims = {_norm_dim(d, len(out)) for d in ([dims] if isinstance(dims, int) else dims)}
    for d in dims:
        b.freeze(b.space(src, d), "rolled dimension")
    b.couple_same(src, node, [(d, d) for d in range(len(out)) if d not in dims])


def _channel_keeping_fn_rule(b: _Builder, node: Node) -> None:
    _channel_keeping_rule(b, node)


def _stack_rule(b: _Builder, node: Node) -> None:
    tensors, dim, out = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0), _shape(node)
    if out is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        b.freeze_all(node, "stack with unknown arguments")
        return
    dim = _norm_dim(dim, len(out))
    for t in tensors:
        b.couple_same(t, node, [(d if d < dim else d, d if d < dim else d + 1) for d in range(len(out) - 1)])


_ELEMENTWISE_FUNCTIONS: tuple[Any, ...] = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.floordiv, torch.add, torch.sub, torch.mul, torch.div, torch.sigmoid, torch.tanh,
    torch.relu, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.clamp, torch.where,
    torch.maximum, torch.minimum, torch.erf, F.relu, F.relu6, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.mish, F.softplus, F.hardtanh,
    F.dropout, torch.softmax, F.softmax, F.log_softmax, torch.nn.functional.normalize,
    torch.clone, torch.pow, torch.square, torch.neg,
)
_ELEMENTWISE_METHODS = (
    "add", "sub", "mul", "div", "sigmoid", "tanh", "relu", "exp", "log", "sqrt", "rsqrt", "abs",
    "clamp", "clamp_min", "clamp_max", "pow", "neg", "softmax", "log_softmax", "contiguous",
    "clone", "detach", "to", "float", "half", "type_as", "masked_fill", "add_", "mul_", "sigmoid_",
    "relu_", "div_", "sub_", "square", "erf", "sqrt_", "hardtanh_", "__add__", "__mul__",
)

FUNCTION_RULES: dict[Any, Callable[[_Builder, Node], None]] = {
    **{fn: (lambda b, n: _broadcast(b, n)) for fn in _ELEMENTWISE_FUNCTIONS},
    torch.flatten: _reshape_fn_rule,
    torch.reshape: _reshape_fn_rule,
    torch.squeeze: _reshape_fn_rule,
    torch.unsqueeze: _reshape_fn_rule,
    torch.permute: _permute_rule,
    torch.transpose: _transpose_rule,
    torch.cat: _cat_rule,
    torch.concat: _cat_rule,
    torch.stack: _stack_rule,
    torch.split: _split_rule,
    torch.chunk: _split_rule,
    torch.unbind: _unbind_rule,
    operator.getitem: _getitem_rule,
    getattr: lambda b, n: _getattr_rule(b, n),
    torch.mean: _reduce_rule,
    torch.sum: _reduce_rule,
    torch.amax: _reduce_rule,
    torch.amin: _reduce_rule,
    torch.matmul: _matmul_rule,
    operator.matmul: _matmul_rule,
    torch.bmm: _matmul_rule,
    F.scaled_dot_product_attention: _sdpa_rule,
    F.linear: _linear_fn_rule,
    F.conv1d: _conv_fn_rule,  # the same objects as torch.conv1d/2d/3d
    F.conv2d: _conv_fn_rule,
    F.conv3d: _conv_fn_rule,
    F.layer_norm: _layer_norm_fn_rule,
    F.batch_norm: _batch_norm_fn_rule,
    F.group_norm: _group_norm_fn_rule,
    F.pad: _pad_rule,
    torch.roll: _roll_rule,
    F.adaptive_avg_pool2d: _channel_keeping_fn_rule,
    F.adaptive_max_pool2d: _channel_keeping_fn_rule,
    F.avg_pool2d: _channel_keeping_fn_rule,
    F.max_pool2d: _channel_keeping_fn_rule,
    F.interpolate: _channel_keeping_fn_rule,
    torch.numel: _numel_rule,
}

METHOD_RULES: dict[str, Callable[[_Builder, Node], None]] = {
    **{name: (lambda b, n: _broadcast(b, n)) for name in _ELEMENTWISE_METHODS},
    "view": _reshape_fn_rule,
    "expand": _expand_rule,
    "index_put": _index_put_rule,
    "reshape_as": _reshape_as_rule,
    "view_as": _reshape_as_rule,
    "reshape": _reshape_fn_rule,
    "flatten": _reshape_fn_rule,
    "squeeze": _reshape_fn_rule,
    "unsqueeze": _reshape_fn_rule,
    "permute": _permute_rule,
    "transpose": _transpose_rule,
    "t": _transpose_rule,
    "split": _split_rule,
    "chunk": _split_rule,
    "unbind": _unbind_rule,
    "mean": _reduce_rule,
    "sum": _reduce_rule,
    "amax": _reduce_rule,
    "size": _size_read_rule,
    "numel": _numel_rule,
    "dim": lambda b, n: None,
    "matmul": _matmul_rule,
}

# Wrapped (opaque to fx) library functions that are the identity in eval mode, by name.
IDENTITY_FUNCTION_NAMES = frozenset({"stochastic_depth", "drop_path"})


def _function_rule(node: Node) -> Callable[[_Builder, Node], None] | None:
    if node.op == "call_method":
        return METHOD_RULES.get(str(node.target))
    try:
        rule = FUNCTION_RULES.get(node.target)
    except TypeError:  # unhashable target
        rule = None
    if rule is None and getattr(node.target, "__name__", "") in IDENTITY_FUNCTION_NAMES:
        return lambda b, n: _passthrough_rule(b, n)
    return rule
