"""``autosparse demo``: an over-wide CNN on scikit-learn's digits, trained with gates to a FLOPs
budget and compacted; :mod:`~autosparse.demo.data` loads the data sets that ship in packages."""

from __future__ import annotations

from autosparse.demo.run import WIDTHS, accuracy, budget_policy, fit, main, run, wide_cnn, widths_table

__all__ = ["WIDTHS", "accuracy", "budget_policy", "fit", "main", "run", "wide_cnn", "widths_table"]
