"""An alternative gate: hard-concrete L0 gates (Louizos, Welling & Kingma, arXiv:1712.01312).

Same interface as :class:`~autosparse.gating.gate.Gate` (``values``, ``kept``, ``penalty``, ``zero_``,
``gamma``), so sites, compaction, the cost model and the budget controller work unchanged; the
paper's gate (``gate.kind: ds``) stays the default. Here ``gamma`` is ``log_alpha`` of each unit:

    training:  u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    otherwise: s = sigmoid(log_alpha)
    g = clamp(s * (zeta - gamma_lo) + gamma_lo, 0, 1)                 # stretched, then clipped
    penalty = sum_i sigmoid(log_alpha_i - beta * log(-gamma_lo / zeta))  # expected number of open units

Each unit is gated on its own (no softmax competition), and the clip gives exact zeros and ones.
Gates sample only in training-mode passes that build a graph and while ``gamma`` requires
gradients, so bookkeeping (``kept()``, compaction, the cost model) and frozen gates are
deterministic. A fresh gate is exactly 1 (``log_alpha = 3``); ``p`` and ``tau`` are unused.

Example:
    >>> gate = HardConcreteGate("conv1", "channel", 4).eval()
    >>> gate.values()
    tensor([1., 1., 1., 1.])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from autosparse.gating.gate import Gate

BETA, LOW, HIGH = 2.0 / 3.0, -0.1, 1.1  # temperature and stretch interval of the paper
OPEN_LOG_ALPHA = 3.0  # sigmoid(3) * 1.2 - 0.1 > 1: the deterministic gate is exactly 1


class HardConcreteGate(Gate):
    """A hard-concrete L0 gate over the ``size`` units of a group; see the module docstring."""

    open_gamma = OPEN_LOG_ALPHA  # the gamma of a fully open unit (0 for the default gate)
    batchable = False  # samples noise on every call in training

    def __init__(
        self,
        name: str,
        granularity: str,
        size: int,
        *,
        tau: float = 0.5,
        modules: Sequence[str] = (),
        penalty_weight: float = 1.0,
    ) -> None:
        super().__init__(name, granularity, size, tau=tau, modules=modules, penalty_weight=penalty_weight)
        with torch.no_grad():
            self.gamma.fill_(OPEN_LOG_ALPHA)

    def _sampling(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.gamma.requires_grad

    def values(self) -> torch.Tensor:
        log_alpha = self.gamma.float()
        if self._sampling():
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
        else:
            s = torch.sigmoid(log_alpha)
        g = (s * (HIGH - LOW) + LOW).clamp(0.0, 1.0)
        return g * (~self.forced_off).to(g.dtype)

    def shares(self) -> torch.Tensor:
        """The probability that each unit is open (not normalised: units do not compete)."""
        return torch.sigmoid(self.gamma.float() - BETA * math.log(-LOW / HIGH))

    def penalty(self, p: float) -> torch.Tensor:
        """The expected number of open units (the L0 norm); ``p`` is ignored."""
        return self.shares().sum() * self.penalty_weight
