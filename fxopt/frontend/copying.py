"""Copying module trees: what ``copy.deepcopy`` gives for an ``nn.Module`` tree, in a fraction of its time.

``copy.deepcopy`` handles each module through the generic pickle protocol (``__reduce_ex__``, then
a rebuild of every attribute); a model of thousands of small modules spends most of a trace or of
a pass manager's copy there. `copy_module` copies a module whose class keeps ``nn.Module``'s state
(its ``__getstate__``; no ``__deepcopy__``, ``__reduce__``, ``__getnewargs__`` or copyreg entry)
attribute by attribute, through its own ``__setstate__`` where it has one, as deepcopy would:
modules recursively, dicts, lists and sets as new containers, immutable values as they are, and
anything else (tensors, parameters, user objects) by ``copy.deepcopy`` with the same memo, so a
tensor shared inside the tree stays shared in the copy and a tensor in the memo (weights a caller
shares on purpose) is not copied at all. A module class with its own ``__deepcopy__``,
``__reduce__`` or ``__getstate__`` (a GraphModule, a scripted module, an RNN) is copied by
``copy.deepcopy`` itself.
"""

from __future__ import annotations

import copy
import copyreg
import functools
import types
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = ["copy_children", "copy_module"]

_ATOMIC = (type(None), bool, int, float, complex, str, bytes, range, type, torch.dtype, torch.device, torch.layout,
           torch.memory_format, types.FunctionType, types.BuiltinFunctionType)


def copy_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy of `module` (``copy.deepcopy(module, memo)``'s result).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> c = copy_module(m)
        >>> c[0].weight is m[0].weight, torch.equal(c[0].weight, m[0].weight)
        (False, True)
        >>> shared = copy_module(m, {id(m[0].weight): m[0].weight})
        >>> shared[0].weight is m[0].weight, shared[0] is m[0]
        (True, False)
    """
    return _copy(module, {} if memo is None else memo)


def copy_children(module: nn.Module, memo: dict[int, Any]) -> None:
    """Copy `module`'s children into `memo` (a ``copy.deepcopy(module, memo)`` after it reuses them: the
    way to copy a module whose own class copies itself, such as a GraphModule)."""
    for child in module.children():
        _copy(child, memo)


@functools.cache
def _plain(cls: type) -> bool:
    # nn.Module's own state (__getstate__ gives the live __dict__), copied as deepcopy's default protocol would: a
    # new object without arguments, then __setstate__ of a copy of that dict; a class's own __setstate__ (_ConvNd's
    # defaults for old pickles) runs as it would under deepcopy. A class with its own __getstate__, reduction, copy or
    # copyreg entry is left to deepcopy (its state may be built on the fly, or not be a dict).
    return (isinstance(cls, type) and issubclass(cls, nn.Module) and getattr(cls, "__deepcopy__", None) is None
            and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is nn.Module.__getstate__
            and not hasattr(cls, "__getnewargs_ex__") and not hasattr(cls, "__getnewargs__")
            and not any("__slots__" in vars(c) for c in cls.__mro__ if c is not object))


def _copy(value: Any, memo: dict[int, Any]) -> Any:
    kind = type(value)
    if kind in _ATOMIC:
        return value
    found = memo.get(id(value), memo)
    if found is not memo:
        return found
    if isinstance(value, nn.Module):
        if not _plain(kind) or kind in copyreg.dispatch_table:  # a reducer registered at any time wins, as in deepcopy
            return copy.deepcopy(value, memo)
        new = kind.__new__(kind)
        memo[id(value)] = new
        state = {k: _copy(v, memo) for k, v in value.__getstate__().items()}
        new.__setstate__(state)
        return new
    if kind is dict or kind is OrderedDict:
        new_map = kind()
        memo[id(value)] = new_map
        for k, v in value.items():
            new_map[k] = _copy(v, memo)
        return new_map
    if kind is list:
        new_list: list[Any] = []
        memo[id(value)] = new_list
        new_list.extend(_copy(v, memo) for v in value)
        return new_list
    if kind is tuple:
        items = tuple(_copy(v, memo) for v in value)
        return value if all(a is b for a, b in zip(items, value)) else items
    if kind is types.MethodType:  # a bound method (a hook, `self.impl = self._fast`) binds to the copy, as deepcopy's does
        return kind(value.__func__, _copy(value.__self__, memo))
    if kind is set and all(type(v) in _ATOMIC for v in value):
        return set(value)
    return copy.deepcopy(value, memo)
