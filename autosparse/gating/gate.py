"""The differentiable gate (Lee, arXiv 1910.03201) and how it acts on the model's own weights.

For a group of ``n`` units with parameters ``gamma``::

    share  = softmax(gamma)                      # positive, sums to 1
    gate_i = relu(n * share_i - tau) / (1 - tau) # == n/(1-tau) * relu(share_i - tau/n)

A fresh gate (``gamma = 0``) is exactly 1 for every unit; a unit whose share falls below
``tau / n`` is *exactly* zero in the forward pass, during ordinary SGD. Its ``gamma`` still
receives gradient through the softmax normalisation, so it can come back. The penalty is the
l_p norm (0 < p < 1) of the shares, which is smallest when few shares carry the mass.

The gate multiplies the *input columns of the weights that consume the units* (a gate site),
through :mod:`torch.nn.utils.parametrize`: ``W_eff = W * g[index]``. Folding it into the weights at
compaction is exact because the consumer is linear in its inputs. A plain ``Linear``/``ConvNd``
consumer whose input is smaller than its weight (late CNN stages) gates the input instead,
``f(x * g, W) == f(x, W * g)``, which costs an activation-sized multiply instead of a weight-sized
one; see :func:`gate_inputs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # batch.py builds on this module
    from autosparse.gating.batch import LazyBatch

TINY_SHARE = 1e-30


def threshold(shares: torch.Tensor, count: float | torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """The gate of the method, ``relu(n * share - tau) / (1 - tau)``; ``count``/``tau`` may be per-row columns."""
    return torch.relu(count * shares - tau) / (1.0 - tau)


class Gate(nn.Module):
    """One differentiable gate over the ``size`` units of a group.

    Attributes:
        name: the group's name (its first producing module).
        granularity: "channel", "head" or "layer".
        size: number of gated units.
        modules: names of the modules whose weights are sliced when units go.

    Example:
        >>> g = Gate("conv1", "channel", 4, tau=0.5)
        >>> g.values()
        tensor([1., 1., 1., 1.], grad_fn=<MulBackward0>)
        >>> g.zero_([1]); g.values()[1].item()
        0.0
    """

    # Whether every value is a pure function of gamma (no sampling), so all such gates of a model
    # can be computed in one batched op per forward (autosparse.gating.batch).
    batchable: bool = True

    def __init__(self, name: str, granularity: str, size: int, *, tau: float = 0.5,
                 modules: Sequence[str] = (), penalty_weight: float = 1.0) -> None:
        super().__init__()
        self.name, self.granularity, self.size = name, str(granularity), int(size)
        self.tau, self.penalty_weight = float(tau), float(penalty_weight)
        self.modules_controlled = tuple(modules)
        self.gamma = nn.Parameter(torch.zeros(self.size))
        self.register_buffer("forced_off", torch.zeros(self.size, dtype=torch.bool))

    def shares(self) -> torch.Tensor:
        """Normalised ``exp(gamma)``, computed in fp32 whatever the model's dtype."""
        return torch.softmax(self.gamma.float(), dim=0)

    def values(self) -> torch.Tensor:
        """Current effective gate values: exactly 1 when fresh, exactly 0 where a unit is off."""
        lent = self.__dict__.get("_lent")
        if lent is not None:  # inside a forward: computed with every other gate (gating.batch)
            return lent.row(self)
        return threshold(self.shares(), self.size, self.tau).masked_fill(self.forced_off, 0.0)

    def lend(self, batch: LazyBatch | None) -> None:
        """Take values from ``batch`` (a batched computation of every gate) until lent ``None`` again."""
        self.__dict__["_lent"] = batch

    def zero_(self, indices: Sequence[int] | torch.Tensor) -> Gate:
        """Force units to exact zero (manual pruning, tests). Returns self."""
        raw = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices)
        if raw.numel() and (raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool):
            raise TypeError(f"gate '{self.name}': zero_ takes integer unit indices, got {raw.dtype}")
        idx = raw.to(torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(f"gate '{self.name}' has {self.size} units; got indices {idx.tolist()}")
        with torch.no_grad():
            self.forced_off[idx] = True
        return self

    def kept(self) -> int:
        """Number of units whose gate value is not zero."""
        with torch.no_grad():
            return int((self.values() != 0).sum())

    def penalty(self, p: float) -> torch.Tensor:
        """``(sum_i share_i ** p) ** (1 / p)``: between 1 (one unit) and ``n ** (1/p - 1)`` (uniform)."""
        # A share that underflows to exactly 0 would meet d(x^p)/dx = inf at 0 and turn gamma's
        # gradient into nan; clamped, it contributes nothing (1e-30 ** p is below fp32 resolution).
        return self.shares().clamp_min(TINY_SHARE).pow(p).sum().pow(1.0 / p) * self.penalty_weight

    def extra_repr(self) -> str:
        return f"name={self.name!r}, granularity={self.granularity}, size={self.size}, tau={self.tau}"


class GateSite(nn.Module):
    """Parametrization ``W -> W * multiplier`` along one dim, the multiplier read from gates.

    ``index[i]`` points into the concatenation of the gates' values followed by a single 1
    (positions that no gate controls). The gates are held without registering them as
    submodules, so the model's state_dict has each gate once, under ``autosparse_gates``.

    ``on_input`` is True only while the consumer's forward runs on an input that
    :class:`_GateInput` already multiplied by the gate; the weight is then returned unchanged.
    Everywhere else (other readers of the weight, folding, ``training``) it reads ``W * g``.
    """

    def __init__(self, gates: Sequence[Gate], index: np.ndarray, dim: int, ndim: int) -> None:
        super().__init__()
        object.__setattr__(self, "gates", list(gates))
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long), persistent=False)
        self.dim, self.ndim = dim, ndim
        # One gate over every position in order (most sites): its values are the multiplier, no
        # cat + gather (whose backward is a scatter) needed.
        self.whole = len(self.gates) == 1 and np.array_equal(np.asarray(index), np.arange(self.gates[0].size))
        self.on_input = False

    def values(self) -> torch.Tensor:
        """The gate value of every position along ``dim`` (fp32, 1-D)."""
        if self.whole:
            return self.gates[0].values().to(self.index.device)
        ones = torch.ones(1, device=self.index.device)
        values = torch.cat([g.values().to(ones.device) for g in self.gates] + [ones])
        return values[self.index]

    def multiplier(self) -> torch.Tensor:
        shape = [1] * self.ndim
        shape[self.dim] = -1
        return self.values().view(shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.on_input:
            return weight
        return weight * self.multiplier().to(weight.dtype)


# The forwards that read ``weight`` exactly once, as ``f(x, weight)`` with x's channels along one dim
# (value: number of trailing spatial dims after the channel dim; -1 for a Linear's last dim).
_INPUT_GATEABLE = {nn.Linear.forward: -1, nn.Conv1d.forward: 1, nn.Conv2d.forward: 2, nn.Conv3d.forward: 3}


def _weight_sites(module: nn.Module) -> list[nn.Module]:
    """The parametrizations of ``module.weight`` (empty when it has none)."""
    chains = getattr(module, "parametrizations", None)
    return list(chains["weight"]) if chains is not None and "weight" in chains else []


def _input_site(module: nn.Module) -> GateSite | None:
    """The gate site on ``module.weight``'s input dim, if input gating is exact for this module."""
    if type(module).forward not in _INPUT_GATEABLE or getattr(module, "groups", 1) != 1:
        return None
    chain = _weight_sites(module)
    if not all(isinstance(p, GateSite) for p in chain):
        return None  # another parametrization does not commute with moving the gate to the input
    return next((p for p in chain if p.dim == 1), None)


class _GateInput:
    """Forward pre-hook: multiply the input by the gate when that is cheaper than the weight.

    Decided per call, because the input's size depends on the batch and resolution, which the
    capture (one example) does not know. A plain object, so the hook survives deepcopy and pickle.
    The site and the weight's size are looked up once (the hook runs on every forward of every
    consumer, so attribute walks through nn.Module would cost more than the multiply saves).
    """

    def __init__(self, spatial: int) -> None:
        self.spatial = spatial
        self.site: GateSite | None = None
        self.weight_numel = self.in_features = 0

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.ndim < self.spatial + 1:
            return None  # an fx Proxy while tracing, a keyword input, ...: the weight stays gated
        if self.site is None:
            self.site = _input_site(module)
            if self.site is None:
                return None
            original = module.parametrizations["weight"].original
            self.weight_numel, self.in_features = original.numel(), original.shape[1]
        channel = -1 if self.spatial < 0 else x.ndim - self.spatial - 1
        if x.numel() >= self.weight_numel or x.shape[channel] != self.in_features:
            return None
        self.site.__dict__["on_input"] = True  # plain attribute: skip nn.Module.__setattr__
        shape = [-1] + [1] * max(self.spatial, 0)
        return (x * self.site.values().to(x.dtype).view(shape), *args[1:])


class _EndGateInput:
    """Forward hook (always called, also on error): the weight is gated again outside the forward."""

    def __init__(self, start: _GateInput) -> None:
        self.start = start  # the pre-hook of the same module: it knows the site it flagged

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.start.site is not None:
            self.start.site.__dict__["on_input"] = False


def gate_inputs(model: nn.Module) -> int:
    """Let every plain ``Linear``/``ConvNd`` consumer gate its input when that is cheaper.

    Exact: the consumer is linear in its input and reads its weight once, so ``f(x * g, W)`` is
    ``f(x, W * g)`` and gamma gets the same gradient. Idempotent. Returns the number of modules.
    """
    count = 0
    for module in model.modules():
        if _input_site(module) is None:
            continue
        count += 1
        if any(isinstance(h, _GateInput) for h in module._forward_pre_hooks.values()):
            continue
        start = _GateInput(_INPUT_GATEABLE[type(module).forward])
        module.register_forward_pre_hook(start)
        module.register_forward_hook(_EndGateInput(start), prepend=True, always_call=True)
    return count


def remove_hooks(module: nn.Module, pre: type, post: type) -> list:
    """Remove ``module``'s forward pre-hooks of class ``pre`` and forward hooks of class ``post``;
    return the pre-hooks removed."""
    removed = []
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, pre):
            removed.append(module._forward_pre_hooks.pop(key))
    for key, hook in list(module._forward_hooks.items()):
        if isinstance(hook, post):
            del module._forward_hooks[key]
            module._forward_hooks_always_called.pop(key, None)
    return removed


def remove_input_gating(module: nn.Module) -> None:
    """Drop the hooks of :func:`gate_inputs` from one module (before its gates are folded away)."""
    remove_hooks(module, _GateInput, _EndGateInput)
    for site in _weight_sites(module):
        if isinstance(site, GateSite):
            site.on_input = False
