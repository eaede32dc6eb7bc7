"""fxopt: a graph-rewriting model compiler over torch.fx for NVIDIA Jetson (Xavier first).

    compiled = fxopt.compile(model, target="xavier", example_inputs=(x,))
"""

from __future__ import annotations

__version__ = "0.1.0"

from fxopt.compiler import CompiledModel, compile, default_pipeline
from fxopt.costs.cost_model import CostSummary, NodeCost, estimate_costs
from fxopt.errors import (
    ExportError,
    FxoptError,
    FxoptWarning,
    InputError,
    PassError,
    PassOrderError,
    PassRegistryError,
    SafetyPolicyError,
    StateWriteError,
    TargetError,
    TensorRTCompatError,
    TraceError,
    VerificationError,
    WeightsChangedError,
)
from fxopt.frontend.stages import Stages
from fxopt.frontend.tracing import Leaf, leaves_of, trace
from fxopt.output.report import CompileReport
from fxopt.passinfra.pass_base import CompileContext, FxoptPass, PassResult, current_context
from fxopt.passinfra.pass_manager import PassManager, PassRecord
from fxopt.passinfra.registry import create_pass, pass_names, register_pass
from fxopt.targets import TargetProfile, get_target, register_target, target_names

__all__ = [
    "CompileContext", "CompileReport", "CompiledModel", "CostSummary", "ExportError", "FxoptError", "FxoptWarning",
    "FxoptPass", "InputError", "Leaf", "NodeCost", "PassError", "PassManager", "PassOrderError",
    "PassRecord", "PassRegistryError", "SafetyPolicyError", "PassResult", "Stages", "StateWriteError", "TargetError", "TargetProfile", "TensorRTCompatError", "TraceError", "WeightsChangedError",
    "VerificationError", "compile", "create_pass", "current_context", "default_pipeline",
    "estimate_costs", "get_target", "leaves_of", "pass_names", "register_pass", "register_target",
    "target_names", "trace", "__version__",
]

_SUBPACKAGES = frozenset({"backends", "distill", "models", "passes", "safety", "testing"})


def __getattr__(name: str) -> object:
    # `fxopt.models.create(...)` after a plain `import fxopt`, without importing them all up front
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"fxopt.{name}")
    if name == "pipeline":  # the DAG pipeline sits on top of the public API (fxopt.automation)
        import importlib

        return importlib.import_module("fxopt.automation")
    if name == "finetune":  # training needs no import at `import fxopt`
        from fxopt.distill import finetune

        return finetune
    raise AttributeError(f"module 'fxopt' has no attribute '{name}'")
