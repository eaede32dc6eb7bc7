"""Shape arithmetic: sizes read at run time (``c // groups``) as size expressions, and the
size constraints they put on the pruning."""

from __future__ import annotations

import math
import operator
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from fxopt.passes.dependency_groups.model import (
    SizeConstraint,
    SizeExpr,
    SpaceKey,
    _atoms,
    _Builder,
    _dims_arg,
    _norm_dim,
    _prunable,
    _shape,
)


def _couple_size_args(b: _Builder, node: Node) -> None:
    """Computed size arguments become size constraints (checked once the atoms are known)."""
    for j, spec in enumerate(_shape_spec(node) or ()):
        if not isinstance(spec, Node):
            continue
        target, expr = b.space(node, j), size_expr(spec)
        if target is None:
            continue
        factors = [key for t, d in expr.factors if (key := b.space(t, d)) is not None] if expr is not None else []
        if expr is None or len(factors) != len(expr.factors):
            b.freeze(target, "reshape size computed by arithmetic the analysis does not model")
            continue
        b.size_constraints.append(SizeConstraint(target, expr.coef, tuple(factors)))
        b.linked.add(target)


def _shape_spec(node: Node) -> list[Any] | None:
    """The target-shape arguments of view/reshape/expand (one entry per output dim)."""
    if node.target in ("view", "reshape", "expand") or node.target is torch.reshape:
        spec = _dims_arg(node, 1, "shape" if node.target is torch.reshape else "size")
        rank = len(_shape(node) or ())
        return spec if len(spec) == rank else None
    return None


def size_source(value: Any) -> tuple[Node, int] | None:
    """``(tensor node, dim)`` when `value` is exactly a size read ``t.shape[d]`` / ``t.size(d)``."""
    if not isinstance(value, Node):
        return None
    if value.op == "call_method" and value.target == "size" and len(value.args) == 2 and isinstance(value.args[1], int):
        t = value.args[0]
        return (t, _norm_dim(value.args[1], len(_shape(t) or ()))) if isinstance(t, Node) else None
    if value.op == "call_function" and value.target is operator.getitem and isinstance(value.args[1], int):
        shape = value.args[0]
        is_shape = isinstance(shape, Node) and (
            (shape.op == "call_function" and shape.target is getattr and shape.args[1] == "shape")
            or (shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1)
        )
        if is_shape:
            t = shape.args[0]
            return (t, _norm_dim(value.args[1], len(_shape(t) or ()))) if isinstance(t, Node) else None
    return None


# Integer arithmetic on sizes that stays a monomial: c * k, a * b, c // k (k a positive constant).
_SIZE_ARITHMETIC = (operator.mul, operator.floordiv)


def size_expr(value: Any) -> SizeExpr | None:
    """`value` as ``coef * product of size reads``, or None when it is not one.

    Example:
        >>> import torch, fxopt
        >>> class Shuffle(torch.nn.Module):
        ...     def forward(self, x):
        ...         b, c, h, w = x.shape
        ...         return x.view(b, 2, c // 2, h, w)
        >>> gm = fxopt.trace(Shuffle(), torch.randn(1, 4, 2, 2))
        >>> view = next(n for n in gm.graph.nodes if n.target == "view")
        >>> e = size_expr(view.args[3])
        >>> e.coef, [(t.name, d) for t, d in e.factors]
        (Fraction(1, 2), [('x', 1)])
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return SizeExpr(Fraction(value), ())
    source = size_source(value)
    if source is not None:
        return SizeExpr(Fraction(1), (source,))
    if not isinstance(value, Node) or value.op != "call_function" or value.target not in _SIZE_ARITHMETIC:
        return None
    if len(value.args) != 2 or value.kwargs:
        return None
    left, right = size_expr(value.args[0]), size_expr(value.args[1])
    if left is None or right is None:
        return None
    if value.target is operator.mul:  # c * k, a * b
        return SizeExpr(left.coef * right.coef, left.factors + right.factors)
    if not right.factors and right.coef > 0:  # c // k
        return SizeExpr(left.coef / right.coef, left.factors)
    return None


def _computed_factor(node: Node, out_dims: list[int]) -> int | None:
    """Position in `out_dims` of the one factor whose size is computed (``c // g``), the rest literal."""
    spec = _shape_spec(node)
    if spec is None:
        return None
    computed = [i for i, d in enumerate(out_dims) if isinstance(spec[d], Node)]
    literal = all(type(spec[d]) is int and spec[d] > 0 for i, d in enumerate(out_dims) if i not in computed)
    if len(computed) != 1 or not literal:
        return None
    expr = size_expr(spec[out_dims[computed[0]]])
    return computed[0] if expr is not None and expr.factors else None


def _is_clean_size_use(user: Node, value: Node) -> bool:
    spec = _shape_spec(user)
    return spec is not None and user.args[0] is not value and any(s is value for s in spec)


def _is_modelled_size_use(user: Node, value: Node) -> bool:
    """A size goes into reshape arguments, directly or through modelled arithmetic."""
    if _is_clean_size_use(user, value):
        return True
    return (user.op == "call_function" and user.target in _SIZE_ARITHMETIC and size_expr(user) is not None
            and all(_is_modelled_size_use(u, user) for u in user.users))


def _size_read_rule(b: _Builder, node: Node) -> None:
    """``t.shape`` / ``t.size()`` / ``t.size(d)``: sizes used other than in reshape sizes freeze."""
    t = node.args[0]
    if not isinstance(t, Node) or _shape(t) is None:
        return
    rank = len(_shape(t) or ())
    if node.target == "size" and len(node.args) == 2:
        dim = node.args[1]
        reads = [(node, _norm_dim(dim, rank))] if isinstance(dim, int) else []
    else:
        reads = []
        for user in node.users:
            if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
                reads.append((user, _norm_dim(user.args[1], rank)))
            else:
                for d in range(rank):
                    b.freeze(b.space(t, d), "whole shape read")
    for value, dim in reads:
        if not all(_is_modelled_size_use(u, value) for u in value.users):
            b.freeze(b.space(t, dim), f"size of dim {dim} used in arithmetic or control flow")


def _widths(b: _Builder, key: SpaceKey, atom_of: np.ndarray, n_atoms: int) -> np.ndarray:
    """Indices of `key` each atom holds."""
    offset, size = b.spaces[key]
    return np.bincount(atom_of[offset:offset + size], minlength=n_atoms)


def _constraint_holds(b: _Builder, c: SizeConstraint, atom_of: np.ndarray, prunable: np.ndarray) -> bool:
    if c.coef * math.prod(b.size(f) for f in c.factors) != b.size(c.target):
        return False  # not exact even before pruning (a floor division with a remainder)
    n = prunable.shape[0]
    live = [i for i, f in enumerate(c.factors) if prunable[_elements(b, f, atom_of)].any()]
    target = _widths(b, c.target, atom_of, n)[prunable]
    if not live:
        return not target.any()
    if len(live) > 1:
        return False  # a product of two pruned sizes is not linear in the atoms removed
    k = c.coef * math.prod(b.size(f) for i, f in enumerate(c.factors) if i != live[0])
    factor = _widths(b, c.factors[live[0]], atom_of, n)[prunable]
    return bool(np.array_equal(target * k.denominator, factor * k.numerator))


def _elements(b: _Builder, key: SpaceKey, atom_of: np.ndarray) -> np.ndarray:
    offset, size = b.spaces[key]
    return atom_of[offset:offset + size]


def _is_copy(b: _Builder, c: SizeConstraint) -> bool:
    return c.coef == 1 and len(c.factors) == 1 and b.size(c.factors[0]) == b.size(c.target)


def _resolve_size_constraints(b: _Builder) -> tuple[np.ndarray, np.ndarray]:
    """Atoms and prunable atoms once every size constraint holds.

    A copied size that the atoms do not keep equal (``reshape(b, n, d)`` with ``d`` read from
    another tensor) gets an index coupling, as a copy of the size would; whatever still breaks
    its constraint then is frozen (freezing only ever removes atoms from the check).
    """
    atom_of, prunable = _atoms(b)
    pending = [c for c in b.size_constraints if _is_copy(b, c)]
    while pending:
        broken = [c for c in pending if not _constraint_holds(b, c, atom_of, prunable)]
        if not broken:
            break
        for c in broken:
            b.couple(c.factors[0], c.target, kind="size")
        pending = [c for c in pending if c not in broken]
        atom_of, prunable = _atoms(b)
    remaining = list(b.size_constraints)
    while True:
        broken = [c for c in remaining if not _constraint_holds(b, c, atom_of, prunable)]
        if not broken:
            return atom_of, prunable
        for c in broken:  # frozen, its sizes keep their values: it holds from now on
            for key in (c.target, *c.factors):
                b.freeze(key, "size arithmetic the pruning cannot keep exact")
        remaining = [c for c in remaining if c not in broken]
        prunable = _prunable(b, atom_of)
