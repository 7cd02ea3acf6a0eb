"""The bookkeeping a sparsified model carries: its plan, policy and example inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from autosparse.errors import NotSparsifiedError
from autosparse.gating.gate import Gate
from autosparse.plan import Plan
from autosparse.policy.document import Policy

if TYPE_CHECKING:  # the training layer builds on this one; only its type is named here
    from autosparse.training.schedule import TrainingState

STATE_ATTR = "_autosparse"


@dataclass
class SparsityState:
    """Attached to a sparsified model as ``model._autosparse`` (a plain attribute, not a module)."""

    plan: Plan
    policy: Policy
    example_inputs: tuple  # as captured (normalize_inputs never returns None)
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)  # owned by the parametrizations, in plan order
    step: int = 0
    training: TrainingState | None = None  # created by autosparse.training on first use

    def gate_list(self) -> list[Gate]:
        return self.gates


def get_state(model: nn.Module) -> SparsityState:
    """The state of a sparsified model, or a :class:`NotSparsifiedError` that says what to do."""
    if not isinstance(model, nn.Module):
        raise NotSparsifiedError(f"expected a torch.nn.Module, got {type(model).__name__}")
    state = unwrap(model).__dict__.get(STATE_ATTR)
    if state is None:
        raise NotSparsifiedError(
            f"{type(model).__name__} has no autosparse gates; call autosparse.sparsify(model, policy, "
            "example_inputs=...) first (compact() returns a model without gates)."
        )
    return state


def unwrap(model: nn.Module) -> nn.Module:
    """The sparsified model inside a wrapper (DistributedDataParallel / DataParallel ``.module``,
    ``torch.compile``'s ``._orig_mod``), else ``model``."""
    if STATE_ATTR in getattr(model, "__dict__", {}):
        return model
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and STATE_ATTR in inner.__dict__:
            return inner
    return model


def is_sparsified(model: nn.Module) -> bool:
    return STATE_ATTR in getattr(unwrap(model), "__dict__", {})


def run_model(model: nn.Module, state: SparsityState) -> Any:
    """Run the stored example inputs in eval mode under no_grad, restoring training flags."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return model(*_like_model(model, state.example_inputs), **state.example_kwargs)
    finally:
        for module, mode in modes.items():
            module.training = mode


def _like_model(model: nn.Module, inputs: tuple) -> tuple:
    """The stored inputs on the model's device, floating ones in its dtype (it may have been cast since)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return inputs
    return tuple(
        t.to(device=param.device, dtype=param.dtype if t.is_floating_point() else t.dtype)
        if isinstance(t, torch.Tensor) else t
        for t in inputs
    )


def parametrization_chains(module: nn.Module) -> dict[str, ParametrizationList]:
    """``module.parametrizations`` (where gate sites live) as ``{attr: chain}``, typed; a fresh dict.

    Raises:
        AttributeError: ``module`` is not parametrized (as reading ``module.parametrizations`` does).
    """
    chains = cast(nn.ModuleDict, module.parametrizations)  # nn.Module.__getattr__ types it Tensor | Module
    return {attr: cast(ParametrizationList, chain) for attr, chain in chains.items()}


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) output: tensors, tuples, lists, dicts, Hugging Face ModelOutput."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten_outputs(v)]
    return []
