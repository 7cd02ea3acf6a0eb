"""What a reshape's neighbours say about it: who takes its dims apart, where its sizes come from.

Two questions the reshape rule cannot answer from its own node:

- :func:`taken_apart`: is a dim of its output only ever split into its positions (``unbind``, an
  integer index), possibly after permutes? Then the dim holds *parts* (timm's packed
  ``qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)``), and uniting the
  parts position by position (what an equal split does) lets the label sit on the heads.
- :func:`size_terms`: what a size computed in a traced forward is made of (tensor sizes read with
  ``x.shape``/``x.size()``, integer literals), so the rule can tell whether compaction changes it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TypeGuard, cast

import torch
from torch import fx

from autosparse.capture import Capture

aten = torch.ops.aten

_PERMUTES = {"permute", torch.permute, aten.permute.default}
_TRANSPOSES = {"transpose", torch.transpose, aten.transpose.int}
_UNBINDS = {"unbind", torch.unbind, aten.unbind.int}
_SELECTS = {"select", torch.select, aten.select.int}
_PASS = {"contiguous", aten.contiguous.default, aten.clone.default}


def taken_apart(capture: Capture, node: fx.Node, dim: int, depth: int = 0) -> bool:
    """Whether every use of ``node`` splits dim ``dim`` into single positions (through permutes)."""
    shape = capture.shape(node)
    if shape is None or not node.users or depth > 4:
        return False
    ndim = len(shape)
    for user in node.users:
        if not user.args or user.args[0] is not node:
            return False
        target = user.target
        if target in _PERMUTES:
            perm = list(user.args[1]) if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) \
                else list(user.args[1:])
            moved = [_int(d) % ndim for d in perm].index(dim)
            ok = taken_apart(capture, user, moved, depth + 1)
        elif target in _TRANSPOSES:
            a, b = _int(user.args[1]) % ndim, _int(user.args[2]) % ndim
            ok = taken_apart(capture, user, b if dim == a else a if dim == b else dim, depth + 1)
        elif target in _PASS:
            ok = taken_apart(capture, user, dim, depth + 1)
        elif target in _UNBINDS or target in _SELECTS:
            ok = _dim_arg(user, 0) % ndim == dim
        elif target is operator.getitem:
            ok = _int_index_on(user.args[1], dim)
        else:
            return False
        if not ok:
            return False
    return True


def _dim_arg(node: fx.Node, default: int) -> int:
    value = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", default)
    return _int(value)


def _int(value: fx.node.Argument) -> int:
    """``int()`` of a dim argument: a literal here, though fx types it as any graph argument."""
    return int(cast(int, value))


def _int_index_on(index: object, dim: int) -> bool:
    """``t[..]`` picks one position of ``dim`` with an integer, every dim before it whole."""
    items = index if isinstance(index, tuple) else (index,)
    if len(items) <= dim or any(i is None or i is Ellipsis for i in items[: dim + 1]):
        return False
    return isinstance(items[dim], int) and all(i == slice(None) for i in items[:dim])


@dataclass
class SizeTerms:
    """What a computed size is made of: ``(tensor, dim)`` size reads and integer literals."""

    reads: list[tuple[fx.Node, int]] = field(default_factory=list)
    literals: list[int] = field(default_factory=list)
    known: bool = True  # False: something else (a tensor value, an op this module does not follow)


_ARITH = {operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv, int}


def size_terms(capture: Capture, value: object, terms: SizeTerms | None = None, depth: int = 0) -> SizeTerms:
    """Follow a traced size back to the sizes and literals it is computed from."""
    terms = terms if terms is not None else SizeTerms()
    if isinstance(value, int):
        terms.literals.append(value)
    elif not isinstance(value, fx.Node) or depth > 8:
        terms.known = False
    elif value.target is operator.getitem and _is_shape(value.args[0]) and isinstance(value.args[1], int):
        terms.reads.append(_read(capture, value.args[0], value.args[1]))
    elif value.op == "call_method" and value.target == "size" and len(value.args) > 1:
        terms.reads.append(_read(capture, value, _int(value.args[1])))
    elif value.target in _ARITH:
        for arg in value.args:
            size_terms(capture, arg, terms, depth + 1)
    else:
        terms.known = False
    return terms


def _is_shape(node: object) -> TypeGuard[fx.Node]:
    if not isinstance(node, fx.Node):
        return False
    shape_attr = node.target is getattr and node.args[1] == "shape"
    # bool(): fx argument comparisons are typed SymBool | bool in newer torch stubs
    return bool(shape_attr or (node.op == "call_method" and node.target == "size" and len(node.args) == 1))


def _read(capture: Capture, shape_node: fx.Node, dim: int) -> tuple[fx.Node, int]:
    tensor = cast(fx.Node, shape_node.args[0])  # the tensor whose ``.shape``/``.size()`` it reads
    shape = capture.shape(tensor)
    return tensor, dim % len(shape) if shape else dim
