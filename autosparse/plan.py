"""Plan: policy x analysis -> which groups get a gate, with their limits. Pure; nothing is mutated."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np
from torch import nn

from autosparse.analysis import Analysis, Group, Role
from autosparse.analysis.branches import Branch
from autosparse.errors import NoGatesError, NotSparsifiedError, warn
from autosparse.policy.document import Policy
from autosparse.policy.rule import Rule


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

    def require_analysis(self) -> Analysis:
        """The analysis the plan was made from (:func:`make_plan` always records one).

        Raises:
            NotSparsifiedError: the plan carries no analysis, so its model's gates cannot be resolved
                to tensors (sparsify the model again).
        """
        if self.analysis is None:
            raise NotSparsifiedError("the model's sparsity plan has no analysis (it was not made by "
                                     "autosparse.sparsify); sparsify the original model again")
        return self.analysis

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
            if member.role != Role.CONSUMER or (member.name, member.dim) in sites:
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
    gated: list[GatedGroup] = []
    skipped: list[tuple[str, str]] = []
    taken: set[str] = set()
    used_rules: set[int] = set()
    for group in analysis.groups:
        if not any(str(r.granularity) == group.granularity for r in policy.rules):
            continue
        free = [r for r in group.units if r not in group.blocked]
        if len(free) < 2:
            continue
        rule, why = _first_rule(policy, group, modules)
        if rule is None:
            skipped.append((group.name, why or f"no {group.granularity} rule matches {group.producers}"))
            continue
        used_rules.add(id(rule))
        if rule.round_to % group.round_to:  # an op needs aligned widths (see Group.round_to)
            rule = dataclasses.replace(rule, round_to=math.lcm(rule.round_to, group.round_to))
        gated.append(GatedGroup(_key(group.name, taken), group, rule, free))
    for gg in _layer_groups(policy, branches or [], modules, taken):
        used_rules.add(id(gg.rule))
        gated.append(gg)
    unmatched = _unmatched_globs(policy, model)
    for line in unmatched:
        warn(line)
    for rule in policy.rules:
        if id(rule) not in used_rules:
            warn(f"policy rule '{rule.name}' ({rule.granularity}) matched no prunable group")
    if not gated:
        raise NoGatesError(_nothing_message(policy, analysis, skipped, unmatched))
    return Plan(gated, skipped, analysis)


def _unmatched_globs(policy: Policy, model: nn.Module) -> list[str]:
    """One line per ``modules`` or ``exclude`` glob that matches no module name, with close names.

    A glob that matches nothing is legal but almost always a typo or a name from another model
    (``encoder.*`` on a CNN), and otherwise surfaces only as "no rule matches" far from its cause.
    """
    names = [n for n, _ in model.named_modules() if n]
    lines = []
    for i, rule in enumerate(policy.rules):
        for key in ("modules", "exclude"):
            for glob in getattr(rule, key):
                if any(fnmatchcase(n, glob) for n in names):
                    continue
                close = difflib.get_close_matches(glob, names, n=3, cutoff=0.5)
                hint = (f"; close names: {', '.join(map(repr, close))}" if close
                        else f"; its modules include {', '.join(map(repr, names[:4]))}")
                lines.append(f"policy: rules[{i}].{key} glob {glob!r} (rule {rule.name!r}) matched no module "
                             f"of {type(model).__name__}{hint}")
    return lines


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


def _first_rule(policy: Policy, group: Group, modules: dict[str, nn.Module]) -> tuple[Rule | None, str]:
    """The first rule that selects a member of the group and excludes none; else why none did.

    The units of a coupled group go together or not at all, so excluding any member (the stem conv
    of a residual stream, or the group's own name) keeps the whole group away from that rule.
    """
    why = ""
    for rule in policy.rules:
        if str(rule.granularity) != group.granularity:
            continue
        if not any(rule.selects(name, modules.get(name)) for name in group.producers):
            continue
        hit = next(((n, g) for n in group.producers if (g := rule.excluded_by(n)) is not None), None)
        if hit is None:
            return rule, ""
        coupled = f", a member of this coupled group of {len(group.producers)} modules," if len(group.producers) > 1 else ""
        why = why or f"rule {rule.name!r} excludes {hit[0]!r} (exclude {hit[1]!r}){coupled} so the group keeps its width"
    return None, why


def _nothing_message(policy: Policy, analysis: Analysis, skipped: list[tuple[str, str]],
                     unmatched: list[str]) -> str:
    wanted = sorted({str(r.granularity) for r in policy.rules})
    found = sorted({g.granularity for g in analysis.groups if len(g.units) - len(g.blocked) >= 2})
    lines = [f"the policy (granularity {', '.join(wanted)}) selected no prunable group."]
    lines.extend(unmatched)
    if not found:
        lines.append("The model has no prunable groups at all.")
    else:
        lines.append(f"Prunable groups exist at granularity: {', '.join(found)}; add a rule for them.")
    for where, why in (analysis.unprunable + skipped)[:8]:
        lines.append(f"  - {where}: {why}")
    lines.append("Run autosparse.explain(model, example_inputs=...) for the full analysis.")
    return "\n".join(lines)
