"""``explain``: a readable report of what autosparse found, gated, and left alone (and why)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autosparse.analysis import Analysis, analyze
from autosparse.capture import capture
from autosparse.state import get_state, is_sparsified


@dataclass
class GroupReport:
    name: str
    granularity: str
    units: int
    prunable: int
    kept: int | None
    producers: list[str]
    consumers: list[str]
    reason: str = ""


@dataclass
class Explanation:
    """The report returned by :func:`explain`; ``str()`` renders it, ``to_dict()`` gives JSON."""

    groups: list[GroupReport] = field(default_factory=list)
    unprunable: list[tuple[str, str]] = field(default_factory=list)
    unknown_ops: list[str] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    capture_kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "capture": self.capture_kind,
            "groups": [vars(g) for g in self.groups],
            "unprunable": [{"where": w, "reason": r} for w, r in self.unprunable],
            "unknown_ops": self.unknown_ops,
            "totals": self.totals,
        }

    def __str__(self) -> str:
        lines = [f"autosparse analysis (graph from {self.capture_kind})"]
        if self.totals:
            lines.append("  " + ", ".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}"
                                          for k, v in self.totals.items()))
        lines.append(f"{'group':<36} {'gran.':<8} {'kept/units':>11}  producers -> gate sites")
        for g in self.groups:
            kept = f"{g.kept if g.kept is not None else g.prunable}/{g.units}"
            lines.append(f"{g.name[:36]:<36} {g.granularity:<8} {kept:>11}  "
                         f"{', '.join(g.producers[:3])}{' ...' if len(g.producers) > 3 else ''} -> "
                         f"{', '.join(g.consumers[:3])}{' ...' if len(g.consumers) > 3 else ''}")
        if self.unprunable:
            lines.append("left ungated:")
            lines.extend(f"  - {w}: {r}" for w, r in self.unprunable)
        if self.unknown_ops:
            lines.append("ops without a rule (their channels are kept whole):")
            lines.extend(f"  - {op}" for op in self.unknown_ops)
        return "\n".join(lines)


def explain(model: nn.Module, *, example_inputs: tuple | None = None) -> Explanation:
    """Report every group (members, units kept/total), and every place left ungated with the reason.

    Works on a sparsified model (uses its stored plan and current gate values) or on any model
    given ``example_inputs`` (runs the analysis without touching the model).

    Example:
        >>> print(autosparse.explain(net))
    """
    if is_sparsified(model):
        state = get_state(model)
        analysis = state.plan.analysis
        kept = {gg.name: gate.kept() for gg, gate in zip(state.plan.gated, state.gate_list())}
        skipped = state.plan.skipped
    else:
        analysis = analyze(capture(model, example_inputs))
        kept, skipped = {}, []
    report = _report(analysis, kept)
    if is_sparsified(model):
        for gg in (gg for gg in state.plan.gated if gg.branches):
            report.groups.append(GroupReport(gg.name, "layer", len(gg.units), len(gg.units), kept.get(gg.name),
                                             [b.module for b in gg.branches], [b.weight for b in gg.branches]))
    report.unprunable = analysis.unprunable + skipped
    return report


def _report(analysis: Analysis, kept: dict[str, int]) -> Explanation:
    out = Explanation(capture_kind=analysis.capture_kind, unknown_ops=analysis.unknown_ops)
    for g in analysis.groups:
        prunable = len(g.units) - len(g.blocked)
        if prunable < 2:
            continue
        consumers = list(dict.fromkeys(s.name.rsplit(".", 1)[0] for s in g.sites))
        out.groups.append(GroupReport(g.name, g.granularity, len(g.units), prunable, kept.get(g.name),
                                      g.producers, consumers))
    return out
