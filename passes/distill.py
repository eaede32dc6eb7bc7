"""Distillation hooks: expose named intermediate features as extra graph outputs, and strip them.

Fine-tuning (`fxopt.distill.finetune`) adds the hooks to a training copy of the student and the
teacher graphs, matches their features (by node name, explicit pairs or stage) and strips the
hooks again, so the deploy graph never carries them. A pruned student keeps its teacher's node
names, and `kept_channels` reads which teacher channels each pruned node kept.

The hooked graph returns ``(original_output, {feature name: tensor})``. The pass is registered as
``distill`` and is not lossy (``output[0]`` is the original output), but it changes the output
structure, so it belongs in a training copy, not in a compile pipeline, whose numerics check
compares whole outputs.
"""

from __future__ import annotations

import copy as copy_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.fx import GraphModule, Node

from fxopt.errors import InputError
from fxopt.passinfra.pass_base import FxoptPass, PassResult
from fxopt.passinfra.registry import register_pass

__all__ = [
    "DistillHooks",
    "DistillRecord",
    "FeaturePair",
    "StripDistillHooks",
    "hooked_copy",
    "kept_channels",
    "match_features",
    "stage_features",
]

META_KEY = "distill"  # under output_node.meta["fxopt"]


@dataclass(frozen=True)
class DistillRecord:
    """What `DistillHooks` added: the exposed node names, in output order."""

    features: tuple[str, ...]


@dataclass(frozen=True)
class FeaturePair:
    """A student feature matched to a teacher feature.

    Attributes:
        student: node name in the student graph.
        teacher: node name in the teacher graph.
        student_channels: channels (dim 1) of the student feature, None when unknown.
        teacher_channels: channels of the teacher feature.
        kept: teacher channel indices the student kept (pruning), or None: then a channel count
            mismatch is bridged by a learned 1x1 adapter (training only).
    """

    student: str
    teacher: str
    student_channels: int | None
    teacher_channels: int | None
    kept: tuple[int, ...] | None = None


def _output_node(gm: GraphModule) -> Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def _record(gm: GraphModule) -> DistillRecord | None:
    return _output_node(gm).meta.get("fxopt", {}).get(META_KEY)


def _shape(node: Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _channels(node: Node) -> int | None:
    shape = _shape(node)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def _shared_nodes(gm: GraphModule) -> set[Node]:
    """The nodes every leaf of the graph's output depends on (all of them for a single output)."""
    out = _output_node(gm)
    leaves = [n for n in out.all_input_nodes]
    shared: set[Node] | None = None
    for leaf in leaves:
        seen, stack = set(), [leaf]
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(node.all_input_nodes)
        shared = seen if shared is None else shared & seen
    return shared or set()


def stage_features(gm: GraphModule) -> list[str]:
    """The last node at each spatial resolution of a traced graph's trunk, in graph order.

    Only nodes with a 4-D (N, C, H, W) ``tensor_meta`` count, and only nodes that every output
    depends on: in a multi-head model (detection and segmentation heads on an FPN) the stages are
    the shared backbone and neck, not one head's layers or its logits. The graph needs shapes
    (`fxopt.trace` or `fxopt.compile` gives them).

    Example:
        >>> import torch, fxopt
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        ...                         torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 4, 1))
        >>> stage_features(fxopt.trace(m, torch.randn(1, 1, 8, 8)))
        ['_1', '_3']
    """
    shared = _shared_nodes(gm)
    last: dict[tuple[int, int], str] = {}
    for node in gm.graph.nodes:
        if node not in shared or node.op not in ("call_module", "call_function", "call_method"):
            continue
        shape = _shape(node)
        if shape is not None and len(shape) == 4:
            last.pop((shape[2], shape[3]), None)  # re-insert: order follows the last node
            last[(shape[2], shape[3])] = node.name
    return list(last.values())


def kept_channels(prune_pass: Any) -> dict[str, tuple[int, ...]]:
    """Per node name, the channel (dim 1) indices a `PruneChannels` run kept.

    Read from the pass instance after it ran (its plan and dependency analysis); nodes whose
    channels were not pruned are left out.

    Args:
        prune_pass: a `fxopt.passes.PruneChannels` instance that has run.

    Returns:
        ``{node name: kept teacher channel indices}``.
    """
    plan, analysis = getattr(prune_pass, "plan", None), getattr(prune_pass, "analysis", None)
    if plan is None or analysis is None:
        raise InputError("kept_channels needs a PruneChannels instance that has run (pass it in compile(passes=[...]))")
    kept: dict[str, tuple[int, ...]] = {}
    for name, item, dim in analysis.spaces:
        if item != 0 or dim != 1:
            continue
        idx = analysis.kept_indices((name, item, dim), plan.removed)
        if len(idx) < analysis.spaces[(name, item, dim)][1]:
            kept[name] = tuple(int(i) for i in idx)
    return kept


def match_features(
    student: GraphModule,
    teacher: GraphModule,
    features: Sequence[str] | Mapping[str, str] | str,
    kept: Mapping[str, Sequence[int]] | None = None,
) -> list[FeaturePair]:
    """Pair student and teacher features.

    Args:
        student: the student graph (with shapes).
        teacher: the teacher graph (with shapes).
        features: node names present in both graphs (a pruned student keeps its teacher's
            names); ``{student name: teacher name}`` pairs; or ``"stages"``: the last node at
            each spatial resolution of each graph's trunk, paired in order. Where the student's
            BatchNorm was folded into a conv and the teacher's was not, the student conv is
            paired with the teacher's BatchNorm output (what the folded conv computes).
        kept: ``{student node name: kept teacher channel indices}`` (`kept_channels`); where
            given, the teacher feature is sliced to those channels instead of using an adapter.

    Returns:
        One `FeaturePair` per match.
    """
    if isinstance(features, str):
        if features != "stages":
            raise InputError(f"features must be node names, {{student: teacher}} pairs or 'stages', got {features!r}")
        s_stages, t_stages = stage_features(student), stage_features(teacher)
        if len(s_stages) != len(t_stages) or not s_stages:
            raise InputError(f"stage matching needs the same number of spatial stages: student {s_stages}, teacher {t_stages}")
        pairs = dict(zip(s_stages, t_stages))
    elif isinstance(features, Mapping):
        pairs = dict(features)
    else:
        pairs = {name: name for name in features}
    s_nodes = {n.name: n for n in student.graph.nodes}
    t_nodes = {n.name: n for n in teacher.graph.nodes}
    out = []
    for s_name, t_name in pairs.items():
        if s_name not in s_nodes or t_name not in t_nodes:
            missing = s_name if s_name not in s_nodes else t_name
            raise InputError(f"feature node '{missing}' is not in the {'student' if s_name == missing else 'teacher'} graph")
        idx = tuple(int(i) for i in kept[s_name]) if kept and s_name in kept else None
        t_node = _past_folded_batchnorm(student, s_nodes[s_name], teacher, t_nodes[t_name])
        out.append(FeaturePair(s_name, t_node.name, _channels(s_nodes[s_name]), _channels(t_node), idx))
    return out


def _batchnorm_user(gm: GraphModule, node: Node) -> Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        if isinstance(gm.get_submodule(str(users[0].target)), nn.modules.batchnorm._BatchNorm):
            return users[0]
    return None


def _past_folded_batchnorm(student: GraphModule, s_node: Node, teacher: GraphModule, t_node: Node) -> Node:
    """The teacher node that computes what `s_node` computes: a student conv with its BatchNorm
    folded in (fold_batchnorm) gives the teacher's BatchNorm output, not its conv output."""
    bn = _batchnorm_user(teacher, t_node)
    return bn if bn is not None and _batchnorm_user(student, s_node) is None else t_node


@register_pass
class DistillHooks(FxoptPass):
    """Expose named nodes as extra outputs: the graph returns ``(output, {name: tensor})``.

    Args:
        features: node names to expose (in this order).

    Example:
        >>> import torch, fxopt
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> gm = fxopt.trace(m, torch.randn(3, 4))
        >>> gm = DistillHooks(["_1"])(gm).graph_module
        >>> out, feats = gm(torch.randn(3, 4))
        >>> tuple(out.shape), tuple(feats["_1"].shape)
        ((3, 2), (3, 8))
    """

    name = "distill"
    lossy = False  # output[0] is the original output
    shares_weights = True  # replaces what it changes, never writes into a weight

    def __init__(self, features: Sequence[str] = ()) -> None:
        super().__init__()
        if isinstance(features, str):
            features = (features,)
        self.features = tuple(features)

    def options(self) -> dict[str, Any]:
        return {"features": list(self.features)}

    def call(self, graph_module: GraphModule) -> PassResult:
        if not self.features:
            self.unchanged_reason = "no features named"
            return PassResult(graph_module, False)
        if _record(graph_module) is not None:
            raise InputError("the graph already has distillation hooks; strip them first (StripDistillHooks)")
        nodes = {n.name: n for n in graph_module.graph.nodes}
        missing = [f for f in self.features if f not in nodes or nodes[f].op == "output"]
        if missing:
            raise InputError(f"DistillHooks: no node named {', '.join(missing)} in the graph")
        out = _output_node(graph_module)
        (original,) = out.args
        out.args = ((original, {f: nodes[f] for f in self.features}),)
        out.meta["fxopt"] = {**out.meta.get("fxopt", {}), META_KEY: DistillRecord(self.features)}  # meta may be shared with a copy
        graph_module.recompile()
        return PassResult(graph_module, True)


@register_pass
class StripDistillHooks(FxoptPass):
    """Undo `DistillHooks`: the graph returns its original output again, with the same nodes.

    Example:
        >>> import torch, fxopt
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> gm = DistillHooks(["_0"])(fxopt.trace(m, torch.randn(3, 4))).graph_module
        >>> StripDistillHooks()(gm).graph_module(torch.randn(3, 4)).shape
        torch.Size([3, 8])
    """

    name = "strip_distill"
    lossy = False
    shares_weights = True  # replaces what it changes, never writes into a weight

    def call(self, graph_module: GraphModule) -> PassResult:
        if _record(graph_module) is None:
            self.unchanged_reason = "the graph has no distillation hooks"
            return PassResult(graph_module, False)
        out = _output_node(graph_module)
        out.args = (out.args[0][0],)
        rest = {k: v for k, v in out.meta["fxopt"].items() if k != META_KEY}
        if rest:
            out.meta["fxopt"] = rest
        else:
            del out.meta["fxopt"]
        graph_module.recompile()
        return PassResult(graph_module, True)


def hooked_copy(gm: GraphModule, features: Sequence[str]) -> GraphModule:
    """A GraphModule sharing `gm`'s submodules and parameters whose graph also returns `features`.

    Training it trains `gm`; `gm`'s own graph is untouched.
    """
    copy = GraphModule(gm, copy_module.deepcopy(gm.graph), type(gm).__name__)  # names and meta kept
    return DistillHooks(features)(copy).graph_module
