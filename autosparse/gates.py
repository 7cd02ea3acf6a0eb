"""The differentiable gate (Lee, arXiv 1910.03201) and how it acts on the model's own weights.

For a group of ``n`` units with parameters ``gamma``::

    share  = softmax(gamma)                      # positive, sums to 1
    gate_i = relu(n * share_i - tau) / (1 - tau) # == n/(1-tau) * relu(share_i - tau/n)

A fresh gate (``gamma = 0``) is exactly 1 for every unit; a unit whose share falls below
``tau / n`` is *exactly* zero in the forward pass, during ordinary SGD. Its ``gamma`` still
receives gradient through the softmax normalisation, so it can come back. The penalty is the
l_p norm (0 < p < 1) of the shares, which is smallest when few shares carry the mass.

The gate multiplies the *input columns of the weights that consume the units* (a gate site),
through :mod:`torch.nn.utils.parametrize`: ``W_eff = W * g[index]``. That is one weight-sized
multiply per step instead of an activation-sized one, and folding it into the weights at
compaction is exact because the consumer is linear in its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


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
        raw = torch.relu(self.size * self.shares() - self.tau) / (1.0 - self.tau)
        return raw * (~self.forced_off).to(raw.dtype)

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
        return self.shares().pow(p).sum().pow(1.0 / p) * self.penalty_weight

    def extra_repr(self) -> str:
        return f"name={self.name!r}, granularity={self.granularity}, size={self.size}, tau={self.tau}"


class GateSite(nn.Module):
    """Parametrization ``W -> W * multiplier`` along one dim, the multiplier read from gates.

    ``index[i]`` points into the concatenation of the gates' values followed by a single 1
    (positions that no gate controls). The gates are held without registering them as
    submodules, so the model's state_dict has each gate once, under ``autosparse_gates``.
    """

    def __init__(self, gates: Sequence[Gate], index: np.ndarray, dim: int, ndim: int) -> None:
        super().__init__()
        object.__setattr__(self, "gates", list(gates))
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long), persistent=False)
        self.dim, self.ndim = dim, ndim

    def multiplier(self) -> torch.Tensor:
        parts = [g.values() for g in self.gates]
        ones = torch.ones(1, device=self.index.device)
        values = torch.cat([p.to(ones.device) for p in parts] + [ones])
        shape = [1] * self.ndim
        shape[self.dim] = -1
        return values[self.index].view(shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.multiplier().to(weight.dtype)
