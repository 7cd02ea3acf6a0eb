"""The typed error hierarchy of autosparse.

Every error subclasses :class:`AutosparseError` *and* the built-in exception that fits
(``ValueError`` for bad input, ``RuntimeError`` for failures while working on a model,
``NotImplementedError`` for constructs autosparse does not support), so callers can catch either.
Messages name the key, module or node at fault and say what to change.
"""

from __future__ import annotations

import warnings


class AutosparseError(Exception):
    """Base class of every error raised by autosparse."""


class PolicyError(AutosparseError, ValueError):
    """A policy (YAML file, dict or object) is malformed: the message names the key path and the fix."""


class ArgumentError(AutosparseError, ValueError):
    """A keyword argument of a public function is out of range or of the wrong type."""


class ExampleInputsError(AutosparseError, ValueError):
    """``example_inputs`` are missing or do not fit the model."""


class CaptureError(AutosparseError, RuntimeError):
    """The model's graph could not be captured with torch.fx nor torch.export."""


class NoGatesError(AutosparseError, ValueError):
    """The policy selected no prunable group in the model, so there is nothing to gate."""


class NotSparsifiedError(AutosparseError, ValueError):
    """An operation that needs gates (``penalty``, ``compact``, ...) was given a model without any."""


class AlreadySparsifiedError(AutosparseError, ValueError):
    """``sparsify`` was given a model that already carries gates."""


class CompactionError(AutosparseError, RuntimeError):
    """Physical removal of zeroed units failed; the input model is left unchanged."""


class EquivalenceError(CompactionError):
    """The compacted model does not compute what the gated model computed (``verify=True``)."""


class RegistryError(AutosparseError, ValueError):
    """An op rule given to the registry is malformed (wrong key or handler)."""


class ModelTypeError(AutosparseError, TypeError):
    """What was passed as the model is not a ``torch.nn.Module``."""


class PlanMismatchError(AutosparseError, ValueError):
    """A saved plan does not fit the base model it is replayed on, or a directory is not an autosparse save."""


class ExportError(AutosparseError, RuntimeError):
    """Export to torch.export or ONNX failed, or was asked for a still-gated model."""


class NotMaterializedError(AutosparseError, RuntimeError):
    """A gated model still on the meta device (no values) was asked for something that needs values:
    gate values, the penalty, a training step. ``autosparse.io.materialize(net, state_dict)`` first."""


class AutosparseWarning(UserWarning):
    """Legal but suspicious input, e.g. a policy rule or exclude pattern that matched nothing."""


def warn(message: str) -> None:
    """Emit an :class:`AutosparseWarning` attributed to the caller of the public API."""
    warnings.warn(message, AutosparseWarning, stacklevel=3)
