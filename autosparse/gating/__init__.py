"""Gates: the differentiable switch of one group, their batched evaluation and the gate kinds.

* :mod:`~autosparse.gating.gate`: :class:`Gate` (shares ``exp(gamma) / sum``, thresholded with
  ``ReLU(share - tau/n)``) and :class:`GateSite` (where a gate multiplies a weight or an input);
* :mod:`~autosparse.gating.batch`: every gate's values in one padded computation per forward;
* :mod:`~autosparse.gating.hard_concrete`: the L0 hard-concrete alternative;
* :mod:`~autosparse.gating.registry`: ``gate.kind`` -> gate class.
"""

from __future__ import annotations

from autosparse.gating.gate import Gate, GateSite
from autosparse.gating.hard_concrete import HardConcreteGate
from autosparse.gating.registry import GATE_CLASSES, gate_class

__all__ = ["GATE_CLASSES", "Gate", "GateSite", "HardConcreteGate", "gate_class"]
