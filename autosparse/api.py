"""The public verbs: sparsify, gates, penalty, compact."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from autosparse.analysis import DEFAULT_RULES, analyze
from autosparse.analysis.branches import find_branches
from autosparse.analysis.registry import Handler, RuleKey
from autosparse.capture import capture
from autosparse.compaction.compact import compact_model
from autosparse.errors import AlreadySparsifiedError, ModelTypeError
from autosparse.gating.batch import batch_gates
from autosparse.gating.gate import Gate, GateSite, gate_inputs
from autosparse.gating.registry import gate_class
from autosparse.plan import Plan, make_plan
from autosparse.policy.document import Policy, load_policy
from autosparse.state import STATE_ATTR, SparsityState, get_state, is_sparsified, unwrap
from autosparse.training.schedule import penalty_value


def sparsify(
    model: nn.Module,
    policy: Policy | Mapping[str, Any] | str,
    *,
    example_inputs: tuple | torch.Tensor | None = None,
    inplace: bool = False,
    op_rules: Mapping[RuleKey, Handler] | None = None,
) -> nn.Module:
    """Attach differentiable gates to every group of coupled units the policy selects.

    Args:
        model: any ``nn.Module``; it keeps its class (a Hugging Face model stays one).
        policy: a YAML path, a dict, or a :class:`~autosparse.policy.Policy`.
        example_inputs: positional inputs for one forward pass (shapes drive the analysis).
        inplace: gate ``model`` itself instead of a deep copy.
        op_rules: extra op rules ``{key: handler}`` for ops autosparse does not know.

    Returns:
        The gated model. Freshly gated, it computes exactly what ``model`` computed.

    Raises:
        PolicyError: the policy is malformed. ExampleInputsError / CaptureError: the model could not
        be run or captured. NoGatesError: the policy selects nothing in this model.

    Example:
        >>> net = autosparse.sparsify(net, "configs/channels.yaml", example_inputs=(x,))
        >>> loss = criterion(net(x), y) + autosparse.penalty(net)
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
        target = model if inplace else copy.deepcopy(model)
        gate_list = _attach(target, plan, policy)
    target.__dict__[STATE_ATTR] = SparsityState(plan, policy, captured.inputs, captured.kwargs, gate_list)
    gate_inputs(target)  # the cheaper multiply where an input is smaller than its weight (exact)
    batch_gates(target, gate_list)  # one batched gate computation per forward (autosparse.gate_batch)
    return target


def _attach(model: nn.Module, plan: Plan, policy: Policy) -> list[Gate]:
    """Create the gates and their weight parametrizations; undone completely on any failure.

    Each gate is registered as a submodule of the parametrization of its first site, so it
    appears once in ``state_dict`` and containers such as ``nn.Sequential`` stay untouched.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
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

    Example:
        >>> small = autosparse.compact(net)
    """
    return compact_model(unwrap(model), inplace, verify, rtol)  # a DDP wrapper: its module
