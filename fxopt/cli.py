"""The `fxopt` command line: compile a model (a factory or a bundled model), list targets, passes, models."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from fxopt.errors import FxoptError, InputError

__all__ = ["main", "load_factory", "parse_shape"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def parse_shape(text: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Parse ``1x3x224x224`` (optionally ``:int64``) into a shape and dtype."""
    dims, _, dtype_name = text.partition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise InputError(f"bad --input-shape '{text}': expected sizes joined by 'x', e.g. 1x3x224x224") from None
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"bad --input-shape '{text}': sizes must be positive integers")
    dtype = _DTYPES.get(dtype_name or "float32")
    if dtype is None:
        raise InputError(f"bad dtype '{dtype_name}' in --input-shape; use one of {', '.join(_DTYPES)}")
    return shape, dtype


def load_factory(spec: str) -> torch.nn.Module:
    """Import ``MODULE:FACTORY`` and call the factory; it must return an nn.Module."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"bad model '{spec}': expected MODULE:FACTORY, e.g. torchvision.models:resnet18")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import module '{module_name}' (from '{spec}'): {exc}") from exc
    finally:
        sys.path.pop(0)
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise InputError(f"module '{module_name}' has no attribute '{attr}'")
        factory = getattr(factory, part)
    try:
        model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    except Exception as exc:  # noqa: BLE001 - the user's factory may raise anything
        raise InputError(f"the factory '{spec}' raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _example_inputs(shapes: Sequence[str], seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for text in shapes:
        shape, dtype = parse_shape(text)
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.zeros(shape, dtype=dtype))
    return tuple(inputs)


def parse_pass(text: str) -> Any:
    """``NAME[:key=value,...]`` -> a pass instance; options are checked against what the pass takes.

    Values are Python literals (``0.5``, ``'flops'``, ``(1, 2)``, ``True``); anything else is a
    string, so ``prune:amount=0.5,by=flops`` works without quotes.

    Example:
        >>> parse_pass("prune:amount=0.3,by=flops").options()["amount"]
        0.3
    """
    from fxopt.passinfra.registry import create_pass, pass_class

    name, _, rest = text.partition(":")
    cls = pass_class(name.strip())
    accepted = _accepted_options(cls)
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in _split_options(rest))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"bad --pass '{text}': expected NAME:key=value,key=value, got '{item}'")
        if accepted is not None and key not in accepted:
            raise InputError(f"pass '{name}' has no option '{key}'; its options: {', '.join(sorted(accepted)) or 'none'}")
        options[key] = _literal(value.strip())
    return create_pass(name.strip(), **options)


def _split_options(text: str) -> list[str]:
    # commas inside brackets or quotes belong to a value: ignore=('a','b')
    parts, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    return [*parts, current]


def _literal(value: str) -> Any:
    import ast

    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _accepted_options(cls: type) -> set[str] | None:
    import inspect

    params = list(inspect.signature(cls).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def load_calib_data(path: str) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches from a file: ``.pt`` (a list of tensors or of tuples of tensors,
    loaded with ``weights_only=True``) or ``.npz`` (one array per model input, ``input_0``,
    ``input_1``, ... or ``arr_0``, ..., each ``(num_batches, *input_shape)``)."""
    import numpy as np

    if not os.path.isfile(path):
        raise InputError(f"--calib-data '{path}' is not a file")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                keys = sorted(data.files, key=lambda k: (len(k), k))
                arrays = [torch.from_numpy(data[k]) for k in keys]
            if not arrays or len({a.shape[0] for a in arrays}) != 1:
                raise InputError(f"--calib-data '{path}': every array needs the same number of batches (first dim), got {[tuple(a.shape) for a in arrays]}")
            return [tuple(a[i] for a in arrays) for i in range(arrays[0].shape[0])]
        if path.endswith((".pt", ".pth")):
            data = torch.load(path, weights_only=True)
            if isinstance(data, torch.Tensor) or not isinstance(data, (list, tuple)):
                raise InputError(f"--calib-data '{path}' must hold a list of input batches (tensors or tuples of tensors), got {type(data).__name__}")
            return [tuple(b) if isinstance(b, (list, tuple)) else (b,) for b in data]
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt or unsafe file is the user's input
        raise InputError(f"cannot read --calib-data '{path}': {type(exc).__name__}: {exc}") from exc
    raise InputError(f"--calib-data '{path}': use a .pt or .npz file")


def _model_inputs_precision(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[Any, ...], str | None]:
    # MODULE:FACTORY needs --input-shape; a bundled model brings its own example inputs and
    # deployment precision (e.g. fp32 for the safety supervisor) unless the flags say otherwise
    if ":" not in args.model:
        from fxopt import models

        cfg = {"preset": args.preset} if args.preset else {}
        torch.manual_seed(args.seed)
        model = models.create(args.model, **cfg)
        inputs = _example_inputs(args.input_shape, args.seed) if args.input_shape else models.example_inputs(args.model, **cfg)
        return model, inputs, args.precision or models.spec(args.model).precision
    if args.preset:
        raise InputError("--preset applies to bundled models (see `fxopt models`), not to MODULE:FACTORY")
    if not args.input_shape:
        raise InputError("give at least one --input-shape, e.g. --input-shape 1x3x224x224")
    return load_factory(args.model), _example_inputs(args.input_shape, args.seed), args.precision


def _cmd_compile(args: argparse.Namespace, first: Sequence[Any] = (), calib_from_recipe: int = 0) -> int:
    import fxopt

    _check_output(args)  # before minutes of work, not after
    passes: list[Any] | None = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    if args.pass_specs:
        passes = (passes or []) + [parse_pass(text) for text in args.pass_specs]
    if first:
        passes = [*first, *(passes or [])]
    options = {"calib_data": load_calib_data(args.calib_data)} if args.calib_data else {}
    model, inputs, precision = _model_inputs_precision(args)
    if calib_from_recipe and "calib_data" not in options:
        options["calib_data"] = _recipe_calibration(args.model, calib_from_recipe, args.preset)
    print(f"compiling {args.model} for {args.target} ...", file=sys.stderr)
    compiled = fxopt.compile(
        model, args.target, example_inputs=inputs, passes=passes, precision=precision,
        strict=args.strict, progress=not args.quiet, leaf_modules=args.leaf, safety=args.safety, **options,
    )
    print(compiled.report)
    paths = compiled.save(args.output)
    print(f"\nwrote {', '.join(os.path.basename(p) for p in paths.values())} to {args.output}")
    failed = [r for r in compiled.report.passes if r.status == "rolled_back" and passes and r.name in {_name(p) for p in passes}]
    for r in failed:
        print(f"fxopt: error: requested pass '{r.name}' was rolled back: {r.reason}", file=sys.stderr)
    return 3 if failed else 0


DEFAULT_OUTPUT = "out"


def _check_output(args: argparse.Namespace) -> None:
    # without -o the folder is ./out: a refusal says so, not only what ./out holds
    from fxopt.output.output_folder import check_output_folder

    if args.output is not None:
        check_output_folder(args.output)
        return
    args.output = DEFAULT_OUTPUT
    try:
        check_output_folder(args.output)
    except InputError as exc:
        raise InputError(f"{exc}. No -o/--output was given, so the default ./{DEFAULT_OUTPUT} was used: "
                         "give each compile its own folder with -o DIR") from exc


def _recipe_calibration(model: str, batches: int, preset: str | None = None) -> list[tuple[Any, ...]]:
    """Input batches from a bundled model's training recipe for its preset (seeded), for passes
    that need data."""
    from fxopt import models

    recipe = None
    if ":" not in model and model in models.names():
        try:
            recipe = models.recipe(model, **({"preset": preset} if preset else {}))
        except InputError:  # no recipe, or one that trains the default config only
            recipe = None
    if recipe is None or not callable(getattr(recipe, "batch", None)):
        which = f"'{model}' with --preset {preset}" if preset else f"'{model}'"
        raise InputError(f"{which} brings no data: give --calib-data FILE (input batches like the example inputs)")
    generator = torch.Generator().manual_seed(0)
    return [tuple(recipe.batch(step, generator)[0]) for step in range(batches)]


def _cmd_slim(args: argparse.Namespace) -> int:
    from fxopt.passinfra.registry import create_pass

    space = tuple(d.strip() for d in args.space.split(",") if d.strip())
    resolutions = [parse_shape(text)[0] for text in args.resolution] or None
    slim = create_pass("slim", latency_ms=args.latency_ms, latency_ratio=args.latency_ratio, trials=args.trials, space=space,
                resolutions=resolutions, seed=args.search_seed, storage=args.storage, study_name=args.study,
                progress=not args.quiet)
    return _cmd_compile(args, first=[slim], calib_from_recipe=4)


def _name(p: Any) -> str:
    from fxopt.passinfra.pass_base import pass_name

    return p if isinstance(p, str) else pass_name(p)


def _cmd_verify(args: argparse.Namespace) -> int:
    from fxopt.output.output_folder import verify_output_folder

    problems = verify_output_folder(args.folder)
    for problem in problems:
        print(f"{args.folder}: {problem}", file=sys.stderr)
    if problems:
        print(f"fxopt: error: {args.folder} does not verify ({len(problems)} problem(s) above)", file=sys.stderr)
        return 2
    print(f"{args.folder}: every file matches manifest.json, and manifest.json its own SHA-256")
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    from fxopt.targets import get_target, target_names

    for name in target_names():
        t = get_target(name)
        trt = f"TensorRT {t.tensorrt_version}" if t.tensorrt_version else t.backend
        print(f"{name:<8} opset<={t.max_onnx_opset}  {trt:<14} {','.join(t.precisions):<15} {t.description}")
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from fxopt.passinfra.registry import registered_passes

    for name, cls in sorted(registered_passes().items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        lossy = "lossy" if cls.lossy else "exact"
        print(f"{name:<22} {lossy:<6} {doc[0] if doc else ''}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from fxopt import models

    for name in models.names():
        model_spec = models.spec(name)
        presets = f"presets: {', '.join(model_spec.presets)}" if model_spec.presets else ""
        trainable = "trainable" if model_spec.recipe is not None else ""
        print(f"{name:<20} {model_spec.summary}  {presets}  {trainable}".rstrip())
    return 0


def _cmd_calibrate_target(args: argparse.Namespace) -> int:
    from fxopt.costs.target_calibration import calibrate_target, write_profile

    profile = calibrate_target(args.profile, args.target, onnx_path=args.onnx, precision=args.precision, name=args.name)
    write_profile(profile, args.out)
    fitted = ", ".join(f"{k} {v:.3g}" for k, v in profile.op_efficiency.items() if k.startswith(("conv", "linear", "matmul")))
    engine = profile.engine
    assert engine is not None  # calibrate_target refuses targets without one
    print(f"{args.out}: target '{profile.name}' ({engine.source}): efficiency {fitted}; bandwidth "
          f"{engine.bandwidth_efficiency:.3g}; launch {profile.launch_overhead_s * 1e6:.3g} us. "
          f"Load it with fxopt.targets.load_target('{args.out}').")
    return 0


COMPILE_EXAMPLES = """examples:
  fxopt compile torchvision.models:resnet18 --input-shape 1x3x224x224 -o out/resnet18
  fxopt compile pointpillars --preset kitti --target xavier -o out/pp
  fxopt compile my_models:net --input-shape 1x3x64x64 --pass prune:amount=0.5,by=flops --pass fold_batchnorm -o out/net_pruned
  fxopt compile my_models:net --input-shape 1x3x64x64 --pass prune:importance=taylor --calib-data calib.pt -o out/net_taylor
  fxopt compile my_models:net --input-shape 1x3x64x64 --leaf backbone.custom_block -o out/net_leaf
  fxopt verify out/resnet18
"""


SLIM_EXAMPLES = """examples:
  fxopt slim camera_multitask --latency-ratio 0.8 --trials 30 -o out/cam_slim
  fxopt slim my_models:net --input-shape 1x3x128x128 --calib-data calib.pt --latency-ratio 0.6 --resolution 96x96 -o out/net_slim
  # one study, many machines: start the same command on each (a different --search-seed per worker)
  fxopt slim my_models:net --input-shape 1x3x128x128 --calib-data calib.pt --latency-ratio 0.5 \\
      --storage postgresql://user@db/fxopt --study net-xavier --search-seed 1 -o out/net_slim_1   # pip install psycopg2-binary
"""


def _add_compile_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("model", help="MODULE:FACTORY, a callable returning an nn.Module (e.g. torchvision.models:resnet18), "
                   "or a bundled model name (see `fxopt models`)")
    c.add_argument("--preset", default=None, help="a bundled model's preset, e.g. kitti for pointpillars")
    c.add_argument("--target", default="xavier", help="target name (see `fxopt targets`)")
    c.add_argument("--input-shape", action="append", default=[], help="example input shape, e.g. 1x3x224x224[:int64]; repeat per input")
    c.add_argument("--passes", default=None, help="comma-separated pass names (default: the target's pipeline)")
    c.add_argument("--pass", dest="pass_specs", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="add a pass with options, e.g. prune:amount=0.5,by=flops; repeatable")
    c.add_argument("--calib-data", default=None, metavar="FILE",
                   help="calibration batches: .pt (list of input tuples, loaded weights_only) or .npz (one array per input, batches first)")
    c.add_argument("--leaf", action="append", default=[], metavar="PATH", help="keep this submodule opaque (e.g. head.nms); repeatable")
    c.add_argument("--precision", default=None, help="fp32, fp16 or int8 (default: the target's)")
    c.add_argument("--strict", action="store_true", help="stop at the first failing pass")
    c.add_argument("--safety", choices=("strict", "off"), default=None,
                   help="safety policy (default: the model's; strict for safety_supervisor): no lossy pass, required precision, audited ops, determinism and property checks")
    c.add_argument("--seed", type=int, default=0, help="seed of the random example inputs")
    c.add_argument("-o", "--output", default=None, metavar="DIR",
                   help=f"output folder, one per compile: it is replaced whole (default: ./{DEFAULT_OUTPUT})")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _version() -> str:
    from fxopt import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxopt", description="Compile PyTorch models for NVIDIA Jetson and ONNX Runtime.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"fxopt {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile MODULE:FACTORY for a target", epilog=COMPILE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_compile_arguments(c)
    c.set_defaults(func=_cmd_compile)
    sl = sub.add_parser("slim", help="NAS-slim a model under a latency budget (Optuna; workers can share a study), then compile it",
                        epilog=SLIM_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_compile_arguments(sl)
    budget = sl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--latency-ratio", type=float, help="budget as a fraction of the input model's latency, e.g. 0.5")
    budget.add_argument("--latency-ms", type=float, help="budget in milliseconds")
    sl.add_argument("--trials", type=int, default=40, help="Optuna trials this worker runs (default 40)")
    sl.add_argument("--space", default="depth,width,resolution", help="dimensions to search (default depth,width,resolution; add layers to remove same-shape conv layers of a net without residual blocks)")
    sl.add_argument("--resolution", action="append", default=[], metavar="HxW",
                    help="an input size the first input may take instead (spatial dims, e.g. 64x96); repeatable")
    sl.add_argument("--storage", default=None, help="Optuna storage URL (sqlite:///s.db, postgresql://...) or a .journal file, to share a study")
    sl.add_argument("--study", default=None, help="study name in --storage (the same on every worker)")
    sl.add_argument("--search-seed", type=int, default=0, help="seed of the sampler (give each worker its own)")
    sl.set_defaults(func=_cmd_slim)
    v = sub.add_parser("verify", help="check a saved folder against its manifest (SHA-256 of every file, manifest.json's "
                       "own, onnx.checker); exit 2 on any problem")
    v.add_argument("folder", help="a folder written by `fxopt compile -o` or CompiledModel.save")
    v.set_defaults(func=_cmd_verify)
    sub.add_parser("targets", help="list targets").set_defaults(func=_cmd_targets)
    k = sub.add_parser("calibrate-target", help="fit a TensorRT target's latency model to a `trtexec --exportProfile` JSON")
    k.add_argument("profile", help="the per-layer profile JSON trtexec wrote (--exportProfile=FILE)")
    k.add_argument("--target", default="xavier", help="the target to calibrate (default: xavier)")
    k.add_argument("--onnx", default=None, help="the ONNX file the engine was built from (default: model.onnx beside the profile)")
    k.add_argument("--precision", default=None, help="the precision the engine ran (default: the target's)")
    k.add_argument("--name", default=None, help="name of the calibrated target (default: TARGET_calibrated)")
    k.add_argument("--out", default="calibrated.json", help="where to write the calibrated profile (default: calibrated.json)")
    k.set_defaults(func=_cmd_calibrate_target)
    sub.add_parser("passes", help="list registered passes").set_defaults(func=_cmd_passes)
    sub.add_parser("models", help="list bundled models").set_defaults(func=_cmd_models)
    from fxopt.automation.cli import add_pipeline_parser  # the DAG pipeline sits on the public API

    add_pipeline_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxopt`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except FxoptError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"fxopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
