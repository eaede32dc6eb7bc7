"""The errors fxopt raises for anything a user can cause; each says what, where and what to do."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence


class FxoptError(Exception):
    """Base class of every error a user of fxopt can cause."""


class InputError(FxoptError):
    """Bad arguments: example inputs, options, file paths."""


class TraceError(FxoptError):
    """The model cannot be symbolically traced, even with automatic leaves."""

    def __init__(self, message: str, *, module_path: str = "", source_line: str = "") -> None:
        self.module_path = module_path
        self.source_line = source_line
        where = f" in module '{module_path or '<root>'}'" if module_path or source_line else ""
        line = f"\n  at: {source_line}" if source_line else ""
        super().__init__(f"cannot trace model{where}: {message}{line}")


class StateWriteError(TraceError):
    """The forward writes one of the model's own buffers or parameters and the written value reaches
    an output: a compiled graph keeps no state between calls, so it would bake in one value.

    ``names`` holds the qualified names of the written buffers and parameters.
    """

    def __init__(self, message: str, *, names: Sequence[str] = (), module_path: str = "", source_line: str = "") -> None:
        self.names = tuple(names)
        super().__init__(message, module_path=module_path, source_line=source_line)


class TargetError(FxoptError):
    """An unknown target, or a target that cannot run what was asked."""


class PassError(FxoptError):
    """A pass raised or broke its contract; carries the pass name and the passes before it."""

    def __init__(self, pass_name: str, message: str, *, ran_before: Sequence[str] = ()) -> None:
        self.pass_name = pass_name
        self.ran_before = tuple(ran_before)
        before = ", ".join(self.ran_before) or "none"
        super().__init__(f"pass '{pass_name}' failed: {message} (passes run before it: {before})")


class PassOrderError(FxoptError):
    """Pass ordering constraints cannot be met (a cycle, or an unknown pass name)."""


class PassRegistryError(FxoptError):
    """An unknown pass name, or a name registered twice."""


class ExportError(FxoptError):
    """Lowering to ONNX (or TensorRT) failed."""


class TensorRTCompatError(ExportError):
    """The exported ONNX file uses something the target's TensorRT cannot parse or run as written.

    ``findings`` holds the `fxopt.backends.tensorrt_compat.CompatFinding` of each incompatibility.
    """

    def __init__(self, message: str, *, findings: Sequence[object] = ()) -> None:
        self.findings = tuple(findings)
        super().__init__(message)


class WeightsChangedError(ExportError):
    """A large model's ONNX file reads its weights from the compiled graph's tensors (`fxopt.output.onnx_weights`),
    and one of them was written after the export: the file would no longer be the one verified."""


class VerificationError(FxoptError):
    """A lowered model does not reproduce the torch graph within tolerance."""


class SafetyPolicyError(FxoptError):
    """A compile under ``safety="strict"`` asked for, or produced, something the policy forbids."""


class FxoptWarning(UserWarning):
    """Something fxopt accepted but a user should look at (constant example inputs, a pass that changed nothing)."""


def warn(message: str) -> None:
    """Issue `message` as an `FxoptWarning` at the user's line: the first caller outside fxopt
    (however deep inside compile the problem was found), so a warning filter or a traceback of
    ``-W error`` points at their call, not at fxopt's internals.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("constant example input")
        >>> caught[0].category.__name__, str(caught[0].message)
        ('FxoptWarning', 'constant example input')
    """
    level, frame = 1, sys._getframe(1)
    while frame is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] == "fxopt":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, FxoptWarning, stacklevel=level + 1)
