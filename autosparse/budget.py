"""Cost model and budget controller: what the compacted model would cost now, and how to steer lambda.

The **cost model** predicts the FLOPs (or parameters) of ``compact(model)`` from the current gates
without compacting anything. It is built once per model from one counted forward pass:

* every parameter tensor costs ``numel * prod_d f_d``, where ``f_d`` is the kept fraction of the
  positions of dimension ``d`` that compaction slices (output rows, input columns, norm vectors);
  positions no gate controls always count as kept. This is exact for parameter counts.
* the FLOPs a module performs *itself* (``flops_by_module`` minus its children's) scale like the
  number of elements of its weight, ``prod_d f_d`` over the weight's sliced dims. That is exact for
  convolutions (grouped and depthwise included) and linear layers, whose FLOPs are
  ``2 * weight.numel() * output positions``. FLOPs of a module without a sliced weight (e.g. the
  attention product of a custom attention module) count as fixed, so the estimate errs high there.

With ``u`` the 0/1 vector of kept units, the cost is a multilinear polynomial in ``u``; its gradient
``d cost / d u_i`` is the cost of unit ``i`` given everything else (used for cost weighting).

The **controller** (see docs/method.md, "Budget controller") adapts lambda in log space::

    r(t)   = B + (1 - B) * (1 - clip((t - W) / (R - W), 0, 1)) ** 3    # reference: 1 at W, B at R
    e(t)   = c(t) - r(t)                                               # c: cost fraction now
    I     <- clip(I + k_i * e(t), -I_max, I_max)                       # integral (dual ascent)
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

from autosparse.compaction import removed_units
from autosparse.errors import PolicyError
from autosparse.measure import flops_by_module
from autosparse.state import SparsityState


@dataclass
class _Term:
    """``cost * prod_d mean(u_ext[index_d])``: one tensor's (or one module's) share of the cost."""

    cost: float
    indices: list[torch.Tensor]  # per sliced dim: position -> flat unit index (n_units = always kept)


@dataclass
class CostModel:
    """Predicts the cost of the compacted model from a kept-unit vector. See the module docstring.

    Attributes:
        metric: ``"flops"`` or ``"params"``.
        dense: The cost of the model with every unit kept.
        offsets: Start of each gated group in the flat unit vector, in plan order (plus the end).
    """

    metric: str
    dense: float
    terms: list[_Term]
    offsets: list[int]
    roots: dict[int, int] = field(default_factory=dict)  # class root -> flat unit index

    @property
    def n_units(self) -> int:
        return self.offsets[-1]

    def cost(self, kept: torch.Tensor) -> torch.Tensor:
        """Cost for a kept vector (0/1 or fractional, differentiable) of length ``n_units``."""
        ext = torch.cat([kept.double(), kept.new_ones(1, dtype=torch.float64)])
        total = kept.new_zeros((), dtype=torch.float64)
        for term in self.terms:
            scale = ext.new_ones(())
            for index in term.indices:
                scale = scale * ext[index].mean()
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
        """The kept vector ``compact`` would use now (gate zeros, then min_keep and round_to)."""
        removed, _ = removed_units(state)
        kept = torch.ones(self.n_units, dtype=torch.float64)
        gone = [self.roots[r] for r in removed if r in self.roots]
        if gone:
            kept[torch.as_tensor(gone)] = 0.0
        return kept

    def smallest(self, state: SparsityState) -> torch.Tensor:
        """The kept vector with every group at its rule's floor (min_keep, rounded up by round_to)."""
        kept = torch.zeros(self.n_units, dtype=torch.float64)
        for i, gg in enumerate(state.plan.gated):
            n = len(gg.units)
            kept[self.offsets[i] : self.offsets[i] + gg.rule.round_keep(gg.rule.resolve_min_keep(n), n)] = 1.0
        return kept


def build_cost_model(model: nn.Module, state: SparsityState, metric: str) -> CostModel:
    """Index the plan's sliced tensors by unit and weigh them by FLOPs or parameter counts.

    Args:
        model: The sparsified model (its weights still have their dense shapes).
        state: Its :class:`~autosparse.state.SparsityState`.
        metric: ``"flops"`` (one counted forward pass on the stored example inputs) or ``"params"``.
    """
    offsets = [0]
    roots: dict[int, int] = {}
    for gg in state.plan.gated:
        for j, root in enumerate(gg.units):
            roots[int(root)] = offsets[-1] + j
        offsets.append(offsets[-1] + len(gg.units))
    sliced = _sliced_dims(state, roots, offsets[-1])
    if metric == "flops":
        flops = flops_by_module(model, state.example_inputs, state.example_kwargs)
        terms = [_flops_term(name, f, sliced) for name, f in _exclusive(flops).items() if f]
    else:
        gammas = {id(g.gamma) for g in state.gate_list()}
        terms = [_param_term(name, p.numel(), sliced) for name, p in model.named_parameters() if id(p) not in gammas]
    return CostModel(metric, sum(t.cost for t in terms), terms, offsets, roots)


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


@dataclass
class _Slice:
    index: torch.Tensor
    role: str


def _param_term(name: str, numel: int, sliced: dict[str, dict[int, _Slice]]) -> _Term:
    return _Term(float(numel), [s.index for s in sliced.get(_plain_name(name), {}).values()])


def _flops_term(module: str, flops: int, sliced: dict[str, dict[int, _Slice]]) -> _Term:
    """FLOPs scale with the module's sliced weight; else with its children's kept outputs (attention)."""
    prefix = f"{module}." if module else ""
    own = {name[len(prefix):]: dims for name, dims in sliced.items()
           if name.startswith(prefix) and "." not in name[len(prefix):]}
    if own:
        dims = own.get("weight") or max(own.values(), key=lambda d: math.prod(len(s.index) for s in d.values()))
        return _Term(float(flops), [s.index for s in dims.values()])
    # e.g. softmax(q k^T) v inside an attention module: proportional to the heads its q/k/v keep
    outputs = [s.index for name, dims in sliced.items() if name.startswith(prefix) and
               name[len(prefix):].count(".") == 1 for s in dims.values() if s.role == "producer"]
    return _Term(float(flops), [torch.cat(outputs)] if outputs else [])


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


# ----------------------------------------------------------------------------- the controller


@dataclass
class Controller:
    """Proportional-integral control of log lambda towards a budget. See the module docstring.

    Attributes:
        target: The budget ``B`` as a fraction of the dense cost.
        start: ``W``, the step the ramp starts (end of the lambda warm-up).
        ramp_end: ``R``, the step the reference reaches ``B``.
        k_i, k_p: Integral and proportional gains on the cost-fraction error.
        log_scale: The integral ``I``; lambda is multiplied by ``exp(I + k_p * e)``.
    """

    target: float
    start: int
    ramp_end: int
    k_i: float = 0.02
    k_p: float = 2.0
    max_log_scale: float = 12.0
    log_scale: float = 0.0
    error: float = 0.0
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, cost, lambda scale)

    def reference(self, step: int) -> float:
        """``r(t)``: 1 until ``W``, then a cubic descent to ``B`` at ``R`` (gradual pruning)."""
        span = max(1, self.ramp_end - self.start)
        progress = min(1.0, max(0.0, (step - self.start) / span))
        return self.target + (1.0 - self.target) * (1.0 - progress) ** 3

    def update(self, step: int, cost: float) -> float:
        """Feed the cost fraction measured after ``step``; returns the new lambda multiplier."""
        if step < self.start:
            return self.scale
        self.error = cost - self.reference(step)
        self.log_scale = min(self.max_log_scale, max(-self.max_log_scale, self.log_scale + self.k_i * self.error))
        self.history.append((step, cost, self.scale))
        return self.scale

    @property
    def scale(self) -> float:
        return math.exp(min(self.max_log_scale, self.log_scale + self.k_p * self.error))


def ramp_end(warmup: int, freeze: int | None) -> int:
    """``R``: three quarters of the way from the warm-up's end to the freeze (or 2 warm-ups / 500 steps)."""
    if freeze is not None:
        return warmup + max(1, int(0.75 * (freeze - warmup)))
    return max(2 * warmup, warmup + 500)


def check_reachable(cost: CostModel, state: SparsityState, key: str, target: float, tolerance: float) -> float:
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
