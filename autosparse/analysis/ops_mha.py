"""Analysis rules for ``nn.MultiheadAttention`` (the stand-in itself lives in :mod:`autosparse.modules.mha`).

Supported modules are traced through :class:`~autosparse.modules.mha.PrunedMultiheadAttention.forward`;
these rules cover what that leaves: the head-averaged attention weights and the configurations the
stand-in does not implement.
"""

from __future__ import annotations

from typing import cast

from torch import nn

from autosparse.analysis.context import OpContext
from autosparse.analysis.registry import Registry
from autosparse.modules.mha import average_over_heads


def average_rule(ctx: OpContext) -> None:
    """Analysis rule for :func:`average_over_heads`: a used head average pins the heads."""
    label = ctx.label(ctx.arg(0))
    if label is not None and ctx.state.reaches_output(ctx.node):
        ctx.block(label, "nn.MultiheadAttention's attention weights averaged over heads are used "
                         "(need_weights=True); call it with need_weights=False to prune its heads")
    ctx.output(None)


def unsupported_rule(ctx: OpContext) -> None:
    """Analysis rule for an ``nn.MultiheadAttention`` the stand-in does not cover (fx keeps it a leaf)."""
    module = cast(nn.MultiheadAttention, ctx.module())  # registered for nn.MultiheadAttention only
    why = [name for name, on in (("add_bias_kv", module.bias_k is not None), ("add_zero_attn", module.add_zero_attn),
                                 ("kdim/vdim != embed_dim", not module._qkv_same_embed_dim)) if on]
    ctx.block_inputs(f"nn.MultiheadAttention with {', '.join(why) or 'this configuration'}: autosparse "
                     "cannot prune its heads or the channels it reads")
    ctx.output(None)


def register(rules: Registry) -> None:
    rules.register(average_over_heads, average_rule)
    rules.register(nn.MultiheadAttention, unsupported_rule)  # supported ones are traced through
