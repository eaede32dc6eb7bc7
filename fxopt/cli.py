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
    model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
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


def _cmd_compile(args: argparse.Namespace) -> int:
    import fxopt

    model, inputs, precision = _model_inputs_precision(args)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    print(f"compiling {args.model} for {args.target} ...", file=sys.stderr)
    compiled = fxopt.compile(
        model, args.target, example_inputs=inputs, passes=passes, precision=precision,
        strict=args.strict, progress=not args.quiet,
    )
    print(compiled.report)
    paths = compiled.save(args.output)
    print(f"\nwrote {', '.join(os.path.basename(p) for p in paths.values())} to {args.output}")
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    from fxopt.targets import get_target, target_names

    for name in target_names():
        t = get_target(name)
        trt = f"TensorRT {t.tensorrt_version}" if t.tensorrt_version else t.backend
        print(f"{name:<8} opset<={t.max_onnx_opset}  {trt:<14} {','.join(t.precisions):<15} {t.description}")
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from fxopt.registry import registered_passes

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxopt", description="Compile PyTorch models for NVIDIA Jetson and ONNX Runtime.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile MODULE:FACTORY for a target")
    c.add_argument("model", help="MODULE:FACTORY, a callable returning an nn.Module (e.g. torchvision.models:resnet18), "
                   "or a bundled model name (see `fxopt models`)")
    c.add_argument("--preset", default=None, help="a bundled model's preset, e.g. kitti for pointpillars")
    c.add_argument("--target", default="xavier", help="target name (see `fxopt targets`)")
    c.add_argument("--input-shape", action="append", default=[], help="example input shape, e.g. 1x3x224x224[:int64]; repeat per input")
    c.add_argument("--passes", default=None, help="comma-separated pass names (default: the target's pipeline)")
    c.add_argument("--precision", default=None, help="fp32, fp16 or int8 (default: the target's)")
    c.add_argument("--strict", action="store_true", help="stop at the first failing pass")
    c.add_argument("--seed", type=int, default=0, help="seed of the random example inputs")
    c.add_argument("-o", "--output", default="out", help="output folder")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    c.set_defaults(func=_cmd_compile)
    sub.add_parser("targets", help="list targets").set_defaults(func=_cmd_targets)
    sub.add_parser("passes", help="list registered passes").set_defaults(func=_cmd_passes)
    sub.add_parser("models", help="list bundled models").set_defaults(func=_cmd_models)
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
