"""How much each unit of each gated group matters: the scores one-shot pruning ranks.

Four criteria, each a vector per gated group (plan order, one entry per unit):

* ``l1`` / ``l2``: the norm of every *parameter* slice that compaction removes with the unit, i.e.
  the plan's analysis members of the unit: the producer rows (and biases), the consumer columns,
  and the follower entries of norm affines. Buffers (running statistics) are not weights and are
  left out. For a residual branch (layer granularity) it is the norm of the branch's output weight
  (and bias): what scales the branch's contribution to the stream, as consumer columns do for a
  channel. The weights are read before any gate (``parametrizations.<attr>.original``).
* ``taylor``: the first-order estimate of the loss change when a unit is removed,
  ``|g_i * dL/dg_i|`` with ``g`` the gate values, accumulated over the batches of ``data``
  (Molchanov et al., CVPR 2019, with the gate as the unit's multiplier). Works for every
  granularity alike, since every gate multiplies what its units feed on.
* ``random``: uniform scores from a seeded generator: the baseline every criterion must beat.

Scores are raw here; :mod:`autosparse.pruning.select` normalises them within each group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autosparse.errors import ArgumentError
from autosparse.gating.batch import batch_gates, unbatch_gates
from autosparse.state import SparsityState, get_state
from autosparse.training.init import magnitude_scores

IMPORTANCES: tuple[str, ...] = ("l1", "l2", "taylor", "random")
LossFn = Callable[[Any, Any], torch.Tensor]
_TAYLOR_NEEDS_DATA = ("importance='taylor' needs data=[(inputs, target), ...] (a few batches, e.g. a DataLoader) "
                      "to take gradients on; pass data, or use importance='l2'")


def check_importance(importance: str, data: Iterable | None, loss_fn: LossFn | None) -> None:
    """Validate the arguments of a criterion before any work is done.

    Raises:
        ArgumentError: ``importance`` is unknown, ``taylor`` has no ``data``, or ``loss_fn`` is not callable.
    """
    if importance not in IMPORTANCES:
        raise ArgumentError(f"importance: got {importance!r}, expected one of {', '.join(map(repr, IMPORTANCES))}")
    if importance == "taylor" and data is None:
        raise ArgumentError(_TAYLOR_NEEDS_DATA)
    if loss_fn is not None and not callable(loss_fn):
        raise ArgumentError(f"loss_fn: got a {type(loss_fn).__name__}, expected a callable (outputs, target) -> loss")


def unit_importance(net: nn.Module, importance: str = "l2", *, data: Iterable | None = None,
                    loss_fn: LossFn | None = None, seed: int = 0) -> list[torch.Tensor]:
    """Raw importance of every unit of every gated group of a sparsified model, in plan order.

    Args:
        net: a model returned by :func:`autosparse.sparsify`; it is not modified.
        importance: ``l1``, ``l2``, ``taylor`` or ``random`` (see the module docstring).
        data: for ``taylor``, an iterable of ``(inputs, target)``; ``inputs`` a tensor or a tuple.
        loss_fn: for ``taylor``, ``loss_fn(outputs, target)``; default cross-entropy on the logits.
        seed: for ``random``.

    Returns:
        One float64 CPU tensor per gated group (``len == group size``), non-negative.

    Raises:
        ArgumentError: see :func:`check_importance`; or ``data`` yielded no batch.
        NotSparsifiedError: ``net`` has no gates.

    Example:
        >>> scores = unit_importance(autosparse.sparsify(model, policy, example_inputs=(x,)), "l1")
    """
    check_importance(importance, data, loss_fn)
    state = get_state(net)
    if importance == "random":
        generator = torch.Generator().manual_seed(int(seed))
        return [torch.rand(len(gg.units), generator=generator, dtype=torch.float64) for gg in state.plan.gated]
    if importance == "taylor":
        if data is None:  # refused by check_importance above; checked again for the type
            raise ArgumentError(_TAYLOR_NEEDS_DATA)
        return _taylor(net, state, data, loss_fn or default_loss)
    return magnitude_scores(net, 1.0 if importance == "l1" else 2.0)


def default_loss(outputs: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the logits: a tensor output, or a Hugging Face output's ``logits``.

    Token-level logits ``(batch, seq, vocab)`` are flattened against a ``(batch, seq)`` target.
    """
    logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise ArgumentError(f"loss_fn: the default cross-entropy needs a tensor output or one with .logits, got "
                            f"{type(outputs).__name__}; pass loss_fn=lambda out, y: ... for this model")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


class FixedValues:
    """Given values for a set of gates, in the form :meth:`Gate.lend` takes (``row(gate)``, as
    :class:`~autosparse.gating.batch.LazyBatch`): here leaf tensors to take gradients on."""

    def __init__(self, gates: list, values: list[torch.Tensor]) -> None:
        self.values = {id(g): v for g, v in zip(gates, values)}

    def row(self, gate: nn.Module) -> torch.Tensor:
        return self.values[id(gate)]


def _taylor(net: nn.Module, state: SparsityState, data: Iterable, loss_fn: LossFn) -> list[torch.Tensor]:
    """``sum_batches |g * dL/dg|`` per unit, in eval mode (no running statistic is updated).

    Each gate is lent a leaf tensor holding its current values (1 for a fresh gate), so the
    gradient is taken with respect to the values the weights are multiplied by, not ``gamma``
    (whose softmax would centre it). Batched gate evaluation is switched off meanwhile, since it
    lends its own values at the start of every forward.
    """
    gates = state.gate_list()
    device = gates[0].gamma.device
    scores = [torch.zeros(g.size, dtype=torch.float64) for g in gates]
    modes = {m: m.training for m in net.modules()}
    unbatch_gates(net)
    batches = 0
    try:
        net.eval()
        for inputs, target in data:
            values = [g.values().detach().clone().requires_grad_(True) for g in gates]
            lent = FixedValues(gates, values)
            for gate in gates:
                gate.lend(lent)
            args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            outputs = net(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
            loss = loss_fn(outputs, target.to(device) if isinstance(target, torch.Tensor) else target)
            grads = torch.autograd.grad(loss, values, allow_unused=True)
            for i, (v, grad) in enumerate(zip(values, grads)):
                if grad is not None:  # a gate the loss does not reach (dead code) scores 0
                    scores[i] += (v.detach() * grad).abs().double().cpu()
            batches += 1
    finally:
        for gate in gates:
            gate.lend(None)
        for module, mode in modes.items():
            module.training = mode
        batch_gates(net, gates)
    if not batches:
        raise ArgumentError("data: yielded no batch; taylor importance needs at least one (inputs, target) pair")
    return scores
