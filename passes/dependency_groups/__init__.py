"""Channel dependency analysis: which channels of an FX graph must be removed together."""

from fxopt.passes.dependency_groups.builder import *  # noqa: F403
from fxopt.passes.dependency_groups.builder import (  # noqa: F401
    ELEMENTWISE_MODULES,
    FUNCTION_RULES,
    IDENTITY_FUNCTION_NAMES,
    METHOD_RULES,
    MODULE_RULES,
    __all__,
    is_tuple_output,
    output_shapes,
    size_source,
)
