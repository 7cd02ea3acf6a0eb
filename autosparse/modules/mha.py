"""Head pruning for ``nn.MultiheadAttention``: a traceable stand-in and the compacted module.

``nn.MultiheadAttention`` cannot lose heads in place: its forward derives ``head_dim`` from
``embed_dim // num_heads`` and reshapes with ``embed_dim``, so the inner width (heads x head_dim)
is tied to the model width. Under torch.fx it is an opaque leaf, and under torch.export its
decomposition hard-codes those sizes. autosparse therefore

* analyses it through :class:`PrunedMultiheadAttention.forward`, the same computation written
  with explicit ``num_heads`` / ``head_dim`` (the class is swapped in only while the graph is
  captured, by :func:`traceable_attention`; the model's own modules are never replaced), and
* after compaction turns a module that lost heads or channels into a
  :class:`PrunedMultiheadAttention` (a subclass, so ``isinstance(m, nn.MultiheadAttention)``
  still holds, with the same parameter names, so ``state_dict`` keys do not change).

Supported: packed ``in_proj_weight`` (``kdim == vdim == embed_dim``), self- and cross-attention,
``batch_first`` either way, unbatched inputs, key padding and attention masks, ``is_causal``.
Not supported (left unprunable and reported): ``add_bias_kv``, ``add_zero_attn``, separate
``kdim``/``vdim`` projections, and subclasses with their own forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn


def supported(module: nn.Module) -> bool:
    """Whether ``module`` is a plain ``nn.MultiheadAttention`` whose heads autosparse can prune."""
    return (type(module) is nn.MultiheadAttention and module._qkv_same_embed_dim
            and module.bias_k is None and module.bias_v is None and not module.add_zero_attn)


def prunable(module: nn.Module) -> bool:
    """A supported ``nn.MultiheadAttention``, or one autosparse already made a :class:`PrunedMultiheadAttention`."""
    return supported(module) or type(module) is PrunedMultiheadAttention


@contextlib.contextmanager
def traceable_attention(model: nn.Module) -> Iterator[None]:
    """Let the tracers see inside every supported ``nn.MultiheadAttention`` of ``model``.

    Swaps the class of those modules to :class:`PrunedMultiheadAttention` (same computation,
    traceable) for the duration of the block and restores it afterwards, also on failure.
    """
    swapped = [m for m in model.modules() if supported(m)]
    for module in swapped:
        module.__class__ = PrunedMultiheadAttention
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = nn.MultiheadAttention


@fx.wrap
def average_over_heads(weights: torch.Tensor) -> torch.Tensor:
    """Mean attention weights over heads (dim 1): what ``need_weights=True`` returns.

    A function of its own so the analysis can tell this reduction apart: when its result is
    used, heads cannot be removed (the mean would change); when it is discarded, it does not matter.
    """
    return weights.mean(dim=1)


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inner width ``num_heads * head_dim`` may differ from ``embed_dim``.

    Built by :func:`autosparse.compact` from an ``nn.MultiheadAttention`` that lost heads (or
    model-width channels); same parameters, same call signature and outputs. The attention
    weights returned with ``need_weights=True`` are averaged over the remaining heads.

    Example:
        >>> attn = nn.MultiheadAttention(32, 4, batch_first=True)
        >>> small = autosparse.compact(autosparse.sparsify(attn_model, "configs/heads.yaml", ...))
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        # symbolic_trace cannot branch on a rank; an unbatched input then fails ShapeProp and the
        # capture falls back to torch.export, which knows the rank.
        batched = fx._symbolic_trace.is_fx_symbolic_tracing() or query.dim() == 3
        q, k, v = (self._batch_first(t, batched) for t in (query, key, value))
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        bsz, tgt_len, src_len = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = self._project(q, k, v, self_attention=query is key and key is value)
        q, k, v = (t.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = self._merged_mask(attn_mask, key_padding_mask, bsz, tgt_len, src_len, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights or (mask is not None and mask.dim() == 4 and mask.shape[1] != 1):
            scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if is_causal and mask is None:
                mask = _causal_mask(tgt_len, src_len, q)
            attn = torch.softmax(scores + mask if mask is not None else scores, dim=-1)
            attn = F.dropout(attn, dropout, training=self.training)
            out = torch.matmul(attn, v)
            if need_weights:
                weights = average_over_heads(attn) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, -1))
        if not batched:
            return out.squeeze(0), weights.squeeze(0) if weights is not None else None
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _batch_first(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        if not batched:
            return x.unsqueeze(0)
        return x if self.batch_first else x.transpose(0, 1)

    def _project(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 self_attention: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # One packed projection, chunked: the analysis reads rows [0:w), [w:2w), [2w:3w) of
        # in_proj_weight as query, key and value features of the same heads.
        if self_attention:
            query, key, value = F.linear(q, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            return query, key, value
        return (F.linear(q, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)[0],
                F.linear(k, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)[1],
                F.linear(v, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)[2])

    def _merged_mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                     bsz: int, tgt_len: int, src_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Both masks as one additive float mask broadcastable to (batch, heads, tgt, src)."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            # (batch * heads, tgt, src) holds one mask per head: kept per head, so the analysis
            # sees the head dim mixed with an input it cannot slice (heads stay unprunable).
            mask = mask.view(bsz, -1, tgt_len, src_len) if mask.dim() == 3 else mask.view(1, 1, tgt_len, src_len)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).view(bsz, 1, 1, src_len)
            mask = padding if mask is None else mask + padding
        return mask

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _causal_mask(tgt_len: int, src_len: int, like: torch.Tensor) -> torch.Tensor:
    future = torch.ones(tgt_len, src_len, dtype=torch.bool, device=like.device).triu(1)
    return _additive(future, like.dtype)


def to_pruned(module: nn.MultiheadAttention) -> None:
    """Make ``module`` (already sliced) a :class:`PrunedMultiheadAttention` with consistent sizes."""
    if not prunable(module):
        return
    module.__class__ = PrunedMultiheadAttention
    module.num_heads = module.in_proj_weight.shape[0] // 3 // module.head_dim
    module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
    # nn.TransformerEncoder(Layer) take a fused fast path in eval mode that assumes the inner
    # width equals embed_dim; they skip it when this flag is False, which is now the truth.
    module._qkv_same_embed_dim = False


def disable_nested_fast_path(model: nn.Module) -> None:
    """Turn off the nested-tensor fast path of ``nn.TransformerEncoder`` over pruned attention.

    In eval mode with a padding mask the encoder packs its input into a nested tensor, which only
    PyTorch's fused kernels accept. The pruned layers take the regular path instead; their outputs
    at padded positions are then computed rather than zero, as in PyTorch's own regular path.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(m, PrunedMultiheadAttention) for m in module.modules()):
            module.use_nested_tensor = False
