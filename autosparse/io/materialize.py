"""Fill a model gated on the meta device with real memory and the dense model's weights.

``sparsify`` plans a model built under ``with torch.device("meta"):`` without allocating it (see
:func:`autosparse.sparsify`). :func:`materialize` then gives every tensor storage on a real device
(``to_empty``), loads a plain ``state_dict`` of the *original* (ungated) model into it, mapping
``x.weight`` to ``x.parametrizations.weight.original`` where a gate acts, and resets every gate to
fresh. Tensors that were never on meta keep their values; non-persistent buffers (not in any state
dict) come from ``state_dict`` when it has them, else from a Hugging Face model's own initialiser
(rotary ``inv_freq``), and each gate site's index is rebuilt from the plan.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from autosparse.errors import PlanMismatchError, warn
from autosparse.gating.gate import Gate, GateSite
from autosparse.state import SparsityState, get_state, parametrization_chains, unwrap


def materialize(net: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None, *,
                device: torch.device | str = "cpu") -> nn.Module:
    """Allocate a gated meta model on ``device``, load the dense weights and open every gate.

    Args:
        net: a model returned by :func:`autosparse.sparsify` for a model on the meta device.
        state_dict: a plain state dict of the original model (``model.state_dict()`` of the dense
            model, or a safetensors file's tensors). ``None`` leaves the weights uninitialised, to
            be loaded by the caller (e.g. with :func:`autosparse.io.load_gated_state`).
        device: where the memory goes.

    Returns:
        ``net`` itself, on ``device``: it computes what the dense model with these weights computes,
        and ``compact(net, inplace=True)`` works without a second copy.

    Raises:
        NotSparsifiedError: ``net`` has no gates.
        PlanMismatchError: ``state_dict`` misses tensors of the model, has tensors the model does
            not have, or a tensor of another shape; the message names the keys.

    Example:
        >>> with torch.device("meta"):
        ...     big = LlamaForCausalLM(config)
        >>> net = autosparse.sparsify(big, policy, example_inputs=(ids,), verify=False)
        >>> autosparse.io.materialize(net, load_file("model.safetensors"))
        >>> small = autosparse.compact(net, inplace=True)
    """
    net = unwrap(net)
    state = get_state(net)
    names = _dense_names(net)
    places = _places(net)
    real = {i: table[name].detach().clone() for i, [(table, name), *_] in places.items()
            if not table[name].is_meta}  # never on meta: kept unless state_dict has them
    if state_dict is not None:
        _check_keys(net, names, state_dict, set(real))
    with torch.no_grad():
        _allocate(net, device, places, real)
        _rebuild_site_indices(net, state)
        _fill_non_persistent(net, state_dict)
        if state_dict is not None:
            _load_dense(net, names, state_dict)
        _reset_gates(state)
    return net


def _allocate(net: nn.Module, device: torch.device | str, places: dict[int, list[tuple[dict, str]]],
              real: dict[int, torch.Tensor]) -> None:
    """``to_empty``, then tie again what was tied and put back the values of what was never on meta
    (``to_empty`` makes a new tensor in every place)."""
    net.to_empty(device=device)
    for i, [(table, name), *tied] in places.items():
        for other, other_name in tied:
            other[other_name] = table[name]
        if i in real:
            table[name].copy_(real[i])


def _dense_names(net: nn.Module) -> dict[str, str]:
    """Every tensor of the gated model's state dict (gates excluded) by its name in the dense model."""
    names: dict[str, str] = {}
    for key in net.state_dict(keep_vars=True):
        head, found, tail = f".{key}".rpartition(".parametrizations.")
        attr, _, rest = tail.partition(".")
        if not found:
            names[key] = key
        elif rest == "original":  # x.parametrizations.weight.original is the dense x.weight
            names[f"{head[1:]}.{attr}" if head else attr] = key
    return names


def _check_keys(net: nn.Module, names: dict[str, str], state_dict: Mapping[str, torch.Tensor],
                real: set[int]) -> None:
    """Raise :class:`PlanMismatchError` naming what is missing, unexpected or of another shape.

    A tensor tied to another (a shared embedding and output layer) is satisfied by either key; one
    that was never on meta (``real``: ids of such tensors) needs no key.
    """
    own = net.state_dict(keep_vars=True)
    given_ids = real | {id(own[names[k]]) for k in state_dict if k in names}
    missing = [k for k, key in names.items() if k not in state_dict and id(own[key]) not in given_ids]
    unexpected = [k for k in state_dict if k not in names and k not in _non_persistent(net)]
    if missing or unexpected:
        raise PlanMismatchError(
            "materialize: the state dict does not fit the dense model behind this gated model: "
            + "; ".join(f"{what} ({len(keys)}): {keys[:6]}" for what, keys in
                        (("missing", missing), ("unexpected", unexpected)) if keys)
            + ". Pass the state_dict() of the original (ungated) model; a gated checkpoint loads with "
            "materialize(net) then autosparse.io.load_gated_state(net, checkpoint)")
    for k, value in state_dict.items():
        target = own[names[k]] if k in names else None
        if target is not None and tuple(value.shape) != tuple(target.shape):
            raise PlanMismatchError(f"materialize: '{k}' has shape {tuple(target.shape)} in this model but "
                                    f"{tuple(value.shape)} in the state dict")


def _places(net: nn.Module) -> dict[int, list[tuple[dict, str]]]:
    """Where each parameter and buffer lives, by tensor id: ``(module._parameters or _buffers, name)``,
    several places for a tied tensor. ``to_empty`` makes a new tensor per place, which unties them."""
    found: dict[int, list[tuple[dict, str]]] = {}
    for module in net.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    found.setdefault(id(tensor), []).append((table, name))
    return found


def _rebuild_site_indices(net: nn.Module, state: SparsityState) -> None:
    """Each gate site's ``index`` (a non-persistent buffer: ``to_empty`` leaves it garbage) from the plan."""
    for (name, dim), (_, index) in state.plan.site_indices().items():
        owner_name, _, attr = name.rpartition(".")
        owner = net.get_submodule(owner_name)
        sites = [s for s in parametrization_chains(owner)[attr] if isinstance(s, GateSite) and s.dim == dim]
        for site in sites:
            site.index.copy_(torch.as_tensor(index, dtype=torch.long))


def _non_persistent(net: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The model's own non-persistent buffers (gate sites' indices excluded), by full name."""
    found = {}
    for prefix, module in net.named_modules():
        if isinstance(module, GateSite):
            continue
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                found[f"{prefix}.{name}" if prefix else name] = (module, name)
    return found


def _fill_non_persistent(net: nn.Module, state_dict: Mapping[str, torch.Tensor] | None) -> None:
    """Non-persistent buffers from ``state_dict``, else from a Hugging Face model's ``_init_weights``.

    They are set before the dense weights are loaded, so an initialiser that also draws a module's
    weights (a module holding both) is overwritten by the loaded values.
    """
    given = state_dict or {}
    init = getattr(net, "_init_weights", None)
    left, initialised = [], set()
    for key, (module, name) in _non_persistent(net).items():
        if key in given:
            buffer = module._buffers[name]
            if buffer is None:  # listed because it was set: only an initialiser run since could unset it
                raise PlanMismatchError(f"materialize: the non-persistent buffer {key!r} was set to None while "
                                        "its module was initialised; it cannot take the given value")
            buffer.copy_(given[key])
        elif callable(init):
            if id(module) not in initialised:
                init(module)
                initialised.add(id(module))
        else:
            left.append(key)
    if left:
        message = (f"materialize: the non-persistent buffer(s) {left[:6]} are in no state dict and "
                   f"{type(net).__name__} has no initialiser for them; pass their values in state_dict "
                   "(dict(model.named_buffers()) of a small copy of the model)")
        if state_dict is not None:
            raise PlanMismatchError(message)
        warn(message)


def _load_dense(net: nn.Module, names: dict[str, str], state_dict: Mapping[str, torch.Tensor]) -> None:
    own = net.state_dict(keep_vars=True)
    for k, value in state_dict.items():
        if k in names:
            own[names[k]].copy_(value)


def _reset_gates(state: SparsityState) -> None:
    """Every gate as a fresh one of its class (``gamma`` at the open value, nothing forced off)."""
    for gate in state.gate_list():
        fresh = _fresh(gate)
        for mine, theirs in zip([*gate.parameters(), *gate.buffers()], [*fresh.parameters(), *fresh.buffers()]):
            mine.copy_(theirs)


def _fresh(gate: Gate) -> Gate:
    """A new gate of ``gate``'s class and arguments (the constructor every gate class shares)."""
    return type(gate)(gate.name, gate.granularity, gate.size, tau=gate.tau, modules=gate.modules_controlled,
                      penalty_weight=gate.penalty_weight)
