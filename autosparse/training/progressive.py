"""Progressive closing for the ``pretrained`` regime: units go a few at a time, never above the reference.

From a trained model the gates have little time to decide on their own; waiting for them and then
closing whatever is still over budget at the freeze step (:func:`~autosparse.training.budget.enforce`)
removes a large part of a trained network at once, with little fine-tuning left to recover. In the
``pretrained`` regime :func:`~autosparse.training.schedule.step` instead calls :func:`close_to` after
every step of the ramp, with the controller's reference as the target, so the predicted cost follows
the reference down from 1 to the budget and the freeze has nothing left to close.

Which unit goes next: the open unit with the lowest ``(v_i / mean_open(v_g)) * (n_g / k_g)``, where
``v`` are the gate values of its group ``g`` (``n_g`` units, ``k_g`` of them open). The first factor
ranks the units of a group by their gate, which in this regime starts at the units' l2 magnitude
and then follows the penalty and the task loss. The second protects a group as it narrows: with
uninformative gates every group loses the same fraction of its units (Torch-Pruning's uniform
allocation), and a group is only cut much deeper than the others when its gates say so. Ranking by
cost per unit instead (``enforce``) strips the most expensive layer first and, at 5 % of the FLOPs
of a three-layer CNN, leaves a 2-channel bottleneck (widths 59-2-64, 79 % accuracy, against 96 %
for a uniform cut).

Example:
    >>> closed = close_to(get_state(net), cost, 0.4)   # done by training.step in the pretrained regime
"""

from __future__ import annotations

import torch

from autosparse.gating.gate import Gate
from autosparse.state import SparsityState
from autosparse.training.budget import CostModel


def close_to(state: SparsityState, cost: CostModel, target: float) -> list[tuple[str, int]]:
    """Close open units in the order above until the predicted cost is at most ``target``.

    A group never drops below its rule's floor (``min_keep``, ``round_to``); if every group is at its
    floor the loop stops over target (``check_reachable`` rules that out for the budget itself).

    Returns:
        ``(group name, unit index)`` of every unit closed, in order.
    """
    gates = state.gate_list()
    floors = cost.smallest(state)
    values = [_values(gate) for gate in gates]  # only the gate that closed a unit changes per round
    closed: list[tuple[str, int]] = []
    while cost.fraction(cost.kept_now(state)) > target:
        best: tuple[int, int] | None = None
        best_score = float("inf")
        for i, gate in enumerate(gates):
            alive = (values[i] != 0).nonzero().flatten()
            lo, hi = cost.offsets[i], cost.offsets[i + 1]
            if len(alive) <= int(floors[lo:hi].sum()):
                continue
            mean = float(values[i][alive].mean()) or 1.0
            scores = values[i][alive] / mean * (gate.size / len(alive))
            j = int(torch.argmin(scores))
            if float(scores[j]) < best_score:
                best, best_score = (i, int(alive[j])), float(scores[j])
        if best is None:
            return closed
        gates[best[0]].zero_([best[1]])
        values[best[0]] = _values(gates[best[0]])
        closed.append((state.plan.gated[best[0]].name, best[1]))
    return closed


def _values(gate: Gate) -> torch.Tensor:
    with torch.no_grad():
        return gate.values().detach().double().cpu()
