"""Compaction: remove zeroed units physically, fold the gate values into the weights, verify.

* :mod:`~autosparse.compaction.compact`: the orchestration and the :class:`Record` of what was removed;
* :mod:`~autosparse.compaction.record`: the :class:`Record` and its accessors :func:`record_of` and
  :func:`require_record`;
* :mod:`~autosparse.compaction.layer_gates`: residual branches and layers removed by layer gates;
* :mod:`~autosparse.compaction.replay`: the record replayed on a freshly built base model (``load``);
* :mod:`~autosparse.compaction.hf_config`: a Hugging Face config rewritten to the compacted widths.
"""

from __future__ import annotations

from autosparse.compaction.compact import compact_model, removed_branches, removed_units
from autosparse.compaction.record import Record, attach_record, record_of, require_record

__all__ = ["Record", "attach_record", "compact_model", "record_of", "removed_branches", "removed_units",
           "require_record"]
