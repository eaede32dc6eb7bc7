"""Index maps the rules share: elementwise broadcasting, and reshapes that keep, split or
merge a channel dimension."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import networkx as nx
from torch.fx import Node

from fxopt.passes.dependency_groups.model import SpaceKey, _Builder, _shape, output_shapes
from fxopt.passes.dependency_groups.shape_arithmetic import _computed_factor


def _broadcast(b: _Builder, node: Node, inputs: Sequence[Any] | None = None) -> None:
    """Elementwise op: output dims couple with same-size input dims, aligned from the right."""
    out = _shape(node)
    if out is None:
        b.freeze_all(node, "elementwise op without a single tensor output")
        return
    args = [a for a in (inputs if inputs is not None else node.all_input_nodes) if isinstance(a, Node)]
    for arg in args:
        shape = _shape(arg)
        if shape is None:
            if output_shapes(arg) is not None:
                b.freeze_all(node, "elementwise op on a tuple")
            continue
        if len(shape) > len(out):
            b.freeze_all(node, "input of higher rank than the output")
            return
        lead = len(out) - len(shape)
        for d, size in enumerate(shape):
            if size == out[lead + d]:
                b.couple(b.space(arg, d), b.space(node, lead + d))
            elif size != 1:
                b.freeze_all(node, "unexpected broadcast")
                return


def _reshape(b: _Builder, src: Node, node: Node) -> None:
    """Same memory order, new shape: couple runs of dims with equal products.

    A run that keeps one dim is an identity; a merge or a split couples the outermost
    non-trivial dim by blocks and freezes the others (a strided slice would be needed).
    """
    ins, outs = _shape(src), _shape(node)
    if ins is None or outs is None:
        b.freeze_all(node, "reshape without shapes")
        return
    i = j = 0
    while i < len(ins) or j < len(outs):
        i0, j0 = i, j
        pi = ins[i] if i < len(ins) else 1
        pj = outs[j] if j < len(outs) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(ins):
                pi *= ins[i]
                i += 1
            elif pj < pi and j < len(outs):
                pj *= outs[j]
                j += 1
            else:
                b.freeze_all(node, "reshape with incompatible shapes")
                return
        _reshape_run(b, src, node, list(range(i0, min(i, len(ins)))), list(range(j0, min(j, len(outs)))))


# A split into (q/k/v, heads, head_dim) keeps the small stacking factor whole and prunes heads.
_STACKING_FACTOR = 4


def _split_run(b: _Builder, src: Node, node: Node, in_dim: int, out_dims: list[int]) -> None:
    """Couple one output factor of a split with strided blocks of the input; freeze the rest.

    The factor whose size argument is computed from a size read (``c // groups`` in a channel
    shuffle, ``d // heads`` in attention) is the unit and the literal factors stay whole.
    Otherwise the outermost factor is the unit (``C -> (C, H, W)`` keeps channels), unless it
    is a small stacking factor in front of two more (``3C -> (3, heads, head_dim)``): then each
    head owns one block of head_dim in every stacked part.
    """
    outs = _shape(node)
    assert outs is not None
    m = _computed_factor(node, out_dims)
    if m is None:
        m = 1 if len(out_dims) >= 3 and outs[out_dims[0]] <= _STACKING_FACTOR else 0
    else:
        b.fixed_factors.update(k for d in out_dims if d != out_dims[m] and (k := b.space(node, d)) is not None)
    unit = out_dims[m]
    inner = math.prod(outs[d] for d in out_dims[m + 1:])
    prefix = math.prod(outs[d] for d in out_dims[:m])
    for p in range(prefix):
        b.couple(b.space(node, unit), b.space(src, in_dim), b_offset=p * outs[unit] * inner,
                 b_block=inner, count=outs[unit], kind="block")
    for d in out_dims[m + 1:]:
        b.freeze(b.space(node, d), "inner factor of a split dimension")


def _merge_run(b: _Builder, src: Node, node: Node, in_dims: list[int], out_dim: int) -> None:
    """Couple one input factor of a merge with strided blocks of the output; freeze the rest.

    The outermost factor owns blocks of the output (flatten -> linear), unless it is a factor
    a split kept whole (heads, shuffle groups): then the one factor that is not is the unit.
    """
    ins = _shape(src)
    assert ins is not None
    m = 0
    if b.fixed_factors:
        free = [i for i, d in enumerate(in_dims) if not _reaches_fixed_factor(b, b.space(src, d))]
        m = free[0] if len(free) == 1 else 0
    unit = in_dims[m]
    inner = math.prod(ins[d] for d in in_dims[m + 1:])
    prefix = math.prod(ins[d] for d in in_dims[:m])
    for p in range(prefix):
        b.couple(b.space(src, unit), b.space(node, out_dim), b_offset=p * ins[unit] * inner,
                 b_block=inner, count=ins[unit], kind="block")
    for d in in_dims:
        if d != unit:
            b.freeze(b.space(src, d), "inner factor of a merged dimension")


def _reaches_fixed_factor(b: _Builder, key: SpaceKey | None) -> bool:
    return key is not None and not b.fixed_factors.isdisjoint(nx.node_connected_component(b.graph, key))


def _reshape_run(b: _Builder, src: Node, node: Node, in_dims: list[int], out_dims: list[int]) -> None:
    ins, outs = _shape(src), _shape(node)
    assert ins is not None and outs is not None
    big_in = [d for d in in_dims if ins[d] > 1]
    big_out = [d for d in out_dims if outs[d] > 1]
    if not big_in or not big_out:
        return
    if len(big_in) == 1 and len(big_out) == 1:
        b.couple(b.space(src, big_in[0]), b.space(node, big_out[0]))
        return
    if len(big_in) == 1:  # a split: one output factor takes whole blocks of the input
        _split_run(b, src, node, big_in[0], big_out)
        return
    if len(big_out) == 1:  # a merge (flatten): one input factor owns blocks of the output
        _merge_run(b, src, node, big_in, big_out[0])
        return
    for d in big_in:
        b.freeze(b.space(src, d), "reshape regroups several dimensions")
    for d in big_out:
        b.freeze(b.space(node, d), "reshape regroups several dimensions")
