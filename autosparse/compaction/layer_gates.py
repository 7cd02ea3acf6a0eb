"""Compaction of layer gates: drop residual branches whose gate is zero, and layers left empty."""

from __future__ import annotations

from typing import cast

from torch import nn

from autosparse.errors import warn
from autosparse.modules.blocks import IdentityBlock, ZeroBranch
from autosparse.state import SparsityState, run_model


def _branch_outputs(gated: nn.Module, state: SparsityState, names: list[str]) -> dict[str, int | None]:
    """For each branch: 0 if it returns a tensor shaped like its input, k for a k-tuple led by
    such a tensor, None if it returns anything else (then it cannot be dropped). The stand-in
    returns None for a tuple's other entries; verification catches a caller that reads them."""
    found: dict[str, int | None] = {}

    def hook(name):
        def record(module, args, kwargs, out):
            first = next((v for v in list(args) + list(kwargs.values()) if hasattr(v, "shape")), None)
            if hasattr(out, "shape") and first is not None and out.shape == first.shape:
                found[name] = 0
            elif (isinstance(out, tuple) and out and hasattr(out[0], "shape") and first is not None
                  and out[0].shape == first.shape):  # extra entries (attention weights) become None
                found[name] = len(out)
            else:
                found[name] = None
        return record

    handles = [gated.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names]
    try:
        run_model(gated, state)
    finally:
        for handle in handles:
            handle.remove()
    return found


def remove_branches(gated: nn.Module, target: nn.Module, state: SparsityState,
                    branches: list) -> tuple[list[str], list[str]]:
    """Replace zero-gated branches by :class:`ZeroBranch` (a block whose branch is written inline by
    :class:`IdentityBlock`); drop list entries left doing nothing."""
    if not branches:
        return [], []
    shapes = _branch_outputs(gated, state, [b.module for b in branches])
    # which lists hold layers of one class, before stand-ins for whole blocks make them look mixed
    alike = {name for name, m in target.named_modules()
             if isinstance(m, nn.ModuleList) and len({type(c) for c in m}) == 1}
    replaced = []
    for branch in branches:
        kind = shapes.get(branch.module)
        if kind is None or (branch.inline and kind != 0):  # a block stand-in returns one tensor
            warn(f"branch '{branch.module}' is gated to zero but returns a structure autosparse cannot "
                 "stand in for; its weights are zeroed but it still runs")
            continue
        parent, _, attr = branch.module.rpartition(".")
        stand_in = IdentityBlock(branch.module) if branch.inline else ZeroBranch(kind, branch.module)
        setattr(target.get_submodule(parent), attr, stand_in)
        replaced.append(branch.module)
    return replaced, _drop_empty_layers(target, state, set(replaced), alike)


def _drop_empty_layers(target: nn.Module, state: SparsityState, replaced: set[str],
                       alike: set[str]) -> list[str]:
    """A list entry whose every branch is gone computes ``x -> x``: take it out of its ModuleList.

    Only when the analysis found that the entry is nothing but its residual adds (``Branch.stream``)
    and all of them are gone: a post-activation block still computes ``relu(x)``, and a branch no
    rule gated still runs."""
    streams = {b.parent: b.stream for gg in state.plan.gated for b in gg.branches}
    dropped = []
    for parent, stream in streams.items():
        owner_name, _, index = parent.rpartition(".")
        if not index.isdigit() or not stream or not all(c in replaced for c in stream):
            continue
        owner = target.get_submodule(owner_name)
        # a stack of like layers only: a mixed list (T5's [attention, feed-forward]) is read by position
        if isinstance(owner, nn.ModuleList) and owner_name in alike:
            dropped.append(parent)
    for parent in sorted(dropped, key=lambda p: -int(p.rpartition(".")[2])):
        owner_name, _, index = parent.rpartition(".")
        del cast(nn.ModuleList, target.get_submodule(owner_name))[int(index)]  # a ModuleList: checked above
    if dropped:
        renumber_layers(target, {int(p.rpartition(".")[2]) for p in dropped})
    return dropped


def renumber_layers(target: nn.Module, dropped: set[int]) -> None:
    """Keep Hugging Face bookkeeping consistent: layer counts and types, cache layer indices."""
    config = getattr(target, "config", None)
    for module in target.modules():
        if isinstance(module, nn.ModuleList) and config is not None:
            if getattr(config, "num_hidden_layers", None) and len(module) < config.num_hidden_layers:
                config.num_hidden_layers = len(module)
                if hasattr(config, "layer_types") and isinstance(config.layer_types, list):
                    config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in dropped]
            for i, layer in enumerate(module):
                for sub in layer.modules():
                    if isinstance(getattr(sub, "layer_idx", None), int):
                        sub.layer_idx = i  # type: ignore[assignment]  # nn.Module.__setattr__ takes any value
