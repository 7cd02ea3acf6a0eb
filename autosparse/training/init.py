"""Gates that start where magnitude pruning would: initial gate values from the units' l2 norms.

A fresh gate is 1 for every unit, so in a *trained* model the gates know nothing yet and the first
units a budget closes are chosen by cost alone. :func:`init_from_magnitude` gives every unit the
gate value ``v_i = s_i / mean_g(s)`` (its l2 magnitude relative to its group, floored at
:data:`FLOOR` and renormalised to mean 1) and divides the weights that the gate multiplies by the
same value, so the model computes exactly what it computed before (:func:`fold_gate_change`), while
the gate values already rank the units of each group as l2 magnitude pruning would.

For the default gate ``v_i = (n * softmax(gamma)_i - tau) / (1 - tau)``; with ``mean(v) = 1`` the
choice ``gamma_i = log(tau + (1 - tau) * v_i)`` gives exactly ``v_i`` (the softmax denominator is
then ``n``). Only the default (``ds``) gate is initialised; a hard-concrete gate samples its values
and is left fresh.

Example:
    >>> net = autosparse.sparsify(trained, policy, example_inputs=(x,))
    >>> init_from_magnitude(net)          # done by the ``schedule: {regime: pretrained}`` policy
    >>> torch.equal(net(x).argmax(1), trained(x).argmax(1))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from autosparse.analysis import Role
from autosparse.gating.gate import Gate, GateSite
from autosparse.state import SparsityState, get_state, parametrization_chains, unwrap
from autosparse.training.distributed import scale_

FLOOR = 0.05  # the smallest initial gate value: far enough above 0 that the fold stays well conditioned
_ROLES = (Role.PRODUCER, Role.CONSUMER, Role.FOLLOWER)


def magnitude_scores(model: nn.Module, p: float = 2.0) -> list[torch.Tensor]:
    """``(sum |w|^p)^(1/p)`` over every parameter slice removed with each unit, per gated group (plan order).

    The one home of the magnitude criterion: ``autosparse.pruning``'s ``l1`` / ``l2`` importances
    call it too. Producer rows, consumer columns, norm affines; a residual branch's whole output
    weight (it feeds that branch only); read from the weights before any gate.

    Example:
        >>> [s.shape for s in magnitude_scores(net)]
        [torch.Size([64]), torch.Size([64]), torch.Size([64])]
    """
    model = unwrap(model)
    state = get_state(model)
    sums = [torch.zeros(len(gg.units), dtype=torch.float64) for gg in state.plan.gated]
    where: dict[int, tuple[int, int]] = {}  # class root -> (group, unit)
    for i, gg in enumerate(state.plan.gated):
        for j, branch in enumerate(gg.branches):
            for name in (branch.weight, branch.bias):
                tensor = _parameter(model, name) if name else None
                if tensor is not None:
                    sums[i][j] += float(tensor.detach().double().abs().pow(p).sum())
        if not gg.branches:
            where.update({int(r): (i, j) for j, r in enumerate(gg.units)})
    seen: set[tuple[str, int]] = set()
    for member in state.plan.analysis.members if state.plan.analysis else []:
        tensor = _parameter(model, member.name)
        if (member.name, member.dim) in seen or member.role not in _ROLES or tensor is None:
            continue
        seen.add((member.name, member.dim))
        flat = tensor.detach().double().abs().pow(p).movedim(member.dim, 0).reshape(tensor.shape[member.dim], -1)
        for pos, (root, value) in enumerate(zip(np.asarray(member.ids).tolist(), flat.sum(1).tolist())):
            hit = where.get(int(root))
            if hit is not None and pos < flat.shape[0]:
                sums[hit[0]][hit[1]] += value
    return [s.pow(1.0 / p) for s in sums]


def _parameter(model: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter ``name`` as it is before its gates; ``None`` for buffers and unknown names."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    if parametrize.is_parametrized(owner, attr):
        return cast(torch.Tensor, parametrization_chains(owner)[attr].original)
    value = getattr(owner, attr, None)
    return value if isinstance(value, nn.Parameter) else None


def initial_values(scores: torch.Tensor, floor: float = FLOOR) -> torch.Tensor:
    """Relative scores as gate values: ``s / mean(s)``, floored at ``floor``, renormalised to mean 1.

    Example:
        >>> initial_values(torch.tensor([1.0, 3.0]))
        tensor([0.5000, 1.5000], dtype=torch.float64)
    """
    s = scores.double()
    mean = float(s.mean())
    if not math.isfinite(mean) or mean <= 0:
        return torch.ones_like(s)
    v = (s / mean).clamp_min(floor)
    return v / v.mean()


def init_from_magnitude(model: nn.Module, scores: list[torch.Tensor] | None = None) -> int:
    """Set each default gate to :func:`initial_values` of its units' scores, keeping the model's function.

    Args:
        model: a freshly sparsified model (open gates).
        scores: per gated group, one non-negative score per unit; default :func:`magnitude_scores`.

    Returns:
        The number of gates initialised.

    Example:
        >>> init_from_magnitude(net)
        3
    """
    model = unwrap(model)
    state = get_state(model)
    scores = magnitude_scores(model) if scores is None else scores
    gates = state.gate_list()
    chosen = [(g, s) for g, s in zip(gates, scores) if type(g) is Gate and not bool(g.forced_off.any())]

    def change() -> None:
        for gate, score in chosen:
            v = initial_values(score)
            gate.gamma.copy_(torch.log(gate.tau + (1.0 - gate.tau) * v).to(gate.gamma.dtype))

    fold_gate_change(model, state, change)
    return len(chosen)


def fold_gate_change(model: nn.Module, state: SparsityState, change: Callable[[], None]) -> bool:
    """Run ``change()`` (which edits gate parameters) and rescale the gated weights so that the model
    computes the same function as before it.

    Each gated weight is ``W * m`` with ``m`` the product of its gate sites' multipliers; after
    ``change`` the stored ``W`` is multiplied by ``m_before / m_after`` wherever ``m_after != 0``.

    Returns:
        False, with nothing changed, when another parametrization shares a weight with a gate (the
        fold would not be exact); True otherwise.
    """
    chains = [
        chain
        for module in model.modules()
        if parametrize.is_parametrized(module)
        for chain in parametrization_chains(module).values()
    ]
    chains = [c for c in chains if any(isinstance(site, GateSite) for site in c)]
    if not all(isinstance(site, GateSite) for c in chains for site in c):
        return False
    sites = [[site for site in c if isinstance(site, GateSite)] for c in chains]
    with torch.no_grad():
        old = [_product(site.multiplier() for site in s) for s in sites]
        change()
        for chain, chain_sites, before in zip(chains, sites, old):
            after = _product(site.multiplier() for site in chain_sites)
            ratio = torch.where(after != 0, before / after.where(after != 0, torch.ones_like(after)), 1.0)
            scale_(chain.original, ratio)
    return True


def _product(factors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``math.prod`` of a chain's multipliers: never empty here, so a tensor, not the start value 1."""
    return cast(torch.Tensor, math.prod(factors))
