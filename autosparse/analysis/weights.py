"""Where a weighted op's weight or group count comes from, for the rules in ``ops_layers``.

A functional op names a parameter only indirectly (``x @ self.weight.T``), or takes a size that
compaction must rewrite (``F.conv2d(x, self.filt, groups=self.channels)``): these helpers tell the
rules which parameter to slice, and whether the size is an attribute a fixer rewrites.
"""

from __future__ import annotations

import torch
from torch import fx

from autosparse.analysis.context import OpContext
from autosparse.modules.surgery import has_fixer

aten = torch.ops.aten

_TRANSPOSE = {aten.t.default, aten.numpy_T.default, torch.t, "t"}  # numpy_T: export's ``w.T``
_SWAP = {aten.transpose.int, torch.transpose, "transpose"}
_PERMUTE = {aten.permute.default, torch.permute, "permute"}


def transposed_parameter(ctx: OpContext, node) -> str | None:
    """The name of the 2-D parameter that ``node`` is the transpose of (``w.t()``, ``w.T``,
    ``w.transpose(0, 1)``, ``w.permute(1, 0)``), or None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or not node.args:
        return None
    source, rest = node.args[0], list(node.args[1:])
    if ctx.tensor_name(source) is None or ctx.ndim(source) != 2:
        return None
    listed = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    dims = [d % 2 for d in listed if isinstance(d, int)] if len(listed) == 2 else []
    target = node.target
    if target is getattr:
        swapped = rest in (["T"], ["mT"])
    elif target in _TRANSPOSE:
        swapped = not rest
    elif target in _SWAP:
        swapped = len(dims) == 2 and dims[0] != dims[1]
    elif target in _PERMUTE:
        swapped = dims == [1, 0]
    else:
        return None
    return ctx.tensor_name(source) if swapped else None


_GROUP_ATTRS = ("groups", "channels")


def groups_rewritten(ctx: OpContext, groups: int) -> bool:
    """Whether the group count of a functional grouped conv is an attribute compaction rewrites:
    a conv module's own ``groups`` (export turns every conv module into a function), or e.g. timm
    BlurPool2d's ``channels`` (``F.conv2d(x, self.filt, groups=self.channels)``), each by its fixer."""
    owner = ctx.owner()
    return owner is not None and has_fixer(owner) and any(getattr(owner, a, None) == groups for a in _GROUP_ATTRS)
