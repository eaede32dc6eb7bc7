"""Channel dependency analysis: which channels of an FX graph must be removed together.

Every dimension of every tensor a node produces is a *channel space* ``(node, item, dim)``.
Per-op rules (explicit registries keyed by module type, function or method name) couple
spaces with index maps: identity (elementwise ops, norms, tied modules), offsets (concat,
split/chunk), blocks (flatten -> linear, grouped/depthwise conv, GroupNorm groups, reshapes
that split or merge a channel dimension). The spaces and their couplings form a networkx graph;
at channel level a union-find over the index maps yields *atoms* (sets of channel indices that
live or die together). An atom is prunable when it holds an output channel of a conv/linear and
no index that is frozen (graph inputs/outputs, unknown ops, leaf modules, shared parameters,
sizes read into arithmetic the analysis does not model). Prunable atoms living in the same producers and the same spaces
form a `PruneGroup` (so the pieces of a split are separate groups, and none is ever emptied).

Sizes read at run time (``b, c, h, w = x.shape``) and recomputed into view/reshape/expand
arguments by products and floor division by constants (``c // groups``, ``d // heads``) are
*size constraints*: the pruning must keep the arithmetic exact, i.e. every prunable atom must
take ``coef`` times as many indices from the reshaped dim as from the size it reads (equal
counts per channel-shuffle group, equal head dims in every head). A constraint that an index
coupling can satisfy (a size copied as is) gets one; one that nothing satisfies freezes.

The analysis writes a frozen `NodeChannels` under ``node.meta["fxopt"]["prune_group"]``; the
pruning transform (`fxopt.passes.prune`) reads it.

The package reads as its parts: `model` (channel spaces, frozen results, the builder's
state, atoms), `couplings` (broadcast and reshape index maps), `module_rules`,
`function_rules` (function and method tables), `shape_arithmetic` (size expressions and
size constraints) and `builder` (the driver, `analyze_dependencies`).
"""

from __future__ import annotations

# `X as X`: a public name outside __all__, re-exported as the single module had it.
from fxopt.passes.dependency_groups.builder import analyze_dependencies
from fxopt.passes.dependency_groups.function_rules import FUNCTION_RULES as FUNCTION_RULES
from fxopt.passes.dependency_groups.function_rules import (
    IDENTITY_FUNCTION_NAMES as IDENTITY_FUNCTION_NAMES,
)
from fxopt.passes.dependency_groups.function_rules import METHOD_RULES as METHOD_RULES
from fxopt.passes.dependency_groups.model import (
    META_KEY,
    ChannelDim,
    DependencyAnalysis,
    NodeChannels,
    ParamDim,
    PruneGroup,
    SizeConstraint,
    SizeExpr,
    SpaceKey,
)
from fxopt.passes.dependency_groups.model import is_tuple_output as is_tuple_output
from fxopt.passes.dependency_groups.model import output_shapes as output_shapes
from fxopt.passes.dependency_groups.module_rules import ELEMENTWISE_MODULES as ELEMENTWISE_MODULES
from fxopt.passes.dependency_groups.module_rules import MODULE_RULES as MODULE_RULES
from fxopt.passes.dependency_groups.shape_arithmetic import size_expr
from fxopt.passes.dependency_groups.shape_arithmetic import size_source as size_source

__all__ = [
    "ChannelDim",
    "DependencyAnalysis",
    "NodeChannels",
    "ParamDim",
    "PruneGroup",
    "SizeConstraint",
    "SizeExpr",
    "SpaceKey",
    "analyze_dependencies",
    "size_expr",
    "META_KEY",
]
