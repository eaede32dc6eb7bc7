"""Inputs a compile runs the model on: the user's example inputs, validated and copied, and the
seeded variants every verification check also runs on, so no check rests on one input.

fxopt never hands the user's tensors to the model: a forward that writes into its input
(``x.mul_(2)``) would change the caller's tensor and the reference of later checks. Every run
gets fresh copies (`copy_inputs`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from fxopt.errors import InputError, warn

__all__ = [
    "VARIANT_KINDS",
    "calibration_batches",
    "check_tensor_outputs",
    "check_train_batches",
    "copy_inputs",
    "describe_shapes",
    "first_train_batch",
    "input_variants",
    "leaf_module_paths",
    "resize_inputs",
    "resize_spatial",
    "submodule",
    "validate_inputs",
    "verification_inputs",
]

# Seeded variants of the example inputs every check runs on besides the example itself.
# Integer and bool tensors (indices, masks) are kept as they are: their values are structural.
VARIANT_KINDS = ("noise", "sign_flip", "scaled")
# Calibration batches (of the example's shapes) also checked, at most this many.
MAX_CALIB_CHECKS = 4


def copy_inputs(inputs: Any) -> Any:
    """A copy of every tensor in an input pytree, so a run cannot write into the caller's."""
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, inputs)


def _tensors(inputs: Any) -> list[tuple[str, torch.Tensor]]:
    leaves, _ = pytree.tree_flatten_with_path(inputs)
    return [(pytree.keystr(path) or "[0]", x) for path, x in leaves if isinstance(x, torch.Tensor)]


def validate_inputs(inputs: tuple[Any, ...], *, what: str = "example_inputs") -> list[str]:
    """Refuse inputs that make a numerical check vacuous; return warnings for suspicious ones.

    NaN/Inf values and empty tensors (a zero-size batch) are an `InputError` naming the input:
    every comparison on them passes whatever a pass did. A constant tensor (all elements equal)
    is allowed but warned about (`FxoptWarning`), since it hides most errors; the verification
    variants still check other values.

    Returns:
        The warning texts (also issued as `FxoptWarning`), for the report.

    Example:
        >>> validate_inputs((torch.ones(1, 3),))
        ['example_inputs[0] is constant (every element is 1): checks on it alone would be weak; fxopt also checks seeded variants']
    """
    notes = []
    for where, t in _tensors(inputs):
        name = f"{what}{where}"
        if t.numel() == 0:
            raise InputError(f"{name} is empty (shape {tuple(t.shape)}): checks on an empty batch pass whatever a pass does; give at least one sample")
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise InputError(
                    f"{name} holds {int(bad.sum())} non-finite value(s) ({kind}, first at index "
                    f"{tuple(int(i) for i in bad.nonzero()[0])}): numerical checks on it are vacuous; give finite inputs"
                )
        if t.numel() > 1 and bool((t == t.reshape(-1)[0]).all()):
            notes.append(f"{name} is constant (every element is {t.reshape(-1)[0].item():g}): checks on it alone would be weak; fxopt also checks seeded variants")
    for note in notes:
        warn(note)
    return notes


def input_variants(inputs: tuple[Any, ...], *, seed: int = 0, kinds: Sequence[str] = VARIANT_KINDS) -> list[tuple[Any, ...]]:
    """Seeded variants of `inputs` with the same shapes and dtypes, one per kind.

    ``noise`` adds Gaussian noise of half the tensor's spread (unit noise on a constant tensor),
    ``sign_flip`` negates, ``scaled`` multiplies by 2.5 (then adds unit noise where all zero), so
    a value-dependent branch or a constant-input blind spot shows up. Integer and bool tensors
    are copied unchanged.

    Example:
        >>> x = (torch.zeros(2, 3), torch.tensor([1, 2]))
        >>> [v[1].tolist() for v in input_variants(x)]
        [[1, 2], [1, 2], [1, 2]]
        >>> [bool(v[0].abs().sum() > 0) for v in input_variants(x)]
        [True, False, True]
    """
    generator = torch.Generator().manual_seed(seed)

    def vary(kind: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t.detach().clone()
        x = t.detach()
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.dtype)
        spread = float(x.float().std()) if x.numel() > 1 else float(x.float().abs().max())
        if kind == "noise":
            return x + noise * (0.5 * spread if spread > 0 else 1.0)
        if kind == "sign_flip":
            return -x
        if kind == "scaled":
            return x * 2.5 if bool((x != 0).any()) else noise
        raise ValueError(f"unknown variant kind {kind!r}")

    return [pytree.tree_map(lambda t, k=kind: vary(k, t) if isinstance(t, torch.Tensor) else t, inputs) for kind in kinds]


def calibration_batches(calib_data: Any, *, what: str = "calib_data", like: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
    """`calib_data` as a list of input tuples, each validated like the example inputs.

    Accepts any re-iterable of tensors or tuples of tensors (a list, a DataLoader); a one-shot
    iterator or generator is refused, since it would be exhausted by the first pass reading it.

    Args:
        like: the example inputs: each batch must have as many inputs, the same dtypes and the
            same shapes but for the batch (first) dimension.

    Raises:
        InputError: not re-iterable, empty, or a batch with NaN/Inf, no samples, or another
            structure than the example inputs (the message names the batch index).
    """
    if isinstance(calib_data, torch.Tensor) or not isinstance(calib_data, Iterable):
        raise InputError(f"{what} must be a list (or other re-iterable) of input tuples, e.g. [(x1,), (x2,)], got {type(calib_data).__name__}")
    if iter(calib_data) is calib_data:
        raise InputError(f"{what} is a one-shot iterator ({type(calib_data).__name__}): it would be used up by the first reader; pass a list or a DataLoader")
    batches = [b if isinstance(b, tuple) else tuple(b) if isinstance(b, list) else (b,) for b in calib_data]
    if not batches:
        raise InputError(f"{what} is empty; give at least one batch")
    for i, batch in enumerate(batches):
        if not any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(batch)):
            raise InputError(f"{what}[{i}] holds no tensor: each batch is a tuple of the model's inputs")
        validate_inputs(batch, what=f"{what}[{i}]")
        if like is not None:
            _check_like(batch, like, f"{what}[{i}]")
    return batches


def _check_like(batch: tuple[Any, ...], like: tuple[Any, ...], what: str) -> None:
    got, want = pytree.tree_leaves(batch), pytree.tree_leaves(like)
    if len(got) != len(want):
        raise InputError(f"{what} has {len(got)} inputs, the example inputs have {len(want)}")
    for j, (g, w) in enumerate(zip(got, want)):
        if not (isinstance(g, torch.Tensor) and isinstance(w, torch.Tensor)):
            continue
        if g.dtype != w.dtype or g.dim() != w.dim() or tuple(g.shape[1:]) != tuple(w.shape[1:]):
            raise InputError(
                f"{what}[{j}] is {tuple(g.shape)}:{str(g.dtype).replace('torch.', '')}, the example input is "
                f"{tuple(w.shape)}:{str(w.dtype).replace('torch.', '')}: a batch may differ only in its first dimension"
            )


def _signature(inputs: tuple[Any, ...]) -> list[Any]:
    return [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x) for x in pytree.tree_leaves(inputs)]


def verification_inputs(
    example_inputs: tuple[Any, ...],
    calib_data: Sequence[tuple[Any, ...]] | None = None,
    *,
    variants: int = len(VARIANT_KINDS),
    seed: int = 0,
) -> tuple[tuple[Any, ...], ...]:
    """The input sets every check runs on: the example, its seeded variants, and calibration
    batches with the example's exact shapes and dtypes (the graph's shapes are static).

    Example:
        >>> x = (torch.randn(1, 3),)
        >>> len(verification_inputs(x)), len(verification_inputs(x, [(torch.randn(1, 3),), (torch.randn(2, 3),)]))
        (4, 5)
    """
    sets = [example_inputs, *input_variants(example_inputs, seed=seed, kinds=VARIANT_KINDS[:variants])]
    wanted = _signature(example_inputs)
    sets += [b for b in (calib_data or ()) if _signature(b) == wanted][:MAX_CALIB_CHECKS]
    return tuple(sets)


def resize_inputs(inputs: tuple[Any, ...], shapes: Sequence[tuple[int, ...] | None]) -> tuple[Any, ...]:
    """`inputs` with each tensor resized to its shape in `shapes` (spatial dims only):
    bilinear/linear/trilinear for floating inputs, nearest for others."""
    out = []
    for x, shape in zip(inputs, shapes):
        size = tuple(shape[2:]) if shape is not None else ()
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or tuple(x.shape[2:]) == size:
            out.append(x)  # the batch size may differ (a calibration batch); only spatial dims are resized
            continue
        out.append(resize_spatial(x, size))
    return tuple(out)


def resize_spatial(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """`x` (batch, channels, spatial...) resized to the spatial `size`: linear/bilinear/trilinear
    for a floating tensor, nearest for others."""
    size = tuple(size)
    if x.is_floating_point():
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    return F.interpolate(x.float(), size=size, mode="nearest").to(x.dtype)


def describe_shapes(items: Sequence[Any]) -> str:
    """``1x3x64x96`` for each tensor or shape in `items` (others skipped), comma-separated."""
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in items]
    return ", ".join("x".join(map(str, s)) for s in shapes if isinstance(s, (tuple, list, torch.Size)))


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``, read from each module's table of children where it holds the
    name (a fraction of the time of `get_submodule`, which tests each step with ``hasattr``; the
    passes and the cost model look up every node's module).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Sequential(torch.nn.ReLU()))
        >>> submodule(m, "0.0") is m[0][0], submodule(m, "") is m
        (True, True)
    """
    module = root
    for atom in path.split(".") if path else ():
        child = module._modules.get(atom)
        if child is None:
            return root.get_submodule(path)  # an attribute that is not a registered child, or its error
        module = child
    return module


def leaf_module_paths(root: nn.Module, leaf_modules: Any, *, where: str = "") -> tuple[str, ...]:
    """`compile(leaf_modules=...)` as submodule paths of `root`, each checked to exist.

    A lone string is one path (``"backbone.block"``), never split into its characters.

    Args:
        where: what `root` is, for the message (default: its class name).

    Raises:
        InputError: an entry is not a non-empty string, or `root` has no such submodule (the
            message lists the closest names).

    Example:
        >>> leaf_module_paths(torch.nn.Sequential(torch.nn.ReLU()), "0")
        ('0',)
    """
    paths = (leaf_modules,) if isinstance(leaf_modules, str) else leaf_modules
    if not isinstance(paths, Iterable) or isinstance(paths, (bytes, Mapping)):
        raise InputError(f"leaf_modules must be a list of submodule paths (e.g. ['backbone.block']), got {type(leaf_modules).__name__}")
    paths = tuple(paths)
    names = [name for name, _ in root.named_modules() if name]
    for path in paths:
        if not isinstance(path, str) or not path:
            raise InputError(f"leaf_modules entries must be submodule paths such as 'backbone.block', got {path!r}")
        if path not in names:
            close = difflib.get_close_matches(path, names, n=3)
            hint = (f"did you mean {', '.join(map(repr, close))}?" if close else
                    f"its top-level submodules: {', '.join(n for n in names if '.' not in n) or 'none'}")
            raise InputError(f"leaf_modules: {where or type(root).__name__} has no submodule '{path}'; {hint}")
    return paths


def check_tensor_outputs(outputs: Any, *, error: type[Exception] = InputError) -> None:
    """Refuse model outputs an ONNX file cannot carry: None, strings, numbers (anything not a tensor).

    The exporter fails on them with a long C++ message, or silently drops them (a ``"label"``
    next to a tensor), so the file would not return what the model does.

    Raises:
        `error` (InputError by default) naming each non-tensor output and its position.

    Example:
        >>> check_tensor_outputs({"logits": torch.ones(1)})
        >>> check_tensor_outputs((torch.ones(1), "cat"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fxopt.errors.InputError: the model's output[1] is str 'cat', not a tensor: an ONNX file carries tensors only ...
    """
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    bad = [(pytree.keystr(path), x) for path, x in leaves if not isinstance(x, torch.Tensor)]
    if not leaves or outputs is None:
        bad = [("", outputs)]
    if bad:
        shown = "; ".join(f"output{where} is {'None' if x is None else f'{type(x).__name__} {x!r:.40}'}" for where, x in bad[:3])
        raise error(f"the model's {shown}, not a tensor: an ONNX file carries tensors only (the exporter would fail or "
                    "drop it); return tensors from forward, or compile with export=False")


def first_train_batch(train_data: Any) -> Any:
    """The first batch of `train_data` when it is a list or tuple, else None: drawing from any
    other iterable could change what the fine-tune gets (a one-shot iterator loses a batch, a
    shuffling `TensorBatches` or DataLoader advances its generator)."""
    return train_data[0] if isinstance(train_data, (list, tuple)) and train_data else None


def check_train_batches(train_data: Any) -> None:
    """Refuse ``(inputs, target)`` fine-tune batches whose target's batch size is not the inputs'.

    Checks every batch of a list or tuple (other iterables are not drawn from, see
    `first_train_batch`); a target that is a tensor, or a dict of tensors (one per head), must have
    the inputs' first dimension. Lists of per-sample targets (detection boxes) are not checked.

    Raises:
        InputError: a batch that is not ``(inputs, target)``, or a target of another batch size.
    """
    for i, batch in enumerate(train_data if isinstance(train_data, (list, tuple)) else ()):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise InputError(f"train_data[{i}] must be an (inputs, target) pair, got {type(batch).__name__}"
                             + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        inputs, target = batch
        sizes = [x.shape[0] for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor) and x.dim() > 0]
        if not sizes:
            continue
        targets = target.items() if isinstance(target, Mapping) else [("", target)]
        for key, t in targets:
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] != sizes[0]:
                name = f"target[{key!r}]" if key != "" else "target"
                raise InputError(f"train_data[{i}]: the {name} has batch size {t.shape[0]} (shape {tuple(t.shape)}), the inputs "
                                 f"{sizes[0]}: each target must hold one row per input sample")
