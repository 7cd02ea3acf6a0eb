"""Analysis: walk a captured graph with the op rules and turn element classes into groups."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from autosparse.analysis.context import Member, OpContext, State
from autosparse.analysis.labels import Label
from autosparse.analysis.registry import Registry
from autosparse.analysis.unionfind import FIXED
from autosparse.capture import Capture


@dataclass
class Group:
    """Units that compete inside one gate, and every weight slice that follows them.

    ``units`` are class roots (stable ids); ``members`` map each position of a sliced tensor
    to the root of its class (or to a blocked/foreign root, which is always kept).
    """

    name: str
    granularity: str  # "channel" | "head"
    units: list[int]
    producers: list[str]  # module names whose outputs define the units
    sites: list[Member] = field(default_factory=list)
    blocked: dict[int, list[str]] = field(default_factory=dict)


@dataclass
class Analysis:
    """The pure result of analysing one graph."""

    groups: list[Group]
    members: list[Member]  # ids already resolved to class roots
    unprunable: list[tuple[str, str]]  # (where, reason) for every group that cannot be gated
    unknown_ops: list[str]
    capture_kind: str
    seconds: float = 0.0


def walk(capture: Capture, rules: Registry) -> State:
    """Run every node's rule in topological order; unknown ops block what they touch."""
    state = State(capture)
    for node in capture.graph.nodes:
        ctx = OpContext(state, node)
        if node.op in ("placeholder", "get_attr"):
            ctx.output(None)
            continue
        if node.op == "output":
            from autosparse.analysis.ops_tensor import output

            output(ctx)
            continue
        handler = rules.lookup(node.op, node.target, capture.module(node))
        if handler is None and _is_pointwise_aten(node.target):
            from autosparse.analysis.ops_tensor import pointwise as handler
        if handler is None:
            if _touches_label(ctx):
                name = _op_name(node)
                state.unknown.append(f"{name} at {ctx.where}")
                ctx.block_inputs(f"unknown op {name} (no rule; add one with op_rules)")
            ctx.output(None)
            continue
        handler(ctx)
        _check_output(ctx)
    return state


def _check_output(ctx: OpContext) -> None:
    """A rule's label must match the tensor it describes; otherwise the rule misread the op."""
    found = ctx.state.env.get(ctx.node)
    meta = ctx.node.meta.get("val", ctx.node.meta.get("tensor_meta"))
    labels = found if isinstance(found, list) else [found]
    metas = list(meta) if isinstance(meta, (list, tuple)) and not hasattr(meta, "shape") else [meta]
    for i, label in enumerate(labels):
        if not isinstance(label, Label):
            continue
        shape = getattr(metas[i], "shape", None) if i < len(metas) else None
        if shape is None or label.dim >= len(shape) or int(shape[label.dim]) != len(label.ids):
            ctx.block(label, f"{_op_name(ctx.node)} changes the channel dim in a way its rule did not follow")
            labels[i] = None
    ctx.state.env[ctx.node] = labels if isinstance(found, list) else labels[0]


def _is_pointwise_aten(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def _touches_label(ctx: OpContext) -> bool:
    return any(isinstance(ctx.state.env.get(n), (Label, list)) for n in ctx.tensor_inputs() + _list_inputs(ctx))


def _list_inputs(ctx: OpContext) -> list:
    flat: list = []
    fx.node.map_arg((ctx.node.args, ctx.node.kwargs), flat.append)
    return flat


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def build_groups(state: State) -> Analysis:
    """Resolve classes, unite tied tensors, and collect prunable groups with their gate sites."""
    elements = state.elements
    by_tensor: dict[tuple[str, int], list[Member]] = defaultdict(list)
    for m in state.members:
        by_tensor[(m.name, m.dim)].append(m)
    for same in by_tensor.values():  # one tensor sliced in several places (tied weights): same fate
        for other in same[1:]:
            if len(other.ids) == len(same[0].ids):
                elements.union_arrays(same[0].ids, other.ids)
            else:
                elements.block(np.concatenate([same[0].ids, other.ids]), f"'{other.name}' used with two sizes")
    members = [Member(m.name, m.dim, elements.find_all(m.ids), m.role, m.where) for m in state.members]
    consumed = {int(r) for m in members if m.role == "consumer" for r in np.unique(m.ids)}
    # Units compete within a group when one producer writes them: unite roots per producer.
    group_of: dict[int, int] = {}
    producer_roots: list[tuple[Member, list[int]]] = []
    for m in members:
        if m.role != "producer":
            continue
        roots = [int(r) for r in dict.fromkeys(m.ids.tolist())]
        producer_roots.append((m, roots))
        anchor = group_of.setdefault(roots[0], roots[0])
        for r in roots:
            _merge(group_of, anchor, r)
    return _assemble(state, members, consumed, group_of, producer_roots)


def _merge(group_of: dict[int, int], a: int, b: int) -> None:
    ra, rb = _gfind(group_of, a), _gfind(group_of, b)
    if ra != rb:
        group_of[max(ra, rb)] = min(ra, rb)


def _gfind(group_of: dict[int, int], x: int) -> int:
    group_of.setdefault(x, x)
    while group_of[x] != x:
        group_of[x] = group_of[group_of[x]]
        x = group_of[x]
    return x


def _assemble(state, members, consumed, group_of, producer_roots) -> Analysis:
    elements = state.elements
    heads = {elements.find(e) for e in state.head_elements}
    units: dict[int, dict[int, None]] = defaultdict(dict)  # ordered sets
    producers: dict[int, list[str]] = defaultdict(list)
    for m, roots in producer_roots:
        g = _gfind(group_of, roots[0])
        owner = m.name.rsplit(".", 1)[0]
        if owner not in producers[g]:
            producers[g].append(owner)
        units[g].update(dict.fromkeys(roots))
    group_of_root = {r: g for g, roots in units.items() for r in roots}
    sites_of: dict[int, list[Member]] = defaultdict(list)
    for m in members:
        if m.role == "consumer":
            for g in {group_of_root.get(int(r)) for r in np.unique(m.ids)} - {None}:
                sites_of[g].append(m)
    groups, unprunable = [], []
    for g, ordered in units.items():
        roots = list(ordered)
        blocked = {}
        for r in roots:
            reasons = elements.blocked_reasons(r)
            if reasons or r == FIXED:
                blocked[r] = reasons
            elif r not in consumed:
                blocked[r] = ["no weight consumes these channels (nothing to gate)"]
        free = [r for r in roots if r not in blocked]
        name = producers[g][0] if producers[g] else f"group{g}"
        granularity = "head" if any(r in heads for r in free) else "channel"
        groups.append(Group(name, granularity, roots, producers[g], sites_of[g], blocked))
        if len(free) < 2:
            reasons = list(dict.fromkeys(why for r in roots for why in blocked.get(r, [])))
            reasons = [w for w in reasons if w != "not produced by a prunable weight"] or reasons
            why = "; ".join(reasons[:3]) if reasons else "a single unit cannot be sparsified by a normalised gate"
            unprunable.append((name, why))
    return Analysis(groups, members, unprunable, list(dict.fromkeys(state.unknown)), state.capture.kind)
