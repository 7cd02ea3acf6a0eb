"""The public verbs: sparsify, gates, penalty, compact."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from autosparse.analysis import DEFAULT_RULES, analyze
from autosparse.analysis.branches import find_branches
from autosparse.analysis.registry import Handler, RuleKey
from autosparse.capture import Capture, capture, on_meta
from autosparse.compaction.compact import compact_model, dry_run, strip_gates
from autosparse.compaction.copying import deep_copy
from autosparse.compaction.record import record_of
from autosparse.errors import AlreadySparsifiedError, ModelTypeError, NoGatesError, warn
from autosparse.gating.batch import batch_gates
from autosparse.gating.gate import Gate, GateSite, fast_paths
from autosparse.gating.registry import gate_class
from autosparse.plan import Plan, make_plan
from autosparse.policy.document import Policy, load_policy
from autosparse.state import STATE_ATTR, SparsityState, get_state, is_sparsified, unwrap
from autosparse.training.budget import build_cost_model, reachable
from autosparse.training.schedule import penalty_value


def sparsify(
    model: nn.Module,
    policy: Policy | Mapping[str, Any] | str,
    *,
    example_inputs: tuple | torch.Tensor | None = None,
    inplace: bool = False,
    op_rules: Mapping[RuleKey, Handler] | None = None,
    verify: bool = True,
) -> nn.Module:
    """Attach differentiable gates to every group of coupled units the policy selects.

    Before returning, every gated group is proved to compact exactly (a dry-run compaction of a
    throwaway copy with random zeros in every gate, compared on the example inputs); a group that
    does not is left ungated and ``explain()`` lists it with the reason.

    Args:
        model: any ``nn.Module``; it keeps its class (a Hugging Face model stays one).
        policy: a YAML path, a dict, or a :class:`~autosparse.policy.Policy`.
        example_inputs: positional inputs for one forward pass (shapes drive the analysis).
        inplace: gate ``model`` itself instead of a deep copy.
        op_rules: extra op rules ``{key: handler}`` for ops autosparse does not know.
        verify: run the dry-run compaction (``False`` skips it: faster, but a group that cannot be
            compacted exactly is then only found by ``compact()``).

    A model whose parameters are on the meta device (built under ``with torch.device("meta"):``, too
    large for this machine) is planned without memory: captured on meta tensors (the example inputs
    may be real; they are stored as given), analysed and gated on meta. The dry run needs values, so
    it is skipped there (with a warning while ``verify`` is True); fill the model with
    :func:`autosparse.io.materialize`, then ``compact(net)`` verifies the result.

    Returns:
        The gated model. Freshly gated, it computes exactly what ``model`` computed.

    Raises:
        PolicyError: the policy is malformed. ExampleInputsError / CaptureError: the model could not
        be run or captured. NoGatesError: the policy selects nothing in this model.

    Example:
        >>> net = autosparse.sparsify(net, "configs/channels.yaml", example_inputs=(x,))
        >>> loss = criterion(net(x), y) + autosparse.penalty(net)
        >>> with torch.device("meta"):
        ...     big = build()  # no memory
        >>> plan_only = autosparse.sparsify(big, policy, example_inputs=(x,), verify=False)
    """
    policy = load_policy(policy)
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"sparsify expects a torch.nn.Module, got {type(model).__name__}; pass the model "
                             "object itself (not its class, state_dict or a factory function)")
    if is_sparsified(model):
        raise AlreadySparsifiedError(
            f"{type(model).__name__} is already sparsified; compact it or start from the original model"
        )
    rules = DEFAULT_RULES.extended(op_rules)  # validates user rules before any work
    captured = capture(model, example_inputs)
    wants_layers = any(str(r.granularity) == "layer" for r in policy.rules)
    branches = find_branches(captured, model) if wants_layers else []
    plan = make_plan(policy, analyze(captured, rules), model, branches)
    # Under torch.inference_mode the copy and the gates would be inference tensors, which can never
    # be trained; sparsify prepares a model for training, so it opts out of that mode here.
    with torch.inference_mode(False):
        target = model if inplace else deep_copy(model)
        _gate(target, plan, policy, captured)
        failing = _dry_run(target, verify)
        if failing:  # fail fast: what compact() could not remove exactly is never gated
            strip_gates(target)
            plan = _without(plan, failing)
            _gate(target, plan, policy, captured)
    return target


def _dry_run(target: nn.Module, verify: bool) -> dict[str, str]:
    """The groups a dry-run compaction refuses; none checked on meta, where there are no values."""
    if not verify:
        return {}
    if on_meta(target):
        warn(f"sparsify: {type(target).__name__} is on the meta device, so the dry-run compaction that proves "
             "each group compacts exactly was skipped (it needs values); after autosparse.io.materialize(net, "
             "state_dict), compact(net) verifies the result on the example inputs (compact(net, inplace=True) "
             "cannot). Pass verify=False to silence this.")
        return {}
    return dry_run(target)


def _gate(target: nn.Module, plan: Plan, policy: Policy, captured: Capture) -> None:
    gate_list = _attach(target, plan, policy)
    target.__dict__[STATE_ATTR] = SparsityState(plan, policy, captured.inputs, captured.kwargs, gate_list)
    fast_paths(target)  # lean weight access; the cheaper multiply where an input is smaller than its weight
    batch_gates(target, gate_list)  # one batched gate computation per forward (autosparse.gate_batch)


def _without(plan: Plan, failing: dict[str, str]) -> Plan:
    """``plan`` less the groups the dry run refused, each listed as skipped with its reason."""
    gated = [gg for gg in plan.gated if gg.name not in failing]
    skipped = [*plan.skipped, *((name, f"a dry-run compaction is not exact ({why})") for name, why in failing.items())]
    if not gated:
        raise NoGatesError("no selected group compacts exactly:\n" + "\n".join(f"  - {n}: {w}" for n, w in skipped))
    return dataclasses.replace(plan, gated=gated, skipped=skipped)


def _attach(model: nn.Module, plan: Plan, policy: Policy) -> list[Gate]:
    """Create the gates and their weight parametrizations; undone completely on any failure.

    Each gate is registered as a submodule of the parametrization of its first site, so it
    appears once in ``state_dict`` and containers such as ``nn.Sequential`` stay untouched.
    """
    device = torch.device("meta") if on_meta(model) else next((p.device for p in model.parameters()),
                                                              torch.device("cpu"))
    gate_cls = gate_class(policy.gate.kind)
    gate_list = [
        gate_cls(gg.name, gg.group.granularity, len(gg.units), tau=policy.gate.tau,
             modules=gg.group.producers, penalty_weight=gg.rule.penalty_weight).to(device)
        for gg in plan.gated
    ]
    owned: set[int] = set()
    done: list[tuple[nn.Module, str]] = []
    try:
        for (name, dim), (used, index) in plan.site_indices().items():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            site = GateSite([gate_list[i] for i in used], index, dim, getattr(owner, attr).ndim).to(device)
            for i in used:
                if i not in owned:
                    site.add_module(f"gate_{plan.gated[i].key}", gate_list[i])
                    owned.add(i)
            parametrize.register_parametrization(owner, attr, site, unsafe=True)
            done.append((owner, attr))
    except Exception:
        for owner, attr in reversed(done):
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
        raise
    return gate_list


def gates(model: nn.Module) -> dict[str, Gate]:
    """The gates of a sparsified model, by group name.

    Example:
        >>> for name, gate in autosparse.gates(net).items():
        ...     print(name, gate.granularity, gate.kept(), "/", gate.size)
    """
    state = get_state(model)
    return {gg.name: gate for gg, gate in zip(state.plan.gated, state.gate_list())}


def penalty(model: nn.Module) -> torch.Tensor:
    """The sparsity regulariser ``lambda_t * sum_g c_g * w_g * ||shares_g||_p`` to add to the loss.

    ``lambda_t`` is the policy's lambda times the warm-up factor and, with a budget target, the
    controller's scale; ``c_g`` is the group's cost weight (``penalty.cost_weighting``, else 1) and
    ``w_g`` its rule's ``penalty_weight``. Zero once the gates are frozen. Schedules advance with
    :func:`autosparse.training.step` or :func:`autosparse.training.attach`.

    Raises:
        NotSparsifiedError: ``model`` has no gates. PolicyError: the budget target is unreachable.

    Example:
        >>> loss = criterion(net(x), y) + autosparse.penalty(net)
    """
    return penalty_value(model)


def compact(model: nn.Module, *, verify: bool = True, inplace: bool = False, rtol: float = 1e-5) -> nn.Module:
    """Remove zeroed units physically, fold gate values into weights, and check equivalence.

    Args:
        model: a model returned by :func:`sparsify` (and trained).
        verify: run the stored example inputs through both models and raise if they differ.
        inplace: mutate ``model`` instead of a copy (no verification is possible then).
        rtol: allowed max abs difference relative to the output scale.

    Returns:
        A model of the original classes with smaller weights and no gates.

    Raises:
        NotSparsifiedError: ``model`` has no gates. EquivalenceError: verification failed.

    Warns:
        AutosparseWarning: no unit was removed (the result has the dense size).

    Example:
        >>> small = autosparse.compact(net)
    """
    inner = unwrap(model)  # a DDP wrapper: its module
    gate_list = get_state(inner).gate_list()
    closed = sum(gate.size - gate.kept() for gate in gate_list)  # read before an inplace compaction
    small = compact_model(inner, inplace, verify, rtol)
    _warn_if_nothing_removed(small, closed, len(gate_list))
    return small


def _warn_if_nothing_removed(small: nn.Module, closed: int, groups: int) -> None:
    """A same-size "compacted" model is legal but almost never what was wanted: say why and what to do."""
    record = record_of(small)
    if record is None or record.replaced or record.dropped_layers:
        return
    if any(w["after"] < w["before"] for w in record.groups.values()):
        return
    why = (f"every gate of the {groups} group(s) is still open" if closed == 0 else
           f"{closed} unit(s) have a zero gate, but the rules' min_keep / round_to keep them")
    warn(f"compact: no unit was removed ({why}), so the compacted model has the dense size. Train longer, "
         "raise penalty.lambda (3-10x), or set a budget such as target: {flops: 0.5} so the controller "
         "closes gates until the model fits it")


def summary(model: nn.Module) -> str:
    """One line on what the gates of a sparsified model control, like PEFT's trainable-parameters line.

    Per granularity, the gated groups and units; the parameters and FLOPs that sit in tensors (or
    residual branches) a gate can shrink, as a share of the dense model; and what ``compact`` would
    keep now (the cost model's prediction). Parameters need no forward pass; FLOPs reuse the
    training's cost model when it has one, else one counted forward on the stored example inputs.

    Raises:
        NotSparsifiedError: ``model`` has no gates.

    Example:
        >>> print(autosparse.summary(net))  # a 2-layer Llama, heads and MLP channels gated, fresh
        gated 4 groups: 2 head (4 units), 2 channel (128 units) | params: 18,432 of 22,688 reachable (81.2%), compact keeps 100.0% | FLOPs: 90.5% reachable, compact keeps 100.0%
    """
    inner = unwrap(model)
    state = get_state(inner)
    counts: dict[str, list[int]] = {}
    for gg in state.plan.gated:
        seen = counts.setdefault(str(gg.group.granularity), [0, 0])
        seen[0], seen[1] = seen[0] + 1, seen[1] + len(gg.units)
    groups = ", ".join(f"{n} {g} ({u} units)" for g, (n, u) in counts.items())
    params = build_cost_model(inner, state, "params")
    cached = state.training.costs.get("flops") if state.training is not None else None
    flops = cached or build_cost_model(inner, state, "flops")
    share = {cost.metric: reachable(cost) / (cost.dense or 1.0) for cost in (params, flops)}
    now = {cost.metric: cost.fraction(cost.kept_now(state)) for cost in (params, flops)}
    return (f"gated {len(state.plan.gated)} groups: {groups} | params: {reachable(params):,.0f} of "
            f"{params.dense:,.0f} reachable ({share['params']:.1%}), compact keeps {now['params']:.1%} | "
            f"FLOPs: {share['flops']:.1%} reachable, compact keeps {now['flops']:.1%}")
