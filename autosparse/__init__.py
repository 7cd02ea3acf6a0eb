"""autosparse: learn structured sparsity end to end by SGD, then compact to an equivalent dense model.

Example:
    >>> import autosparse
    >>> net = autosparse.sparsify(net, "configs/channels.yaml", example_inputs=(x,))
    >>> loss = criterion(net(x), y) + autosparse.penalty(net)   # train as usual
    >>> small = autosparse.compact(net)                          # plain torch modules, fewer channels
"""

from __future__ import annotations

from autosparse.api import compact, gates, penalty, sparsify
from autosparse.errors import (
    AutosparseError,
    CaptureError,
    CompactionError,
    EquivalenceError,
    ExampleInputsError,
    NoGatesError,
    NotSparsifiedError,
    PolicyError,
)
from autosparse.explain import explain
from autosparse.gates import Gate
from autosparse.policy import Policy, load_policy

__version__ = "0.1.0"

__all__ = [
    "AutosparseError",
    "CaptureError",
    "CompactionError",
    "EquivalenceError",
    "ExampleInputsError",
    "Gate",
    "NoGatesError",
    "NotSparsifiedError",
    "Policy",
    "PolicyError",
    "compact",
    "explain",
    "gates",
    "load_policy",
    "penalty",
    "sparsify",
]
