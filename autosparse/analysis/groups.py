"""Analysis: walk a captured graph with the op rules and turn element classes into groups."""

from __future__ import annotations

import math

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from autosparse.analysis import derived
from autosparse.analysis.context import Member, OpContext, Role, State
from autosparse.analysis.labels import Label
from autosparse.analysis.ops_tensor import output, pointwise
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
    round_to: int = 1  # kept counts must be multiples of this (an op's alignment, see State.multiple_of)


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
            ctx.output(derived.seed(ctx))
            continue
        handler = None if node.op == "output" else rules.lookup(node.op, node.target, state.module(node))
        if handler is None and _is_pointwise_aten(node.target):
            handler = pointwise
        vectors = derived.read(ctx)
        if vectors and derived.propagate(ctx, handler, vectors):
            continue
        start = len(state.members)
        _run(ctx, handler)
        if vectors:  # a rule that did not slice a vector it read: slicing it would change this op
            derived.pin(ctx, vectors, {m.name for m in state.members[start:]})
    return state


def _run(ctx: OpContext, handler) -> None:
    node, state = ctx.node, ctx.state
    if node.op == "output":
        return output(ctx)
    if handler is None:
        if _touches_label(ctx):
            name = _op_name(node)
            state.unknown.append(f"{name} at {ctx.where}")
            ctx.block_inputs(f"unknown op {name} (no rule; add one with op_rules)")
        return ctx.output(None)
    handler(ctx)
    _check_output(ctx)


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
    """Resolve classes, unite tied tensors, and collect prunable groups with their gate sites.

    Every step is an array operation over element ids (a ResNet-50 has ~27k elements, BERT-base
    ~120k): the union-find is frozen after the tied tensors are united, so one root array
    resolves every member.
    """
    elements = state.elements
    by_tensor: dict[tuple[str, int], list[Member]] = defaultdict(list)
    for m in state.members:
        by_tensor[(m.name, m.dim)].append(m)
    for name, where in state.pinned.items():  # also read where slicing would change a value
        for m in by_tensor.get((name, 0), []):
            elements.block(m.ids, f"'{name}' is also used at {where}, where slicing it would change the result")
    for same in by_tensor.values():  # one tensor sliced in several places (tied weights): same fate
        for other in same[1:]:
            if len(other.ids) == len(same[0].ids):
                elements.union_arrays(same[0].ids, other.ids)
            else:
                elements.block(np.concatenate([same[0].ids, other.ids]), f"'{other.name}' used with two sizes")
    for ids, other_ids, why in state.same_size:
        if not np.array_equal(np.sort(elements.find_all(ids)), np.sort(elements.find_all(other_ids))):
            elements.block(np.concatenate([ids, other_ids]), why)
    root_of = elements.roots()
    members = [Member(m.name, m.dim, root_of[np.asarray(m.ids, dtype=np.int64)], m.role, m.where)
               for m in state.members]
    consumed = np.zeros(len(root_of), dtype=bool)
    for m in members:
        if m.role == Role.CONSUMER:
            consumed[m.ids] = True
    producers = [(m, _ordered_unique(m.ids)) for m in members if m.role == Role.PRODUCER]
    return _assemble(state, root_of, members, consumed, producers, _producer_groups(producers, len(root_of)))


def _ordered_unique(ids: np.ndarray) -> np.ndarray:
    """Distinct values of ``ids`` in order of first appearance."""
    _, first = np.unique(ids.reshape(-1), return_index=True)
    return ids.reshape(-1)[np.sort(first)]


def _producer_groups(producers: list[tuple[Member, np.ndarray]], n_elements: int) -> list[int]:
    """Units compete within a group when one producer writes them: producers sharing a class root
    form one group. Returns each producer's group as the index of the group's first producer."""
    group = list(range(len(producers)))

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    claimed = np.full(n_elements, -1, dtype=np.int64)  # root -> a producer that writes it
    for i, (_, roots) in enumerate(producers):
        for j in np.unique(claimed[roots]).tolist():
            if j >= 0:
                a, b = find(i), find(j)
                group[max(a, b)] = min(a, b)
        claimed[roots] = i
    return [find(i) for i in range(len(producers))]


_UNCONSUMED = "no weight consumes these channels (nothing to gate)"


def _assemble(state, root_of, members, consumed, producers, group_of) -> Analysis:
    """One :class:`Group` per producer group (in order of its first producer), with its sites."""
    blocked_roots = state.elements.blocked_roots()
    heads = np.zeros(len(root_of), dtype=bool)
    heads[root_of[np.fromiter(state.head_elements, dtype=np.int64, count=len(state.head_elements))]] = True
    parts: dict[int, list[np.ndarray]] = defaultdict(list)
    owners: dict[int, list[str]] = defaultdict(list)
    for (m, roots), g in zip(producers, group_of):
        owner = m.name.rsplit(".", 1)[0]
        if owner not in owners[g]:
            owners[g].append(owner)
        parts[g].append(roots)
    units = {g: _ordered_unique(np.concatenate(p)) for g, p in parts.items()}
    group_index = np.full(len(root_of), -1, dtype=np.int64)  # root -> position in ``units``
    for k, roots in enumerate(units.values()):
        group_index[roots] = k
    sites: list[list[Member]] = [[] for _ in units]
    for m in members:
        if m.role == Role.CONSUMER:
            for k in np.unique(group_index[m.ids]).tolist():
                if k >= 0:
                    sites[k].append(m)
    round_to = _round_to(state, root_of, group_index, len(units))
    is_blocked = np.zeros(len(root_of), dtype=bool)
    is_blocked[np.fromiter(blocked_roots, dtype=np.int64, count=len(blocked_roots))] = True
    is_blocked[FIXED] = True
    groups, unprunable = [], []
    for k, (g, roots) in enumerate(units.items()):
        out = is_blocked[roots] | ~consumed[roots]
        blocked = {r: blocked_roots.get(r, []) if is_blocked[r] else [_UNCONSUMED] for r in roots[out].tolist()}
        free = roots[~out]
        name = owners[g][0]
        granularity = "head" if heads[free].any() else "channel"
        groups.append(Group(name, granularity, roots.tolist(), owners[g], sites[k], blocked, round_to[k]))
        if len(free) < 2:
            reasons = list(dict.fromkeys(why for r in roots.tolist() for why in blocked.get(r, [])))
            reasons = [w for w in reasons if w != "not produced by a prunable weight"] or reasons
            why = "; ".join(reasons[:3]) if reasons else "a single unit cannot be sparsified by a normalised gate"
            unprunable.append((name, why))
    named = {name for name, _ in unprunable} | {g.name for g in groups}
    unprunable += [(name, why) for name, why in state.refused.items() if name not in named]
    return Analysis(groups, members, unprunable, list(dict.fromkeys(state.unknown)), state.capture.kind)


def _round_to(state: State, root_of: np.ndarray, group_index: np.ndarray, n_groups: int) -> list[int]:
    """Per group, the least common multiple of the alignments ops asked of its channels."""
    out = [1] * n_groups
    for ids, multiple in state.multiple_of:
        for k in np.unique(group_index[root_of[ids]]).tolist():
            if k >= 0:
                out[k] = math.lcm(out[k], multiple)
    return out
