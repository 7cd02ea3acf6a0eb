"""``prune``: one-shot structured pruning to a FLOPs, parameter or latency budget, without training.

The same sound engine as training with gates: the analysis finds the coupled units, the gates
switch them off exactly, the cost model prices them and ``compact`` removes them and verifies the
result. Only the decision differs: an importance criterion and one global ranking instead of SGD.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from autosparse.api import compact, sparsify
from autosparse.errors import PolicyError
from autosparse.policy.document import Policy, load_policy
from autosparse.pruning.importance import LossFn, check_importance, unit_importance
from autosparse.pruning.select import Selection, select_units

SELECTION_ATTR = "_autosparse_selection"


def prune(
    model: nn.Module,
    policy: Policy | Mapping[str, Any] | str,
    *,
    example_inputs: tuple | torch.Tensor,
    importance: str = "l2",
    data: Iterable | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> nn.Module:
    """Prune ``model`` to the policy's ``target`` in one call: score, rank globally, remove, verify.

    A deep copy is sparsified (``model`` is never modified), every unit of every gated group is
    scored, one global ranking (docs/pruning.md) picks the units to remove within each rule's
    ``min_keep`` / ``round_to`` until the cost model's FLOPs (parameters, or latency) reach the target, their
    gates are zeroed and the copy is compacted, which checks that the result computes what the
    gated copy computed. Fine-tune the result as usual afterwards.

    Args:
        model: any ``nn.Module`` :func:`autosparse.sparsify` accepts.
        policy: a YAML path, dict or :class:`~autosparse.policy.Policy` with ``target.flops``,
            ``target.params`` or ``target.latency``; its gate, penalty and schedule sections do not matter here.
        example_inputs: positional inputs for one forward pass (analysis, FLOPs, verification); for
            ``target.latency``, at the batch size the latency is wanted for (the model is timed on them).
        importance: ``l2`` (default), ``l1``, ``taylor`` (needs ``data``) or ``random``.
        data: for ``taylor``: an iterable of ``(inputs, target)`` batches, e.g. a few of a DataLoader.
        loss_fn: for ``taylor``: ``loss_fn(outputs, target)``; default cross-entropy on the logits.
        seed: for ``random``: the generator's seed (same seed, same model).

    Returns:
        A plain model of the original classes, no gates, with the removed units gone;
        :func:`selection_of` on it gives the :class:`~autosparse.pruning.Selection` (the predicted cost).

    Raises:
        PolicyError: the policy has no target, or the target is below what ``min_keep`` allows.
        ArgumentError: unknown ``importance``; ``taylor`` without ``data``; a non-callable ``loss_fn``.
        EquivalenceError: the compacted model differs from the gated one (a bug: please report it).

    Example:
        >>> small = prune(model, {"rules": [{"granularity": "channel"}], "target": {"flops": 0.5}},
        ...               example_inputs=(x,), importance="l2")
    """
    policy = load_policy(policy)
    if policy.target.metric is None:
        raise PolicyError("target: prune needs a budget; add target.flops (or target.params, target.latency), a "
                          "fraction of the dense model in (0, 1), e.g. {'target': {'flops': 0.5}}")
    check_importance(importance, data, loss_fn)
    # Gates are only switches here: plain ones, whose values a Taylor pass can take gradients on
    # (a hard-concrete gate samples its values and could not be lent fixed ones).
    policy = dataclasses.replace(policy, gate=dataclasses.replace(policy.gate, kind="ds"))
    net = sparsify(model, policy, example_inputs=example_inputs)
    scores = unit_importance(net, importance, data=data, loss_fn=loss_fn, seed=seed)
    selection = select_units(net, scores)
    small = compact(net)
    small.__dict__[SELECTION_ATTR] = selection  # a plain attribute: not a submodule, not in the state_dict
    return small


def selection_of(model: nn.Module) -> Selection | None:
    """What :func:`prune` decided for the model it returned (``None`` for any other model).

    Example:
        >>> small = prune(model, {"rules": [{"granularity": "channel"}], "target": {"latency": 0.5}},
        ...               example_inputs=(x,))
        >>> selection_of(small).predicted  # the cost model's latency fraction, e.g. 0.497
    """
    selection = model.__dict__.get(SELECTION_ATTR)
    return selection if isinstance(selection, Selection) else None
