"""Which units of a gate survive compaction: the open ones, topped up to the rule's floor.

Compaction and the cost model (which predicts what compaction will keep) both ask this; this is
the one answer. Topping up uses zero-gated units of largest ``gamma``: their gate value is 0, so
keeping them changes nothing in the output and compaction stays exact.

The groups of a ``uniform: true`` rule keep one common count, decided jointly (:func:`kept_masks`):

* ``exact`` (compaction): the largest count any of the groups needs, each group topped up to it
  with zero-gated units, so no unit with a non-zero gate is ever dropped;
* ``predict`` (the cost model, the freeze step): the rounded mean of the groups' open-unit counts,
  each group keeping its top units by gate value. A group with more open units than that loses
  some non-zero units, which changes the output: :func:`autosparse.training.freeze` does exactly
  that cut (it forces those units off), after which both modes agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from autosparse.gating.gate import Gate, raise_on_meta
from autosparse.policy.rule import Rule


def kept_mask(gate: Gate, rule: Rule) -> torch.Tensor:
    """A bool vector over ``gate``'s units (on the CPU): True where compaction keeps the unit.

    Ignores ``rule.uniform`` (one gate alone cannot know the common count): see :func:`kept_masks`.

    Example:
        >>> g = Gate("conv1", "channel", 4).zero_([0, 1, 2])
        >>> kept_mask(g, Rule("channel", min_keep=2)).tolist()  # equal gammas: the first zero-gated unit
        [True, False, False, True]
    """
    with torch.no_grad():
        kept = (gate.values().detach() != 0).cpu()
        need = rule.kept_count(int(kept.sum()), gate.size) - int(kept.sum())
        if need > 0:
            gamma = gate.gamma.detach().float().cpu().masked_fill(kept, float("-inf"))
            kept[torch.argsort(gamma, descending=True, stable=True)[:need]] = True
    return kept


def kept_masks(gates: Sequence[Gate], rules: Sequence[Rule], *, predict: bool = False) -> list[torch.Tensor]:
    """:func:`kept_mask` for every gate, with the gates of each ``uniform`` rule keeping a common count.

    Args:
        gates: The gates, in plan order.
        rules: The rule of each gate (the groups of one rule share its name).
        predict: False (compaction): the common count is the largest any group needs, so every
            open unit stays (exact). True (cost model, freeze): the rounded mean of the open counts.

    Returns:
        One bool vector per gate.

    Example:
        >>> rule = Rule("head", name="heads", uniform=True)
        >>> a, b = Gate("a", "head", 4).zero_([0, 1, 2]), Gate("b", "head", 4).zero_([0])
        >>> [int(m.sum()) for m in kept_masks([a, b], [rule, rule])]
        [3, 3]
        >>> [m.tolist() for m in kept_masks([a, b], [rule, rule], predict=True)]
        [[True, False, False, True], [False, True, True, False]]
    """
    raise_on_meta("which units compaction keeps", gates)  # the cost model, compact, explain
    masks: list[torch.Tensor | None] = [None] * len(gates)
    for members in uniform_clusters(rules):
        if len(members) == 1 and not rules[members[0]].uniform:
            masks[members[0]] = kept_mask(gates[members[0]], rules[members[0]])
            continue
        chosen = [gates[i] for i in members]
        for i, k in zip(members, common_counts(chosen, rules[members[0]], predict)):
            masks[i] = top_units(gates[i], k)
    return masks  # type: ignore[return-value]


def uniform_clusters(rules: Sequence[Rule]) -> list[list[int]]:
    """Indices of groups whose widths move together: all groups of a uniform rule; any other alone.

    Example:
        >>> u, f = Rule("head", name="u", uniform=True), Rule("channel", name="f")
        >>> uniform_clusters([u, f, u, f])
        [[0, 2], [1], [3]]
    """
    clusters: dict[object, list[int]] = {}
    for i, rule in enumerate(rules):
        clusters.setdefault(rule.name if rule.uniform else ("alone", i), []).append(i)
    return list(clusters.values())


def common_counts(gates: Sequence[Gate], rule: Rule, predict: bool) -> list[int]:
    """Per gate of a uniform rule, the units it keeps (the common count, capped at its size).

    Example:
        >>> a, b = Gate("a", "channel", 16).zero_(range(11)), Gate("b", "channel", 16).zero_(range(9))
        >>> common_counts([a, b], Rule("channel", round_to=4, uniform=True), predict=True)  # mean 6 -> 8
        [8, 8]
    """
    with torch.no_grad():
        opened = [int((g.values().detach() != 0).sum()) for g in gates]
    if predict:
        raw = math.floor(sum(opened) / len(opened) + 0.5)
    else:
        raw = max(rule.kept_count(o, g.size) for o, g in zip(opened, gates))
    return [rule.kept_count(min(raw, g.size), g.size) for g in gates]


def top_units(gate: Gate, k: int) -> torch.Tensor:
    """A bool vector marking the ``k`` units of largest gate value (ties: largest ``gamma``, then index).

    Example:
        >>> g = Gate("a", "channel", 4).zero_([1, 3])
        >>> top_units(g, 3).tolist()
        [True, True, True, False]
    """
    with torch.no_grad():
        values = gate.values().detach().float().cpu()
        by_gamma = torch.argsort(gate.gamma.detach().float().cpu(), descending=True, stable=True)
        order = by_gamma[torch.argsort(values[by_gamma], descending=True, stable=True)]
    kept = torch.zeros(gate.size, dtype=torch.bool)
    kept[order[:k]] = True
    return kept
