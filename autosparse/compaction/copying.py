"""Copies of a gated model for compaction: one that shares only what compaction replaces, and a
throwaway one for the dry run that shares every tensor's storage and copies only Python objects.

``copy.deepcopy`` of a gated model spends most of its time in Python, not in memory: each module
is pickled and rebuilt through ``__reduce_ex__`` (with every hook dict), and the model's sparsity
state (plan, analysis, example inputs) is copied although compaction drops it at once. Both copies
here leave the state out; the throwaway one also rebuilds plain modules by copying their
``__dict__`` directly, which is what deepcopy's reduce protocol amounts to for them.
"""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from autosparse.state import STATE_ATTR

# Values deepcopy returns as they are: copying them through it only costs time.
_ATOMIC = frozenset({type(None), bool, int, float, str, torch.dtype, torch.device})
_CHILDREN = ("_parameters", "_buffers", "_modules")
_COMPILED = "_compiled_call_impl"  # what nn.Module.__getstate__ leaves out of a copy
_PROTOCOL = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__",
             "__getnewargs__", "__getnewargs_ex__", "__copy__")


def copy_sharing(model: nn.Module, replaced: list[torch.Tensor]) -> nn.Module:
    """``copy.deepcopy(model)`` in which each tensor of ``replaced`` shares its storage with ``model``
    and the sparsity state is shared, not copied (compaction removes it from the copy first).

    Compaction slices or folds every tensor of ``replaced`` into a new one before anything could
    write to it, so they are never copied at full size: the peak is the model plus the compacted
    model, not two models. :func:`unshare` then makes sure no storage is left in common.
    """
    memo: dict[int, Any] = {}
    for tensor in replaced:
        if _aliasable(tensor):
            memo[id(tensor)] = alias(tensor)
    state = model.__dict__.get(STATE_ATTR)
    if state is not None:
        memo[id(state)] = state
    return copy.deepcopy(model, memo)


def throwaway_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to compact and discard: every module and Python object is its own, every
    tensor is a new tensor object viewing the original's storage.

    Compaction replaces tensors (slicing makes new ones, folding ``set_``s the copy's own tensor
    object) and never writes into a tensor's memory, so the original is left as it was while no
    weight is copied. The sparsity state is not copied (compaction drops it first). A module whose
    class customises copying (``__deepcopy__``, ``__reduce__``, ``__getstate__``, slots) is copied
    by ``copy.deepcopy`` with the same shared tensors.
    """
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for module in model.modules():  # every module's own tables: parametrizations' originals too
            for tensor in [*module._parameters.values(), *module._buffers.values()]:
                if tensor is not None and id(tensor) not in memo and _aliasable(tensor):
                    memo[id(tensor)] = alias(tensor)
    state = model.__dict__.get(STATE_ATTR)
    if state is not None:
        memo[id(state)] = state
    return _module(model, memo, {})


def deep_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, with less time in Python: modules whose classes leave the copy
    protocol alone are rebuilt from their ``__dict__`` directly, everything else (tensors included)
    goes through ``copy.deepcopy`` with one shared memo, so the result is the same."""
    return _module(model, {}, {})


def _module(module: nn.Module, memo: dict[int, Any], plain: dict[type, bool]) -> nn.Module:
    found = memo.get(id(module))
    return found if found is not None else _object(module, memo, plain)


def _object(value: Any, memo: dict[int, Any], plain: dict[type, bool]) -> Any:
    """``value`` rebuilt from a copy of its ``__dict__`` where deepcopy would do just that, else
    ``copy.deepcopy`` (both record the copy in ``memo``, so shared objects stay shared)."""
    cls = type(value)
    if cls not in plain:
        plain[cls] = _plain_copy(cls)
    if not plain[cls]:
        return copy.deepcopy(value, memo)
    new = cls.__new__(cls)  # type: ignore[call-overload]  # what deepcopy does: any class
    memo[id(value)] = new
    state = {key: item for key, item in value.__dict__.items() if key != _COMPILED}
    # Children first: hooks and plain objects that point at submodules (a root hook holding every
    # gate) then find them in ``memo`` instead of deep-copying them the slow way.
    copied = {key: _value(state[key], memo, plain) for key in _CHILDREN if key in state}
    # Atomic values (most of a module's attributes) are kept without a call: this loop runs for
    # every attribute of every module of the copy.
    new.__dict__.update({key: copied[key] if key in copied else item if type(item) in _ATOMIC
                         else _value(item, memo, plain) for key, item in state.items()})
    return new


def _value(value: Any, memo: dict[int, Any], plain: dict[type, bool]) -> Any:
    cls = type(value)
    if cls in _ATOMIC:  # exact types: a set look-up, where isinstance would walk metaclass checks
        return value
    if cls in (dict, OrderedDict) and not value:  # most of a module's hook tables
        return cls()
    found = memo.get(id(value))
    if found is not None:
        return found
    if cls in (dict, OrderedDict):  # the child tables, and hooks that are set
        new: dict[Any, Any] = cls()
        memo[id(value)] = new
        new.update((k, _value(v, memo, plain)) for k, v in value.items())
        return new
    if cls is list:  # e.g. a gate site's gates
        items: list[Any] = []
        memo[id(value)] = items
        items.extend(_value(v, memo, plain) for v in value)
        return items
    if cls in (tuple, set, frozenset) and all(type(v) in _ATOMIC for v in value):
        return cls(value) if cls is set else value  # sizes and names: the tuple itself, as deepcopy
    if cls.__module__ != "builtins" and not isinstance(value, type) and hasattr(value, "__dict__"):
        return _object(value, memo, plain)  # modules, and plain objects such as a gated forward
    return copy.deepcopy(value, memo)


def _plain_copy(cls: type) -> bool:
    """Whether deepcopy would copy instances of ``cls`` as ``__dict__`` copied into ``cls.__new__(cls)``:
    no class of its MRO customises the copy protocol and there are no slots. The class that
    ``torch.nn.utils.parametrize`` injects adds a ``__deepcopy__`` doing exactly that (and a
    ``__getstate__`` that only refuses pickling), so it does not count; nor do torch.nn's own:
    ``Module.__getstate__`` leaves out a ``torch.compile`` cache (so does :func:`_object`) and the
    ``__setstate__`` methods only add attributes missing from pickles of older versions."""
    for klass in cls.__mro__:
        if klass is object:
            break
        own = vars(klass)
        allowed = set()
        if getattr(own.get("__deepcopy__"), "__name__", "") == "default_deepcopy":
            allowed |= {"__deepcopy__", "__getstate__"}
        if klass.__module__.startswith("torch.nn."):  # see the docstring
            allowed |= {"__getstate__", "__setstate__"}
        if any(name in own for name in _PROTOCOL if name not in allowed):
            return False
    return not copyreg._slotnames(cls)  # type: ignore[attr-defined]


def _aliasable(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.layout == torch.strided \
        and tensor.device.type != "meta"


def alias(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor object (own version counter, no grad) viewing ``tensor``'s storage."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return alias(tensor)
    shared = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    if isinstance(tensor, nn.Parameter):
        shared = nn.Parameter(shared, requires_grad=tensor.requires_grad)
    if tensor.__dict__:
        shared.__dict__.update(copy.deepcopy(tensor.__dict__))
    return shared


def unshare(source: nn.Module, target: nn.Module) -> None:
    """Give every tensor of ``target`` that still shares storage with ``source`` its own copy."""
    ptrs = {t.untyped_storage().data_ptr() for t in [*source.parameters(), *source.buffers()] if t.numel()}
    for module in target.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and t.numel() and t.untyped_storage().data_ptr() in ptrs:
                    t.data = t.data.clone()
