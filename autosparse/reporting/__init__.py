"""What a user reads: :func:`report` (before/after numbers), :func:`explain` (what was gated and why),
:class:`GateLogger` (gate widths over training) and the plots (matplotlib, imported only when drawing)."""

from __future__ import annotations

from autosparse.reporting.explain import Explanation, explain
from autosparse.reporting.logger import GateLogger
from autosparse.reporting.report import Report, report

__all__ = ["Explanation", "GateLogger", "Report", "explain", "report"]
