"""``explain``: a readable report of what autosparse found, gated, and left alone (and why).

Each group of coupled units is listed with its status (``gated``: it has a gate; ``candidate``:
prunable, but the policy did not select it), the width ``compact()`` would keep (open gates topped
up to the rule's ``min_keep`` and ``round_to``), a label a person recognises ("layer1 residual
stream (3 convs, 64 ch)") and every member module, never truncated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autosparse.analysis import Analysis, Group, analyze
from autosparse.capture import capture
from autosparse.compaction.record import record_of
from autosparse.gating.kept import kept_masks
from autosparse.state import SparsityState, get_state, is_sparsified, unwrap


@dataclass
class GroupReport:
    """One group of coupled units in an :class:`Explanation`.

    ``name`` is the group's key in :func:`autosparse.gates`; ``kept`` the units ``compact()`` keeps
    now (``min_keep`` and ``round_to`` applied; ``None`` for a candidate); ``open`` the gates that
    are not zero; ``reason`` why a candidate has no gate.
    """

    name: str
    granularity: str
    units: int
    prunable: int
    kept: int | None
    producers: list[str]
    consumers: list[str]
    reason: str = ""
    label: str = ""
    status: str = "candidate"  # "gated" | "candidate"
    open: int | None = None


@dataclass
class Explanation:
    """The report returned by :func:`explain`; ``str()`` renders it, ``to_dict()`` gives JSON.

    ``compacted`` is set for a model that ``compact()`` (or ``load``) produced: the widths of each
    group before and after.
    """

    groups: list[GroupReport] = field(default_factory=list)
    unprunable: list[tuple[str, str]] = field(default_factory=list)
    unknown_ops: list[str] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    capture_kind: str = ""
    compacted: dict[str, dict[str, int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "capture": self.capture_kind,
            "compacted": self.compacted,
            "groups": [vars(g) for g in self.groups],
            "unprunable": [{"where": w, "reason": r} for w, r in self.unprunable],
            "unknown_ops": self.unknown_ops,
            "totals": self.totals,
        }

    def __str__(self) -> str:
        lines = _compacted_lines(self.compacted)
        if self.capture_kind:
            lines.append(f"autosparse analysis (graph from {self.capture_kind})")
        if self.totals:
            lines.append("  " + ", ".join(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}"
                                          for k, v in self.totals.items()))
        if self.groups:
            gated = sum(g.status == "gated" for g in self.groups)
            lines.append(f"{len(self.groups)} groups: {gated} gated, {len(self.groups) - gated} candidate(s) "
                         "(prunable, no gate); kept/units is what compact() keeps, round_to applied")
        for g in self.groups:
            lines.extend(_group_lines(g))
        if self.unprunable:
            lines.append("left ungated:")
            lines.extend(f"  - {w}: {r}" for w, r in self.unprunable)
        if self.unknown_ops:
            lines.append("ops without a rule (their channels are kept whole):")
            lines.extend(f"  - {op}" for op in self.unknown_ops)
        return "\n".join(lines)


def _group_lines(g: GroupReport) -> list[str]:
    width = f"{g.kept}/{g.units} kept" if g.kept is not None else f"{g.units} units"
    opened = f"; {g.open} of {g.units} gates open" if g.open is not None and g.open != g.kept else ""
    lines = [f"[{g.status}] {g.granularity} {width}  {g.label or g.name}",
             f"    group {g.name!r}{opened}{'; no gate: ' + g.reason if g.reason else ''}",
             f"    producers: {', '.join(g.producers)}"]
    if g.consumers:
        lines.append(f"    gate sites: {', '.join(g.consumers)}")
    return lines


def _compacted_lines(compacted: dict[str, dict[str, int]] | None) -> list[str]:
    if compacted is None:
        return []
    lines = [f"already compacted: autosparse.compact() removed units from "
             f"{sum(w['after'] < w['before'] for w in compacted.values())} of {len(compacted)} groups; "
             "it has no gates left. Explain the gated model for what was gated and why, or pass "
             "example_inputs= to analyse this one again"]
    lines.extend(f"  {name}: {w['before']} -> {w['after']}" for name, w in compacted.items())
    return lines


def explain(model: nn.Module, *, example_inputs: tuple | None = None) -> Explanation:
    """Report every group (status, label, units kept/total, members), and every place left ungated.

    Works on a sparsified model (its stored plan and current gate values), on a model that
    ``compact()`` produced (the widths it kept; with ``example_inputs`` also a fresh analysis of it),
    or on any model given ``example_inputs`` (the analysis runs; the model is not touched).

    Raises:
        ExampleInputsError: the model is neither sparsified nor compacted and ``example_inputs``
            is missing or does not fit.

    Example:
        >>> print(autosparse.explain(net))
        [gated] channel 24/48 kept  layer1 residual stream (3 convs, 48 ch)
    """
    inner = unwrap(model)
    record = record_of(inner)
    if record is not None and example_inputs is None and not is_sparsified(model):
        return Explanation(compacted=dict(record.groups))
    if not is_sparsified(model):
        analysis = analyze(capture(model, example_inputs))
        report = _report(analysis, {}, {}, dict(inner.named_modules()))
        report.unprunable = list(analysis.unprunable)
        report.compacted = dict(record.groups) if record is not None else None
        return report
    state = get_state(model)
    gates = {gg.name: (gg, gate) for gg, gate in zip(state.plan.gated, state.gate_list())}
    widths = _widths(state)
    skipped = dict(state.plan.skipped)
    wanted = {str(r.granularity) for r in state.policy.rules}
    analysis = state.plan.require_analysis()
    for g in analysis.groups:
        if g.name not in gates and g.name not in skipped and g.granularity not in wanted:
            skipped[g.name] = f"the policy has no {g.granularity} rule"
    report = _report(analysis, widths, skipped, dict(inner.named_modules()))
    for gg, _ in (v for v in gates.values() if v[0].branches):
        kept, opened = widths[gg.name]
        report.groups.append(GroupReport(
            gg.name, "layer", len(gg.units), len(gg.units), kept, [b.module for b in gg.branches],
            [b.weight for b in gg.branches], label=f"{gg.name} ({len(gg.units)} residual branches)",
            status="gated", open=opened))
    report.unprunable = analysis.unprunable + state.plan.skipped
    return report


def _widths(state: SparsityState) -> dict[str, tuple[int | None, int | None]]:
    """Per gated group: (units compact() keeps, open gates). A model gated on the meta device has
    no gate values yet (``autosparse.io.materialize`` gives them): its groups are reported with
    their sizes only, as the shapes are all the plan needs."""
    gate_list = state.gate_list()
    if any(gate.gamma.is_meta for gate in gate_list):
        return {gg.name: (None, None) for gg in state.plan.gated}
    masks = kept_masks(gate_list, [gg.rule for gg in state.plan.gated])  # what compact() keeps
    return {gg.name: (int(mask.sum()), gate.kept()) for gg, gate, mask in zip(state.plan.gated, gate_list, masks)}


def _report(analysis: Analysis, widths: dict[str, tuple[int | None, int | None]], skipped: dict[str, str],
            modules: dict[str, nn.Module]) -> Explanation:
    out = Explanation(capture_kind=analysis.capture_kind, unknown_ops=analysis.unknown_ops)
    for g in analysis.groups:
        prunable = len(g.units) - len(g.blocked)
        if prunable < 2:
            continue
        consumers = list(dict.fromkeys(s.name.rsplit(".", 1)[0] for s in g.sites))
        kept, opened = widths.get(g.name, (None, None))
        out.groups.append(GroupReport(
            g.name, g.granularity, len(g.units), prunable, kept, g.producers, consumers,
            reason=skipped.get(g.name, ""), label=group_label(g, modules),
            status="gated" if g.name in widths else "candidate", open=opened))
    return out


def group_label(group: Group, modules: dict[str, nn.Module]) -> str:
    """A name a person recognises: ``layer1 residual stream (3 convs, 64 ch)``.

    One producer: its own name. Several producers under one parent (an attention block's q/k/v, an
    MLP's gate and up projections): the parent. Several parents (a residual add couples the stem
    and every block of a stage): the module path most of them share, as a residual stream.

    Example:
        >>> group_label(Group("stem", "channel", list(range(64)), ["stem", "layer1.0.conv2"]), {})
        'layer1 residual stream (2 modules, 64 ch)'
    """
    kinds = Counter(_kind(modules.get(p)) for p in group.producers)
    members = ", ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in kinds.items())
    size = f"{len(group.units)} {'heads' if group.granularity == 'head' else 'ch'}"
    parents = list(dict.fromkeys(p.rpartition(".")[0] for p in group.producers))
    if len(group.producers) == 1:
        what = group.producers[0] or type(modules.get("", nn.Module())).__name__
    elif len(parents) == 1:
        what = f"{parents[0] or 'model'} {'attention heads' if group.granularity == 'head' else 'joint outputs'}"
    else:
        what = f"{_shared_prefix(group.producers) or 'model'} residual stream"
    return f"{what} ({members}, {size})"


def _kind(module: nn.Module | None) -> str:
    names = [c.__name__ for c in type(module).__mro__] if module is not None else []
    if any(n.startswith("Conv") and "Transpose" not in n and n != "Conv1D" for n in names):
        return "conv"
    if any(n in ("Linear", "Conv1D") for n in names):  # Hugging Face's Conv1D is a transposed Linear
        return "linear"
    plain = [n for n in names if not n.startswith("Parametrized")]  # the class a gated module wraps
    return plain[0].lower() if plain else "module"


def _shared_prefix(names: list[str]) -> str:
    """The dotted prefix most names share (at least two, and at least half); the longest on a tie."""
    counts = Counter(tuple(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1))
    best = [(c, len(p), p) for p, c in counts.items() if c >= 2 and 2 * c >= len(names)]
    return ".".join(max(best)[2]) if best else ""
