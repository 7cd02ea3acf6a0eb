"""Rules for parameter-free ops that compute on values: element-wise ops, reductions, size reads.

Also ``expand`` (a broadcast, aligned like an element-wise operand), runtime metadata checks,
attribute reads and the graph output. Ops that only move channels around (reshape, permute,
concat/split, indexing) live in :mod:`autosparse.analysis.ops_shape`.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from autosparse.analysis.context import OpContext, Role
from autosparse.analysis.labels import Label
from autosparse.analysis.registry import Registry, RuleKey

aten = torch.ops.aten


def _align(ctx: OpContext, node: fx.Node, out_ndim: int) -> Label | None:
    label = ctx.label(node)
    if label is None:
        return None
    return label.moved(label.dim + out_ndim - ctx.ndim(node))


def pointwise(ctx: OpContext) -> None:
    """Broadcasting element-wise ops: labelled inputs unite; sliceable tensors follow; others fuse."""
    out_shape = ctx.shape()
    inputs = ctx.tensor_inputs()
    if out_shape is None:
        ctx.block_inputs("a non-tensor result")
        return ctx.output(None)
    labels = []
    for lab in (_align(ctx, n, len(out_shape)) for n in inputs):
        if lab is not None and len(lab.ids) != out_shape[lab.dim]:  # one channel broadcast over many
            ctx.block(lab, "a single channel broadcast over a channel dim")
        elif lab is not None:
            labels.append(lab)
    if not labels:
        return ctx.output(None)
    if len({lab.dim for lab in labels}) > 1:
        for lab in labels:
            ctx.block(lab, "an element-wise op mixing channels of different dimensions")
        return ctx.output(None)
    dim, ids = labels[0].dim, labels[0].ids
    for lab in labels[1:]:
        ctx.elements.union_arrays(ids, lab.ids)
    for node in inputs:
        if ctx.label(node) is not None:
            continue
        shape = ctx.tensor_shape(node)
        own = dim - (len(out_shape) - len(shape))
        if own < 0 or shape[own] == 1:
            continue  # broadcast along the channel dim: the same value for every channel
        parts = ctx.sources(node, own)  # a parameter, or a vector derived from some (frozen BN)
        if parts is not None:
            for name, dim_of_name in parts:
                ctx.member(name, dim_of_name, ids, Role.FOLLOWER)
        else:
            ctx.block(labels[0], f"an element-wise op with '{node.name}', a tensor autosparse cannot slice")
    ctx.output(Label(dim, ids))


def expand(ctx: OpContext) -> None:
    """``x.expand(...)``: a broadcast, so the label is aligned from the right like an element-wise operand."""
    out_shape = ctx.shape()
    ctx.output(_align(ctx, ctx.arg(0), len(out_shape)) if out_shape else None)


def reduction(ctx: OpContext) -> None:
    """sum/mean/amax/var/...: reducing over channels makes them unprunable; others shift."""
    _reduce(ctx, ctx.arg(1, "dim", None))


def _reduce(ctx: OpContext, dims) -> None:
    x = ctx.arg(0)
    label, ndim = ctx.label(x), ctx.ndim(x)
    if label is None:
        return ctx.output(None)
    dims = list(range(ndim)) if dims is None or dims == [] else [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(int(d) % ndim for d in dims)
    if label.dim in dims:
        if ctx.state.reaches_output(ctx.node):  # a discarded reduction runs fine on fewer channels
            ctx.block(label, f"a reduction ({_name(ctx)}) over the channel dim")
        return ctx.output(None)
    keep = ctx.ndim() == ndim
    ctx.output(label if keep else label.moved(label.dim - sum(d < label.dim for d in dims)))


def norm(ctx: OpContext) -> None:
    """``x.norm(p, dim, keepdim)`` / ``linalg_vector_norm(x, ord, dim, keepdim)``: dim is argument 2."""
    _reduce(ctx, ctx.arg(2, "dim", None))


def along_dim(ctx: OpContext) -> None:
    """softmax/cumsum/...: an op that mixes positions along one dim given as argument 1."""
    x = ctx.arg(0)
    label = ctx.label(x)
    if label is not None and int(ctx.arg(1, "dim", -1)) % ctx.ndim(x) == label.dim:
        ctx.block(label, f"{_name(ctx)} across the channel dim")
        return ctx.output(None)
    ctx.output(label)


def size(ctx: OpContext) -> None:
    """Reading a channel count is safe only where it feeds shapes (views), not arithmetic on values."""
    x = ctx.arg(0)
    label = ctx.label(x)
    dim = ctx.arg(1, "dim") if ctx.node.target != getattr else None
    if isinstance(dim, int) and label is not None and dim % ctx.ndim(x) != label.dim:
        return ctx.output(None)  # the size of another dim does not change
    if label is not None and not _feeds_only_shapes(ctx.node, None if dim is not None else (label.dim, ctx.ndim(x))):
        ctx.block(label, "its size is used in a computation")
    ctx.output(None)


_SHAPE_USERS = {"view", "reshape", "expand", "repeat", "flatten", "new_zeros", "new_ones", "new_empty"}


def _feeds_only_shapes(node: fx.Node, channel: tuple[int, int] | None = None, depth: int = 0) -> bool:
    """Whether a size read only shapes views. ``channel`` = (label dim, ndim) when ``node`` is a
    whole ``x.shape``: picking other dims out of it (``x.shape[-2:]`` for an interpolate) is safe."""
    for user in node.users:
        if user.op == "call_method" and user.target in _SHAPE_USERS and user.args[0] is not node:
            continue
        if channel is not None and user.target is operator.getitem and not _picks(user.args[1], *channel):
            continue
        if user.target in (operator.getitem, operator.floordiv, operator.mul) and depth < 4:
            if _feeds_only_shapes(user, None, depth + 1):
                continue
        if user.target in (torch.reshape,) and user.args[0] is not node:
            continue
        return False
    return True


def _picks(index: object, dim: int, ndim: int) -> bool:
    """Whether ``shape[index]`` includes position ``dim`` (unknown index kinds: assume it does)."""
    if isinstance(index, int):
        return index % ndim == dim
    if isinstance(index, slice) and all(v is None or isinstance(v, int) for v in (index.start, index.stop, index.step)):
        return dim in range(ndim)[index]
    return True


def no_op(ctx: OpContext) -> None:
    """Runtime metadata checks of an exported graph: they compute nothing."""
    ctx.output(None)


def getattr_rule(ctx: OpContext) -> None:
    """``x.shape`` in a traced forward behaves like ``x.size()``; other attributes are unknown."""
    if ctx.arg(1) in ("shape",):
        return size(ctx)
    if ctx.arg(1) in ("dtype", "device", "ndim", "is_cuda", "requires_grad"):
        return ctx.output(None)
    ctx.block_inputs(f"attribute '{ctx.arg(1)}' read in the forward")
    ctx.output(None)


def output(ctx: OpContext) -> None:
    flat: list = []
    fx.node.map_arg(ctx.args, flat.append)
    for node in flat:
        found = ctx.state.env.get(node)
        for lab in found if isinstance(found, list) else [found]:
            if isinstance(lab, Label):
                ctx.elements.block(lab.ids, "channels reach the model's outputs")
    ctx.output(None)


def _name(ctx: OpContext) -> str:
    target = ctx.node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


_POINTWISE_FUNCS: list[RuleKey] = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.exp, torch.log,
    torch.sqrt, torch.rsqrt, torch.abs, torch.clamp, torch.where, torch.maximum, torch.minimum,
    torch.sin, torch.cos, torch.tanh, torch.sigmoid, torch.relu, torch.erf, torch.square,
    torch.reciprocal, torch.log1p, torch.expm1, torch.sign,
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu,
    F.elu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
]
_POINTWISE_METHODS: list[RuleKey] = [
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sqrt", "rsqrt", "abs", "clamp",
    "sigmoid", "tanh", "relu", "add_", "mul_", "sub_", "div_", "relu_", "sigmoid_", "masked_fill",
    "float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous", "clone", "detach",
    "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__",
    "square", "reciprocal", "clamp_min", "clamp_max", "sin", "cos", "erf", "log1p", "expm1", "sign",
    "maximum", "minimum", "exp_", "clamp_", "tanh_", "square_",
]
_IDENTITY_ATEN = [
    aten.dropout, aten.alias, aten.clone, aten.contiguous, aten.to, aten._to_copy, aten.detach,
    aten.lift_fresh_copy, aten.type_as, aten.feature_dropout, aten.native_dropout,
]


def register(rules: Registry) -> None:
    rules.register(_POINTWISE_FUNCS + _POINTWISE_METHODS, pointwise)
    rules.register(_IDENTITY_ATEN, pointwise)
    rules.register(["expand", "expand_as", aten.expand, aten.expand_as], expand)
    rules.register(["norm", torch.norm, aten.norm, aten.linalg_vector_norm], norm)
    rules.register(["sum", "mean", "amax", "amin", "var", "std", "prod", "logsumexp",
                    torch.sum, torch.mean, torch.amax, torch.amin, torch.var, torch.std,
                    aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.prod,
                    aten.logsumexp], reduction)
    rules.register(["softmax", "log_softmax", "cumsum", torch.softmax, torch.log_softmax, F.softmax,
                    F.log_softmax, torch.cumsum, aten._softmax, aten.softmax, aten._log_softmax,
                    aten.log_softmax, aten.cumsum], along_dim)
    rules.register(["size", aten.sym_size], size)
    rules.register(getattr, getattr_rule)
    rules.register([aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size],
                   no_op)
