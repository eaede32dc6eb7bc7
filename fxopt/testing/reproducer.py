"""Build a model from its spec by executing its generated source, and give that source back.

The source is registered with `linecache`, so tracebacks through a drawn model show its lines,
and the model's class pretty-prints as its source in hypothesis' falsifying examples.
"""

from __future__ import annotations

import hashlib
import linecache
from typing import Any

import torch
from torch import nn

from fxopt.errors import InputError
from fxopt.testing.codegen import render_source
from fxopt.testing.spec import ModelSpec

__all__ = ["build_model", "reproducer", "spec_of"]


def _pretty_source(self: nn.Module, printer: Any, cycle: bool) -> None:
    # IPython / hypothesis pretty-printer protocol: show the model as the code that builds it
    printer.text("<model; reproducer:>\n" + reproducer(self))


def _exec_source(source: str) -> dict[str, Any]:
    filename = f"<fxopt.testing model {hashlib.sha1(source.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"__name__": "fxopt_testing_model"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace


def build_model(spec: ModelSpec) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The module `spec` describes and its example inputs, built from the generated source.

    Args:
        spec: a drawn architecture.

    Returns:
        ``(model, example_inputs)``: the model in eval mode with seeded weights.

    Example:
        >>> from fxopt.testing.spec import BlockSpec, ModelSpec
        >>> spec = ModelSpec("mlp", 2, ((4,),), (BlockSpec.of("linear", f_in=4, f_out=3, bias=True,
        ...     bn=False, act="relu"),), BlockSpec.of("head", variant="features"))
        >>> model, (x,) = build_model(spec)
        >>> tuple(model(x).shape)
        (2, 3)
    """
    namespace = _exec_source(render_source(spec))
    cls = namespace["Model"]
    cls.fxopt_spec = spec
    cls._repr_pretty_ = _pretty_source
    model, inputs = namespace["make_model"]()
    return model, inputs


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The spec a model was drawn from, or None for a model fxopt.testing did not build."""
    spec = getattr(type(model), "fxopt_spec", None)
    return spec if isinstance(spec, ModelSpec) else None


def reproducer(spec_or_module: ModelSpec | nn.Module) -> str:
    """Python source that rebuilds a drawn model: ``Model`` and ``make_model()``.

    Paste it into a test; ``model, example_inputs = make_model()`` gives the same weights and
    inputs as the draw.

    Args:
        spec_or_module: a `ModelSpec`, or a module built by `build_model` / the strategies.

    Returns:
        The source code.

    Raises:
        InputError: the module was not built by fxopt.testing.

    Example:
        >>> from fxopt.testing.spec import BlockSpec, ModelSpec
        >>> spec = ModelSpec("mlp", 1, ((4,),), (BlockSpec.of("layernorm", d=4),), BlockSpec.of("head", variant="features"))
        >>> print(reproducer(spec).split("class Model")[1].split("def make_model")[0].strip())
        (nn.Module):
            def __init__(self):
                super().__init__()
                self.b0_norm = nn.LayerNorm(4)
        <BLANKLINE>
            def forward(self, x):
                x = self.b0_norm(x)
                return x
    """
    spec = spec_or_module if isinstance(spec_or_module, ModelSpec) else spec_of(spec_or_module)
    if spec is None:
        raise InputError(
            f"reproducer() needs a ModelSpec or a model drawn by fxopt.testing strategies, "
            f"got {type(spec_or_module).__name__}"
        )
    return render_source(spec)
