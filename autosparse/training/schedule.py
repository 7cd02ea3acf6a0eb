"""Training with gates: the lambda schedule, cost weights, the budget controller, freezing, and hooks.

Three ways to apply the penalty, all computing the same gradients:

* by hand: ``loss = criterion(net(x), y) + autosparse.penalty(net)``;
* without touching the loop: ``autosparse.training.attach(net)`` adds the penalty's gradient to the
  gate parameters during every backward pass, so a Hugging Face ``Trainer``, Lightning or any loop
  works unchanged;
* per group: each rule's ``penalty_weight`` (or ``gate.penalty_weight``) scales its groups' terms.

Schedules advance once per optimizer step. :func:`attach` does it for you (an optimizer step
post-hook); a hand-written loop without :func:`attach` calls :func:`step` after ``optimizer.step()``.

Example:
    >>> net = autosparse.sparsify(model, policy, example_inputs=(x,))
    >>> handle = autosparse.training.attach(net)   # penalty gradient + schedule, no loop changes
    >>> trainer.train()                            # any loop
    >>> handle.remove(); small = autosparse.compact(net)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from autosparse.errors import PolicyError, warn
from autosparse.gating.batch import penalty_norms
from autosparse.gating.gate import raise_on_meta
from autosparse.policy.document import Schedule
from autosparse.state import SparsityState, get_state, unwrap
from autosparse.training.budget import (
    Controller,
    CostModel,
    build_cost_model,
    check_reachable,
    enforce,
    equalize,
    ramp_end,
)
from autosparse.training.distributed import average_gate_grads
from autosparse.training.init import fold_gate_change, init_from_magnitude
from autosparse.training.progressive import close_to


@dataclass
class TrainingState:
    """What training adds to a sparsified model's state: cost models, controller, freeze snapshot."""

    costs: dict[str, CostModel] = field(default_factory=dict)  # by metric
    controller: Controller | None = None
    weights: list[float] = field(default_factory=list)  # cost weight per gate (1.0 without weighting)
    frozen: bool = False
    snapshot: list[torch.Tensor] = field(default_factory=list)
    hooked: bool = False  # penalty gradient added by hooks
    attachment: Attachment | None = None
    warned_twice: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # thinned to <= 2 * HISTORY entries
    last: dict[str, float] = field(default_factory=dict)  # the record of the latest step
    stride: int = 1  # history keeps every stride-th step
    penalty_layouts: dict = field(default_factory=dict)  # gate_batch layouts by device (constants)
    scale: torch.Tensor | None = None  # per gate lambda_now * cost weight, see _penalty_scale
    pending_init: bool = False  # regime pretrained: gates start from l2 magnitude at the first step


HISTORY = 1000


def warmup_factor(schedule: Schedule, step: int) -> float:
    """The lambda multiplier of the warm-up: ``min(1, step / warmup_steps)``, 1 without warm-up.

    Example:
        >>> warmup_factor(Schedule(warmup_steps=100), 25)
        0.25
    """
    if schedule.warmup_steps <= 0:
        return 1.0
    return min(1.0, max(0, step) / schedule.warmup_steps)


def training_state(model: nn.Module) -> TrainingState:
    """The model's :class:`TrainingState`, built on first use (one counted forward pass).

    Raises:
        PolicyError: the policy's budget target is below what its rules' ``min_keep`` allow.
    """
    model, state = unwrap(model), get_state(model)
    existing = state.training
    if existing is not None:
        return existing
    policy, tr = state.policy, TrainingState()
    target, weighting = policy.target, policy.penalty.cost_weighting
    metrics = {m for m in (target.metric, None if weighting == "none" else weighting) if m}
    for metric in sorted(metrics):
        tr.costs[metric] = build_cost_model(model, state, metric)
    if target.metric is not None:
        budget = getattr(target, target.metric)
        check_reachable(tr.costs[target.metric], state, f"target.{target.metric}", budget, target.tolerance)
        sched = policy.schedule
        tr.controller = Controller(
            budget, sched.warmup_steps, ramp_end(sched.warmup_steps, sched.freeze_step)
        )
    tr.weights = _cost_weights(state, tr)
    if policy.schedule.regime == "pretrained" and state.step == 0:
        tr.pending_init = True  # done by the first step(): now a forward graph may still hold the weights
    state.training = tr
    return tr


def _cost_weights(state: SparsityState, tr: TrainingState) -> list[float]:
    """Per gate: the mean cost of its units relative to the mean cost of all units (1 on average)."""
    weighting = state.policy.penalty.cost_weighting
    if weighting == "none":
        return [1.0] * len(state.gate_list())
    cost = tr.costs[weighting]
    per_unit = cost.unit_costs(cost.kept_now(state))
    mean = float(per_unit.mean()) or 1.0
    offsets = cost.offsets
    return [float(per_unit[offsets[i] : offsets[i + 1]].mean()) / mean for i in range(len(offsets) - 1)]


def current_lambda(model: nn.Module) -> float:
    """The lambda in force now: the policy's, times the warm-up factor and the controller's scale.

    Zero once the gates are frozen.
    """
    state = get_state(model)
    tr = training_state(model)
    if tr.frozen:
        return 0.0
    scale = tr.controller.scale if tr.controller is not None else 1.0
    return state.policy.penalty.lam * warmup_factor(state.policy.schedule, state.step) * scale


def penalty_terms(model: nn.Module) -> list[torch.Tensor]:
    """Per gate, its term of the penalty: ``lambda_now * cost_weight * penalty_weight * ||shares||_p``."""
    return list(_scaled_norms(model).unbind())


def _scaled_norms(model: nn.Module) -> torch.Tensor:
    """:func:`penalty_terms` as one tensor (summed directly: an unbind + stack per step costs two
    ops per gate forward and backward, noticeable when small layers make every op count)."""
    state = get_state(model)
    tr = training_state(model)
    gates = state.gate_list()
    norms = penalty_norms(gates, state.policy.penalty.p, tr.penalty_layouts)
    scale = _penalty_scale(model, tr)
    if scale.device != norms.device or scale.dtype != norms.dtype:
        scale = scale.to(device=norms.device, dtype=norms.dtype)
    return norms * scale


def _penalty_scale(model: nn.Module, tr: TrainingState) -> torch.Tensor:
    """Per gate ``lambda_now * cost_weight``, as a tensor kept in ``tr.scale``.

    Under ``torch.compile`` a Python float read from the schedule (the step, the warm-up factor,
    the controller's scale) would be baked into the graph and guarded on, so every warm-up step
    would recompile. The compiled penalty reads ``tr.scale`` instead, a graph input; eager calls
    and :func:`step` replace it with the current values. Replaced rather than updated in place: a
    graph not yet backpropagated (the penalty computed twice before one backward) saved the old one.
    """
    if tr.scale is not None and torch.compiler.is_compiling():
        return tr.scale
    return _refresh_scale(model, tr)


def _refresh_scale(model: nn.Module, tr: TrainingState) -> torch.Tensor:
    lam = current_lambda(model)
    device = next((g.gamma.device for g in get_state(model).gate_list()), torch.device("cpu"))
    tr.scale = torch.tensor([lam * w for w in tr.weights], dtype=torch.float32, device=device)
    return tr.scale


def penalty_value(model: nn.Module) -> torch.Tensor:
    """The body of :func:`autosparse.penalty`: the sum of :func:`penalty_terms` (0 when frozen)."""
    raise_on_meta("autosparse.penalty", get_state(model).gate_list())  # before the cost model reads values
    tr = training_state(model)
    gates = get_state(model).gate_list()
    if tr.hooked and not tr.warned_twice:
        tr.warned_twice = True
        warn(
            "autosparse.penalty() called while autosparse.training.attach() already adds the penalty's "
            "gradient: it now counts twice; drop one of them"
        )
    if tr.frozen:
        return gates[0].gamma.new_zeros(())
    return _scaled_norms(model).sum()


def cost_fraction(model: nn.Module, metric: str = "flops") -> float:
    """The predicted cost of ``compact(model)`` now, as a fraction of the dense model.

    Args:
        metric: ``"flops"`` or ``"params"``.
    """
    state = get_state(model)
    tr = training_state(model)
    if metric not in tr.costs:
        tr.costs[metric] = build_cost_model(unwrap(model), state, metric)
    cost = tr.costs[metric]
    return cost.fraction(cost.kept_now(state))


def step(model: nn.Module) -> None:
    """Advance the schedule by one optimizer step: warm-up, budget controller, cost weights, freeze.

    Call it after ``optimizer.step()`` in a hand-written loop, unless :func:`attach` is active.
    """
    state = get_state(model)
    raise_on_meta("autosparse.training.step", state.gate_list())
    tr = training_state(model)
    state.step += 1
    if tr.pending_init:
        # After the optimizer step no forward graph holds the weights that the fold rescales in place.
        tr.pending_init = False
        init_from_magnitude(model)
    if tr.frozen:
        _restore(state, tr)
        return
    record: dict[str, float] = {"step": float(state.step)}
    if tr.controller is not None:
        metric = state.policy.target.metric
        if metric is None:  # training_state() makes a controller only for a policy with a budget
            raise PolicyError("the policy has no target budget (target.flops / target.params) but training "
                              "runs a budget controller; was the state's policy replaced during training?")
        cost = tr.costs[metric]
        frac = cost.fraction(cost.kept_now(state))
        soft = cost.fraction(cost.soft_kept(state))
        if state.policy.schedule.regime == "pretrained" and state.step >= tr.controller.start:
            # progressive closing: never above the reference, so nothing is left to close at the freeze
            reference = tr.controller.reference(state.step)
            if frac > reference and close_to(state, cost, reference):
                frac = cost.fraction(cost.kept_now(state))
        tr.controller.update(state.step, tr.controller.signal(state.step, frac, soft))
        record["soft"] = soft
        record.update({metric: frac, "reference": tr.controller.reference(state.step)})
    if state.policy.penalty.cost_weighting != "none":
        tr.weights = _cost_weights(state, tr)
    record["lambda"] = current_lambda(model)
    _record(tr, record)
    if tr.scale is not None:
        _refresh_scale(model, tr)  # what a compiled penalty reads (_penalty_scale)
    freeze_at = state.policy.schedule.freeze_step
    if freeze_at is not None and state.step >= freeze_at:
        freeze(model)


def _record(tr: TrainingState, record: dict[str, float]) -> None:
    """Keep the latest record and a thinned history (every ``stride``-th step, at most ~2000)."""
    tr.last = record
    if int(record["step"]) % tr.stride == 0:
        tr.history.append(record)
    if len(tr.history) > 2 * HISTORY:
        tr.history[:] = tr.history[1::2]
        tr.stride *= 2


def freeze(model: nn.Module) -> None:
    """Fix the structure: enforce the budget (if any), equalize uniform rules, then stop every gate
    from changing.

    Over budget, the open units that cost most per unit of gate value are closed until the predicted
    cost is at most the target. The groups of each ``uniform: true`` rule are then cut to one common
    width, the rounded mean of their open counts (:func:`~autosparse.training.budget.equalize`: the
    lowest gates of the wider groups go), as the cost model predicted. The gate values are then
    folded into the weights (every open gate becomes exactly 1; the model computes the same function). The gate parameters stop requiring
    gradients, their gradients are dropped, and :func:`step` restores them after every optimizer
    step, so neither momentum nor weight decay can move them.
    """
    state = get_state(model)
    tr = training_state(model)
    if tr.frozen:
        return
    target = state.policy.target
    if target.metric is not None:
        enforce(state, tr.costs[target.metric], getattr(target, target.metric))
    equalize(state)  # what the cost model predicted for uniform rules, so the budget still holds
    if target.metric is not None:
        cost = tr.costs[target.metric]
        frac = cost.fraction(cost.kept_now(state))
        if frac < getattr(target, target.metric) - target.tolerance:
            warn(
                f"gates froze at {frac:.3f} of the dense {target.metric}, below target.{target.metric} "
                f"({getattr(target, target.metric):g}) minus its tolerance; train longer before freeze_step"
            )
    _normalize(unwrap(model), state)
    for gate in state.gate_list():
        gate.gamma.requires_grad_(False)
        gate.gamma.grad = None
    tr.snapshot = [gate.gamma.detach().clone() for gate in state.gate_list()]
    tr.frozen = True
    if tr.scale is not None:
        _refresh_scale(model, tr)  # lambda 0 for a compiled penalty_terms()


def _normalize(model: nn.Module, state: SparsityState) -> None:
    """Fold the gate values into the weights so that every open unit's gate is exactly 1 from now on.

    The model computes exactly the same function, but the fine-tuning after the freeze sees all kept
    units at the same scale: a unit whose gate is 0.1 would otherwise learn ten times slower through
    ``W * g`` than one whose gate is 1 (Adam steps ``W`` by about the learning rate either way).
    Closed units are forced off, then every ``gamma`` is reset to its fully open value (0 for the
    default gate, whose gates are then all 1).
    """
    def reset() -> None:
        for gate in state.gate_list():
            gate.zero_((gate.values() == 0).nonzero().flatten())
            gate.gamma.fill_(getattr(gate, "open_gamma", 0.0))  # DS gate: gamma 0 is exactly 1

    fold_gate_change(model, state, reset)  # False: another parametrization shares a weight; left as is


def _restore(state: SparsityState, tr: TrainingState) -> None:
    with torch.no_grad():
        for gate, saved in zip(state.gate_list(), tr.snapshot):
            gate.gamma.copy_(saved)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The gate parameters (``gamma`` of each gate), e.g. for their own optimizer group.

    Example:
        >>> gates = autosparse.training.gate_parameters(net)
        >>> rest = [p for p in net.parameters() if all(p is not g for g in gates)]
        >>> opt = torch.optim.AdamW([{"params": rest}, {"params": gates, "weight_decay": 0.0}])
    """
    return [gate.gamma for gate in get_state(model).gate_list()]


class Attachment:
    """What :func:`attach` registered; :meth:`remove` (or leaving a ``with`` block) undoes it."""

    def __init__(self, model: nn.Module, handles: list[Any]) -> None:
        self._model, self._handles = weakref.ref(model), handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        model = self._model()
        if model is not None:
            tr = training_state(model)
            tr.hooked = False
            tr.attachment = None if tr.attachment is self else tr.attachment

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(
    model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None, add_penalty_gradient: bool = True
) -> Attachment:
    """Train with gates in any loop: schedule stepping and (optionally) the penalty, through hooks.

    Args:
        model: A sparsified model.
        optimizer: The optimizer whose steps advance the schedule. ``None``: any optimizer that
            holds the gate parameters (a global step hook, so optimizers created later by a
            ``Trainer`` count too).
        add_penalty_gradient: Add ``d penalty / d gamma`` to each gate's gradient after every
            backward pass, so the loss need not include :func:`autosparse.penalty`. False: the loop
            adds the penalty itself and only the schedule is hooked.

    Returns:
        An :class:`Attachment`; call ``.remove()`` to undo. Attaching again replaces the previous one.

    Raises:
        PolicyError: the budget target cannot be reached under the rules' ``min_keep``.

    Example:
        >>> with autosparse.training.attach(net):
        ...     trainer.train()
    """
    tr = training_state(model)
    state = get_state(model)
    if tr.attachment is not None:
        tr.attachment.remove()  # two attachments would count every step twice
    handles: list[Any] = []
    if add_penalty_gradient:
        for i, gate in enumerate(state.gate_list()):
            handles.append(gate.gamma.register_post_accumulate_grad_hook(_penalty_hook(model, i)))
        tr.hooked = True
    owns: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = weakref.WeakKeyDictionary()
    gammas = {id(gate.gamma) for gate in state.gate_list()}
    ref = weakref.ref(model)

    def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        target = ref()
        if _owns(opt, gammas, owns) and target is not None:
            step(target)

    def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        target = ref()
        if target is not None and _owns(opt, gammas, owns):
            average_gate_grads(target)  # no-op unless several processes train (FSDP2 ignores the gates)

    if optimizer is not None:
        handles += [optimizer.register_step_pre_hook(before_step), optimizer.register_step_post_hook(after_step)]
    else:
        handles += [register_optimizer_step_pre_hook(before_step), register_optimizer_step_post_hook(after_step)]
    tr.attachment = Attachment(model, handles)
    return tr.attachment


def _owns(opt: torch.optim.Optimizer, gammas: set[int],
          owns: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool]) -> bool:
    """Whether ``opt`` holds gate parameters (cached per optimizer)."""
    if opt not in owns:
        owns[opt] = any(id(p) in gammas for group in opt.param_groups for p in group["params"])
    return owns[opt]


def _penalty_hook(model: nn.Module, index: int):
    ref = weakref.ref(model)

    def hook(gamma: torch.Tensor) -> None:
        target = ref()
        if target is None or gamma.grad is None:
            return
        tr = training_state(target)
        if tr.frozen:
            return
        state = get_state(target)
        gate = state.gate_list()[index]
        with torch.enable_grad():
            term = current_lambda(target) * tr.weights[index] * gate.penalty(state.policy.penalty.p)
            (grad,) = torch.autograd.grad(term, gamma)
        gamma.grad.add_(grad.to(gamma.grad.dtype))

    return hook
