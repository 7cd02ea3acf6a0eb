"""One-shot structured pruning on the gate engine: score units, rank them globally, compact.

* :func:`prune`: the one call (``model`` + policy with a ``target`` -> a smaller plain model);
* :func:`unit_importance`: ``l1`` / ``l2`` / ``taylor`` / ``random`` scores of every gated unit;
* :func:`select_units`: the global, cost-aware ranking that zeroes the gates of the units to remove.

See docs/pruning.md.

Example:
    >>> from autosparse.pruning import prune
    >>> small = prune(model, {"rules": [{"granularity": "channel"}], "target": {"flops": 0.3}},
    ...               example_inputs=(x,), importance="l2")
"""

from __future__ import annotations

from autosparse.pruning.importance import IMPORTANCES, default_loss, unit_importance
from autosparse.pruning.oneshot import prune, selection_of
from autosparse.pruning.select import Selection, select_units

__all__ = ["IMPORTANCES", "Selection", "default_loss", "prune", "select_units", "selection_of", "unit_importance"]
