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
one; see :func:`fast_paths`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from autosparse.errors import NotMaterializedError


class ValueSource(Protocol):
    """What a gate can be lent: values for it computed elsewhere (``gating.batch.LazyBatch``, or
    fixed values to take gradients on, as ``autosparse.pruning`` does)."""

    def row(self, gate: Gate) -> torch.Tensor: ...

TINY_SHARE = 1e-30


def raise_on_meta(what: str, gates: Sequence[Gate]) -> None:
    """Raise :class:`NotMaterializedError` naming ``what`` if a gate is on the meta device.

    A model sparsified on meta has shapes but no values: its gates' values, the penalty and the
    schedule's bookkeeping would be meta tensors (or fail deep in torch on ``.item()``).
    """
    on_meta = [g.name for g in gates if cast(torch.Tensor, g._parameters["gamma"]).is_meta]
    if on_meta:
        raise NotMaterializedError(
            f"{what}: the gates of this model are on the meta device ({len(on_meta)} of them, e.g. "
            f"{on_meta[0]!r}), so they have no values; materialise first with "
            "autosparse.io.materialize(net, state_dict) (docs/reliability.md).")


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
    gamma: nn.Parameter
    forced_off: torch.Tensor

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

    def lend(self, batch: ValueSource | None) -> None:
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
        """Number of units whose gate value is not zero.

        Raises:
            NotMaterializedError: the gate is on the meta device.
        """
        raise_on_meta(f"gate {self.name!r}: kept()", [self])
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
    Inside a forward the gates are lent a batch (:mod:`autosparse.gating.batch`) that also computes
    each site's values once for every reader of them.
    """

    gates: list[Gate]
    index: torch.Tensor

    def __init__(self, gates: Sequence[Gate], index: np.ndarray, dim: int, ndim: int) -> None:
        super().__init__()
        object.__setattr__(self, "gates", list(gates))
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long), persistent=False)
        self.dim, self.ndim = dim, ndim
        # One gate over every position in order (most sites): its values are the multiplier, no
        # cat + gather (whose backward is a scatter) needed.
        self.whole = len(self.gates) == 1 and np.array_equal(np.asarray(index), np.arange(self.gates[0].size))
        self.view_shape = tuple(-1 if d == dim else 1 for d in range(ndim))  # the weight's rank

    def shaped(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The multiplier: every position's gate value along ``dim``, 1-sized dims elsewhere (the
        weight's rank, so neither the multiply nor its backward needs a view), in ``dtype``, on the
        site's device. Inside a batched forward it is computed once per forward."""
        shaped = getattr(self.gates[0].__dict__.get("_lent"), "shaped", None)
        if shaped is not None:  # gating.batch.LazyBatch
            return shaped(self, dtype)
        values = self.values_from_gates().view(self.view_shape)
        return values if values.dtype == dtype else values.to(dtype)

    def values(self) -> torch.Tensor:
        """The gate value of every position along ``dim`` (fp32, 1-D, on the site's device)."""
        return self.shaped().view(-1)

    def values_from_gates(self) -> torch.Tensor:
        """:meth:`values` from each gate's own ``values()`` (batched rows or computed alone)."""
        device = self.index.device
        if self.whole:
            return self.gates[0].values().to(device)
        ones = torch.ones(1, device=device)
        values = torch.cat([g.values().to(device) for g in self.gates] + [ones])
        return values[self.index]

    def multiplier(self) -> torch.Tensor:
        return self.shaped()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.shaped(weight.dtype)


# ---------------------------------------------------------------- fast paths
# torch's getter of a parametrized tensor goes through ``ParametrizationList.__call__`` and
# ``GateSite.__call__`` (nn.Module's call machinery, hook checks, ``_get_tracing_state``): ~40 us per
# read, against ~7 us for the multiply itself. On a host-bound step (small layers, small batches:
# every op costs its Python dispatch) that made the gated step 1.4x the ungated one. The fast paths
# below compute the same ``W * g`` (or ``x * g``) directly; torch's structure (``parametrizations``,
# ``original``, state_dict keys, ``remove_parametrizations``) is untouched.


def _lean_getter(name: str, torch_getter: Callable[[nn.Module], torch.Tensor]) -> Callable[[nn.Module], torch.Tensor]:
    """A getter for ``module.<name>`` whose chain is one :class:`GateSite`: the site's forward on
    ``original``, without nn.Module's call machinery."""

    def get(module: nn.Module) -> torch.Tensor:
        chain: Any = cast(Any, module._modules["parametrizations"])._modules[name]
        if parametrize._cache_enabled or len(chain._modules) != 1:  # parametrize.cached(), or a user
            return torch_getter(module)                              # parametrization added later
        return chain._modules["0"].forward(chain._parameters["original"])

    get.torch_getter = torch_getter  # type: ignore[attr-defined]  # marks it as ours (idempotence)
    return get


def _install_lean_getter(module: nn.Module, name: str) -> None:
    """Replace the property ``register_parametrization`` put on ``module``'s own Parametrized* class.
    Copies of the module share that class; the getter reads everything from the instance."""
    cls = type(module)
    prop = cls.__dict__.get(name)
    if not isinstance(prop, property) or prop.fget is None or hasattr(prop.fget, "torch_getter"):
        return
    setattr(cls, name, property(_lean_getter(name, prop.fget), prop.fset))


# The forwards that read ``weight`` exactly once, as ``f(x, weight)`` with x's channels along one dim
# (value: number of trailing spatial dims after the channel dim; -1 for a Linear's last dim).
_INPUT_GATEABLE = {nn.Linear.forward: -1, nn.Conv1d.forward: 1, nn.Conv2d.forward: 2, nn.Conv3d.forward: 3}


def _weight_sites(module: nn.Module) -> list[nn.Module]:
    """The parametrizations of ``module.weight`` (empty when it has none)."""
    chains = getattr(module, "parametrizations", None)
    return list(chains["weight"]) if chains is not None and "weight" in chains else []


def _input_gateable(module: nn.Module) -> bool:
    """Whether ``module`` is a plain Linear/ConvNd whose weight has one site, on its input dim."""
    if type(module).forward not in _INPUT_GATEABLE or getattr(module, "groups", 1) != 1:
        return False
    chain = _weight_sites(module)
    return len(chain) == 1 and isinstance(chain[0], GateSite) and chain[0].dim == 1


class _GatedForward:
    """The instance ``forward`` of a plain Linear/ConvNd consumer of gated units.

    It multiplies the input by the gate where the input is smaller than the weight (late CNN
    stages, transformers at small batch), else the weight, then runs torch's own functional form
    of the layer. Exact: the layer is linear in its input and reads its weight once, so
    ``f(x * g, W) == f(x, W * g)`` and gamma gets the same gradient. Decided per call, because the
    input's size depends on the batch and resolution, which the capture (one example) does not know.
    An instance attribute rather than hooks: any forward hook sends every call through nn.Module's
    slow path. A plain object, so it survives deepcopy (the copy's holds the copy).
    """

    def __init__(self, module: nn.Module, spatial: int) -> None:
        self.module = module
        self.linear = spatial < 0
        self.channel = -(max(spatial, 0) + 1)  # x's channel dim, counted from the end

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module: Any = self.module
        chain: Any = module._modules["parametrizations"]._modules["weight"]
        if parametrize._cache_enabled or len(chain._modules) != 1 or not isinstance(x, torch.Tensor):
            return type(module).forward(module, x)  # torch's forward, through the parametrization
        site, weight = chain._modules["0"], chain._parameters["original"]
        if x.numel() < weight.numel() and x.ndim >= site.ndim and x.shape[self.channel] == weight.shape[1]:
            x = x * site.shaped(x.dtype)  # (1, C, 1, ...): broadcast over x's batch and spatial dims
        else:
            weight = site.forward(weight)
        if self.linear:
            return F.linear(x, weight, module.bias)
        return module._conv_forward(x, weight, module.bias)


def fast_paths(model: nn.Module) -> int:
    """Install the lean getters on every single-site gated tensor, and :class:`_GatedForward` on
    every plain Linear/ConvNd consumer. Idempotent. Returns the number of consumers.

    A module that already has an instance ``forward`` (accelerate's device hooks) keeps it.
    """
    count = 0
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        chains = cast(dict[str, Any], module.parametrizations)
        for name, chain in chains.items():
            if len(chain) == 1 and isinstance(chain[0], GateSite):
                _install_lean_getter(module, name)
        if _input_gateable(module):
            count += 1
            if "forward" not in module.__dict__:
                module.forward = _GatedForward(module, _INPUT_GATEABLE[type(module).forward])
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
    """Drop :class:`_GatedForward` from one module (before its gates are folded away): it runs
    torch's forward again, through the parametrization while there is one."""
    if isinstance(module.__dict__.get("forward"), _GatedForward):
        del module.__dict__["forward"]
