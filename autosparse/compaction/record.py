"""The record of a compaction: what was removed, kept on the compacted model, replayable by ``load``.

One accessor for it (:func:`record_of`) so no module reads the attribute by name.

Example:
    >>> small = autosparse.compact(net)
    >>> record_of(small).groups["conv1"]
    {'before': 64, 'after': 21}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from autosparse.errors import NotSparsifiedError

RECORD_ATTR = "_autosparse_record"


@dataclass
class Record:
    """What a compaction removed: per tensor and dim, the kept positions. Replayable with ``load``."""

    kept: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # tensor -> {dim: positions}
    groups: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> {before, after}
    replaced: list[str] = field(default_factory=list)  # residual branches replaced by ZeroBranch
    dropped_layers: list[str] = field(default_factory=list)  # ModuleList entries removed whole
    config_changes: dict[str, int] = field(default_factory=dict)  # Hugging Face config keys rewritten
    base_config: dict | None = None  # the Hugging Face config before compaction (to rebuild the base)
    base_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor shapes of the base model (fit check)


def record_of(model: nn.Module) -> Record | None:
    """The :class:`Record` of the compaction (or load) that produced ``model``; None for any other model."""
    record = model.__dict__.get(RECORD_ATTR)
    return record if isinstance(record, Record) else None


def require_record(model: nn.Module) -> Record:
    """The :class:`Record` of ``model``, which must come from ``compact`` or ``load``.

    Raises:
        NotSparsifiedError: ``model`` has no compaction record (it was not compacted by autosparse).
    """
    record = record_of(model)
    if record is None:
        raise NotSparsifiedError(f"{type(model).__name__} has no compaction record; expected a model returned by "
                                 "autosparse.compact() or autosparse.load()")
    return record


def attach_record(model: nn.Module, record: Record) -> None:
    """Keep ``record`` on ``model`` as a plain attribute (not a submodule or buffer: no state_dict entry)."""
    model.__dict__[RECORD_ATTR] = record
