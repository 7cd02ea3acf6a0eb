"""Which units to remove: one global ranking across groups, priced by the cost model.

Raw importances (:mod:`autosparse.pruning.importance`) are not comparable across groups: a weight
norm depends on fan-in, initialisation and the norm layers around it, and a branch is not a channel.
Two normalisations make them comparable, both relative to the unit's own group:

* importance: ``a_i = s_i / mean_{j in g} s_j`` (1 for an average unit of its group);
* cost: ``b_i = c_i / mean_{j in g} c_j``, with ``c_i = d cost / d u_i`` the cost model's price of
  unit ``i`` in the dense model.

The unit (or, with ``round_to``, the chunk of units) removed next is the one with the lowest
``sum a / sum b``: the least important relative to its peers for what it costs relative to them.
Units of one group usually cost the same, so in effect the ranking is by group-normalised
importance and the cost model decides when to stop. Prices are not updated as widths change, on
purpose: a unit's price depends on its neighbours' widths, not its own layer's, so as one layer
narrows the layers around it get cheaper, look ever less worth removing, and that one layer keeps
being cut (on the MNIST-1D CNN: widths 51-10-63 at 15 % of the FLOPs). Dividing by the raw cost
has the same flaw and strips the highest-resolution layers first. See docs/pruning.md.

Widths stay legal: a group only moves between counts that its rule allows (``Rule.kept_count``:
at least ``min_keep``, multiples of ``round_to``), removing its least important units first. The
groups of a ``uniform: true`` rule move together (a *cluster*): one move removes a chunk from each
of them, scored by the chunks' summed importance over their summed relative cost, so they end at
one common width. The
removals are taken in rounds: each round takes the best moves until their estimated (linear)
saving covers half of what is left to save, then the cost model is evaluated again, so the
result lands at or just under the target in a few dozen evaluations, not one per unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from autosparse.errors import PolicyError, warn
from autosparse.gating.kept import uniform_clusters
from autosparse.policy.rule import Rule
from autosparse.state import SparsityState, get_state
from autosparse.training.budget import CostModel, build_cost_model, check_reachable


@dataclass
class Selection:
    """What :func:`select_units` decided.

    Attributes:
        metric: ``"flops"``, ``"params"`` or ``"latency"``.
        target: The budget, a fraction of the dense cost.
        predicted: The cost model's fraction for the units kept (exact for params and for the
            FLOPs of convolutions, linear layers and attention; for latency, the measured table's
            prediction, see :mod:`autosparse.training.latency`).
        removed: Per group name, the indices of the units removed (their gates are now zero).
    """

    metric: str
    target: float
    predicted: float
    removed: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Move:
    cluster: int
    parts: list[tuple[int, list[int]]]  # (group, unit indices within it): one per group of the cluster
    score: float
    saving: float  # linear estimate of the cost it removes


def select_units(net: nn.Module, scores: list[torch.Tensor]) -> Selection:
    """Zero the gates of the units a global ranking removes to meet the policy's target.

    Args:
        net: a freshly sparsified model whose policy has ``target.flops``, ``target.params`` or
            ``target.latency``; its gates are zeroed in place.
        scores: raw importance per gated group, in plan order (:func:`unit_importance`).

    Returns:
        The :class:`Selection`.

    Raises:
        PolicyError: the policy has no target, or even every group at its rule's floor is over it.
        NotSparsifiedError: ``net`` has no gates.

    Example:
        >>> selection = select_units(net, unit_importance(net, "l2")); small = autosparse.compact(net)
    """
    state = get_state(net)
    metric, budget = _budget(state)
    cost = build_cost_model(net, state, metric)
    check_reachable(cost, state, f"target.{metric}", budget, state.policy.target.tolerance)
    kept = torch.ones(cost.n_units, dtype=torch.float64)
    dense = cost.unit_costs(kept)
    spans = list(zip(cost.offsets[:-1], cost.offsets[1:]))
    worth = [_relative(s.double().cpu()) for s in scores]
    groups = [_Group(state.plan.gated[i].rule, lo, hi, float(dense[lo:hi].mean()), worth[i],
                     torch.argsort(worth[i], stable=True).tolist()) for i, (lo, hi) in enumerate(spans)]
    clusters = uniform_clusters([g.rule for g in groups])
    taken: list[list[_Move]] = [[] for _ in clusters]  # per cluster, its moves in the order applied
    while cost.fraction(kept) > budget:
        unit_cost = cost.unit_costs(kept)
        moves = [m for c, members in enumerate(clusters)
                 for m in _moves(c, [(i, groups[i]) for i in members], kept, unit_cost, dense)]
        if not moves:
            break  # every group at its floor: check_reachable allowed landing within the tolerance
        for move in _take(moves, kept, spans, float(cost.cost(kept)) - budget * cost.dense):
            taken[move.cluster].append(move)
    _refill(cost, kept, spans, taken, budget)
    predicted = cost.fraction(kept)
    if predicted > budget:
        warn(f"target.{metric}: every group is at its rule's floor (min_keep, round_to) and the model still "
             f"has {predicted:.3f} of the dense {metric}, above the target {budget:g} (within its tolerance); "
             "lower min_keep or round_to to reach the target")
    removed = {}
    for (lo, hi), gg, gate in zip(spans, state.plan.gated, state.gate_list()):
        off = (kept[lo:hi] == 0).nonzero().flatten().tolist()
        if off:
            gate.zero_(off)
            removed[gg.name] = off
    return Selection(metric, budget, predicted, removed)


def _budget(state: SparsityState) -> tuple[str, float]:
    target = state.policy.target
    metric = target.metric
    if metric is None:
        raise PolicyError("target: one-shot pruning needs a budget; set target.flops (or target.params, "
                          "target.latency) to a fraction of the dense model in (0, 1), e.g. {'target': {'flops': 0.5}}")
    return metric, float(getattr(target, metric))


def _relative(score: torch.Tensor) -> torch.Tensor:
    """``s / mean(s)``; a group whose every score is 0 is all zeros (nothing in it matters)."""
    mean = float(score.mean()) if score.numel() else 0.0
    return score / mean if mean > 0 else torch.zeros_like(score)


@dataclass
class _Group:
    """One gated group as the selection sees it: its rule, span in the unit vector, mean dense
    unit price, group-relative importance and unit order (least important first)."""

    rule: Rule
    lo: int
    hi: int
    price: float
    worth: torch.Tensor
    order: list[int]


def _moves(cluster: int, members: list[tuple[int, _Group]], kept: torch.Tensor, unit_cost: torch.Tensor,
           dense: torch.Tensor) -> list[_Move]:
    """A cluster's successive legal removals, from its kept count down to its rule's floor. A
    cluster is one group, or every group of a uniform rule: then each move narrows all of them.

    Sums over a move's units come from prefix sums along each group's removal order, so listing
    every move of a group costs about as much as reading its units once (this runs every round).
    """
    if min(g.price for _, g in members) <= 0:
        return []  # removing them saves nothing now (their branch is already gone)
    kept_np, cost_np, dense_np = kept.numpy(), unit_cost.numpy(), dense.numpy()
    alive = [[j for j in g.order if kept_np[g.lo + j] > 0] for _, g in members]
    sums = []  # per member: prefix sums of saving, dense price and worth along its alive units
    for (_, g), units in zip(members, alive):
        flat = np.asarray(units, dtype=np.int64) + g.lo
        sums.append([np.concatenate([[0.0], np.cumsum(v)]) for v in
                     (cost_np[flat], dense_np[flat] / g.price, g.worth.numpy()[flat - g.lo])])
    rule = members[0][1].rule
    floor = max(rule.kept_count(0, g.hi - g.lo) for _, g in members)
    moves: list[_Move] = []
    count, best = max(len(a) for a in alive), 0.0
    while True:
        nxt = ((count - 1) // rule.round_to) * rule.round_to  # the next smaller width the rule allows
        if count == 0 or nxt < floor:
            return moves
        ends = [(len(a) - min(count, len(a)), len(a) - min(nxt, len(a))) for a in alive]
        saving, relative_cost, importance = (float(sum(s[k][e] - s[k][b] for s, (b, e) in zip(sums, ends)))
                                             for k in range(3))
        if saving <= 0:
            return moves  # removing them saves nothing now (their branch is already gone)
        best = max(best, importance / relative_cost)  # monotone: a cluster's moves go in order
        moves.append(_Move(cluster, [(i, a[b:e]) for (i, _), a, (b, e) in zip(members, alive, ends)], best, saving))
        count = nxt


def _take(moves: list[_Move], kept: torch.Tensor, spans: list[tuple[int, int]], excess: float) -> list[_Move]:
    """Remove the best-scored moves until their estimated saving covers half of ``excess`` (at least one).

    Half, because the linear estimate overstates what several removals save together (two units
    of one product term each claim the full term), and the cost model is re-read after each round.
    """
    saved, done = 0.0, []
    for move in sorted(moves, key=lambda m: m.score):
        _set(kept, spans, move, 0.0)
        done.append(move)
        saved += move.saving
        if saved >= excess / 2:
            break
    return done


def _refill(cost: CostModel, kept: torch.Tensor, spans: list[tuple[int, int]], taken: list[list[_Move]],
            budget: float) -> None:
    """Undo removals that still fit under the budget, the most important first.

    The last move taken can overshoot by a whole chunk (an attention head, a ``round_to`` block);
    undoing a group's latest move restores its most important removed units at a legal width.
    """
    while True:
        tops = sorted((stack[-1] for stack in taken if stack), key=lambda m: m.score, reverse=True)
        for move in tops:
            _set(kept, spans, move, 1.0)
            if cost.fraction(kept) <= budget:
                taken[move.cluster].pop()
                break
            _set(kept, spans, move, 0.0)
        else:
            return


def _set(kept: torch.Tensor, spans: list[tuple[int, int]], move: _Move, value: float) -> None:
    for group, units in move.parts:
        kept[[spans[group][0] + j for j in units]] = value

