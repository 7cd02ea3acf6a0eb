"""Rules for tables read by rows: relative-position bias tables, whose columns are attention heads.

``table[index]`` (an index tensor picks rows) and ``table[a:b]`` keep each column where it is, so a
2-D parameter read that way gets one element per column, which follows whatever the result meets:
added to attention scores, the columns unite with the heads and are sliced with them (timm's Swin,
Hugging Face BEiT, which also interpolates part of the table and concatenates the rest).
"""

from __future__ import annotations

import torch
from torch import fx

from autosparse.analysis.context import OpContext, Role
from autosparse.analysis.labels import Label
from autosparse.analysis.registry import Registry

aten = torch.ops.aten


def columns(ctx: OpContext, table) -> Label | None:
    """The label of ``table``'s columns: its own, or fresh elements for a 2-D parameter."""
    label = ctx.label(table)
    if label is not None:
        return label
    name = ctx.tensor_name(table)
    if name is None or ctx.ndim(table) != 2:
        return None
    ids = ctx.new(ctx.tensor_shape(table)[1])
    ctx.member(name, 1, ids, Role.FOLLOWER)
    return Label(1, ids)


def gather_rows(ctx: OpContext) -> None:
    """``table[idx]`` / ``aten.index(table, [idx])`` of a 2-D table by one unlabelled index tensor:
    the output is ``idx.shape + (columns,)``, the columns last."""
    table, index = ctx.arg(0), ctx.arg(1)
    idx = index[0] if isinstance(index, (list, tuple)) and len(index) == 1 else index
    by_rows = isinstance(idx, fx.Node) and ctx.label(idx) is None and ctx.ndim(table) == 2
    label = columns(ctx, table) if by_rows else ctx.label(table)
    if not by_rows or label is None or label.dim != 1:
        ctx.block_inputs("advanced indexing")
        return ctx.output(None)
    ctx.output(Label(ctx.ndim() - 1, label.ids))


def slice_rows(ctx: OpContext) -> bool:
    """``table[a:b]`` of an unlabelled 2-D parameter: label its columns. False if it is not one."""
    table = ctx.arg(0)
    if ctx.label(table) is not None or ctx.ndim(table) != 2 or int(ctx.arg(1, "dim", 0)) % 2 != 0:
        return False
    label = columns(ctx, table)
    if label is None:
        return False
    ctx.output(label)
    return True


def register(rules: Registry) -> None:
    rules.register(aten.index.Tensor, gather_rows)
