"""Which units of a gate survive compaction: the open ones, topped up to the rule's floor.

Compaction and the cost model (which predicts what compaction will keep) both ask this; this is
the one answer. Topping up uses zero-gated units of largest ``gamma``: their gate value is 0, so
keeping them changes nothing in the output and compaction stays exact.
"""

from __future__ import annotations

import torch

from autosparse.gating.gate import Gate
from autosparse.policy.rule import Rule


def kept_mask(gate: Gate, rule: Rule) -> torch.Tensor:
    """A bool vector over ``gate``'s units (on the CPU): True where compaction keeps the unit.

    Example:
        >>> g = Gate("conv1", "channel", 4); g.zero_([0, 1, 2])
        >>> kept_mask(g, Rule("channel", min_keep=2)).tolist()
        [False, False, True, True]
    """
    with torch.no_grad():
        kept = (gate.values().detach() != 0).cpu()
        need = rule.kept_count(int(kept.sum()), gate.size) - int(kept.sum())
        if need > 0:
            gamma = gate.gamma.detach().float().cpu().masked_fill(kept, float("-inf"))
            kept[torch.argsort(gamma, descending=True, stable=True)[:need]] = True
    return kept
