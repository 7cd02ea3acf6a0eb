"""Plan: policy x analysis -> which groups get a gate, with their limits. Pure; nothing is mutated."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from autosparse.analysis import Analysis, Group
from autosparse.analysis.branches import Branch
from autosparse.errors import NoGatesError, warn
from autosparse.policy.document import Policy, Rule


@dataclass
class GatedGroup:
    """A group that gets a gate: its analysed structure and the rule that selected it."""

    key: str  # state_dict-safe name
    group: Group
    rule: Rule
    units: list[int]  # class roots gated, in gate order (branch indices for layer groups)
    branches: list[Branch] = field(default_factory=list)  # layer granularity only

    @property
    def name(self) -> str:
        return self.group.name


@dataclass
class Plan:
    """Everything ``sparsify`` will do, decided before the model is touched."""

    gated: list[GatedGroup]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (group, reason)
    analysis: Analysis | None = None

    def site_indices(self) -> dict[tuple[str, int], tuple[list[int], np.ndarray]]:
        """For each consumer (tensor, dim): the gates it reads and its position -> value index.

        The value index points into the concatenation of the used gates' values followed by one
        1 (positions no gate controls); see :class:`~autosparse.gating.gate.GateSite`.
        """
        sites: dict[tuple[str, int], tuple[list[int], np.ndarray]] = {}
        for i, gg in enumerate(self.gated):
            for j, branch in enumerate(gg.branches):  # layer gates scale the branch's output weight
                sites[(branch.weight, branch.out_dim)] = ([i], np.full(branch.size, j, dtype=np.int64))
                if branch.bias:
                    sites[(branch.bias, 0)] = ([i], np.full(branch.size, j, dtype=np.int64))
        gate_of, unit_of = self._unit_lookup()
        sizes = np.array([len(gg.units) for gg in self.gated], dtype=np.int64)
        members = self.analysis.members if self.analysis is not None and len(gate_of) else []
        for member in members:
            if member.role != "consumer" or (member.name, member.dim) in sites:
                continue
            ids = np.asarray(member.ids, dtype=np.int64)
            known = ids < len(gate_of)
            gate = np.where(known, gate_of[np.where(known, ids, 0)], -1)
            used = np.unique(gate[gate >= 0])
            if not len(used):
                continue
            offset = np.zeros(len(self.gated), dtype=np.int64)
            offset[used] = np.concatenate([[0], np.cumsum(sizes[used])[:-1]])
            ones = int(sizes[used].sum())
            index = np.where(gate >= 0, offset[np.maximum(gate, 0)] + unit_of[np.where(known, ids, 0)], ones)
            sites[(member.name, member.dim)] = (used.tolist(), index.astype(np.int64))
        return sites

    def _unit_lookup(self) -> tuple[np.ndarray, np.ndarray]:
        """Arrays over element roots: the gate (-1: none) and the unit within it of each root."""
        roots = [r for gg in self.gated if not gg.branches for r in gg.units]  # layer units are branches
        size = max(roots, default=-1) + 1
        gate_of, unit_of = np.full(size, -1, dtype=np.int64), np.zeros(size, dtype=np.int64)
        for i, gg in enumerate(self.gated):
            if not gg.branches:
                gate_of[gg.units] = i
                unit_of[gg.units] = np.arange(len(gg.units))
        return gate_of, unit_of


def _key(name: str, taken: set[str]) -> str:
    base = name.replace(".", "__") or "root"
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key


def make_plan(policy: Policy, analysis: Analysis, model: nn.Module,
              branches: list[Branch] | None = None) -> Plan:
    """Match every prunable group against the policy's rules (first match wins).

    Raises:
        NoGatesError: no group matched any rule (the message lists why groups were skipped).
    """
    modules = dict(model.named_modules())
    gated, skipped, taken = [], [], set()
    used_rules: set[int] = set()
    for group in analysis.groups:
        if not any(str(r.granularity) == group.granularity for r in policy.rules):
            continue
        free = [r for r in group.units if r not in group.blocked]
        if len(free) < 2:
            continue
        rule = _first_rule(policy, group, modules)
        if rule is None:
            skipped.append((group.name, f"no {group.granularity} rule matches {group.producers}"))
            continue
        used_rules.add(id(rule))
        gated.append(GatedGroup(_key(group.name, taken), group, rule, free))
    for gg in _layer_groups(policy, branches or [], modules, taken):
        used_rules.add(id(gg.rule))
        gated.append(gg)
    for rule in policy.rules:
        if id(rule) not in used_rules:
            warn(f"policy rule '{rule.name}' ({rule.granularity}) matched no prunable group")
    if not gated:
        raise NoGatesError(_nothing_message(policy, analysis, skipped))
    return Plan(gated, skipped, analysis)


def _layer_groups(policy: Policy, branches: list[Branch], modules: dict[str, nn.Module],
                  taken: set[str]) -> list[GatedGroup]:
    """Branches of one kind (e.g. every attention sub-block) compete inside one layer gate."""
    by_kind: dict[tuple[str, int], list[Branch]] = {}
    for branch in branches:
        rule = next((r for r in policy.rules if str(r.granularity) == "layer"
                     and r.matches(branch.module, modules.get(branch.module))), None)
        if rule is not None:
            by_kind.setdefault((branch.kind, id(rule)), []).append(branch)
    out = []
    for (kind, _), members in by_kind.items():
        if len(members) < 2:  # a normalised share over one unit can never reach zero
            continue
        rule = next(r for r in policy.rules if str(r.granularity) == "layer"
                    and r.matches(members[0].module, modules.get(members[0].module)))
        group = Group(f"{kind} branches", "layer", list(range(len(members))), [b.module for b in members])
        out.append(GatedGroup(_key(f"layers_{kind}", taken), group, rule, list(range(len(members))), members))
    return out


def _first_rule(policy: Policy, group: Group, modules: dict[str, nn.Module]) -> Rule | None:
    for rule in policy.rules:
        if str(rule.granularity) != group.granularity:
            continue
        if any(rule.matches(name, modules.get(name)) for name in group.producers):
            return rule
    return None


def _nothing_message(policy: Policy, analysis: Analysis, skipped: list[tuple[str, str]]) -> str:
    wanted = sorted({str(r.granularity) for r in policy.rules})
    found = sorted({g.granularity for g in analysis.groups if len(g.units) - len(g.blocked) >= 2})
    lines = [f"the policy (granularity {', '.join(wanted)}) selected no prunable group."]
    if not found:
        lines.append("The model has no prunable groups at all.")
    else:
        lines.append(f"Prunable groups exist at granularity: {', '.join(found)}; add a rule for them.")
    for where, why in (analysis.unprunable + skipped)[:8]:
        lines.append(f"  - {where}: {why}")
    lines.append("Run autosparse.explain(model, example_inputs=...) for the full analysis.")
    return "\n".join(lines)
