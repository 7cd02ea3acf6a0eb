"""Rules for parameter-free ops that move channels without computing on them.

Reshape/view (with the literal-size checks), repeat_interleave, permute/transpose, concat, stack,
split/chunk, and indexing (getitem, slice, select). Element-wise ops (``expand`` among them, as a
broadcast), reductions, size reads and the graph output live in :mod:`autosparse.analysis.ops_tensor`.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx

from autosparse.analysis.context import OpContext
from autosparse.analysis.labels import Label, reshape_label
from autosparse.analysis.ops_tables import gather_rows, slice_rows
from autosparse.analysis.registry import Registry
from autosparse.analysis.reshape_sizes import size_terms, taken_apart
from autosparse.analysis.unionfind import FIXED
from autosparse.modules.surgery import has_fixer, head_count_attribute, head_layout

aten = torch.ops.aten


def _shape_args(ctx: OpContext) -> list:
    rest = ctx.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    return list(rest)


def reshape(ctx: OpContext) -> None:
    """view/reshape/flatten/unsqueeze/...: follow positions; a split fuses the inner factors.

    A size written as a literal in the code stays that literal after compaction, so a literal on
    the labelled output dim is only safe when compaction rewrites it (a head-count or width
    attribute of the module). Under torch.export every size is a literal, so there only the cases
    that would go wrong *silently* are refused: a literal group count in a split, and a literal
    channel count in a merge whose other sizes include -1 (``view(-1, C*H*W)``).
    """
    x, out_shape = ctx.arg(0), ctx.shape()
    label = ctx.label(x)
    if label is None or out_shape is None:
        return ctx.output(None)
    parts = tuple(d for d, n in enumerate(out_shape) if n > 1 and taken_apart(ctx.state.capture, ctx.node, d))
    new, split = reshape_label(ctx.elements, label, ctx.tensor_shape(x), out_shape, f"reshape at {ctx.where}", parts)
    if new is None:
        return ctx.output(None)
    sizes = _shape_args(ctx) if ctx.node.target in _SIZED else []
    literal = len(sizes) == len(out_shape) and isinstance(sizes[new.dim], int) and sizes[new.dim] != -1
    if literal and not split and _is_head_dim(ctx, sizes[new.dim]):  # export's view(B, N, -1, head_dim)
        ctx.block(new, f"a reshape that hard-codes the head size {sizes[new.dim]} on the channel dim")
        return ctx.output(None)
    clash = _kept_width(ctx, sizes[new.dim]) if literal and ctx.state.capture.kind == "export" else None
    if clash is not None:
        ctx.block(new, f"a reshape that hard-codes the size {sizes[new.dim]} of the channel dim, which is also "
                       f"'{clash}' (compaction does not change it)")
        return ctx.output(None)
    twin = _twin_size(ctx, sizes[new.dim], new.dim) if literal else None
    if twin is not None:
        ctx.block(new, f"a reshape whose channel dim has the literal size {sizes[new.dim]}, the head count (or "
                       f"width) compaction rewrites, but dim {twin} has that size too: under torch.export every "
                       "size is a literal, so which one the code reads from the module cannot be told; use "
                       "example inputs whose sizes (e.g. the sequence length) differ from the head count")
        return ctx.output(None)
    if literal and not _rewritable_size(ctx, sizes[new.dim]):
        exported = ctx.state.capture.kind == "export"
        kept_whole = not split and np.array_equal(new.ids, label.ids)  # view(-1, C): C maps 1:1
        # Exported literals that are still safe: the channel dim kept whole next to a -1 (Conv1D's
        # view(-1, C)), or merged with a broadcast dim without -1 (GQA's repeat_kv reshape).
        safe = (kept_whole and -1 in sizes) or (not kept_whole and -1 not in sizes)
        if split or not exported or not safe:
            ctx.block(new, f"a reshape that hard-codes the size {sizes[new.dim]} of the channel dim")
            return ctx.output(None)
    problem = _computed_size_problem(ctx, sizes, new) if len(sizes) == len(out_shape) else None
    if problem is not None:
        ctx.block(new, problem)
        return ctx.output(None)
    if split:
        ctx.state.head_elements.update(int(i) for i in new.ids)
    ctx.output(new)


def _computed_size_problem(ctx: OpContext, sizes: list, new: Label) -> str | None:
    """Why a size the traced forward computes would be wrong after compaction, or None.

    The channel dim's size must shrink with its channels: ``x.shape[d]`` of a tensor whose dim d
    carries the same classes does (or -1, or a literal compaction rewrites: checked by the caller);
    ``C`` read off the block's input does not (timm's ``reshape(B, N, C)`` after attention). Any other
    dim must keep its size, so it may not read a pruned dim or divide by a rewritten head count
    (XCiT's ``C // self.num_heads``)."""
    capture = ctx.state.capture
    for k, size in enumerate(sizes):
        if not isinstance(size, fx.Node):
            continue
        terms = size_terms(capture, size)
        if k == new.dim:
            if not _follows(ctx, terms, new):
                src = ", ".join(f"{t.name}.shape[{d}]" for t, d in terms.reads) or size.name
                return f"a reshape that takes the size of the channel dim from {src}, which does not shrink with it"
            continue
        heads = [n for n in terms.literals if _head_count(ctx, n)]
        pruned = [f"{t.name}.shape[{d}]" for t, d in terms.reads if _labelled_on(ctx, t, d)]
        if heads or pruned:
            what = f"the head count {heads[0]}" if heads else pruned[0]
            return f"a reshape whose size on dim {k} is computed from {what}, which compaction changes"
    return None


def _follows(ctx: OpContext, terms, new: Label) -> bool:
    """The size is one read of a labelled dim as long as ``new``'s; that they carry the same
    classes (and so shrink together) is checked once the walk has united everything."""
    if not terms.known or terms.literals or len(terms.reads) != 1:
        return False
    tensor, dim = terms.reads[0]
    found = ctx.label(tensor)
    if found is None or found.dim != dim or len(found.ids) != len(new.ids):
        return False
    why = f"a reshape that takes the size of the channel dim from {tensor.name}.shape[{dim}], whose " \
          f"channels are pruned differently, at {ctx.where}"
    ctx.state.same_size.append((new.ids, found.ids, why))
    return True


def _labelled_on(ctx: OpContext, tensor: fx.Node, dim: int) -> bool:
    found = ctx.label(tensor)
    return found is not None and found.dim == dim


_KEPT_WIDTHS = ("hidden_size", "embed_dim", "d_model")


def _kept_width(ctx: OpContext, value: int) -> str | None:
    """An exported literal equal to an attention module's model width as well as its head width
    (Hugging Face PvtV2's ``reshape(B, N, self.hidden_size)``): the graph cannot say which one the
    code reads, and the model width stays, so the heads must stay too."""
    module = _owner(ctx)
    if module is None or head_count_attribute(module, value) is None:
        return None
    return next((a for a in _KEPT_WIDTHS if getattr(module, a, None) == value), None)


def _twin_size(ctx: OpContext, value: int, dim: int) -> int | None:
    """Another output dim of an exported reshape whose size equals a channel-dim literal that is only
    trusted because it equals a head count compaction rewrites (``view(1, 4, 4, 16)`` with 4 heads
    and 4 tokens): the graph cannot say which of the two literals is ``self.num_heads``, so neither
    is trusted. fx keeps sizes read off tensors as nodes, so there a literal is the code's own."""
    module = _owner(ctx)
    if ctx.state.capture.kind != "export" or module is None or head_count_attribute(module, value) is None:
        return None
    return next((d for d, n in enumerate(ctx.tensor_shape()) if d != dim and n == value), None)


def _is_head_dim(ctx: OpContext, value: int) -> bool:
    """A single-head stage splits (B, N, C) into (B, N, 1, C): the channels land on the head-size
    dim one to one, and that size stays what the code says (the head count is what changes)."""
    module = _owner(ctx)
    layout = head_layout(module) if module is not None else None
    return layout is not None and layout[0] == value


def _head_count(ctx: OpContext, value: int) -> bool:
    module = _owner(ctx)
    return module is not None and value > 1 and head_count_attribute(module, value) is not None


def _owner(ctx: OpContext):
    """The innermost module whose forward holds the node, or None."""
    return ctx.owner()


def _rewritable_size(ctx: OpContext, count: int) -> bool:
    """A literal size is fine when it is an attribute compaction rewrites (``self.heads``)."""
    module = _owner(ctx)
    if module is None:
        return False
    if head_count_attribute(module, count) is not None:
        return True
    # A layer whose own forward shapes its output from a width attribute its fixer rewrites
    # (Hugging Face Conv1D: ``x.view(*shape[:-1], self.nf)``).
    return has_fixer(module) and any(getattr(module, a, None) == count for a in _WIDTH_ATTRS)


_WIDTH_ATTRS = ("nf", "out_features", "out_channels", "num_features", "embedding_dim")


_SIZED = {"view", "reshape", aten.view.default, aten.reshape.default, torch.reshape}


def repeat_interleave(ctx: OpContext) -> None:
    """``x.repeat_interleave(r, dim)`` (GQA key/value sharing): each position is repeated r times."""
    x, repeats, dim = ctx.arg(0), ctx.arg(1, "repeats"), ctx.arg(2, "dim")
    label = ctx.label(x)
    if label is None:
        return ctx.output(None)
    if not isinstance(repeats, int) or dim is None:
        ctx.block(label, "repeat_interleave with tensor repeats or no dim")
        return ctx.output(None)
    if int(dim) % ctx.ndim(x) != label.dim:
        return ctx.output(label)
    ctx.output(Label(label.dim, np.repeat(label.ids, repeats)))


def permute(ctx: OpContext) -> None:
    x = ctx.arg(0)
    label, ndim = ctx.label(x), ctx.ndim(x)
    if label is None:
        return ctx.output(None)
    target = ctx.node.target
    if target in ("transpose", aten.transpose.int, torch.transpose, "swapaxes"):
        a, b = ctx.arg(1) % ndim, ctx.arg(2) % ndim
        perm = list(range(ndim))
        perm[a], perm[b] = perm[b], perm[a]
    elif target in ("t", aten.t.default):
        perm = list(range(ndim))[::-1]
    else:
        perm = [int(d) % ndim for d in _shape_args(ctx)]
    ctx.output(label.moved(perm.index(label.dim)))


def cat(ctx: OpContext) -> None:
    """Concatenation: along the channel dim ids are laid end to end; elsewhere inputs unite."""
    if not isinstance(ctx.arg(0), (list, tuple)):  # e.g. cat(parts[::-1]): the list is a graph value
        found = ctx.state.env.get(ctx.arg(0))
        for lab in found if isinstance(found, list) else [found]:
            ctx.block(lab if isinstance(lab, Label) else None, "a concat of a computed sequence")
        return ctx.output(None)
    tensors = list(ctx.arg(0))
    out_shape = ctx.tensor_shape()
    dim = int(ctx.arg(1, "dim", 0)) % len(out_shape)
    labels = [ctx.label(t) for t in tensors]
    if any(lab is not None and lab.dim == dim for lab in labels):
        parts = [
            lab.ids if lab is not None and lab.dim == dim else np.full(ctx.tensor_shape(t)[dim], FIXED, np.int64)
            for t, lab in zip(tensors, labels)
        ]
        for lab in labels:
            if lab is not None and lab.dim != dim:
                ctx.block(lab, "a concat mixing channel dimensions")
        return ctx.output(Label(dim, np.concatenate(parts)))
    present = [lab for lab in labels if lab is not None]
    if not present:
        return ctx.output(None)
    if len({lab.dim for lab in present}) > 1 or len(present) != len(labels):
        for lab in present:
            ctx.block(lab, "a concat of channels with unlabelled or differently labelled tensors")
        return ctx.output(None)
    for lab in present[1:]:
        ctx.elements.union_arrays(present[0].ids, lab.ids)
    ctx.output(present[0])


def stack(ctx: OpContext) -> None:
    tensors, out_ndim = list(ctx.arg(0)), ctx.ndim()
    dim = int(ctx.arg(1, "dim", 0)) % out_ndim
    labels = [ctx.label(t) for t in tensors]
    present = [lab for lab in labels if lab is not None]
    if not present:
        return ctx.output(None)
    if len(present) != len(labels) or len({lab.dim for lab in present}) > 1:
        for lab in present:
            ctx.block(lab, "a stack of differently labelled tensors")
        return ctx.output(None)
    for lab in present[1:]:
        ctx.elements.union_arrays(present[0].ids, lab.ids)
    d = present[0].dim
    ctx.output(present[0].moved(d + 1 if d >= dim else d))


def split(ctx: OpContext) -> None:
    """split/chunk/unbind: equal parts of a channel dim must lose the same positions."""
    x = ctx.arg(0)
    label, shape = ctx.label(x), ctx.tensor_shape(x)
    outs = ctx.node.meta.get("val") or ctx.node.meta.get("tensor_meta")
    sizes = [int(o.shape[_split_dim(ctx, len(shape))]) for o in outs] if outs else []
    dim = _split_dim(ctx, len(shape))
    if label is None or not sizes:
        return ctx.output([None] * max(len(sizes), 1))
    if label.dim != dim:
        return ctx.output([label] * len(sizes))
    if len(set(sizes)) != 1:
        ctx.block(label, "a split into unequal parts along the channel dim")
        return ctx.output([None] * len(sizes))
    literal = ctx.node.target in _SIZE_SPLITS and isinstance(ctx.arg(1), (int, list, tuple))
    if literal and not _rewritable_size(ctx, sizes[0]):  # exported chunk stays aten.chunk
        ctx.block(label, f"a split that hard-codes the part size {sizes[0]} (use chunk)")
        return ctx.output([None] * len(sizes))
    parts = label.ids.reshape(len(sizes), sizes[0])
    for part in parts[1:]:
        ctx.elements.union_arrays(parts[0], part)
    ctx.output([Label(dim, part.copy()) for part in parts])


def unbind(ctx: OpContext) -> None:
    """``x.unbind(dim)``: one output per position of ``dim``, which disappears from each."""
    x = ctx.arg(0)
    label, shape = ctx.label(x), ctx.tensor_shape(x)
    dim = int(ctx.arg(1, "dim", 0)) % len(shape)
    if label is None:
        return ctx.output([None] * shape[dim])
    if label.dim == dim:  # fewer channels would mean fewer outputs than the code unpacks
        ctx.block(label, "unbinding the channel dim (one output per channel)")
        return ctx.output([None] * shape[dim])
    ctx.output([label.moved(label.dim - (dim < label.dim))] * shape[dim])


_SIZE_SPLITS = {"split", torch.split, aten.split.Tensor, aten.split_with_sizes.default,
                aten.unsafe_split.Tensor}


def _split_dim(ctx: OpContext, ndim: int) -> int:
    return int(ctx.arg(2, "dim", 0)) % ndim


def getitem(ctx: OpContext) -> None:
    """Pick from a tuple output, or index a tensor (only full slices of the channel dim are safe)."""
    source, index = ctx.arg(0), ctx.arg(1)
    found = ctx.state.env.get(source)
    if isinstance(found, list):
        if isinstance(index, slice):  # parts[::-1]: still a sequence of labels
            return ctx.output(found[index])
        return ctx.output(found[index] if isinstance(index, int) and index < len(found) else None)
    if isinstance(index, fx.Node) and ctx.ndim(source) == 2:  # table[idx]: rows picked by a tensor
        return gather_rows(ctx)
    label = ctx.label(source)
    if label is None or ctx.shape() is None:
        return ctx.output(None)
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (fx.Node, list)) for i in items):  # advanced indexing moves dims around
        ctx.block(label, "advanced (tensor) indexing")
        return ctx.output(None)
    out_dim = index_dim(index if isinstance(index, tuple) else (index,), label.dim, ctx.ndim(source))
    if out_dim is None:
        ctx.block(label, "indexing into the channel dim")
    ctx.output(None if out_dim is None else label.moved(out_dim))


def index_dim(index: tuple, dim: int, ndim: int) -> int | None:
    """Where input dim ``dim`` lands after basic indexing, or None if it is indexed."""
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    src = out = 0
    for item in index:
        if item is Ellipsis:
            skip = ndim - consumed
            if src <= dim < src + skip:
                return out + dim - src
            src, out = src + skip, out + skip
        elif item is None:
            out += 1
        elif isinstance(item, slice) and item == slice(None):
            if src == dim:
                return out
            src, out = src + 1, out + 1
        elif src == dim:
            return None
        else:
            src, out = src + 1, out + (0 if isinstance(item, int) else 1)
    return out + dim - src if dim >= src else None


def slice_op(ctx: OpContext) -> None:
    x = ctx.arg(0)
    label = ctx.label(x)
    if label is None:
        return None if slice_rows(ctx) else ctx.output(None)
    shape = ctx.tensor_shape(x)
    if int(ctx.arg(1, "dim", 0)) % len(shape) == label.dim and ctx.tensor_shape()[label.dim] != shape[label.dim]:
        ctx.block(label, "slicing part of the channel dim")
        return ctx.output(None)
    ctx.output(label)


def select(ctx: OpContext) -> None:
    x = ctx.arg(0)
    label = ctx.label(x)
    if label is None:
        return ctx.output(None)
    dim = int(ctx.arg(1)) % ctx.ndim(x)
    if dim == label.dim:
        ctx.block(label, "selecting one position of the channel dim")
        return ctx.output(None)
    ctx.output(label.moved(label.dim - (dim < label.dim)))


def register(rules: Registry) -> None:
    rules.register(
        ["view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
         torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten,
         aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
         aten.unsqueeze, torch.nn.Flatten, torch.nn.Unflatten], reshape)
    rules.register(["repeat_interleave", torch.repeat_interleave, aten.repeat_interleave], repeat_interleave)
    rules.register(["permute", "transpose", "t", "swapaxes", torch.permute, torch.transpose,
                    aten.permute, aten.transpose, aten.t], permute)
    rules.register([torch.cat, torch.concat, aten.cat, aten.concat], cat)
    rules.register([torch.stack, aten.stack], stack)
    rules.register(["split", "chunk", torch.split, torch.chunk, aten.split, aten.split_with_sizes,
                    aten.chunk, aten.unsafe_split], split)
    rules.register(["unbind", torch.unbind, aten.unbind], unbind)
    rules.register(operator.getitem, getitem)
    rules.register([aten.slice, aten.narrow, "narrow", torch.narrow], slice_op)
    rules.register([aten.select, "select", torch.select], select)
