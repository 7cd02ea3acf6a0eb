"""``report``: what compaction saves, before and after, per group and in total.

Numbers come from :mod:`autosparse.measure`: parameters (tied ones once), FLOPs of one forward pass
of the example inputs (``FlopCounterMode``: convolutions, linear layers, matmuls and attention; a
multiply-add is 2 FLOPs), bytes of parameters and buffers, and the median CPU latency.

A group's params and size are those of the tensors it slices; its FLOPs are those of the modules
that own those tensors, plus a parent whose parametrised children all belong to the group (the
attention module that computes the scores of the heads it gates). A tensor sliced by two groups
counts in both, so group rows do not add up to the total.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from autosparse.api import compact
from autosparse.compaction.compact import fold_gates
from autosparse.compaction.record import record_of
from autosparse.compaction.replay import moved
from autosparse.errors import ExampleInputsError
from autosparse.measure import BINARY_UNITS, SI_UNITS, count_params, flops_by_module, human, measure_latency
from autosparse.reporting.plots import plot_widths
from autosparse.state import STATE_ATTR, get_state, is_sparsified

_METRICS = ("params", "flops", "size_bytes", "latency_ms")


@dataclass
class Row:
    """One line of a :class:`Report`: a group (or the total) before and after compaction."""

    name: str
    units: tuple[int, int] | None = None
    params: tuple[int, int] | None = None
    flops: tuple[int, int] | None = None
    size_bytes: tuple[int, int] | None = None
    latency_ms: tuple[float, float] | None = None


@dataclass
class Report:
    """What :func:`report` returns; ``str()`` is a text table, :meth:`to_dict` / :meth:`to_json` for tools."""

    total: Row
    groups: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def row(r: Row) -> dict[str, Any]:
            out: dict[str, Any] = {"name": r.name}
            for key, value in asdict(r).items():
                if key != "name" and value is not None:
                    before, after = value
                    out[key] = {"before": before, "after": after, "ratio": after / before if before else None}
            return out

        return {"total": row(self.total), "groups": [row(g) for g in self.groups]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def __str__(self) -> str:
        header = ("", "units", "params", "FLOPs", "size", "latency")
        fmts: tuple[Callable[[Any], str], ...] = (str, lambda n: human(n, SI_UNITS), lambda n: human(n, SI_UNITS), lambda n: human(n, BINARY_UNITS),
                lambda ms: f"{ms:.2f} ms")
        rows: list[tuple[str, ...]] = [header]
        for r in [self.total, *self.groups]:
            cells = [r.name]
            for fmt, pair in zip(fmts, (r.units, r.params, r.flops, r.size_bytes, r.latency_ms)):
                cells.append("-" if pair is None else
                             f"{fmt(pair[0])} -> {fmt(pair[1])}" + (f" ({pair[1] / pair[0]:.2f}x)" if pair[0] else ""))
            rows.append(tuple(cells))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        if self.groups:
            lines.insert(3, "")
        return "\n".join(line.rstrip() for line in lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Bar chart of each group's units before and after (needs matplotlib)."""
        widths = {g.name: g.units for g in self.groups if g.units is not None}
        return plot_widths({k: v[0] for k, v in widths.items()}, {k: v[1] for k, v in widths.items()}, path)


def report(model: nn.Module, *, before: nn.Module | None = None, example_inputs: tuple | None = None,
           latency: bool = True, repeats: int = 20) -> Report:
    """Measure the model before and after compaction, per group and in total.

    Args:
        model: a gated model (it is compacted on a copy; "before" is its dense form), or a
            compacted one together with ``before``.
        before: the dense model, when ``model`` is already compacted (or any other model to compare).
        example_inputs: inputs for FLOPs and latency; a gated model's own example inputs by default.
        latency: also time both models on the CPU (median of ``repeats`` runs after 3 warm-ups).
        repeats: timed runs per model.

    Returns:
        A :class:`Report`: ``print(report)`` for a table, ``report.to_dict()`` for JSON.

    Raises:
        ExampleInputsError: no example inputs were given or stored.
        ValueError: ``model`` is compacted or plain and ``before`` is missing.

    Example:
        >>> print(autosparse.report(net))                      # gated: compacts a copy
        >>> autosparse.report(small, before=dense, example_inputs=(x,)).to_dict()
    """
    groups: dict[str, tuple[int, set[str]]] = {}
    if is_sparsified(model):
        state = get_state(model)
        example_inputs = example_inputs if example_inputs is not None else state.example_inputs
        after = _compacted(model)
        before = _dense(model) if before is None else before
        groups = _group_tensors(state, before)
    elif before is None:
        raise ValueError(f"report() needs before= (the dense model) to compare {type(model).__name__} with")
    else:
        after = model
    if example_inputs is None:
        raise ExampleInputsError("report() needs example_inputs to count FLOPs and time the model")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if latency:  # warm both first: the first forward of a process pays one-off setup costs
        for m in (before, after):
            measure_latency(m, inputs, repeats=1, warmup=2)
    sides = [_measure(m, inputs, latency, repeats) for m in (before, after)]
    total = Row("total", None, *(_pair(sides, key) for key in _METRICS))
    units = getattr(record_of(after), "groups", {}) or {}
    rows = [_group_row(name, units.get(name), tensors, sides) for name, (_, tensors) in groups.items()]
    rows += [Row(name, (u["before"], u["after"])) for name, u in units.items() if name not in groups]
    return Report(total, rows)


def _compacted(model: nn.Module) -> nn.Module:
    return compact(model, verify=False)


def _dense(model: nn.Module) -> nn.Module:
    """A plain copy of a gated model with gates folded in: the dense shapes, for measuring."""
    dense = copy.deepcopy(model)
    fold_gates(dense)
    dense.__dict__.pop(STATE_ATTR, None)
    return dense


def _group_tensors(state: Any, dense: nn.Module) -> dict[str, tuple[int, set[str]]]:
    """Per gated group, the tensors it slices (channels, heads) or removes (whole residual branches)."""
    names = [name for name, _ in [*dense.named_parameters(), *dense.named_buffers()]]
    out = {}
    for gg in state.plan.gated:
        if getattr(gg, "branches", None):
            prefixes = tuple(f"{b.module}." for b in gg.branches)
            tensors = {name for name in names if name.startswith(prefixes)}
        else:
            units = np.asarray(gg.group.units)
            tensors = {m.name for m in state.plan.analysis.members if np.isin(m.ids, units).any()}
        out[gg.name] = (len(gg.units), tensors)
    return out


def _measure(model: nn.Module, inputs: tuple, latency: bool, repeats: int) -> dict[str, Any]:
    flops = flops_by_module(model, inputs)
    return {
        "model": model,
        "params": count_params(model),
        "flops": flops.get("", 0),
        "module_flops": _exclusive(model, flops),
        "tensors": {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]},
        "size_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
        "latency_ms": measure_latency(model, inputs, repeats=repeats, warmup=3).median_ms if latency else None,
    }


def _exclusive(model: nn.Module, inclusive: dict[str, int]) -> dict[str, int]:
    """FLOPs each module performs itself, not counting its submodules."""
    out = dict(inclusive)
    for name in inclusive:
        if name:
            parent = name.rpartition(".")[0]
            out[parent] = out.get(parent, 0) - inclusive[name]
    return out


def _pair(sides: list[dict[str, Any]], key: str) -> tuple[Any, Any] | None:
    before, after = sides[0][key], sides[1][key]
    return None if before is None or after is None else (before, after)


def _group_row(name: str, units: dict[str, int] | None, tensors: set[str], sides: list[dict]) -> Row:
    modules = _group_modules(sides[0]["model"], tensors)
    record = record_of(sides[1]["model"])
    gone = (list(getattr(record, "replaced", []) or []), list(getattr(record, "dropped_layers", []) or []))
    params: list[int] = []
    sizes: list[int] = []
    flops: list[int] = []
    for i, side in enumerate(sides):  # before, after
        # The compacted model may have lost branches and renumbered layers: follow each name there.
        where = (lambda n: n) if i == 0 else (lambda n: moved(n, *gone))
        present = [side["tensors"].get(where(t)) for t in tensors]
        present = [t for t in present if t is not None]
        params.append(sum(t.numel() for t in present if isinstance(t, nn.Parameter)))
        sizes.append(sum(t.numel() * t.element_size() for t in present))
        flops.append(sum(side["module_flops"].get(where(m), 0) for m in modules))
    return Row(name, (units["before"], units["after"]) if units else None,
               (params[0], params[1]), (flops[0], flops[1]), (sizes[0], sizes[1]))


def _group_modules(model: nn.Module, tensors: set[str]) -> set[str]:
    owners = {t.rpartition(".")[0] for t in tensors}
    modules = set(owners)
    for owner in owners:
        parent = owner.rpartition(".")[0] if owner else None
        if parent is None or parent in modules:
            continue
        children = [f"{parent}.{n}" if parent else n for n, c in model.get_submodule(parent).named_children()
                    if any(True for _ in c.parameters())]
        if children and all(c in owners for c in children):
            modules.add(parent)
    return modules
