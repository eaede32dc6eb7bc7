"""Architecture specs: the plain data a random test model is drawn as (shrinks well, prints well).

A `ModelSpec` is a family, input shapes, a seed and a flat list of `BlockSpec`s; the model's
Python source is generated from it (`fxopt.testing.codegen`), so every drawn model has readable
code a pass author can paste into a test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BlockSpec", "ModelSpec", "FAMILIES"]

# conv: inputs (C, H, W); mlp: inputs (F,); attention: inputs (L, D) tokens.
FAMILIES = ("convnet", "mlp", "attention")


@dataclass(frozen=True)
class BlockSpec:
    """One block of a drawn model: its kind (a key of `codegen.RENDERERS`) and its arguments.

    Args:
        kind: the block kind, e.g. ``"conv"``, ``"residual"``, ``"split"``, ``"gate"``.
        args: ``(name, value)`` pairs of plain values (ints, floats, strings, bools).
    """

    kind: str
    args: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, kind: str, **args: Any) -> BlockSpec:
        """A block spec from keyword arguments (kept in the given order)."""
        return cls(kind, tuple(args.items()))

    @property
    def params(self) -> Mapping[str, Any]:
        """The arguments as a mapping."""
        return dict(self.args)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.args)
        return f"{self.kind}({inner})"


@dataclass(frozen=True)
class ModelSpec:
    """A whole drawn model.

    Args:
        family: one of `FAMILIES`.
        batch: the batch size of the example inputs.
        inputs: the shape (without batch) of each positional input; at most two (``x``, ``y``).
        blocks: the body, in forward order; the first block is the stem, reading ``x``.
        head: how the outputs are formed (a single tensor, a tuple or a dict).
        seed: seeds weights and example inputs, so the spec fixes the model exactly.
    """

    family: str
    batch: int
    inputs: tuple[tuple[int, ...], ...]
    blocks: tuple[BlockSpec, ...]
    head: BlockSpec
    seed: int = 0

    def kinds(self) -> set[str]:
        """Block kinds used, with variants as ``kind:variant`` (for coverage checks)."""
        found = set()
        for block in (*self.blocks, self.head):
            found.add(block.kind)
            variant = block.params.get("variant")
            if variant is not None:
                found.add(f"{block.kind}:{variant}")
        return found

    def __repr__(self) -> str:
        body = ", ".join(repr(b) for b in self.blocks)
        return (
            f"ModelSpec({self.family}, batch={self.batch}, inputs={list(self.inputs)}, "
            f"blocks=[{body}], head={self.head!r}, seed={self.seed})"
        )
