"""Dynamic shapes for :func:`autosparse.export`: the default batch spec, and the shapes a check runs at.

``torch.export`` takes ``dynamic_shapes`` keyed by the names of ``forward``'s parameters. This module
builds the default one (dim 0 of every tensor input is one shared ``Dim("batch")``), and, for any
spec, derives other input shapes from the example inputs to run the exported file at: every dynamic
dim made smaller (batch 1) and larger (example + 1). A resized input repeats the example's entries
along that dim (``index_select`` with ``arange(n) % old``), so token ids stay within the vocabulary
and masks stay masks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from autosparse.errors import ExportError

BATCH = "batch"


@dataclass
class Case:
    """The inputs of one check: positional, keyword, by parameter name, and a label naming their shapes."""

    args: tuple
    kwargs: dict[str, Any]
    named: dict[str, Any]

    @classmethod
    def of(cls, bound: inspect.BoundArguments) -> Case:
        return cls(tuple(bound.args), dict(bound.kwargs), dict(bound.arguments))

    @property
    def label(self) -> str:
        shapes = [tuple(t.shape) for t in _tensors((self.args, self.kwargs))]
        return ", ".join(str(s) for s in shapes) or "(no tensors)"


def bind(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """Bind inputs to ``model.forward``'s parameters, as torch.export does to read ``dynamic_shapes``."""
    return inspect.signature(model.forward).bind_partial(*args, **kwargs)


def batch_spec(bound: inspect.BoundArguments) -> dict[str, Any] | None:
    """``dynamic_shapes`` with dim 0 of every tensor input dynamic, one ``Dim("batch")`` shared by all.

    Only tensors whose dim 0 has the first tensor's size get it (the others are not batched the
    same way, e.g. a sequence-first input beside a batch-first one); None if there is no tensor.
    """
    tensors = [t for t in _tensors(bound.arguments) if t.dim() > 0]
    if not tensors:
        return None
    size, dim = tensors[0].shape[0], Dim(BATCH)

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: dim} if value.dim() > 0 and value.shape[0] == size else None
        if isinstance(value, (list, tuple)):
            return [spec(v) for v in value] if isinstance(value, list) else tuple(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    return {name: spec(value) for name, value in bound.arguments.items()}


def resized(bound: inspect.BoundArguments, spec: Any, sizes: dict[Any, int]) -> Case:
    """The bound inputs with each dynamic dim of ``spec`` resized to ``sizes[key]`` (see :func:`dims`)."""
    new = inspect.BoundArguments(bound.signature, bound.arguments.copy())
    for name, value in bound.arguments.items():
        new.arguments[name] = _walk(value, _arg_spec(bound, spec, name), sizes, None)
    return Case.of(new)


def dims(bound: inspect.BoundArguments, spec: Any) -> dict[Any, tuple[int, int, Any, set[int]]] | None:
    """Every dynamic dim of ``spec``: ``{key: (example size, min, max, tensor dims it appears at)}``.

    A named ``Dim`` is one key wherever it appears; ``Dim.AUTO`` / ``Dim.DYNAMIC`` are keyed by
    the tensor dim they mark. None when a derived dim (``2 * seq``) depends on a dim that appears
    nowhere by itself: its size cannot be chosen, so only the example shapes are checked.
    """
    found: dict[Any, tuple[int, int, Any, set[int]]] = {}
    roots: list[Any] = []
    for name, value in bound.arguments.items():
        _walk(value, _arg_spec(bound, spec, name), None, (found, roots))
    return None if any(_key(root, 0) not in found for root in roots) else found


def variant_sizes(found: dict[Any, tuple[int, int, Any, set[int]]]) -> list[dict[Any, int]]:
    """Two size choices for the check: every dim smaller (a batch dim: 1), every dim larger (+1)."""
    small, large = {}, {}
    for key, (size, low, high, at) in found.items():
        low = max(int(low or 1), 1)
        small[key] = max(low, 1 if at == {0} else size // 2)
        large[key] = size + 1 if high is None or size + 1 <= high else size
    return [s for s in (small, large) if any(s[k] != found[k][0] for k in s)]


def _arg_spec(bound: inspect.BoundArguments, spec: Any, name: str) -> Any:
    if spec is None:
        return None
    if isinstance(spec, dict):
        return spec.get(name)
    names = list(bound.arguments)  # the positional form follows the bound order, as torch.export's does
    index = names.index(name)
    return spec[index] if index < len(spec) else None


def _key(marker: Any, dim: int) -> Any:
    return ("dim", marker.__name__) if isinstance(marker, Dim) else ("hint", dim)


def _dynamic(marker: Any) -> bool:
    return marker is not None and marker != Dim.STATIC and not isinstance(marker, int)


def _walk(value: Any, spec: Any, sizes: dict[Any, int] | None, collect: tuple | None) -> Any:
    """Resize ``value`` along ``spec``'s dynamic dims (``sizes``), or record them (``collect``)."""
    if isinstance(value, torch.Tensor):
        if spec is None:
            return value
        for dim, marker in (spec.items() if isinstance(spec, dict) else enumerate(spec)):
            if _dynamic(marker):
                value = _one(value, dim, marker, sizes, collect)
        return value
    if isinstance(value, (list, tuple)) and isinstance(spec, (list, tuple)):
        walked = [_walk(v, s, sizes, collect) for v, s in zip(value, spec)] + list(value[len(spec):])
        if isinstance(value, list):
            return walked
        return type(value)(*walked) if hasattr(value, "_fields") else tuple(walked)  # a namedtuple or not
    if isinstance(value, dict) and isinstance(spec, dict):
        return {k: _walk(v, spec.get(k), sizes, collect) for k, v in value.items()}
    return value


def _one(value: torch.Tensor, dim: int, marker: Any, sizes: dict | None, collect: tuple | None) -> torch.Tensor:
    root = getattr(marker, "root", None)  # a derived dim: its size follows its root's
    if collect is not None:
        found, roots = collect
        if root is not None:
            roots.append(root)
        else:
            size, low, high, at = found.get(_key(marker, dim), (value.shape[dim], getattr(marker, "min", None),
                                                                  getattr(marker, "max", None), set()))
            found[_key(marker, dim)] = (size, low, high, at | {dim})
        return value
    if sizes is None:  # _walk is given either sizes to resize to or a collection to fill, never neither
        raise ExportError("dynamic shapes: neither sizes nor a collection was given to resize the inputs")
    new = marker.fn(sizes[_key(root, 0)]) if root is not None else sizes.get(_key(marker, dim), value.shape[dim])
    if new == value.shape[dim]:
        return value
    index = torch.arange(new, device=value.device) % value.shape[dim]
    return value.index_select(dim, index)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def feed(case: Case, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of a case for a graph whose inputs are ``names``: by parameter name when they are
    ``forward``'s, else in the order of the positional then keyword inputs (nested inputs)."""
    if all(isinstance(case.named.get(name), torch.Tensor) for name in names):
        return {name: case.named[name] for name in names}
    return dict(zip(names, _tensors((case.args, case.kwargs))))
