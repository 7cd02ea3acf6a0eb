"""Rules for ops with weights (conv, linear, embedding, norms) and for activation contractions."""

from __future__ import annotations

import operator
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autosparse.analysis.context import OpContext, Role
from autosparse.analysis.labels import Label
from autosparse.analysis.registry import Registry, RuleKey
from autosparse.analysis.unionfind import FIXED
from autosparse.analysis.weights import groups_rewritten, transposed_parameter

aten = torch.ops.aten


def _param(ctx: OpContext, value, attr: str | None = None) -> str | None:
    if attr is not None and ctx.module() is not None:
        return ctx.module_param(attr)
    return ctx.tensor_name(value)


def _slices(ctx: OpContext, value, dim: int = 0) -> list[tuple[str, int]] | None:
    """The (tensor, dim) slices that cut ``value`` along ``dim``: a module's tensor name, or a graph
    node (a parameter, or a vector derived from some); None for a computed tensor nothing can cut."""
    if value is None:
        return []
    if isinstance(value, str):
        return [(value, dim)]
    return ctx.sources(value, dim)


def _input_ids(ctx: OpContext, x, dim: int) -> np.ndarray | None:
    label = ctx.label(x)
    if label is None:
        return None
    if label.dim != dim % ctx.ndim(x):
        ctx.block(label, "a weighted op reading channels on an unexpected dimension")
        return None
    return label.ids


def contraction(ctx: OpContext, x, weight: str | None, bias, *, in_dim: int,
                out_dim: int, x_dim: int, y_dim: int, n_out: int) -> None:
    """A weight that reads features on ``x_dim`` of x and writes ``n_out`` new ones on ``y_dim``.

    ``bias`` is a tensor name, a graph node or None (see :func:`_slices`).
    """
    ids = _input_ids(ctx, x, x_dim)
    if weight is None:  # weight computed on the fly: cannot slice, so nothing here is prunable
        if ids is not None:
            ctx.elements.block(ids, f"a contraction with a computed weight at {ctx.where}")
        ctx.state.refused.setdefault(ctx.owner_name(), f"its weight is computed in forward (e.g. weight "
                                     f"standardisation) at {ctx.where}; a computed weight cannot be sliced, "
                                     "so its output channels are kept")
        return ctx.output(None)
    x_shape = ctx.shape(x)
    if ids is None and x_shape is not None:
        # Features autosparse cannot slice (a model input, a blocked op): recorded as fixed, so a
        # weight shared with a prunable input (packed attention projections) stays whole there.
        ids = ctx.new(x_shape[x_dim])
        ctx.elements.block(ids, f"'{weight}' also reads an input autosparse cannot slice at {ctx.where}")
    if ids is not None:
        ctx.member(weight, in_dim, ids, Role.CONSUMER)
    out = ctx.new(n_out)
    ctx.member(weight, out_dim, out, Role.PRODUCER)
    _bias_members(ctx, bias, out)
    ctx.output(Label(y_dim % ctx.ndim(), out))


def _bias_members(ctx: OpContext, bias, out: np.ndarray) -> None:
    """The bias follows the new features; a computed one (nothing to slice) keeps them whole."""
    parts = _slices(ctx, bias)
    if parts is None:
        ctx.elements.block(out, f"a computed bias (autosparse cannot slice it) at {ctx.where}")
        return
    own = isinstance(bias, str) or ctx.tensor_name(bias) is not None
    for name, dim in parts:
        ctx.member(name, dim, out, Role.PRODUCER if own else Role.FOLLOWER)


def grouped_conv(ctx: OpContext, x, weight: str | None, bias: str | None, groups: int, n_out: int) -> None:
    """Grouped/depthwise conv: a unit is a whole group (its input and output channels together)."""
    ids = _input_ids(ctx, x, 1)
    n_in = ctx.tensor_shape(x)[1]
    ids = np.full(n_in, FIXED, np.int64) if ids is None else ids
    out = ctx.new(n_out)
    ctx.elements.fuse_rows(np.concatenate([ids.reshape(groups, -1), out.reshape(groups, -1)], axis=1))
    ctx.member(weight, 0, out, Role.PRODUCER)
    _bias_members(ctx, bias, out)
    ctx.output(Label(1, out))


def conv_module(ctx: OpContext) -> None:
    conv = cast(nn.modules.conv._ConvNd, ctx.module())  # registered for conv module classes only
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    _conv(ctx, ctx.arg(0), _param(ctx, None, "weight"), _param(ctx, None, "bias"), conv.groups,
          transposed, conv.out_channels)


def conv_function(ctx: OpContext) -> None:
    """aten.conv2d / F.conv2d (x, w, b, stride, padding, dilation, groups) and aten.convolution."""
    x, w, b = ctx.arg(0), ctx.arg(1), ctx.arg(2, "bias")
    target = ctx.node.target
    transposed = "transpose" in str(target)
    if target in (aten.convolution.default, aten._convolution.default):
        transposed, groups = bool(ctx.arg(6)), int(ctx.arg(8))
    elif transposed:
        groups = int(ctx.arg(6, "groups", 1))
    else:
        groups = ctx.arg(6, "groups", 1)
    if not isinstance(groups, int):  # a count the forward computes: nothing says it shrinks with the channels
        ctx.block_inputs(f"a functional convolution whose group count is computed ({groups})")
        return ctx.output(None)
    _conv(ctx, x, ctx.tensor_name(w), b, groups, transposed, ctx.tensor_shape()[1])
    if groups > 1 and not groups_rewritten(ctx, groups):
        ctx.block(ctx.label(ctx.node), f"a functional grouped convolution whose group count {groups} is a "
                  "number in the code that compaction does not rewrite (register a fixer for its module in "
                  "autosparse.modules.surgery.FIXERS)")


def _conv(ctx, x, weight, bias, groups: int, transposed: bool, n_out: int) -> None:
    if groups == 1:
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        return contraction(ctx, x, weight, bias, in_dim=in_dim, out_dim=out_dim, x_dim=1, y_dim=1,
                           n_out=n_out)
    if transposed:
        ctx.block_inputs("a grouped transposed convolution")
        return ctx.output(None)
    grouped_conv(ctx, x, weight, bias, groups, n_out)


def linear_module(ctx: OpContext) -> None:
    _linear(ctx, ctx.arg(0), _param(ctx, None, "weight"), _param(ctx, None, "bias"))


def linear_function(ctx: OpContext) -> None:
    _linear(ctx, ctx.arg(0), ctx.tensor_name(ctx.arg(1, "weight")), ctx.arg(2, "bias"))  # timm passes weight=...


def _linear(ctx: OpContext, x, weight, bias) -> None:
    contraction(ctx, x, weight, bias, in_dim=1, out_dim=0, x_dim=-1, y_dim=-1, n_out=ctx.tensor_shape()[-1])


def addmm(ctx: OpContext) -> None:
    """bias + x @ W with W a (in, out) parameter (Hugging Face Conv1D)."""
    bias, x, w = ctx.arg(0), ctx.arg(1), ctx.arg(2)
    if ctx.tensor_name(w) is None:
        return matmul(ctx, operands=(x, w))
    contraction(ctx, x, ctx.tensor_name(w), bias, in_dim=0, out_dim=1, x_dim=-1,
                y_dim=-1, n_out=ctx.tensor_shape()[-1])


def matmul(ctx: OpContext, operands=None) -> None:
    """a @ b. With a 2-D parameter b it is a contraction; between activations, batch dims unite."""
    a, b = operands or (ctx.arg(0), ctx.arg(1))
    if ctx.tensor_name(b) is not None and ctx.ndim(b) == 2:
        return contraction(ctx, a, ctx.tensor_name(b), None, in_dim=0, out_dim=1, x_dim=-1, y_dim=-1,
                           n_out=ctx.tensor_shape()[-1])
    stored = transposed_parameter(ctx, b)
    if stored is not None:  # x @ self.weight.T (Falcon's FalconLinear): an nn.Linear-shaped weight
        return contraction(ctx, a, stored, None, in_dim=1, out_dim=0, x_dim=-1, y_dim=-1,
                           n_out=ctx.tensor_shape()[-1])
    _attention_like(ctx, [(a, "row"), (b, "col")], ctx.ndim())


def _attention_like(ctx: OpContext, operands, out_ndim: int) -> None:
    """Map each operand's label to the output: batch dims and free dims pass, contracted ones block."""
    found: list[Label] = []
    for node, role in operands:
        label, ndim = ctx.label(node), ctx.ndim(node)
        if label is None:
            continue
        if ndim < 2:
            ctx.block(label, "a vector contraction")
            continue
        rel = label.dim - ndim
        if rel < -2:  # batch dim, right-aligned against the output
            found.append(label.moved(out_ndim + rel))
        elif (role == "row" and rel == -2) or (role == "col" and rel == -1):
            found.append(label.moved(out_ndim + rel))
        else:
            ctx.block(label, "a contraction over the channel dim between activations")
    _merge_into_output(ctx, found)


def _merge_into_output(ctx: OpContext, found: list[Label]) -> None:
    if not found:
        return ctx.output(None)
    if len({lab.dim for lab in found}) > 1:
        for lab in found:
            ctx.block(lab, "an attention/matmul whose output would carry two channel dims")
        return ctx.output(None)
    first = found[0]
    for lab in found[1:]:
        ids = lab.ids
        if len(ids) != len(first.ids):  # grouped-query attention: kv heads shared by query groups
            if len(first.ids) % len(ids):
                ctx.block(lab, "mismatched head counts")
                continue
            ids = np.repeat(ids, len(first.ids) // len(ids))
        ctx.elements.union_arrays(first.ids, ids)
    ctx.output(first)


def sdpa(ctx: OpContext) -> None:
    """softmax(q k^T) v: heads (batch dims) of q, k, v unite; q rows and v columns pass."""
    q, k, v = ctx.arg(0), ctx.arg(1), ctx.arg(2)
    out_ndim = ctx.ndim()
    found: list[Label] = []
    for node, free in ((q, -2), (k, None), (v, -1)):
        label, ndim = ctx.label(node), ctx.ndim(node)
        if label is None:
            continue
        rel = label.dim - ndim
        if rel < -2 or rel == free:
            found.append(label.moved(out_ndim + rel))
        else:
            ctx.block(label, "attention contracting over the channel dim")
    mask = ctx.arg(3, "attn_mask")
    if ctx.label(mask) is not None:
        ctx.block(ctx.label(mask), "an attention mask")
    _merge_into_output(ctx, found)


def embedding_module(ctx: OpContext) -> None:
    _embedding(ctx, _param(ctx, None, "weight"))


def embedding_function(ctx: OpContext) -> None:
    weight = ctx.arg(0) if ctx.node.target is aten.embedding.default else ctx.arg(1)
    _embedding(ctx, ctx.tensor_name(weight))


def _embedding(ctx: OpContext, weight: str | None) -> None:
    out = ctx.new(ctx.tensor_shape()[-1])
    ctx.member(weight, 1, out, Role.PRODUCER)
    ctx.output(Label(ctx.ndim() - 1, out))


def _channel_followers(ctx: OpContext, x, values: list) -> None:
    """An op acting per channel (dim 1) whose vectors (scale, shift, stats) follow the channels.

    ``values`` are tensor names or graph nodes (see :func:`_slices`).
    """
    ids = _input_ids(ctx, x, 1)
    if ids is None:
        return ctx.output(None)
    ctx.output(Label(1, ids) if _followers(ctx, ids, values) else None)


def _followers(ctx: OpContext, ids: np.ndarray, values: list) -> bool:
    """Record per-channel vectors as followers of ``ids``; False (channels blocked) if one is a
    computed tensor that nothing can slice (it would keep its full size after compaction)."""
    parts = [_slices(ctx, v) for v in values]
    sliced = [p for p in parts if p is not None]
    if len(sliced) < len(parts):
        ctx.block(Label(1, ids), "a per-channel vector computed in the forward (autosparse cannot slice it)")
        return False
    for name, dim in (pair for p in sliced for pair in p):
        ctx.member(name, dim, ids, Role.FOLLOWER)
    return True


def batch_norm_module(ctx: OpContext) -> None:
    names = [_param(ctx, None, a) for a in ("weight", "bias", "running_mean", "running_var")]
    _channel_followers(ctx, ctx.arg(0), names)


_BN_ARGS = ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))  # aten order
_F_BN_ARGS = ((3, "weight"), (4, "bias"), (1, "running_mean"), (2, "running_var"))  # F.batch_norm


def batch_norm_function(ctx: OpContext) -> None:
    """F.batch_norm / aten batch norms; a traced forward passes weight and bias by keyword."""
    target = ctx.node.target
    order = _F_BN_ARGS if target is F.batch_norm else _BN_ARGS
    _channel_followers(ctx, ctx.arg(0), [ctx.arg(i, name) for i, name in order])
    if "legit" in str(target):  # returns (out, save_mean, save_invstd)
        ctx.output([ctx.state.env.get(ctx.node), None, None])


def group_norm(ctx: OpContext) -> None:
    """GroupNorm: removing whole norm groups is exact, so a unit is one norm group."""
    module = ctx.module()
    if module is not None:
        groups = cast(nn.GroupNorm, module).num_groups  # the only module class with this rule
        values = [_param(ctx, None, "weight"), _param(ctx, None, "bias")]
    else:
        groups = int(ctx.arg(1, "num_groups"))
        values = [ctx.arg(2, "weight"), ctx.arg(3, "bias")]
    ids = _input_ids(ctx, ctx.arg(0), 1)
    if ids is None:
        return ctx.output(None)
    if groups == 1:
        ctx.block(Label(1, ids), "GroupNorm with one group (normalises every channel together)")
        return ctx.output(None)
    ctx.elements.fuse_rows(ids.reshape(groups, -1))
    ctx.output(Label(1, ids) if _followers(ctx, ids, values) else None)


def layer_norm(ctx: OpContext) -> None:
    """LayerNorm/RMSNorm over trailing dims: channels normalised together cannot be removed."""
    module = ctx.module()
    if module is not None:
        count = len(cast(nn.LayerNorm | nn.RMSNorm, module).normalized_shape)
    else:
        count = len(ctx.arg(1))
    x = ctx.arg(0)
    label = ctx.label(x)
    if label is not None and label.dim >= ctx.ndim(x) - count:
        ctx.block(label, "normalised together (LayerNorm/RMSNorm over the channels)")
        return ctx.output(None)
    ctx.output(label)


def spatial(ctx: OpContext) -> None:
    """Pooling, upsampling, padding over the trailing spatial dims: channel dim 1 passes."""
    x = ctx.arg(0)
    label = ctx.label(x)
    out = ctx.node.meta.get("val", ctx.node.meta.get("tensor_meta"))
    out = out[0] if isinstance(out, (list, tuple)) and not hasattr(out, "shape") else out
    if label is not None and (label.dim != 1 or getattr(out, "shape", [0, -1])[1] != len(label.ids)
                              or ctx.ndim(x) < 3):  # (B, F) input: torch treats F as the spatial dim
        ctx.block(label, "a spatial op over the channel dim")
        label = None
    if isinstance(ctx.node.meta.get("val"), (tuple, list)):
        return ctx.output([label, None])
    ctx.output(label)


def pixel_shuffle(ctx: OpContext) -> None:
    x = ctx.arg(0)
    ids = _input_ids(ctx, x, 1)
    if ids is None:
        return ctx.output(None)
    block = ctx.tensor_shape(x)[1] // ctx.tensor_shape()[1]
    rows = ids.reshape(-1, block)
    ctx.elements.fuse_rows(rows)
    ctx.output(Label(1, rows[:, 0].copy()))


def pixel_unshuffle(ctx: OpContext) -> None:
    x = ctx.arg(0)
    ids = _input_ids(ctx, x, 1)
    if ids is None:
        return ctx.output(None)
    ctx.output(Label(1, np.repeat(ids, ctx.tensor_shape()[1] // ctx.tensor_shape(x)[1])))


def identity_module(ctx: OpContext) -> None:
    ctx.output(ctx.label(ctx.arg(0)))


def prelu(ctx: OpContext) -> None:
    """nn.PReLU / F.prelu(x, weight): a weight of one value per channel follows the channels."""
    module = ctx.module()
    if module is not None:
        weight, count = _param(ctx, None, "weight"), cast(nn.PReLU, module).num_parameters
    else:
        weight = ctx.arg(1, "weight")
        count = int(np.prod(ctx.shape(weight) or (1,)))
    if count > 1:
        return _channel_followers(ctx, ctx.arg(0), [weight])
    ctx.output(ctx.label(ctx.arg(0)))


def softmax_module(ctx: OpContext) -> None:
    x, dim = ctx.arg(0), cast(nn.Softmax, ctx.module()).dim  # registered for nn.Softmax only
    label = ctx.label(x)
    if label is not None and (dim is None or dim % ctx.ndim(x) == label.dim):
        ctx.block(label, "softmax across the channel dim")
        return ctx.output(None)
    ctx.output(label)


_ACTIVATIONS = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.ELU, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
]
_SPATIAL_MODULES: list[RuleKey] = [
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
]
_SPATIAL_FUNCS: list[RuleKey] = [
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.interpolate, F.pad, aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d,
    aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d, aten.max_pool2d_with_indices,
    aten.adaptive_max_pool2d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
    aten.upsample_nearest1d, aten.upsample_linear1d, aten.upsample_bicubic2d, aten.upsample_nearest3d,
    aten._upsample_nearest_exact2d, aten.pad, aten.constant_pad_nd, aten.reflection_pad2d,
    aten.replication_pad2d,
]


def register(rules: Registry) -> None:
    rules.register([nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                    nn.ConvTranspose3d], conv_module)
    rules.register([F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                    F.conv_transpose3d, aten.conv1d, aten.conv2d, aten.conv3d,
                    aten.convolution, aten._convolution, aten.conv_transpose1d, aten.conv_transpose2d,
                    aten.conv_transpose3d], conv_function)
    rules.register(nn.Linear, linear_module)
    rules.register([F.linear, aten.linear], linear_function)
    rules.register([torch.addmm, aten.addmm], addmm)
    rules.register([torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm", aten.matmul,
                    aten.bmm, aten.mm], matmul)
    rules.register([F.scaled_dot_product_attention, aten.scaled_dot_product_attention], sdpa)
    rules.register(nn.Embedding, embedding_module)
    rules.register([F.embedding, aten.embedding], embedding_function)
    rules.register([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm], batch_norm_module)
    rules.register([F.batch_norm, aten.batch_norm, aten._native_batch_norm_legit_no_training,
                    aten._native_batch_norm_legit_functional, aten.native_batch_norm],
                   batch_norm_function)
    rules.register([nn.GroupNorm, F.group_norm, aten.group_norm], group_norm)
    rules.register([nn.LayerNorm, nn.RMSNorm, F.layer_norm, F.rms_norm, aten.layer_norm,
                    aten.rms_norm], layer_norm)
    rules.register(_SPATIAL_MODULES + _SPATIAL_FUNCS, spatial)
    rules.register([nn.PixelShuffle, F.pixel_shuffle, aten.pixel_shuffle], pixel_shuffle)
    rules.register([nn.PixelUnshuffle, F.pixel_unshuffle, aten.pixel_unshuffle], pixel_unshuffle)
    rules.register(_ACTIVATIONS, identity_module)
    rules.register([nn.PReLU, F.prelu, aten.prelu, aten._prelu_kernel], prelu)
    rules.register(nn.Softmax, softmax_module)
