"""Errors of the automation pipeline (`fxopt.pipeline`): each says what was wrong and what to do."""

from __future__ import annotations

from fxopt.errors import FxoptError, InputError

__all__ = ["CorruptArtefactError", "PipelineConfigError", "PipelineError", "PipelineInterrupted"]


class PipelineError(FxoptError):
    """A pipeline run failed: a node raised, or the cache could not be repaired."""


class PipelineConfigError(PipelineError, InputError):
    """Bad pipeline configuration (a ratio out of range, an unknown precision, a missing file)."""


class CorruptArtefactError(PipelineError):
    """An artefact on disk does not match the digest its record carries.

    Attributes:
        node: the DAG node whose artefact is corrupt (the engine recomputes it).
    """

    def __init__(self, node: str, message: str) -> None:
        super().__init__(message)
        self.node = node


class PipelineInterrupted(PipelineError):
    """Ctrl-C inside a node, carried through the engine as an ordinary error (hamilton's cache
    adapter asserts on a `KeyboardInterrupt`); `fxopt.pipeline.run` raises `KeyboardInterrupt` again."""
