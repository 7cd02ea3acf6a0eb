"""Compaction: fold gate values into weights, physically remove zeroed units, verify equivalence.

A copy costs the compacted model, not a second full one: the tensors compaction slices or folds are
not deep-copied (the copy views them until each is replaced by a new, smaller tensor), and weights
are sliced before their gates are folded in, so no full-size folded weight is built either.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from autosparse.analysis import Role
from autosparse.analysis.branches import Branch
from autosparse.compaction.copying import copy_sharing, throwaway_copy, unshare
from autosparse.compaction.equivalence import check_equivalence
from autosparse.compaction.hf_config import sync_config
from autosparse.compaction.layer_gates import remove_branches
from autosparse.compaction.record import Record, attach_record
from autosparse.compaction.replay import base_config, replay, slice_kept
from autosparse.errors import ArgumentError, CompactionError, EquivalenceError
from autosparse.gating.batch import unbatch_gates
from autosparse.gating.gate import GateSite, remove_input_gating
from autosparse.gating.kept import kept_mask, kept_masks
from autosparse.state import SparsityState, get_state, parametrization_chains


def removed_units(state: SparsityState) -> tuple[set[int], dict[str, dict[str, int]]]:
    """Class roots to remove: units whose gate is zero, within each rule's min_keep and round_to.

    The groups of a ``uniform`` rule keep one common count: the largest any of them needs, each
    topped up to it with zero-gated units (exact: no unit with a non-zero gate is dropped). After
    :func:`autosparse.training.freeze`, which cuts them to a common count, that is the count itself.
    """
    removed: set[int] = set()
    summary: dict[str, dict[str, int]] = {}
    masks = kept_masks(state.gate_list(), [gg.rule for gg in state.plan.gated])
    for gg, mask in zip(state.plan.gated, masks):
        keep = set(torch.nonzero(mask).flatten().tolist())
        if not gg.branches:
            removed.update(gg.units[i] for i in range(len(gg.units)) if i not in keep)
        summary[gg.name] = {"before": len(gg.units), "after": len(keep)}
    _keep_one_per_producer(state, removed)
    return removed, summary


def _keep_one_per_producer(state: SparsityState, removed: set[int]) -> None:
    """A group can span several producers (concat parts joined by a depthwise conv); min_keep counts
    the group, so one producer could lose every output. Keep one (zero-gated, so exact) unit there."""
    producers = [m.ids for m in state.plan.require_analysis().members if m.role == Role.PRODUCER and len(m.ids)]
    if not producers or not removed:
        return
    # One mask, not a set look-up per unit: this runs in every dry-run trial.
    is_removed = np.zeros(max(max(removed), *(int(ids.max()) for ids in producers)) + 1, dtype=bool)
    is_removed[np.fromiter(removed, dtype=np.int64, count=len(removed))] = True
    for ids in producers:
        if is_removed[ids].all():
            first = int(ids.min())
            removed.discard(first)
            is_removed[first] = False


def removed_branches(state: SparsityState) -> list[Branch]:
    """Residual branches (layer granularity) whose gate is zero."""
    out: list[Branch] = []
    for gg, gate in zip(state.plan.gated, state.gate_list()):
        if gg.branches:
            keep = set(torch.nonzero(kept_mask(gate, gg.rule)).flatten().tolist())
            out.extend(b for i, b in enumerate(gg.branches) if i not in keep)
    return out


def compact_model(model: nn.Module, inplace: bool, verify: bool, rtol: float) -> nn.Module:
    """Return a compacted copy (or ``model`` itself when ``inplace``) with no gates left."""
    state = get_state(model)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0:
        raise ArgumentError(f"compact: rtol must be a number >= 0 (a tolerance relative to the output "
                            f"scale, e.g. 1e-5), got {rtol!r}")
    removed, summary = removed_units(state)
    target, record = _build(model, state, removed, inplace)
    if not inplace:
        unshare(model, target)
    record.groups = summary
    attach_record(target, record)
    if verify and state.example_inputs is not None and not inplace:
        try:
            check_equivalence(model, target, state, rtol)
        except EquivalenceError as exc:
            raise EquivalenceError(f"{exc} {_blame(model, state, removed, rtol)}") from None
    return target


def _build(model: nn.Module, state: SparsityState, removed: set[int], inplace: bool,
           throwaway: bool = False) -> tuple[nn.Module, Record]:
    """Slice, fold and drop in ``model`` or a copy of it that shares only what it replaces.

    A ``throwaway`` copy (the dry run's) shares every tensor's storage and keeps its config as it
    is: config sync rewrites only the config (and informational width attributes), and a random
    dry-run pattern's widths are not the ones compact() will write, so syncing them proves nothing.
    """
    if inplace:
        target = model
    elif throwaway:
        target = throwaway_copy(model)
    else:
        target = copy_sharing(model, _replaced_tensors(model, _kept_positions(state, removed)))
    try:
        record = _apply_throwaway(target, state, removed) if throwaway else _apply(target, state, removed)
        record.replaced, record.dropped_layers = remove_branches(model, target, state, removed_branches(state))
        if not throwaway:
            record.config_changes = sync_config(target)
    except Exception as exc:
        raise CompactionError(f"compaction failed: {type(exc).__name__}: {exc}") from exc
    return target, record


def dry_run(model: nn.Module, rtol: float = 1e-4, seed: int = 0) -> dict[str, str]:
    """Prove that every gated group of a sparsified ``model`` compacts exactly; gates are left as they were.

    Zeroes random units of every gate at once (all but a quarter, see :func:`_trial_keep`; layer gates
    only in a second round, as removing a branch hides the groups inside it), compacts
    a throwaway copy (:func:`~autosparse.compaction.copying.throwaway_copy`: every tensor shared, no
    weight copied) and compares it with the gated model on the example inputs; on a failure, bisects
    the groups to find those that fail (alone, or only together) and checks the rest again.

    Returns:
        ``{group name: why}`` for the groups that do not compact exactly (empty when all do).
    """
    state = get_state(model)
    gates = state.gate_list()
    saved = [g.forced_off.clone() for g in gates]
    gen = torch.Generator().manual_seed(seed)
    patterns = [torch.randperm(g.size, generator=gen)[: g.size - _trial_keep(g.size)] for g in gates]
    failing: dict[int, str] = {}
    # A layer gate's zeros remove whole branches, and with them every other gated group inside:
    # a group whose compaction is wrong would pass unseen. So first prove every group with the
    # branches all kept, then everything together.
    every = list(range(len(gates)))
    layered = [i for i in every if state.plan.gated[i].branches]
    try:
        for todo in ([i for i in every if i not in layered], every) if layered else (every,):
            todo = [i for i in todo if i not in failing]
            why = _trial(model, state, todo, patterns, rtol) if todo else None
            while why is not None and todo:
                found = _culprits(model, state, todo, patterns, rtol, why)
                failing.update(found)
                todo = [i for i in todo if i not in found]
                why = _trial(model, state, todo, patterns, rtol) if todo else None
    finally:
        with torch.no_grad():
            for gate, off in zip(gates, saved):
                gate.forced_off.copy_(off)
    return {state.plan.gated[i].name: why for i, why in failing.items()}


def _trial_keep(size: int) -> int:
    """Units a dry-run pattern keeps in a group of ``size``: a random quarter, but at least two
    where there are four or more (a one-wide tensor broadcasts where a wider one would not, which
    could hide a missed slice), half of two or three. Fewer kept units make the throwaway copy's
    slices and forward cheaper; which ones are kept is what the check is about."""
    return size - size // 2 if size < 4 else max(2, -(-size // 4))


def _trial(model: nn.Module, state: SparsityState, chosen: list[int], patterns: list[torch.Tensor],
           rtol: float) -> str | None:
    """Compact with the random zeros of the ``chosen`` gates only; why it is not exact, or None."""
    with torch.no_grad():
        for i, gate in enumerate(state.gate_list()):
            gate.forced_off.zero_()
            if i in chosen:
                gate.forced_off[patterns[i]] = True
    try:
        removed, _ = removed_units(state)
        target, _ = _build(model, state, removed, inplace=False, throwaway=True)
        check_equivalence(model, target, state, rtol)
    except Exception as exc:  # any failure of compaction or of the compacted forward disqualifies
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return None


def _culprits(model: nn.Module, state: SparsityState, chosen: list[int], patterns: list[torch.Tensor],
              rtol: float, why: str) -> dict[int, str]:
    """The gates of ``chosen`` (known to fail with reason ``why``) that fail alone, by bisection;
    all of ``chosen`` when no part fails alone (they fail only together)."""
    if len(chosen) == 1:
        return {chosen[0]: why}
    found: dict[int, str] = {}
    for part in (chosen[: len(chosen) // 2], chosen[len(chosen) // 2:]):
        part_why = _trial(model, state, part, patterns, rtol)
        if part_why is not None:
            found.update(_culprits(model, state, part, patterns, rtol, part_why))
    return found or dict.fromkeys(chosen, why)


def strip_gates(model: nn.Module) -> None:
    """Undo :func:`autosparse.sparsify` on a model whose gates never changed its weights."""
    _unparametrize(model)
    model.__dict__.pop("_autosparse", None)


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
    # Slice first, fold after: folding multiplies only the kept entries, so no full-size folded
    # weight is ever built (and in a copy the full-size weights are never copied: copying.copy_sharing).
    pending = _unparametrize(model)
    model.__dict__.pop("_autosparse", None)
    record = Record(kept=_kept_positions(state, removed))
    # The base model is only known here (later steps rewrite the config): save() stores its shapes'
    # hash, so load() can tell whether a base model fits, and a Hugging Face config to rebuild it.
    record.base_config = base_config(model)
    record.base_shapes = replay(model, record.kept)
    _fold(pending, record.kept)
    return record


def _apply_throwaway(model: nn.Module, state: SparsityState, removed: set[int]) -> Record:
    """:func:`_apply` on the dry run's copy: the same slices and folds, without what only a kept
    result needs (the base config and shapes that ``save`` stores, re-checking positions that
    :func:`_kept_arrays` built from this very plan) and without ``parametrize``'s class surgery."""
    pending = _unparametrize(model, throwaway=True)
    model.__dict__.pop("_autosparse", None)
    kept = _kept_arrays(state, removed)
    empty = next((f"{name} dim {dim}" for name, dims in kept.items() for dim, keep in dims.items() if not len(keep)),
                 None)
    if empty is not None:  # what replay's check refuses in compact(): keep the dry run as strict
        raise CompactionError(f"the plan keeps no position of tensor {empty}")
    slice_kept(model, kept)
    _fold(pending, kept)
    return Record()


def _kept_positions(state: SparsityState, removed: set[int]) -> dict[str, dict[str, list[int]]]:
    """``Record.kept``: for every tensor and dim that loses positions, the positions it keeps."""
    return {name: {dim: keep.tolist() for dim, keep in dims.items()}
            for name, dims in _kept_arrays(state, removed).items()}


def _kept_arrays(state: SparsityState, removed: set[int]) -> dict[str, dict[str, np.ndarray]]:
    """:func:`_kept_positions` as arrays (the dry run slices with them and never stores them)."""
    by_tensor: dict[tuple[str, int], np.ndarray] = {}
    for m in state.plan.require_analysis().members:
        by_tensor.setdefault((m.name, m.dim), m.ids)
    removed_arr = np.fromiter(removed, dtype=np.int64, count=len(removed))
    size = max([int(ids.max()) for ids in by_tensor.values() if len(ids)] + [int(removed_arr.max(initial=0))]) + 1
    is_removed = np.zeros(size, dtype=bool)  # one mask: np.isin per tensor re-sorts the removed set
    is_removed[removed_arr] = True
    kept: dict[str, dict[str, np.ndarray]] = {}
    for (name, dim), ids in by_tensor.items():
        keep = np.flatnonzero(~is_removed[ids])
        if len(keep) < len(ids):
            kept.setdefault(name, {})[str(dim)] = keep
    return kept


# ---------------------------------------------------------------- copy without the full-size weights


def _replaced_tensors(model: nn.Module, kept: dict[str, dict[str, list[int]]]) -> list[torch.Tensor]:
    """The tensors compaction replaces by new ones: the weights under gate sites only (folded out
    of place by :func:`_fold`) and the plain tensors it slices (``slice_tensor`` makes new ones)."""
    out: list[torch.Tensor] = []
    for module in model.modules():
        if parametrize.is_parametrized(module):
            out += [chain.original for chain in parametrization_chains(module).values()
                    if chain.is_tensor and all(isinstance(p, GateSite) for p in chain)]
    for name in kept:
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:  # replay reports it, with a better message, inside compaction's try
            continue
        if not parametrize.is_parametrized(owner, attr) and isinstance(getattr(owner, attr, None), torch.Tensor):
            out.append(getattr(owner, attr))
    return out



# ---------------------------------------------------------------- folding


@dataclass
class _Fold:
    """A weight whose gate sites were removed unfolded: its multipliers, to apply after slicing."""

    module: nn.Module
    attr: str
    name: str
    multipliers: list[tuple[int, torch.Tensor]]  # (dim, gate value per position), in chain order


def _unparametrize(model: nn.Module, throwaway: bool = False) -> list[_Fold]:
    """Remove every gate parametrization, leaving the weights as they are; return the folds owed."""
    unbatch_gates(model)
    pending: list[_Fold] = []
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        remove_input_gating(module)
        if throwaway and _drop_sites(module, name, pending):
            continue
        # A deep copy shares the dynamically created Parametrized* class with the original, and
        # removing a parametrization deletes the property from that class: give this instance its
        # own class first, or the gated model we were given would lose its weights.
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__, {
            k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
        for attr in list(module.parametrizations.keys()):
            chain = module.parametrizations[attr]
            if not any(isinstance(p, GateSite) for p in chain):
                continue
            with torch.no_grad():
                if all(isinstance(p, GateSite) for p in chain) and chain.is_tensor:
                    mults = [(site.dim, site.values().detach()) for site in chain]
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                    pending.append(_Fold(module, attr, f"{name}.{attr}" if name else attr, mults))
                else:  # another parametrization in the chain: fold the whole chain at full size
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return pending


def _drop_sites(module: nn.Module, name: str, pending: list[_Fold]) -> bool:
    """On the dry run's copy, where every chain is of gate sites only: give each weight back its
    original tensor and the module its own class again, and owe the folds; False (nothing done)
    for any other chain. What ``remove_parametrizations`` does, less the per-module class it needs
    so that the copied-from model keeps its properties: the copy is only reverted to its base class."""
    chains = parametrization_chains(module)
    if not all(chain.is_tensor and all(isinstance(p, GateSite) for p in chain) for chain in chains.values()):
        return False
    prefix = f"{name}." if name else ""
    with torch.no_grad():
        for attr, chain in chains.items():
            sites = cast("list[GateSite]", list(chain))  # all GateSite: checked above
            pending.append(_Fold(module, attr, prefix + attr, [(site.dim, site.values().detach()) for site in sites]))
    del module._modules["parametrizations"]
    module.__class__ = type(module).__bases__[0]
    for attr, chain in chains.items():
        original = chain.original
        if isinstance(original, nn.Parameter):
            module._parameters[attr] = original
        else:
            module._buffers[attr] = original
    return True


def _fold(pending: list[_Fold], kept: Mapping[str, Mapping[str, Collection[int]]]) -> None:
    """Multiply each (already sliced) weight by its gates' values at the positions it kept."""
    with torch.no_grad():
        for fold in pending:
            weight = getattr(fold.module, fold.attr)
            folded = weight
            for dim, values in fold.multipliers:
                positions = kept.get(fold.name, {}).get(str(dim))
                if positions is not None:
                    values = values[torch.as_tensor(positions, dtype=torch.long, device=values.device)]
                if bool((values == 1).all()):  # w * 1 == w bit for bit: a fresh gate costs no copy
                    continue
                shape = [1] * weight.ndim
                shape[dim] = -1
                folded = folded * values.to(weight.dtype).view(shape)
            if folded is not weight:  # out of place: in a copy, ``weight`` may still view the gated model
                weight.set_(folded)


def fold_gates(model: nn.Module) -> None:
    """Bake every gate site into its weight (W * g), leaving plain parameters at full size."""
    _fold(_unparametrize(model), {})
