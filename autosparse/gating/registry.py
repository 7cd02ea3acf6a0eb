"""``gate.kind`` in a policy -> the gate class that implements it: one table, validated on registration.

Example:
    >>> gate_class("ds").__name__
    'Gate'
"""

from __future__ import annotations

from autosparse.errors import RegistryError
from autosparse.gating.gate import Gate
from autosparse.gating.hard_concrete import HardConcreteGate

GATE_CLASSES: dict[str, type[Gate]] = {}


def register_gate(kind: str, cls: type[Gate]) -> None:
    """Make ``gate: {kind: <kind>}`` build ``cls`` (a :class:`Gate` subclass with its constructor)."""
    if not (isinstance(cls, type) and issubclass(cls, Gate)):
        raise RegistryError(f"gate kind {kind!r}: {cls!r} is not a subclass of autosparse.gating.Gate")
    if kind in GATE_CLASSES and GATE_CLASSES[kind] is not cls:
        raise RegistryError(f"gate kind {kind!r} is already registered to {GATE_CLASSES[kind].__name__}")
    GATE_CLASSES[kind] = cls


def gate_class(kind: str) -> type[Gate]:
    """The class registered for ``kind`` (the policy has already checked the name)."""
    try:
        return GATE_CLASSES[kind]
    except KeyError:
        raise RegistryError(f"no gate class for kind {kind!r}; known: {sorted(GATE_CLASSES)}") from None


register_gate("ds", Gate)
register_gate("hard_concrete", HardConcreteGate)
