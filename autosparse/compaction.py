"""Compaction: fold gate values into weights, physically remove zeroed units, verify equivalence."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from autosparse.errors import ArgumentError, CompactionError, EquivalenceError
from autosparse.gates import GateSite
from autosparse.hf import sync_config
from autosparse.layers import remove_branches
from autosparse.replay import base_config, replay
from autosparse.state import SparsityState, get_state


@dataclass
class Record:
    """What a compaction removed: per tensor and dim, the kept positions. Replayable with ``load``."""

    kept: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # tensor -> {dim: positions}
    groups: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> {before, after}
    replaced: list[str] = field(default_factory=list)  # residual branches replaced by ZeroBranch
    dropped_layers: list[str] = field(default_factory=list)  # ModuleList entries removed whole
    config_changes: dict[str, int] = field(default_factory=dict)  # Hugging Face config keys rewritten
    base_config: dict | None = None  # the Hugging Face config before compaction (to rebuild the base)
    base_shapes: dict = field(default_factory=dict)  # tensor shapes of the base model (fit check)


def _kept_indices(gg, gate) -> set[int]:
    """Units kept: non-zero gates, topped up to the rule's min_keep and round_to with zero-gated ones."""
    with torch.no_grad():
        values = gate.values().detach().cpu()
    n = len(gg.units)
    keep = set(torch.nonzero(values).flatten().tolist())
    keep_n = gg.rule.round_keep(max(len(keep), gg.rule.resolve_min_keep(n)), n)
    for i in torch.argsort(gate.gamma.detach().float().cpu(), descending=True).tolist():
        if len(keep) >= keep_n:
            break
        keep.add(i)  # a zero-gated unit contributes nothing, so keeping it is still exact
    return keep


def removed_units(state: SparsityState) -> tuple[set[int], dict[str, dict[str, int]]]:
    """Class roots to remove: units whose gate is zero, within each rule's min_keep and round_to."""
    removed, summary = set(), {}
    for gg, gate in zip(state.plan.gated, state.gate_list()):
        keep = _kept_indices(gg, gate)
        if not gg.branches:
            removed.update(gg.units[i] for i in range(len(gg.units)) if i not in keep)
        summary[gg.name] = {"before": len(gg.units), "after": len(keep)}
    _keep_one_per_producer(state, removed)
    return removed, summary


def _keep_one_per_producer(state: SparsityState, removed: set[int]) -> None:
    """A group can span several producers (concat parts joined by a depthwise conv); min_keep counts
    the group, so one producer could lose every output. Keep one (zero-gated, so exact) unit there."""
    for member in state.plan.analysis.members:
        if member.role != "producer" or len(member.ids) == 0:
            continue
        roots = np.unique(member.ids)
        if all(int(r) in removed for r in roots):
            removed.discard(int(roots[0]))


def removed_branches(state: SparsityState) -> list:
    """Residual branches (layer granularity) whose gate is zero."""
    out = []
    for gg, gate in zip(state.plan.gated, state.gate_list()):
        if gg.branches:
            keep = _kept_indices(gg, gate)
            out.extend(b for i, b in enumerate(gg.branches) if i not in keep)
    return out


def compact_model(model: nn.Module, inplace: bool, verify: bool, rtol: float) -> nn.Module:
    """Return a compacted copy (or ``model`` itself when ``inplace``) with no gates left."""
    state = get_state(model)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0:
        raise ArgumentError(f"compact: rtol must be a number >= 0 (a tolerance relative to the output "
                            f"scale, e.g. 1e-5), got {rtol!r}")
    removed, summary = removed_units(state)
    target = model if inplace else copy.deepcopy(model)
    try:
        record = _apply(target, state, removed)
        record.replaced, record.dropped_layers = remove_branches(model, target, state, removed_branches(state))
        record.config_changes = sync_config(target)
    except Exception as exc:
        raise CompactionError(f"compaction failed: {type(exc).__name__}: {exc}") from exc
    record.groups = summary
    target._autosparse_record = record
    if verify and state.example_inputs is not None and not inplace:
        try:
            check_equivalence(model, target, state, rtol)
        except EquivalenceError as exc:
            raise EquivalenceError(f"{exc} {_blame(model, state, removed, rtol)}") from None
    return target


def _blame(model: nn.Module, state: SparsityState, removed: set[int], rtol: float) -> str:
    """Compact one group at a time to name the groups whose removal alone breaks equivalence."""
    culprits = []
    for gg in state.plan.gated:
        mine = removed.intersection(gg.units) if not gg.branches else set()
        if not mine:
            continue
        trial = copy.deepcopy(model)
        try:
            _apply(trial, state, mine)
            check_equivalence(model, trial, state, rtol)
        except Exception:  # any failure of this group alone makes it a suspect
            culprits.append(gg.name)
    if not culprits:
        return "No single group fails alone; the groups interact (see autosparse.explain)."
    return f"Group(s) most likely responsible: {', '.join(culprits[:6])}."


def _apply(model: nn.Module, state: SparsityState, removed: set[int]) -> Record:
    _fold_gates(model)
    model.__dict__.pop("_autosparse", None)
    by_tensor: dict[tuple[str, int], np.ndarray] = {}
    for m in state.plan.analysis.members:
        by_tensor.setdefault((m.name, m.dim), m.ids)
    removed_arr = np.fromiter(removed, dtype=np.int64, count=len(removed))
    size = max([int(ids.max()) for ids in by_tensor.values() if len(ids)] + [int(removed_arr.max(initial=0))]) + 1
    is_removed = np.zeros(size, dtype=bool)  # one mask: np.isin per tensor re-sorts the removed set
    is_removed[removed_arr] = True
    record = Record()
    for (name, dim), ids in by_tensor.items():
        keep = np.flatnonzero(~is_removed[ids])
        if len(keep) < len(ids):
            record.kept.setdefault(name, {})[str(dim)] = keep.tolist()
    # The base model is only known here (later steps rewrite the config): save() stores its shapes'
    # hash, so load() can tell whether a base model fits, and a Hugging Face config to rebuild it.
    record.base_config = base_config(model)
    record.base_shapes = replay(model, record.kept)
    return record


def _fold_gates(model: nn.Module) -> None:
    """Bake every gate site into its weight (W * g), leaving plain parameters."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        # A deep copy shares the dynamically created Parametrized* class with the original, and
        # removing a parametrization deletes the property from that class: give this instance its
        # own class first, or the gated model we were given would lose its weights.
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, {
            k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
        for attr in list(module.parametrizations.keys()):
            if any(isinstance(p, GateSite) for p in module.parametrizations[attr]):
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def check_equivalence(gated: nn.Module, compact: nn.Module, state: SparsityState, rtol: float) -> float:
    """Max abs difference of all outputs relative to the output scale; raises over ``rtol``."""
    from autosparse.state import flatten_outputs, run_model

    ref = flatten_outputs(run_model(gated, state))
    try:
        out = flatten_outputs(run_model(compact, state))
    except Exception as exc:  # the compacted forward itself failed: stale attributes or an unknown layout
        raise EquivalenceError(
            f"the compacted model fails on the example inputs ({type(exc).__name__}: {exc}). A module "
            "probably keeps a size attribute autosparse does not know; register a fixer in "
            "autosparse.surgery.FIXERS for it, or exclude its group in the policy."
        ) from exc
    if len(ref) != len(out):
        raise EquivalenceError(f"compacted model returns {len(out)} tensors, gated model {len(ref)}")
    worst = 0.0
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            raise EquivalenceError(f"output shape changed: {tuple(a.shape)} -> {tuple(b.shape)}")
        scale = max(float(a.abs().max()), 1e-6) if a.numel() else 1.0
        worst = max(worst, float((a.float() - b.float()).abs().max()) / scale if a.numel() else 0.0)
    if worst > rtol:
        raise EquivalenceError(
            f"compacted model differs from the gated model by {worst:.3g} (relative, allowed {rtol:g}). "
            "This is a bug in autosparse's analysis for this architecture (or a custom op rule); please "
            "report it with autosparse.explain(model)."
        )
    return worst
