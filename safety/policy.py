"""The strict compile policy for safety models: what it refuses, and the evidence it records.

``fxopt.compile(model, target, safety="strict")`` (the default for a model whose `ModelSpec`
says ``safety="strict"``, like ``safety_supervisor``) calls, in order:

1. `check_strict_request` before any pass runs: no lossy pass, the model's required precision;
2. after lowering, `strict_checks`, which runs
   - `check_ops`: every ONNX node's op type is on the target's audited list (`allowed_ops`);
   - `check_determinism`: the same input gives bit-identical outputs over repeated ONNX
     Runtime runs and thread counts;
   - `run_property_suite`: the model's own properties on the compiled graph and the ONNX file;
   - the spec's ``equivalence`` (for the supervisor, `equivalence_evidence`): the ONNX file
     against the eager model over a sampled input box;

and returns the manifest's ``safety`` section, so a reviewer can trace the deployed file to its
checks. Every refusal is a `fxopt.SafetyPolicyError` that names what was refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fxopt.errors import InputError, SafetyPolicyError
from fxopt.output.onnx_weights import serialize
from fxopt.targets import TargetProfile, get_target

__all__ = [
    "StrictPolicy",
    "ALLOWED_OPS", "STRICT", "allowed_ops", "check_determinism", "check_ops", "check_strict_request",
    "equivalence_evidence", "run_property_suite", "strict_checks",
]

STRICT = "strict"
# precisions that change the function whatever the model: int8 needs the lossy quantize pass
_LOSSY_PRECISIONS = ("int8",)

# ONNX op types (default domain) whose kernels give the same bits on every run of one engine and
# compute the op itself, not an approximation of a different function. A closed list: anything
# else is refused until someone audits it and adds it here with the reason.
_DATA_MOVEMENT = frozenset({
    "Cast", "Concat", "Constant", "ConstantOfShape", "Expand", "Flatten", "Gather", "Identity", "Pad",
    "Reshape", "Shape", "Slice", "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze",
})
# IEEE-exact (correctly rounded or exact) elementwise arithmetic, comparisons and selection
_EXACT_ELEMENTWISE = frozenset({
    "Abs", "Add", "And", "Ceil", "Clip", "Div", "Equal", "Floor", "Greater", "GreaterOrEqual", "Less",
    "LessOrEqual", "Max", "Min", "Mul", "Neg", "Not", "Or", "Reciprocal", "Relu", "Sign", "Sqrt", "Sub",
    "Where", "Xor",
})
# transcendental functions: a few ulp from the true value (CUDA's libm accuracy), but the same
# kernel on every run; the equivalence check bounds their effect on the rules
_TRANSCENDENTAL = frozenset({"Acos", "Asin", "Atan", "Cos", "Exp", "Log", "Sigmoid", "Sin", "Tan", "Tanh"})
# min / max reductions are order-independent, hence exact whatever the kernel's split
_ORDER_FREE_REDUCTIONS = frozenset({"ReduceMax", "ReduceMin"})
# accumulation order is fixed by the tactic chosen when the engine is built, so one engine is
# bit-reproducible; a rebuilt engine may differ in the last bits (TensorRT builds are not
# deterministic across builds, NVIDIA/TensorRT#3316), which is why the manifest pins the file
_LINEAR = frozenset({"Conv", "Gemm", "MatMul"})
# Left off on purpose (refused until audited), with the reason:
# - ScatterND / ScatterElements: reductions by atomics, order-dependent (torch refuses scatter
#   with reduce under deterministic mode on CUDA: pytorch/pytorch#88244);
# - RandomNormal(Like) / RandomUniform(Like) / Bernoulli / Multinomial / Dropout: random;
# - Erf / Gelu: TensorRT-side GELU is often the tanh approximation (pytorch/TensorRT#721);
# - Softmax / LogSoftmax / LayerNormalization / ReduceSum / ReduceMean / Einsum: sum reductions
#   whose kernels may split across thread blocks; not audited;
# - Resize / GridSample: interpolation conventions differ between TensorRT 8.5 and ONNX;
# - TopK / ArgMax / ArgMin / NonZero / NonMaxSuppression / Unique: tie order or data-dependent shapes;
# - QuantizeLinear / DequantizeLinear: int8, lossy;
# - If / Loop / Scan and any custom-domain op (a TensorRT plugin): their bodies are not checked here.
_TENSORRT_8_5 = _DATA_MOVEMENT | _EXACT_ELEMENTWISE | _TRANSCENDENTAL | _ORDER_FREE_REDUCTIONS | _LINEAR

ALLOWED_OPS: dict[str, frozenset[str]] = {
    "tensorrt-8.5": _TENSORRT_8_5,
    # ONNX Runtime's CPU kernels of the same ops are deterministic too; one list keeps a file
    # verified on the cpu target deployable on a Jetson
    "onnxruntime": _TENSORRT_8_5,
}


def check_strict_request(
    pass_names_and_lossy: list[tuple[str, bool]], precision: str, required_precision: str | None, model_name: str
) -> None:
    """Refuse, before anything runs, a strict compile that asks for a lossy pass or the wrong precision.

    Args:
        pass_names_and_lossy: the pipeline, as ``(pass name, pass.lossy)``.
        precision: the precision the compile would deploy at.
        required_precision: the model's ``ModelSpec.precision`` (``None``: any non-lossy one).
        model_name: for the message.

    Raises:
        SafetyPolicyError: naming every lossy pass, or the precision asked and the one required.

    Example:
        >>> check_strict_request([("canonicalize", False)], "fp32", "fp32", "safety_supervisor")
        >>> check_strict_request([("canonicalize", False), ("prune", True)], "fp32", "fp32", "safety_supervisor")
        Traceback (most recent call last):
        ...
        fxopt.errors.SafetyPolicyError: safety='strict' refuses lossy pass 'prune' for safety_supervisor: ...
    """
    lossy = [name for name, is_lossy in pass_names_and_lossy if is_lossy]
    if lossy:
        names = ", ".join(f"'{name}'" for name in lossy)
        raise SafetyPolicyError(
            f"safety='{STRICT}' refuses lossy pass{'es' if len(lossy) > 1 else ''} {names} for {model_name}: "
            "a lossy pass changes the function the safety checks verified; remove it from passes="
        )
    if required_precision is not None and precision != required_precision:
        raise SafetyPolicyError(
            f"{model_name} must be deployed at {required_precision}; {precision} was requested "
            f"(safety='{STRICT}' enforces the model's required precision; pass precision='{required_precision}')"
        )
    if precision in _LOSSY_PRECISIONS:
        raise SafetyPolicyError(f"safety='{STRICT}' refuses precision {precision} for {model_name}: it is lossy")


def allowed_ops(profile: str | TargetProfile) -> frozenset[str]:
    """The ONNX op types a strict compile may deploy on `profile` (see `ALLOWED_OPS`).

    Example:
        >>> "Where" in allowed_ops("xavier"), "ScatterND" in allowed_ops("xavier")
        (True, False)
    """
    target = get_target(profile)
    key = f"tensorrt-{target.tensorrt_version}" if target.backend == "tensorrt" else target.backend
    if key not in ALLOWED_OPS:
        raise SafetyPolicyError(
            f"no audited op list for target '{target.name}' ({key}); safety='{STRICT}' needs one in "
            f"fxopt.safety.policy.ALLOWED_OPS (audited: {sorted(ALLOWED_OPS)})"
        )
    return ALLOWED_OPS[key]


def check_ops(onnx_model: Any, profile: str | TargetProfile) -> dict[str, Any]:
    """Refuse an ONNX model with any node outside `allowed_ops(profile)`.

    Returns:
        ``{"ops_checked": nodes, "op_types": sorted op types, "allow_list": its key}``.

    Raises:
        SafetyPolicyError: naming every forbidden node as ``name (OpType)``.
    """
    allowed = allowed_ops(profile)
    nodes = list(onnx_model.graph.node)
    forbidden = [n for n in nodes if n.domain not in ("", "ai.onnx") or n.op_type not in allowed]
    if forbidden:
        listed = ", ".join(f"{n.name or '<unnamed>'} ({n.domain + '.' if n.domain else ''}{n.op_type})" for n in forbidden[:20])
        more = f" and {len(forbidden) - 20} more" if len(forbidden) > 20 else ""
        raise SafetyPolicyError(
            f"safety='{STRICT}' refuses {len(forbidden)} node(s) whose op is not on the audited list for "
            f"'{get_target(profile).name}' (non-deterministic or approximated kernels, or not audited): {listed}{more}"
        )
    target = get_target(profile)
    return {
        "ops_checked": len(nodes),
        "op_types": sorted({n.op_type for n in nodes}),
        "allow_list": f"tensorrt-{target.tensorrt_version}" if target.backend == "tensorrt" else target.backend,
    }


def _as_array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def check_determinism(
    onnx_model: Any, inputs: tuple[Any, ...], *, repeats: int = 3, threads: tuple[int, ...] = (1, 2)
) -> dict[str, Any]:
    """Require bit-identical outputs over repeated ONNX Runtime (CPU) runs and thread counts.

    One session per entry of `threads` (``intra_op_num_threads``), each run `repeats` times on
    `inputs`; every output of every run must equal the first run's byte for byte (NaN payloads
    and signed zeros included).

    Args:
        onnx_model: the lowered model.
        inputs: its positional inputs (tensors or arrays of the exported shapes).
        repeats: runs per session.
        threads: the thread counts to try.

    Returns:
        ``{"runs": total runs, "threads": [...], "repeats": repeats, "outputs": [names], "bit_identical": True}``.

    Raises:
        SafetyPolicyError: naming the output that differed, the thread count and the run.
    """
    import onnxruntime as ort

    if repeats < 1 or not threads:
        raise InputError(f"check_determinism needs repeats >= 1 and at least one thread count, got {repeats}, {threads}")
    data = serialize(onnx_model)
    reference: list[np.ndarray] | None = None
    names: list[str] = []
    for count in threads:
        options = ort.SessionOptions()
        options.intra_op_num_threads = count
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        feed = {i.name: _as_array(x) for i, x in zip(session.get_inputs(), inputs)}
        names = [o.name for o in session.get_outputs()]
        for run in range(repeats):
            outputs = [np.asarray(o) for o in session.run(None, feed)]
            if reference is None:
                reference = outputs
                continue
            for name, first, now in zip(names, reference, outputs):
                if first.shape != now.shape or first.dtype != now.dtype or first.tobytes() != now.tobytes():
                    raise SafetyPolicyError(
                        f"safety='{STRICT}': output '{name}' is not deterministic in ONNX Runtime: run {run + 1} "
                        f"with {count} thread(s) differs from the first run with {threads[0]} thread(s) "
                        "on the same input"
                    )
    return {"runs": repeats * len(threads), "threads": list(threads), "repeats": repeats, "outputs": names,
            "bit_identical": True}


# ``suite(runner, model) -> {property: {"cases", "failures", "example"}}``
Suite = Callable[[Callable[..., Mapping[str, np.ndarray]], nn.Module | None], Mapping[str, Mapping[str, Any]]]


def _graph_runner(graph_module: nn.Module) -> Callable[..., dict[str, np.ndarray]]:
    def run(*inputs: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = graph_module(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
        return {k: v.numpy() for k, v in out.items()}
    return run


def _onnx_runner(onnx_model: Any) -> Callable[..., dict[str, np.ndarray]]:
    import onnxruntime as ort

    from fxopt.safety.verify import run_onnx_batched

    session = ort.InferenceSession(serialize(onnx_model), providers=["CPUExecutionProvider"])
    return lambda *inputs: run_onnx_batched(session, inputs)


def run_property_suite(
    spec_or_suite: Any, graph_module: nn.Module, onnx_model: Any, *, model: nn.Module | None = None
) -> dict[str, Any]:
    """Re-run a safety model's own property suite on its compiled graph and on its ONNX file.

    Args:
        spec_or_suite: a `ModelSpec` with ``properties`` set, or the suite itself:
            ``suite(runner, model) -> {property: {"cases", "failures", "example"}}``.
        graph_module: the compiled torch graph (outputs a dict of tensors).
        onnx_model: its ONNX lowering (static batch: rows are fed in chunks).
        model: the eager model they were compiled from, for a suite that reads its config
            (``None``: the suite's defaults, e.g. the registered default config).

    Returns:
        ``{"graph": counts, "onnx": counts}`` where counts is ``{"properties": k, "cases": n,
        "failures": 0, "by_property": {property: cases}}``.

    Raises:
        SafetyPolicyError: listing each failing property per runtime, with its first failing row.
    """
    suite: Suite | None = getattr(spec_or_suite, "properties", spec_or_suite)
    if not callable(suite):
        raise InputError(f"no property suite to run: {getattr(spec_or_suite, 'name', spec_or_suite)!r} has none")
    evidence: dict[str, Any] = {}
    failures: list[str] = []
    for where, runner in (("graph", _graph_runner(graph_module)), ("onnx", _onnx_runner(onnx_model))):
        results = suite(runner, model)
        failed = {name: r for name, r in results.items() if r["failures"]}
        failures += [f"{name} on the {where} ({r['failures']}/{r['cases']} rows; {r.get('example')})" for name, r in failed.items()]
        evidence[where] = {
            "properties": len(results),
            "cases": sum(int(r["cases"]) for r in results.values()),
            "failures": sum(int(r["failures"]) for r in results.values()),
            "by_property": {name: int(r["cases"]) for name, r in results.items()},
        }
    if failures:
        raise SafetyPolicyError(f"safety='{STRICT}': the model's properties fail after compilation: " + "; ".join(failures))
    return evidence


def equivalence_evidence(
    model: nn.Module, onnx_model: Any, *, stratified: int = 512, boundary: int = 128, seed: int = 0
) -> dict[str, Any]:
    """The safety supervisor's ONNX file against its eager model (`fxopt.safety.verify.check_equivalence`).

    Args:
        model: the eager `SafetySupervisor` the file was compiled from.
        onnx_model: the lowering.
        stratified: Latin-hypercube rows; boundary: rows at the rules' decision boundaries;
            seed: the sampling seed (the corner rows come on top).

    Returns:
        ``{"rows": checked, "samples": by kind, "max_abs_error": per output, "rule_mismatches": 0,
        "atol": ..., "passed": True, "seed": seed}``.

    Raises:
        SafetyPolicyError: when an output deviates beyond ``atol`` or a row's active rules differ.
    """
    from fxopt.safety.verify import check_equivalence

    report = check_equivalence(model, onnx_model, stratified=stratified, boundary=boundary, seed=seed)
    if not report.passed:
        raise SafetyPolicyError(
            f"safety='{STRICT}': {report}; first mismatching rows: {report.rule_mismatches[:3]}"
        )
    return {
        "rows": sum(report.samples.values()),
        "samples": dict(report.samples),
        "max_abs_error": dict(report.max_abs_error),
        "rule_mismatches": len(report.rule_mismatches),
        "atol": report.atol,
        "passed": True,
        "seed": seed,
    }


def strict_checks(
    model: nn.Module,
    model_spec: Any,
    graph_module: nn.Module,
    onnx_model: Any,
    example_inputs: Sequence[Any],
    profile: str | TargetProfile,
) -> dict[str, Any]:
    """Every post-lowering check of ``safety="strict"``, as the manifest's ``safety`` section.

    Args:
        model: the user's eager model (for the spec's ``equivalence``).
        model_spec: its `ModelSpec`, or ``None`` for a model outside the registry (no suite then).
        graph_module: the compiled graph.
        onnx_model: its ONNX lowering.
        example_inputs: the compile's example inputs (the determinism check runs on them).
        profile: the target.

    Returns:
        ``{"policy": "strict", "ops": ..., "determinism": ..., "properties": ..., "equivalence": ...}``
        (the last two only when the spec has them).

    Raises:
        SafetyPolicyError: from the first check that fails.
    """
    evidence: dict[str, Any] = {
        "policy": STRICT,
        "ops": check_ops(onnx_model, profile),
        "determinism": check_determinism(onnx_model, tuple(example_inputs)),
    }
    if getattr(model_spec, "properties", None) is not None:
        evidence["properties"] = run_property_suite(model_spec, graph_module, onnx_model, model=model)
    if getattr(model_spec, "equivalence", None) is not None:
        evidence["equivalence"] = dict(model_spec.equivalence(model, onnx_model))
    return evidence


class StrictPolicy:
    """safety='strict' for one compile (the core's ``safety_policy`` extension ``"strict"``): the
    model spec's required precision, the request check before any work, the checks of the deployed
    file and their report lines.

    Example:
        >>> StrictPolicy(None).strict, StrictPolicy(None).required_precision
        (True, None)
    """

    strict = True

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    @property
    def required_precision(self) -> str | None:
        return getattr(self.spec, "precision", None)

    def check_request(self, pipeline: list[Any], precision: str) -> None:
        from fxopt.passinfra.pass_base import pass_attr, pass_name

        name = self.spec.name if self.spec is not None else "this model"
        check_strict_request([(pass_name(p), bool(pass_attr(p, "lossy", False))) for p in pipeline], precision, self.required_precision, name)

    def checks(self, model: nn.Module, gm: Any, onnx_model: Any, inputs: tuple[Any, ...], profile: TargetProfile) -> dict[str, Any]:
        return strict_checks(model, self.spec, gm, onnx_model, inputs, profile)

    @staticmethod
    def summary(evidence: dict[str, Any]) -> list[str]:
        lines = [
            f"safety='strict': {evidence['ops']['ops_checked']} ONNX nodes on the audited op list ({evidence['ops']['allow_list']}); "
            f"outputs bit-identical over {evidence['determinism']['runs']} ONNX Runtime runs at {evidence['determinism']['threads']} threads"
        ]
        for where, counts in evidence.get("properties", {}).items():
            lines.append(f"safety='strict': property suite on the {where}: {counts['properties']} properties, {counts['cases']} cases, {counts['failures']} failures")
        if "equivalence" in evidence:
            e = evidence["equivalence"]
            lines.append(f"safety='strict': ONNX vs eager over {e['rows']} rows, {e['rule_mismatches']} rule mismatches, max abs error {max(e['max_abs_error'].values()):.3g}")
        return lines
