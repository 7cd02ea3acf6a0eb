"""``GateLogger``: the kept fraction of every group over training, for logs and plots.

Example:
    >>> log = GateLogger(net, every=50, sink=print)
    >>> for step, (x, y) in enumerate(loader):
    ...     loss = criterion(net(x), y) + autosparse.penalty(net)
    ...     ...
    ...     log.step(step)
    >>> log.plot("kept.png")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from autosparse.api import gates
from autosparse.reporting.plots import plot_kept_fraction
from autosparse.state import get_state

Sink = Callable[[int, dict[str, float]], Any]


class GateLogger:
    """Record ``gate.kept() / gate.size`` per group every ``every`` steps.

    Args:
        net: a gated model (from :func:`autosparse.sparsify`).
        every: record on steps that are multiples of ``every`` (and on the first call).
        sink: called as ``sink(step, {group: kept_fraction})`` on each record, e.g. ``print``
            or a function writing to TensorBoard / Weights & Biases.

    Attributes:
        history: ``{group: [(step, kept_fraction), ...]}``, what :func:`~autosparse.reporting.plots.plot_kept_fraction` draws.
    """

    def __init__(self, net: nn.Module, every: int = 1, *, sink: Sink | None = None) -> None:
        if int(every) < 1:
            raise ValueError(f"GateLogger: every must be >= 1, got {every}")
        get_state(net)  # fail now, not at the first step, if net has no gates
        self.net, self.every, self.sink = net, int(every), sink
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._calls = 0

    def step(self, step: int | None = None) -> dict[str, float] | None:
        """Call once per training step; returns the fractions when it recorded, else None.

        Args:
            step: the global step; by default the number of earlier calls.
        """
        step = self._calls if step is None else int(step)
        self._calls += 1
        if step % self.every and self._calls > 1:
            return None
        return self.record(step)

    def record(self, step: int) -> dict[str, float]:
        """Record the kept fraction of every group now, whatever the step."""
        fractions = {name: gate.kept() / gate.size for name, gate in gates(self.net).items()}
        for name, fraction in fractions.items():
            self.history.setdefault(name, []).append((step, fraction))
        if self.sink is not None:
            self.sink(step, fractions)
        return fractions

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {name: [[s, f] for s, f in points] for name, points in self.history.items()}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the history as JSON ``{group: [[step, fraction], ...]}``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """PNG of the kept fraction per group over steps (needs matplotlib)."""
        return plot_kept_fraction(self.history, path)
