"""autosparse: learn structured sparsity end to end by SGD, then compact to an equivalent dense model.

Example:
    >>> import autosparse
    >>> net = autosparse.sparsify(net, "configs/channels.yaml", example_inputs=(x,))
    >>> loss = criterion(net(x), y) + autosparse.penalty(net)   # train as usual
    >>> small = autosparse.compact(net)                          # plain torch modules, fewer channels
"""

from __future__ import annotations

from autosparse import pruning, training
from autosparse.api import compact, gates, penalty, sparsify, summary
from autosparse.errors import (
    AlreadySparsifiedError,
    AutosparseError,
    CaptureError,
    CompactionError,
    EquivalenceError,
    ExampleInputsError,
    ExportError,
    ModelTypeError,
    NoGatesError,
    NotSparsifiedError,
    PlanMismatchError,
    PolicyError,
)
from autosparse.gating.gate import Gate
from autosparse.gating.hard_concrete import HardConcreteGate
from autosparse.io.checkpoints import load_gated_state
from autosparse.io.export import export
from autosparse.io.save_load import load, save
from autosparse.policy.document import Policy, load_policy
from autosparse.pruning import prune
from autosparse.reporting.explain import explain
from autosparse.reporting.logger import GateLogger
from autosparse.reporting.report import report
from autosparse.training.distill import distill

__version__ = "0.1.0"

__all__ = [
    "AlreadySparsifiedError",
    "AutosparseError",
    "CaptureError",
    "CompactionError",
    "EquivalenceError",
    "ExampleInputsError",
    "ExportError",
    "ModelTypeError",
    "Gate",
    "GateLogger",
    "HardConcreteGate",
    "NoGatesError",
    "NotSparsifiedError",
    "PlanMismatchError",
    "Policy",
    "PolicyError",
    "compact",
    "distill",
    "explain",
    "export",
    "gates",
    "load",
    "load_gated_state",
    "load_policy",
    "penalty",
    "prune",
    "pruning",
    "report",
    "save",
    "sparsify",
    "summary",
    "training",
]
