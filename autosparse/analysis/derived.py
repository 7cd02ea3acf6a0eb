"""Per-channel vectors computed from parameters and buffers (a frozen BatchNorm's scale and shift).

A 1-D parameter or buffer read in a forward is a :class:`~autosparse.analysis.context.Derived`
vector, and so is anything computed from such vectors alone by element-wise ops, reshapes that
only add or drop size-1 dims, broadcasts and basic indexing: position ``i`` of its one varying dim
depends on entry ``i`` of each source. Where it meets channels in an element-wise op (or is the
weight of a norm), each source follows those channels and is sliced with them, exactly like a
parameter read directly (``x * (w * (rv + eps).rsqrt()).reshape(1, -1, 1, 1)`` prunes like a
BatchNorm).

Any other use (a reduction, a matmul, an op without a rule, a model output) *pins* the sources:
slicing them would change that use's value, so :func:`autosparse.analysis.groups.build_groups`
blocks whatever channels they follow. Rules need not know about derived vectors: a rule that does
not record a source as a member of the node reading it pins it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import fx

from autosparse.analysis.context import Derived, OpContext
from autosparse.analysis.labels import Label
from autosparse.analysis.ops_shape import getitem, index_dim, reshape
from autosparse.analysis.ops_tensor import expand, pointwise

Handler = Callable[[OpContext], None]


def seed(ctx: OpContext) -> Derived | None:
    """The value of a placeholder or get_attr node: a 1-D parameter/buffer is a derived vector."""
    name, shape = ctx.tensor_name(ctx.node), ctx.shape()
    if name is None or shape is None or len(shape) != 1 or shape[0] < 2:
        return None
    return Derived(0, shape[0], (name,))


def read(ctx: OpContext) -> list[fx.Node]:
    """The inputs of ``ctx.node`` whose value is a derived vector."""
    env = ctx.state.env
    return [n for n in ctx.node.all_input_nodes if isinstance(env.get(n), Derived)]


def propagate(ctx: OpContext, handler: Handler | None, inputs: list[fx.Node]) -> bool:
    """Compute a derived vector from derived ``inputs`` where no channels are involved.

    Returns True when the node was handled here (its rule must not run): its value is a derived
    vector, or it is not one and its sources are pinned.
    """
    if any(isinstance(ctx.state.env.get(n), (Label, list)) for n in ctx.node.all_input_nodes):
        return False  # channels involved: the op's own rule runs, then unrecorded sources are pinned
    if handler is pointwise:
        out = _pointwise(ctx, inputs)
    elif handler is reshape or handler is expand or handler is getitem:
        out = _moved(ctx, _vector(ctx, ctx.arg(0)), handler) if ctx.arg(0) in inputs else None
    else:
        return False
    if out is None:
        pin(ctx, inputs)
    ctx.output(out)
    return True


def pin(ctx: OpContext, inputs: list[fx.Node], recorded: set[str] | frozenset[str] = frozenset()) -> None:
    """Pin the sources of derived ``inputs`` that the node's rule did not record as members."""
    for node in inputs:
        for name in _vector(ctx, node).sources:
            if name not in recorded:
                ctx.state.pinned.setdefault(name, ctx.where)


def _vector(ctx: OpContext, node: Any) -> Derived:
    """The derived vector of an input that :func:`read` found to hold one."""
    return cast(Derived, ctx.derived(node))


def _pointwise(ctx: OpContext, inputs: list[fx.Node]) -> Derived | None:
    """Element-wise op of derived vectors and constants: they must vary along one and the same dim."""
    out_shape = ctx.shape()
    if out_shape is None:
        return None
    dims = {d.dim + len(out_shape) - ctx.ndim(n) for n in inputs for d in [_vector(ctx, n)]}
    sizes = {_vector(ctx, n).size for n in inputs}
    if len(dims) != 1 or len(sizes) != 1:
        return None
    dim, size = dims.pop(), sizes.pop()
    if out_shape[dim] != size:
        return None
    for node in ctx.tensor_inputs():
        if node in inputs:
            continue
        shape = ctx.tensor_shape(node)
        own = dim - (len(out_shape) - len(shape))
        if own >= 0 and shape[own] != 1:  # a constant varying along the dim: cannot be sliced with it
            return None
    sources = tuple(dict.fromkeys(s for n in inputs for s in _vector(ctx, n).sources))
    return Derived(dim, size, sources)


def _moved(ctx: OpContext, value: Derived, handler: Handler) -> Derived | None:
    """Where a reshape, broadcast or basic index puts the varying dim (None: it is split or cut)."""
    out_shape, in_shape = ctx.shape(), ctx.shape(ctx.arg(0))
    if out_shape is None or in_shape is None:
        return None
    dim: int | None
    if handler is expand:
        dim = value.dim + len(out_shape) - len(in_shape)
    elif handler is getitem:
        index = ctx.arg(1)
        dim = index_dim(index if isinstance(index, tuple) else (index,), value.dim, len(in_shape))
    else:
        varying = [d for d, n in enumerate(out_shape) if n != 1]
        dim = varying[0] if len(varying) == 1 and _sized(ctx, varying[0]) else None
    if dim is None or not 0 <= dim < len(out_shape) or out_shape[dim] != value.size:
        return None
    return Derived(dim, value.size, value.sources)


def _sized(ctx: OpContext, dim: int) -> bool:
    """A traced ``view(1, 16, 1, 1)`` keeps 16 after slicing: only -1 or a computed size moves."""
    if ctx.state.capture.kind != "fx" or ctx.node.target not in ("view", "reshape", torch.reshape):
        return True  # export graphs hold literals for every size; compaction's check catches a real one
    rest = ctx.args[1:]
    sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    return len(sizes) != len(ctx.tensor_shape()) or not isinstance(sizes[dim], int) or sizes[dim] == -1
