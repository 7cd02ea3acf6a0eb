"""Slicing tensors out of modules and keeping each module's attributes consistent with its weights.

``FIXERS`` is the one table of per-module attribute updates, keyed by class (MRO lookup) or, for
classes autosparse does not import (Hugging Face), by class name. A fixer reads the module's
(already sliced) tensors and rewrites the attributes its forward uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

import torch
from torch import nn

from autosparse.modules.mha import prunable, to_pruned

Fixer = Callable[[nn.Module, dict[str, tuple[int, ...]]], None]
FIXERS: dict[type | str, Fixer] = {}
_ModuleT = TypeVar("_ModuleT", bound=nn.Module)
_ClassFixer = Callable[[_ModuleT, dict[str, tuple[int, ...]]], None]  # a fixer typed for its key's class


def fixer(*keys: type | str) -> Callable[[_ClassFixer[_ModuleT]], _ClassFixer[_ModuleT]]:
    """Register a fixer for ``keys``; it may take the key's class (FIXERS looks it up by that class)."""

    def wrap(fn: _ClassFixer[_ModuleT]) -> _ClassFixer[_ModuleT]:
        for key in keys:
            FIXERS[key] = cast(Fixer, fn)  # only ever called with an instance of ``key``
        return fn

    return wrap


def slice_tensor(model: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Replace parameter/buffer ``name`` by its ``keep`` positions along ``dim`` (same kind, flags)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    new = old.detach().index_select(dim, keep.to(old.device))  # index_select already copies
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(attr, new, persistent=attr not in owner._non_persistent_buffers_set)


def has_fixer(module: nn.Module) -> bool:
    return any(cls in FIXERS or cls.__name__ in FIXERS for cls in type(module).__mro__)


def fix_attributes(module: nn.Module, old_shapes: dict[str, tuple[int, ...]]) -> None:
    for cls in type(module).__mro__:
        found = FIXERS.get(cls) or FIXERS.get(cls.__name__)
        if found is not None:
            found(module, old_shapes)
            return
    _fix_experts(module)


def _fix_experts(module: nn.Module) -> None:
    """A bank of experts stored as 3-D weights (transformers 5 has ~80 such classes, one per model
    family, all alike): its ``intermediate_dim`` follows the ``(experts, hidden, inner)`` down
    projection, as a fresh build from the synced config would have it."""
    down = getattr(module, "down_proj", None)
    if isinstance(down, torch.Tensor) and down.ndim == 3 and isinstance(getattr(module, "intermediate_dim", None), int):
        module.intermediate_dim = down.shape[-1]  # type: ignore[assignment]  # a plain int at runtime


@fixer(nn.modules.conv._ConvNd)
def _conv(m: nn.modules.conv._ConvNd, old: dict[str, tuple[int, ...]]) -> None:
    w = m.weight.shape
    if m.transposed:
        m.in_channels, m.out_channels = w[0], w[1] * m.groups
        return
    if m.groups > 1:  # whole groups were removed: per-group widths are unchanged
        per_group_out = old["weight"][0] // m.groups
        m.groups = w[0] // per_group_out
    m.out_channels, m.in_channels = w[0], w[1] * m.groups


@fixer("BlurPool2d")  # timm's anti-aliasing: F.conv2d(x, self.filt, groups=self.channels)
def _blur_pool(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    if isinstance(getattr(m, "channels", None), int):
        m.channels = cast(torch.Tensor, m.filt).shape[0]  # type: ignore[assignment]  # an int at runtime


@fixer(nn.Linear)
def _linear(m: nn.Linear, old: dict[str, tuple[int, ...]]) -> None:
    m.out_features, m.in_features = m.weight.shape


@fixer(nn.modules.batchnorm._NormBase)
def _norm(m: nn.modules.batchnorm._NormBase, old: dict[str, tuple[int, ...]]) -> None:
    source = m.weight if m.weight is not None else m.running_mean
    m.num_features = source.shape[0]


@fixer(nn.GroupNorm)
def _group_norm(m: nn.GroupNorm, old: dict[str, tuple[int, ...]]) -> None:
    if m.weight is None:
        return
    per_group = old["weight"][0] // m.num_groups
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_channels // per_group


@fixer(nn.Embedding)
def _embedding(m: nn.Embedding, old: dict[str, tuple[int, ...]]) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@fixer(nn.PReLU)
def _prelu(m: nn.PReLU, old: dict[str, tuple[int, ...]]) -> None:
    m.num_parameters = m.weight.shape[0]


@fixer(nn.MultiheadAttention)
def _multihead(m: nn.MultiheadAttention, old: dict[str, tuple[int, ...]]) -> None:
    fix_attention(m)


@fixer("Conv1D")  # Hugging Face GPT-2 style (in, out) weight
def _hf_conv1d(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    # nn.Module's __setattr__ stub admits only tensors and modules; these are plain ints at runtime
    m.nx, m.nf = cast(torch.Tensor, m.weight).shape  # type: ignore[assignment]


# --------------------------------------------------------------------------- attention containers
_Q_NAMES = ("q_proj", "query", "q", "c_attn", "qkv", "Wqkv")
_K_NAMES = ("k_proj", "key", "k")
_FUSED_QKV = ("c_attn", "qkv", "Wqkv")
_HEAD_DIM_NAMES = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads", "q_heads")
WIDTH_NAMES = ("all_head_size", "inner_dim", "split_size", "attn_dim")
GROUP_NAMES = ("num_key_value_groups", "num_kv_groups", "n_rep")
KV_COUNT_NAMES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads")


def head_count_attribute(module: nn.Module, value: int) -> str | None:
    """The name of ``module``'s head-count attribute equal to ``value``, if ``fix_attention`` can
    rewrite it after compaction (it needs a query projection and an integer head_dim)."""
    if isinstance(module, nn.MultiheadAttention):  # compaction makes it a PrunedMultiheadAttention
        return "num_heads" if prunable(module) and module.num_heads == value else None
    layout = head_layout(module)
    if layout is None:
        return None
    head_dim = layout[0]
    names = HEAD_COUNT_NAMES + KV_COUNT_NAMES + WIDTH_NAMES
    found = next((a for a in names if getattr(module, a, None) == value), None)
    if found is None:  # ``self.heads * self.head_dim`` is folded into a literal by tracing
        found = next((a for a in HEAD_COUNT_NAMES + KV_COUNT_NAMES
                      if isinstance(getattr(module, a, None), int) and getattr(module, a) * head_dim == value), None)
    return found


def out_features(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0]


def head_layout(module: nn.Module) -> tuple[int, int, int] | None:
    """``(head_dim, query heads, key/value heads)`` read off an attention module's projections,
    or None when it has no integer head_dim or no query projection."""
    head_dim = next((getattr(module, n) for n in _HEAD_DIM_NAMES if isinstance(getattr(module, n, None), int)),
                    None) or _head_dim_from_scale(module)
    q_name = next((n for n in _Q_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
    if not head_dim or q_name is None:
        return None
    q = getattr(module, q_name)
    q_out = out_features(q)
    if q_out is None:
        return None
    fused = 3 if type(q).__name__ == "Conv1D" or q_name in _FUSED_QKV or "qkv" in type(q).__name__.lower() else 1
    if q_out % (fused * head_dim):
        return None
    n_q = q_out // fused // head_dim
    k = next((getattr(module, n) for n in _K_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
    k_out = out_features(k) if k is not None else None
    n_kv = k_out // head_dim if k_out else n_q
    return head_dim, n_q, n_kv


def _head_dim_from_scale(module: nn.Module) -> int | None:
    """timm's WindowAttention keeps no head_dim, only ``scale = head_dim ** -0.5``: read it back
    (compaction's equivalence check catches a custom scale that happens to look like one)."""
    scale = getattr(module, "scale", None)
    if not isinstance(scale, float) or not 0 < scale < 1:
        return None
    head_dim = round(scale ** -2)
    return head_dim if head_dim > 1 and abs(head_dim ** -0.5 - scale) <= 1e-6 * scale else None


def fix_attention(module: nn.Module) -> bool:
    """Rewrite head counts of an attention module from its (sliced) projections.

    Hugging Face attention classes and most hand-written ones keep ``num_heads``-like integers
    that their forward uses for views and splits; after heads are removed they must agree with
    the weights or a later forward crashes (or, worse, regroups heads). Returns True if fixed.
    """
    if isinstance(module, nn.MultiheadAttention):  # its forward cannot change inner width: swap class
        to_pruned(module)
        return True
    layout = head_layout(module)
    if layout is None:
        return False
    head_dim, n_q, n_kv = layout
    for attr in HEAD_COUNT_NAMES:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, n_q)
    for attr in KV_COUNT_NAMES:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, n_kv)
    for attr in WIDTH_NAMES:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, n_q * head_dim)
    for attr in GROUP_NAMES:  # query heads per KV head: changes when an MQA layer loses query heads
        if isinstance(getattr(module, attr, None), int) and n_kv and n_q % n_kv == 0:
            setattr(module, attr, n_q // n_kv)
    return True
