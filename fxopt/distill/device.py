"""Where training runs: `training_device` resolves and checks a ``device=`` (default CUDA when
present, else CPU), and `to_device` moves a batch (tensors inside tuples, dicts, dataclasses) there.

Training moves the model there for the loop and back afterwards, so a compiled graph stays on the
CPU for ONNX export and verification; batches move one step at a time.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fxopt.errors import InputError

__all__ = ["available_devices", "describe_device", "home_device", "to_device", "training_device"]


def available_devices() -> list[str]:
    """The devices training can run on here: ``"cpu"``, then ``"cuda:0"``, ``"cuda:1"``, ...

    Example:
        >>> available_devices()[0]
        'cpu'
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


def training_device(device: str | torch.device | None = None) -> torch.device:
    """The device a ``device=`` option names, checked: None is CUDA when available, else the CPU;
    ``"cuda"`` is the current CUDA device. Anything not available here (a CUDA device on a host
    without one, ``"cuda:3"`` with fewer GPUs, another kind, a malformed name) is an `InputError`
    naming it and what is available.

    Example:
        >>> training_device("cpu")
        device(type='cpu')
        >>> training_device("gpu")
        Traceback (most recent call last):
        ...
        fxopt.errors.InputError: device='gpu' is not a device name (...); training runs on one of: cpu...
    """
    if device is None:
        return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    available = available_devices()
    where = f"training runs on one of: {', '.join(available)}"
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise InputError(f"device must be a name such as 'cpu', 'cuda' or 'cuda:1' (or a torch.device), got {device!r}; {where}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"device={device!r} is not a device name ({error}); {where}") from None
    if parsed.type == "cpu" and parsed.index in (None, 0):
        return torch.device("cpu")
    if parsed.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device() if parsed.index is None else parsed.index
        if index < torch.cuda.device_count():
            return torch.device(f"cuda:{index}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r}: CUDA is not available on this host (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda}); {where}")
    raise InputError(f"device={device!r} is not available here; {where}")


def describe_device(device: torch.device) -> str:
    """The device and, for CUDA, the GPU's name: what made a result (a CPU and a GPU give slightly
    different floats, so caches key on it).

    Example:
        >>> describe_device(torch.device("cpu"))
        'cpu'
    """
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def home_device(module: nn.Module) -> torch.device:
    """The device of `module`'s first parameter or buffer (the CPU when it has none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it on `device`: tensors, and those inside tuples (named tuples
    too), lists, dicts and dataclass instances; anything else as it is. A value with no tensor to
    move is returned itself.

    Example:
        >>> batch = ((torch.zeros(2),), {"label": torch.ones(2)})
        >>> to_device(batch, torch.device("cpu")) is batch
        True
    """
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        items = [to_device(v, device) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*items)
        return type(value)(items)
    if isinstance(value, Mapping):
        moved = {k: to_device(v, device) for k, v in value.items()}
        if all(moved[k] is v for k, v in value.items()):
            return value
        if not isinstance(value, dict):
            return moved
        copied = copy.copy(value)  # keeps a dict subclass (OrderedDict, defaultdict) as it is
        copied.update(moved)
        return copied
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_device(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init}
        if all(changes[k] is getattr(value, k) for k in changes):
            return value
        return dataclasses.replace(value, **changes)
    return value
