"""Channel importance for structured pruning: one score per prunable atom (channel or channel group).

Criteria (each aggregates over every weight coupled to the channel, see `dependency_groups`):
``l1`` / ``l2`` weight magnitude, ``bn_scale`` (|gamma| of the norms), ``taylor`` (first-order
Taylor expansion |w * dL/dw| on calibration data), or a user callable
``(group, graph_module) -> tensor of per-channel scores``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from fxopt.errors import InputError
from fxopt.passes.dependency_groups import DependencyAnalysis, ParamDim, PruneGroup

__all__ = ["CRITERIA", "Criterion", "atom_scores", "param_tensor"]

Criterion = Callable[[PruneGroup, GraphModule], torch.Tensor]
CRITERIA = ("l1", "l2", "bn_scale", "taylor")
_SCORED_KINDS = ("out", "in", "affine", "tensor")


def param_tensor(gm: GraphModule, pd: ParamDim) -> torch.Tensor:
    """The tensor a `ParamDim` slices (a module parameter/buffer, or a ``get_attr`` tensor)."""
    if pd.kind == "tensor":
        value: Any = gm
        for atom in pd.owner.split("."):
            value = getattr(value, atom)
        return value
    return getattr(gm.get_submodule(pd.owner), pd.name)


def _slice_norms(t: torch.Tensor, dim: int, p: int) -> np.ndarray:
    others = [d for d in range(t.dim()) if d != dim]
    t = t.detach().float()
    if not others:
        values = t.abs() if p == 1 else t.pow(2)
    else:
        values = torch.linalg.vector_norm(t, ord=p, dim=others)
        values = values if p == 1 else values.pow(2)
    return values.cpu().numpy().astype(np.float64)


def _accumulate(analysis: DependencyAnalysis, scores: np.ndarray, pd: ParamDim, per_index: np.ndarray) -> None:
    atoms = analysis.elements(pd.space)
    if per_index.shape[0] == atoms.shape[0]:
        np.add.at(scores, atoms, per_index)


def _magnitude(gm: GraphModule, analysis: DependencyAnalysis, p: int, kinds: Sequence[str] = _SCORED_KINDS) -> np.ndarray:
    scores = np.zeros(analysis.num_atoms)
    by_tensor: dict[tuple[str, str, bool], list[ParamDim]] = {}
    for pd in analysis.param_dims:
        if pd.kind in kinds:
            by_tensor.setdefault((pd.owner, pd.name, pd.kind == "tensor"), []).append(pd)
    for pds in by_tensor.values():
        t = param_tensor(gm, pds[0]).detach().float()
        powered = t.abs() if p == 1 else t * t  # once per tensor, summed along each coupled dim
        for pd in pds:
            others = [d for d in range(t.dim()) if d != pd.dim]
            values = powered.sum(dim=others) if others else powered
            _accumulate(analysis, scores, pd, values.cpu().numpy().astype(np.float64))
    return scores


def _bn_scale(gm: GraphModule, analysis: DependencyAnalysis) -> np.ndarray:
    scores = np.zeros(analysis.num_atoms)
    covered = np.zeros(analysis.num_atoms, dtype=bool)
    for pd in analysis.param_dims:
        if pd.kind == "affine" and pd.name == "weight":
            _accumulate(analysis, scores, pd, _slice_norms(param_tensor(gm, pd), pd.dim, 1))
            covered[analysis.elements(pd.space)] = True
    # groups without a norm layer fall back to weight magnitude (ranked within the group)
    uncovered = [list(g.atoms) for g in analysis.groups if not covered[list(g.atoms)].all()]
    if uncovered:
        fallback = _magnitude(gm, analysis, 2)
        for atoms in uncovered:
            scores[atoms] = fallback[atoms]
    return scores


def _taylor_loss(output: Any, label: Any) -> torch.Tensor:
    if label is not None:
        return F.cross_entropy(output, label)
    leaves = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().pow(2).mean() for t in leaves)  # the output-norm surrogate


def _taylor(gm: GraphModule, analysis: DependencyAnalysis, calib_data: Sequence[Any], labels: Sequence[Any] | None) -> np.ndarray:
    dims = [pd for pd in analysis.param_dims if pd.kind in _SCORED_KINDS]
    tensors = list({id(t): t for t in (param_tensor(gm, pd) for pd in dims)}.values())
    wanted = [t for t in tensors if t.is_floating_point()]
    totals = {id(t): torch.zeros_like(t) for t in wanted}
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in wanted]
        originals = _swap_tensors(gm, wanted, leaves)
        try:
            for i, batch in enumerate(calib_data):
                inputs = batch if isinstance(batch, tuple) else (batch,)
                loss = _taylor_loss(gm(*inputs), labels[i] if labels is not None else None)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for t, leaf, g in zip(wanted, leaves, grads):
                    if g is not None:
                        totals[id(t)] += (leaf.detach() * g).abs()
        finally:
            _swap_tensors(gm, leaves, originals)
    scores = np.zeros(analysis.num_atoms)
    for pd in dims:
        total = totals.get(id(param_tensor(gm, pd)))
        if total is not None:
            _accumulate(analysis, scores, pd, _slice_norms(total, pd.dim, 1))
    return scores


def _swap_tensors(gm: GraphModule, old: list[torch.Tensor], new: list[torch.Tensor]) -> list[torch.Tensor]:
    """Point every module attribute holding a tensor of `old` to the matching `new` one."""
    by_id = {id(o): n for o, n in zip(old, new)}
    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for name, value in list(store.items()):
                if value is not None and id(value) in by_id:
                    store[name] = by_id[id(value)]
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and id(value) in by_id:
                setattr(module, name, by_id[id(value)])
    return old


def _user_scores(gm: GraphModule, analysis: DependencyAnalysis, criterion: Criterion) -> np.ndarray:
    scores = np.zeros(analysis.num_atoms)
    for g in analysis.groups:
        value = criterion(g, gm)
        values = np.asarray(torch.as_tensor(value).detach().cpu().double().reshape(-1))
        if values.shape[0] != len(g.atoms):
            raise InputError(
                f"importance callable returned {values.shape[0]} scores for prune group {g.index} "
                f"(roots {', '.join(g.root_modules)}), which has {len(g.atoms)} channels"
            )
        scores[list(g.atoms)] = values
    return scores


def atom_scores(
    gm: GraphModule,
    analysis: DependencyAnalysis,
    criterion: str | Criterion = "l1",
    *,
    calib_data: Sequence[Any] | None = None,
    labels: Sequence[Any] | None = None,
) -> np.ndarray:
    """Importance of every atom (higher = keep); only prunable atoms' scores are meaningful.

    Args:
        gm: the graph module the analysis was made on.
        analysis: its `DependencyAnalysis`.
        criterion: ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"taylor"`` or a callable
            ``(group, graph_module) -> tensor`` with one score per atom of the group.
        calib_data: input tuples for ``taylor``.
        labels: optional class labels per calibration batch (cross-entropy instead of the
            output-norm surrogate).

    Returns:
        A float64 array with one score per atom.

    Example:
        >>> import torch, fxopt
        >>> from fxopt.passes.dependency_groups import analyze_dependencies
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        >>> gm = fxopt.trace(m, torch.randn(1, 4))
        >>> a = analyze_dependencies(gm)
        >>> atom_scores(gm, a, "l1")[list(a.groups[0].atoms)].shape
        (3,)
    """
    if callable(criterion):
        return _user_scores(gm, analysis, criterion)
    if criterion in ("l1", "l2"):
        return _magnitude(gm, analysis, 1 if criterion == "l1" else 2)
    if criterion == "bn_scale":
        return _bn_scale(gm, analysis)
    if criterion == "taylor":
        if not calib_data:
            raise InputError(
                "importance='taylor' needs calibration data: pass calib_data=[(x,), ...] to "
                "fxopt.compile (a list of input tuples)"
            )
        return _taylor(gm, analysis, list(calib_data), labels)
    raise InputError(f"importance must be one of {CRITERIA} or a callable, got {criterion!r}")
