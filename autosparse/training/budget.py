"""Cost model and budget controller: what the compacted model would cost now, and how to steer lambda.

The **cost model** predicts the FLOPs (or parameters) of ``compact(model)`` from the current gates
without compacting anything. It is built once per model from one counted forward pass:

* every parameter tensor costs ``numel * prod_d f_d``, where ``f_d`` is the kept fraction of the
  positions of dimension ``d`` that compaction slices (output rows, input columns, norm vectors);
  positions no gate controls always count as kept. This is exact for parameter counts.
* the FLOPs a module performs *itself* (``flops_by_module`` minus its children's) scale like the
  number of elements of its weight, ``prod_d f_d`` over the weight's sliced dims. That is exact for
  convolutions (grouped and depthwise included) and linear layers, whose FLOPs are
  ``2 * weight.numel() * output positions``. A module without a sliced weight of its own (the
  ``softmax(q k^T) v`` of an attention module) scales with the kept outputs of its children (heads).
* a residual branch that a layer gate removes takes all its modules' FLOPs and parameters with it.
* ``"latency"``: each leaf-module call costs its measured milliseconds times a measured curve of
  the same product ``prod_d f_d`` (:mod:`autosparse.training.latency`: a table timed on the current
  device at a few widths and cached); the time outside leaf modules follows the mean kept fraction.

With ``u`` the 0/1 vector of kept units, the cost is a multilinear polynomial in ``u``; its gradient
``d cost / d u_i`` is the cost of unit ``i`` given everything else (used for cost weighting).

The **controller** (docs/method.md, section 4) adapts lambda in log space (dual ascent)::

    r(t)   = B + (1 - B) * (1 - a(t)) ** 3,  a(t) = clip((t - W) / (R - W), 0, 1)   # reference
    c(t)   = a(t) * cost_hard + (1 - a(t)) * cost_soft                            # tracked signal
    e(t)   = log(c(t) / r(t))
    I     <- clip(I + k_i * e(t), -I_max, I_max)                                  # integral
    lambda = lambda_policy * exp(I + k_p * e(t))

W is the end of the warm-up and R the end of the ramp (75 % of the way from W to the freeze
step). At the freeze step :func:`enforce` closes the cheapest-to-lose units if the model is still
over budget, so the compacted model never lands above ``B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from autosparse.analysis import Role
from autosparse.errors import PolicyError
from autosparse.gating.kept import kept_masks
from autosparse.measure import flops_by_module
from autosparse.state import SparsityState
from autosparse.training.latency import Curve, latency_table

SOFT_THRESHOLD = 0.5  # a unit counts as fully kept by the controller's signal above this gate value


@dataclass
class _Term:
    """``cost * prod_d mean(u[index_d]) * prod_b u[b]``: one tensor's (or module's) share of the cost."""

    cost: float
    indices: list[torch.Tensor]  # per sliced dim: position -> flat unit index (n_units: always kept)
    branches: list[int] = field(default_factory=list)  # flat indices of residual branches containing it
    curve: Curve | None = None  # latency: cost * curve(prod_d mean(...)) instead of cost * prod_d mean(...)


@dataclass
class CostModel:
    """Predicts the cost of the compacted model from a kept-unit vector. See the module docstring.

    Attributes:
        metric: ``"flops"``, ``"params"`` or ``"latency"`` (milliseconds, see :mod:`.latency`).
        dense: The cost of the model with every unit kept.
        offsets: Start of each gated group in the flat unit vector, in plan order (plus the end).
    """

    metric: str
    dense: float
    terms: list[_Term]
    offsets: list[int]

    @property
    def n_units(self) -> int:
        return self.offsets[-1]

    def cost(self, kept: torch.Tensor) -> torch.Tensor:
        """Cost for a kept vector (0/1 or fractional, differentiable) of length ``n_units``."""
        ext = torch.cat([kept.double(), kept.new_ones(1, dtype=torch.float64)])
        total = ext.new_zeros(())
        for term in self.terms:
            scale = ext.new_ones(())
            for index in term.indices:
                scale = scale * ext[index].mean()
            if term.curve is not None:
                scale = term.curve(scale)
            for b in term.branches:
                scale = scale * ext[b]
            total = total + term.cost * scale
        return total

    def fraction(self, kept: torch.Tensor) -> float:
        """Cost relative to the dense model, in [0, 1]."""
        return float(self.cost(kept)) / self.dense if self.dense else 1.0

    def unit_costs(self, kept: torch.Tensor) -> torch.Tensor:
        """``d cost / d u_i``: what each unit costs given which other units are kept."""
        u = kept.double().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.cost(u), u)
        return grad.detach()

    def kept_now(self, state: SparsityState) -> torch.Tensor:
        """The 0/1 kept vector ``compact`` would use now: non-zero gates, topped up to each rule's
        ``min_keep`` and ``round_to`` with the zero-gated units of largest ``gamma`` (as compaction does).

        The groups of a ``uniform`` rule are predicted at the rounded mean of their open counts, each
        keeping its largest gates: what :func:`equalize` makes of them at the freeze step (before
        it, an unfrozen ``compact`` would keep the largest count instead, see
        :func:`~autosparse.gating.kept.kept_masks`).
        """
        rules = [gg.rule for gg in state.plan.gated]
        return torch.cat([m.double() for m in kept_masks(state.gate_list(), rules, predict=True)])

    def soft_kept(self, state: SparsityState) -> torch.Tensor:
        """``min(1, value / SOFT_THRESHOLD)`` per unit: falls as units head for zero, before they reach it."""
        with torch.no_grad():
            values = [gate.values().detach().double().cpu() for gate in state.gate_list()]
        return (torch.cat(values) / SOFT_THRESHOLD).clamp(max=1.0)

    def smallest(self, state: SparsityState) -> torch.Tensor:
        """The kept vector with every group at its rule's floor (min_keep, rounded up by round_to)."""
        kept = torch.zeros(self.n_units, dtype=torch.float64)
        for i, gg in enumerate(state.plan.gated):
            n = len(gg.units)
            kept[self.offsets[i] : self.offsets[i] + gg.rule.kept_count(0, n)] = 1.0
        return kept


def reachable(cost: CostModel) -> float:
    """The part of ``cost.dense`` that some gate can remove: terms with a gated position or in a branch.

    Example:
        >>> cost = build_cost_model(net, get_state(net), "params")  # doctest: +SKIP
        >>> reachable(cost) / cost.dense  # doctest: +SKIP
        0.78
    """
    n = cost.n_units
    return sum(t.cost for t in cost.terms if t.branches or any(bool((i < n).any()) for i in t.indices))


def build_cost_model(model: nn.Module, state: SparsityState, metric: str) -> CostModel:
    """Index the plan's sliced tensors by unit and weigh them by FLOPs or parameter counts.

    Args:
        model: The sparsified model (its weights still have their dense shapes).
        state: Its :class:`~autosparse.state.SparsityState`.
        metric: ``"flops"`` (one counted forward pass on the stored example inputs), ``"params"``,
            or ``"latency"`` (a measured, cached per-module table: :func:`.latency.latency_table`).
    """
    offsets, roots, branches = [0], {}, {}
    for gg in state.plan.gated:
        for j, unit in enumerate(gg.units):
            if gg.branches:  # layer granularity: a unit is a whole residual branch (a module)
                branches[gg.branches[j].module] = offsets[-1] + j
            else:
                roots[int(unit)] = offsets[-1] + j
        offsets.append(offsets[-1] + len(gg.units))
    sliced = _sliced_dims(state, roots, offsets[-1])
    gammas = {id(g.gamma) for g in state.gate_list()}
    if metric == "flops":
        flops = flops_by_module(model, state.example_inputs, state.example_kwargs)
        terms = [
            _flops_term(name, f, sliced, _containing(name, branches))
            for name, f in _exclusive(flops).items()
            if f
        ]
    elif metric == "latency":
        terms = _latency_terms(model, state, sliced, branches, offsets[-1])
    else:
        plain = [
            (_plain_name(name), p.numel()) for name, p in model.named_parameters() if id(p) not in gammas
        ]
        terms = [
            _Term(
                float(numel),
                [s.index for s in sliced.get(name, {}).values()],
                _containing(name.rpartition(".")[0], branches),
            )
            for name, numel in plain
        ]
    return CostModel(metric, sum(t.cost for t in terms), terms, offsets)


@dataclass
class _Slice:
    index: torch.Tensor
    role: Role


def _sliced_dims(state: SparsityState, roots: dict[int, int], n: int) -> dict[str, dict[int, _Slice]]:
    """Per tensor name and dim some gate controls: position -> flat unit index (``n``: none), role."""
    out: dict[str, dict[int, _Slice]] = {}
    for m in state.plan.analysis.members if state.plan.analysis else []:
        if m.dim in out.get(m.name, {}):
            continue
        index = np.array([roots.get(int(r), n) for r in m.ids], dtype=np.int64)
        if (index < n).any():
            out.setdefault(m.name, {})[m.dim] = _Slice(torch.as_tensor(index), m.role)
    return out


def _flops_term(module: str, flops: int, sliced: dict[str, dict[int, _Slice]], branches: list[int]) -> _Term:
    """FLOPs scale with the module's sliced weight; else with its children's kept outputs (attention)."""
    prefix = f"{module}." if module else ""
    own = {
        name[len(prefix) :]: dims
        for name, dims in sliced.items()
        if name.startswith(prefix) and "." not in name[len(prefix) :]
    }
    if own:
        dims = own.get("weight") or max(
            own.values(), key=lambda d: math.prod(len(s.index) for s in d.values())
        )
        return _Term(float(flops), [s.index for s in dims.values()], branches)
    # e.g. softmax(q k^T) v inside an attention module: proportional to the heads its q/k/v keep
    outputs = [
        s.index
        for name, dims in sliced.items()
        if name.startswith(prefix) and name[len(prefix) :].count(".") == 1
        for s in dims.values()
        if s.role == Role.PRODUCER
    ]
    return _Term(float(flops), [torch.cat(outputs)] if outputs else [], branches)


def _latency_terms(model: nn.Module, state: SparsityState, sliced: dict[str, dict[int, _Slice]],
                   branches: dict[str, int], n_units: int) -> list[_Term]:
    """Each timed module call priced by its measured curve over its weight's sliced dims (a module
    without weights: its leader's output rows); the rest by its curve over the mean of all units."""
    table = latency_table(model)
    terms = []
    for entry in table.entries:
        dims = sliced.get(f"{entry.follows or entry.name}.weight", {})
        if entry.follows is None:
            indices = [s.index for s in dims.values()]
        else:  # an activation or pooling: as wide as its leader's output rows
            indices = [dims[0].index] if 0 in dims else []
        terms.append(_Term(entry.ms, indices, _containing(entry.name, branches), entry.curve))
    return [*terms, _Term(table.rest, [torch.arange(n_units)], [], table.rest_curve)]


def _plain_name(name: str) -> str:
    """``conv.parametrizations.weight.original`` -> ``conv.weight``."""
    return name.replace(".parametrizations.", ".").replace(".original", "")


def _exclusive(inclusive: dict[str, int]) -> dict[str, int]:
    """Per module, the FLOPs it performs itself: its inclusive count minus its direct children's."""
    out = dict(inclusive)
    for name, flops in inclusive.items():
        if name:
            parent = name.rpartition(".")[0]
            while parent not in inclusive and parent:
                parent = parent.rpartition(".")[0]
            out[parent] = out.get(parent, 0) - flops
    return out


def _containing(module: str, branches: dict[str, int]) -> list[int]:
    """Flat indices of the residual branches whose module is ``module`` or one of its parents."""
    return [i for name, i in branches.items() if module == name or module.startswith(name + ".")]


# ----------------------------------------------------------------------------- the controller


@dataclass
class Controller:
    """Proportional-integral control of log lambda towards a budget. See the module docstring.

    Attributes:
        target: The budget ``B`` as a fraction of the dense cost.
        start: ``W``, the step the ramp starts (end of the lambda warm-up).
        ramp_end: ``R``, the step the reference reaches ``B``.
        k_i, k_p: Integral and proportional gains on the error ``log(cost / reference)``.
        log_scale: The integral ``I``; lambda is multiplied by ``exp(I + k_p * e)``.
    """

    target: float
    start: int
    ramp_end: int
    k_i: float = 0.05
    k_p: float = 8.0
    max_log_scale: float = 12.0
    log_scale: float = 0.0
    error: float = 0.0

    def reference(self, step: int) -> float:
        """``r(t)``: 1 until ``W``, then a cubic descent to ``B`` at ``R`` (gradual pruning)."""
        span = max(1, self.ramp_end - self.start)
        progress = min(1.0, max(0.0, (step - self.start) / span))
        return self.target + (1.0 - self.target) * (1.0 - progress) ** 3

    def signal(self, step: int, hard: float, soft: float) -> float:
        """What the controller tracks: the soft cost early in the ramp, the hard cost at its end.

        The soft cost falls as soon as units head for zero, so lambda stops rising before a burst of
        units closes (the hard cost lags the gates by the tens of steps a closing unit takes).
        Near the end the hard cost takes over, so lingering half-closed units are pushed to a decision.
        """
        blend = min(1.0, max(0.0, (step - self.start) / max(1, self.ramp_end - self.start)))
        return blend * hard + (1.0 - blend) * soft

    def update(self, step: int, cost: float) -> float:
        """Feed the cost fraction measured after ``step``; returns the new lambda multiplier."""
        if step < self.start:
            return self.scale
        self.error = math.log(max(cost, 1e-6) / self.reference(step))
        self.log_scale = min(
            self.max_log_scale, max(-self.max_log_scale, self.log_scale + self.k_i * self.error)
        )
        return self.scale

    @property
    def scale(self) -> float:
        return math.exp(min(self.max_log_scale, self.log_scale + self.k_p * self.error))


def ramp_end(warmup: int, freeze: int | None) -> int:
    """``R``: three quarters of the way from the warm-up's end to the freeze (or 2 warm-ups / 500 steps)."""
    if freeze is not None:
        return warmup + max(1, int(0.75 * (freeze - warmup)))
    return max(2 * warmup, warmup + 500)


def check_reachable(
    cost: CostModel, state: SparsityState, key: str, target: float, tolerance: float
) -> float:
    """Raise :class:`PolicyError` naming ``key`` if even the smallest allowed model is over budget."""
    floor = cost.fraction(cost.smallest(state))
    if floor > target + tolerance:
        rules = sorted({gg.rule.name for gg in state.plan.gated})
        raise PolicyError(
            f"{key}: got {target:g}, but the smallest model the rules allow (every group at min_keep, "
            f"rounded by round_to) still has {floor:.3f} of the dense {cost.metric}; set {key} >= "
            f"{floor - tolerance:.3f} or lower min_keep in rules {rules}"
        )
    return floor


def enforce(state: SparsityState, cost: CostModel, target: float) -> list[tuple[str, int]]:
    """Close the open units that cost most per unit of gate value until ``cost <= target``.

    Units are forced off with :meth:`Gate.zero_`; a group never drops below its rule's floor.

    Returns:
        ``(group name, unit index)`` of every unit closed.
    """
    closed: list[tuple[str, int]] = []
    gates = state.gate_list()
    floors = cost.smallest(state)
    while True:
        kept = cost.kept_now(state)
        if cost.fraction(kept) <= target:
            return closed
        per_unit = cost.unit_costs(kept)
        best, best_score = None, -1.0
        for i, gate in enumerate(gates):
            lo, hi = cost.offsets[i], cost.offsets[i + 1]
            with torch.no_grad():
                values = gate.values().detach().double().cpu()
            alive = (values != 0).nonzero().flatten()
            if len(alive) <= int(floors[lo:hi].sum()):
                continue
            scores = per_unit[lo + alive] / (values[alive] + 1e-12)
            j = int(torch.argmax(scores))
            if float(scores[j]) > best_score:
                best, best_score = (i, int(alive[j])), float(scores[j])
        if best is None:
            return closed
        gates[best[0]].zero_([best[1]])
        closed.append((state.plan.gated[best[0]].name, best[1]))


def equalize(state: SparsityState) -> list[tuple[str, int]]:
    """Give the groups of every ``uniform`` rule one common width: the rounded mean of their open
    counts (then ``min_keep`` / ``round_to``), each keeping its largest gates.

    A group with more open units than that has its lowest-valued ones forced off (the model's
    function changes here, as with :func:`enforce`); a group with fewer keeps zero-gated units to
    make up the count at compaction (exact: their gate is 0). Afterwards ``compact`` keeps exactly
    the common width in every group, which is what :meth:`CostModel.kept_now` predicted.

    Returns:
        ``(group name, unit index)`` of every unit closed.

    Example:
        >>> closed = equalize(get_state(net))  # done by autosparse.training.freeze
    """
    rules = [gg.rule for gg in state.plan.gated]
    if not any(rule.uniform for rule in rules):
        return []
    masks = kept_masks(state.gate_list(), rules, predict=True)
    closed: list[tuple[str, int]] = []
    for gg, gate, mask in zip(state.plan.gated, state.gate_list(), masks):
        with torch.no_grad():
            cut = ((gate.values().detach().cpu() != 0) & ~mask).nonzero().flatten().tolist()
        if gg.rule.uniform and cut:
            gate.zero_(cut)
            closed += [(gg.name, j) for j in cut]
    return closed
