"""Slicing tensors out of modules and keeping each module's attributes consistent with its weights.

``FIXERS`` is the one table of per-module attribute updates, keyed by class (MRO lookup) or, for
classes autosparse does not import (Hugging Face), by class name. A fixer reads the module's
(already sliced) tensors and rewrites the attributes its forward uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Fixer = Callable[[nn.Module, dict[str, tuple[int, ...]]], None]
FIXERS: dict[type | str, Fixer] = {}


def fixer(*keys: type | str) -> Callable[[Fixer], Fixer]:
    def wrap(fn: Fixer) -> Fixer:
        for key in keys:
            FIXERS[key] = fn
        return fn

    return wrap


def slice_tensor(model: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Replace parameter/buffer ``name`` by its ``keep`` positions along ``dim`` (same kind, flags)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    new = old.detach().index_select(dim, keep.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(attr, new, persistent=attr not in owner._non_persistent_buffers_set)


def fix_attributes(module: nn.Module, old_shapes: dict[str, tuple[int, ...]]) -> None:
    for cls in type(module).__mro__:
        found = FIXERS.get(cls) or FIXERS.get(cls.__name__)
        if found is not None:
            found(module, old_shapes)
            return


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


@fixer(nn.Linear)
def _linear(m: nn.Linear, old: dict[str, tuple[int, ...]]) -> None:
    m.out_features, m.in_features = m.weight.shape


@fixer(nn.modules.batchnorm._NormBase)
def _norm(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
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


@fixer("Conv1D")  # Hugging Face GPT-2 style (in, out) weight
def _hf_conv1d(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    m.nx, m.nf = m.weight.shape
