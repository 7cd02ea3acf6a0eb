"""Replay a compaction Record on a model: check that it fits, then slice tensors and fix attributes.

``compact`` uses :func:`replay` to apply what it decided; ``load`` uses it, then
:func:`replay_layers` (residual branches replaced by ``ZeroBranch``, emptied layers dropped), to
rebuild the compacted architecture on a freshly built base model. Checking is separate from
mutating (:func:`check`, :func:`check_layers` and :func:`shapes_after` are pure), so a plan that
does not fit is reported before the model is touched.

Names in a Record are those of the base model: slicing and branch replacement happen before
layers are dropped and the remaining ones renumbered; :func:`moved` maps a name to where it ends up.
"""

from __future__ import annotations

import copy
import hashlib
import json
import operator
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from autosparse.compaction.layer_gates import renumber_layers
from autosparse.errors import PlanMismatchError
from autosparse.modules.blocks import IDENTITY, IdentityBlock, ZeroBranch
from autosparse.modules.mha import disable_nested_fast_path
from autosparse.modules.surgery import fix_attention, fix_attributes, slice_tensor

Shapes = dict[str, tuple[int, ...]]


def architecture(model: nn.Module) -> Shapes:
    """The model's tensors as ``state_dict`` names them, with their shapes (what ``load`` fits)."""
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def base_config(model: nn.Module) -> dict[str, Any] | None:
    """A Hugging Face model's config as a dict (what rebuilds the base model), or None."""
    config = getattr(model, "config", None)
    return copy.deepcopy(config.to_dict()) if config is not None and hasattr(config, "to_dict") else None


def architecture_hash(shapes: Mapping[str, tuple[int, ...] | list[int]]) -> str:
    """A stable sha256 of tensor names and shapes, independent of dict order."""
    canonical = json.dumps(sorted((name, list(shape)) for name, shape in shapes.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()


def shapes_after(base: Shapes, kept: Mapping[str, Mapping[str, list[int]]],
                 replaced: Sequence[str] = (), dropped: Sequence[str] = ()) -> Shapes:
    """The names and shapes ``base`` tensors have once the whole Record is replayed."""
    out = {}
    for name, shape in base.items():
        new_shape = list(shape)
        for dim, positions in kept.get(name, {}).items():
            new_shape[int(dim)] = len(positions)
        new_name = moved(name, replaced, dropped)
        if new_name is not None:
            out[new_name] = tuple(new_shape)
    return out


def moved(name: str, replaced: Sequence[str] = (), dropped: Sequence[str] = ()) -> str | None:
    """Where module or tensor ``name`` of the base model is after the replay; None if removed."""
    if any(name == r or name.startswith(r + ".") for r in [*replaced, *dropped]):
        return None
    for owner in dict.fromkeys(d.rpartition(".")[0] for d in dropped):
        prefix = f"{owner}." if owner else ""
        head, _, rest = name[len(prefix):].partition(".")
        if name.startswith(prefix) and head.isdigit():
            gone = sum(1 for d in dropped if d.rpartition(".")[0] == owner and int(d.rpartition(".")[2]) < int(head))
            name = f"{prefix}{int(head) - gone}" + (f".{rest}" if rest else "")
    return name


class _Modules:
    """``model.get_submodule`` by one dict look-up (it walks the path on every call)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.by_name = dict(model.named_modules(remove_duplicate=False))

    def get(self, name: str) -> nn.Module:
        found = self.by_name.get(name)
        return found if found is not None else self.model.get_submodule(name)

    def owner(self, name: str) -> tuple[nn.Module | None, str]:
        """The module holding tensor ``name`` (None if there is none) and the attribute name."""
        owner_name, _, attr = name.rpartition(".")
        try:
            return self.get(owner_name), attr
        except AttributeError:
            return None, attr


def _tensor(modules: _Modules, name: str) -> torch.Tensor | None:
    owner, attr = modules.owner(name)
    value = getattr(owner, attr, None) if owner is not None else None
    return value if isinstance(value, torch.Tensor) else None


def check(model: nn.Module, kept: Mapping[str, Mapping[str, list[int]]],
          modules: _Modules | None = None) -> None:
    """Raise :class:`PlanMismatchError` naming the first tensor ``kept`` does not fit; mutates nothing.

    Every tensor must exist in ``model``, every dim be in range, and every position list be
    strictly increasing, within the dim's size and non-empty.
    """
    modules = modules or _Modules(model)
    for name, dims in kept.items():
        tensor = _tensor(modules, name)
        if tensor is None:
            raise PlanMismatchError(
                f"the plan slices tensor '{name}', which {type(model).__name__} does not have; "
                "the base model is not the architecture the plan was saved from"
            )
        for dim_text, positions in dims.items():
            dim = int(dim_text)
            if not 0 <= dim < tensor.ndim:
                raise PlanMismatchError(
                    f"the plan slices dim {dim} of tensor '{name}', which has shape {tuple(tensor.shape)}"
                )
            size = tensor.shape[dim]
            ordered = all(map(operator.lt, positions, positions[1:]))
            if not positions or not ordered or positions[0] < 0 or positions[-1] >= size:
                raise PlanMismatchError(
                    f"the plan keeps positions {_brief(positions)} of dim {dim} of tensor '{name}', "
                    f"which has size {size}: they must be increasing, non-empty and below {size}"
                )


def _brief(positions: list[int]) -> str:
    return str(positions) if len(positions) <= 8 else f"[{positions[0]}, ..., {positions[-1]}] ({len(positions)})"


def replay(model: nn.Module, kept: Mapping[str, Mapping[str, list[int]]]) -> Shapes:
    """Slice every tensor of ``kept`` to its kept positions, then fix each owner's attributes.

    Args:
        model: the model to mutate in place (a base model, or the folded copy inside ``compact``).
        kept: ``Record.kept``: tensor name -> {dim (as a string): kept positions}.

    Returns:
        The model's :func:`architecture` before slicing (``save`` stores its hash).

    Raises:
        PlanMismatchError: ``kept`` does not fit ``model``; raised before anything is changed.

    Example:
        >>> base_shapes = replay(model, record_of(small).kept)
    """
    modules = _Modules(model)
    check(model, kept, modules)
    base = architecture(model)
    slice_kept(model, kept, modules)
    return base


def slice_kept(model: nn.Module, kept: Mapping[str, Mapping[str, Collection[int]]],
               modules: _Modules | None = None) -> None:
    """The mutating half of :func:`replay`, for positions already known to fit (the dry run's own,
    built from this model's plan: :func:`check` only repeats what their construction guarantees)."""
    modules = modules or _Modules(model)
    old_shapes: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for name, dims in kept.items():
        owner_name, _, attr = name.rpartition(".")
        owner = modules.get(owner_name)
        old_shapes[owner_name].setdefault(attr, tuple(getattr(owner, attr).shape))
        _slice_dims(owner, attr, dims)
    for owner_name, shapes in old_shapes.items():
        fix_attributes(modules.get(owner_name), shapes)
    # Head counts live on the module that holds the projections, one level above the sliced weights.
    for parent in dict.fromkeys(owner.rpartition(".")[0] for owner in old_shapes):
        fix_attention(modules.get(parent))
    disable_nested_fast_path(model)  # an nn.TransformerEncoder over attention that lost heads


def _slice_dims(owner: nn.Module, attr: str, dims: Mapping[str, Collection[int]]) -> None:
    """Slice every dim of one tensor, then set it once: one new Parameter (and one module
    ``__setattr__``) per tensor rather than per dim, the smaller intermediate first."""
    if len(dims) == 1:
        ((dim, positions),) = dims.items()
        slice_tensor(owner, attr, int(dim), torch.as_tensor(positions, dtype=torch.long))
        return
    old = getattr(owner, attr)
    new = old.detach()
    shrink = sorted(dims.items(), key=lambda item: len(item[1]) / old.shape[int(item[0])])
    for dim, positions in shrink:
        new = new.index_select(int(dim), torch.as_tensor(positions, dtype=torch.long, device=old.device))
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(attr, new, persistent=attr not in owner._non_persistent_buffers_set)


def check_layers(model: nn.Module, replaced: Mapping[str, int], dropped: Sequence[str]) -> None:
    """Raise :class:`PlanMismatchError` if a replaced branch or a dropped layer does not exist."""
    for name in replaced:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise PlanMismatchError(f"the plan replaces branch '{name}', which {type(model).__name__} "
                                    "does not have") from None
    for name in dropped:
        owner, _, index = name.rpartition(".")
        try:
            container = model.get_submodule(owner)
        except AttributeError:
            container = None
        if not isinstance(container, nn.ModuleList) or not index.isdigit() or int(index) >= len(container):
            raise PlanMismatchError(f"the plan drops layer '{name}', which is not an entry of a ModuleList "
                                    f"in {type(model).__name__}")


def replay_layers(model: nn.Module, replaced: Mapping[str, int], dropped: Sequence[str]) -> None:
    """Replace branches by :class:`~autosparse.modules.blocks.ZeroBranch` (``{name: tuple_len}``; a whole block by
    :class:`~autosparse.modules.blocks.IdentityBlock` where ``tuple_len`` is ``-1``), then drop layers.

    Raises:
        PlanMismatchError: a branch or layer does not exist; raised before anything is changed.
    """
    check_layers(model, replaced, dropped)
    for name, tuple_len in replaced.items():
        parent, _, attr = name.rpartition(".")
        stand_in = IdentityBlock(name) if int(tuple_len) == IDENTITY else ZeroBranch(int(tuple_len), name)
        setattr(model.get_submodule(parent), attr, stand_in)
    for name in sorted(dropped, key=lambda d: -int(d.rpartition(".")[2])):
        owner, _, index = name.rpartition(".")
        del cast(nn.ModuleList, model.get_submodule(owner))[int(index)]  # a ModuleList: check_layers
    if dropped:
        renumber_layers(model, {int(d.rpartition(".")[2]) for d in dropped})
